#!/usr/bin/env bash
# Run a command on this machine's kernel, but with another Debian release's BCC and Python:
# how `make test` runs the kernel tests against Debian 13's BCC (0.31) and Python 3.13.
#
#   scripts/bcc-root.sh [--suite SUITE] -- CMD [ARG...]      (default SUITE: trixie)
#
# The root is made once and kept in $CLOSEWAIT_CACHE/roots/SUITE (default cache
# /var/cache/closewait-trace): debootstrap's minbase with BCC, bpftool, iproute2 and procps
# from the suite, and a venv in /opt/venv (seeing the suite's bcc module) with the project's
# dependencies and its test tools from PyPI. A root whose package list or pyproject.toml
# changed is made again; runs take a lock, so two never make or remove a root under each other.
# CMD runs chrooted, in a private mount namespace (its mounts vanish with it), in /src (this
# checkout), with the host's /proc, /sys (tracefs, bpffs, BTF), /dev, kernel headers (/usr/src
# and /lib/modules, read-only) and the tracer's header cache, and only the CLOSEWAIT_* and CI
# variables of the caller's environment. The CA certificates this machine trusts locally are
# trusted in the root too (PyPI through a proxy). Needs root. Environment: CLOSEWAIT_CACHE,
# DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)

suite=trixie
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=${2:-}; shift 2 ;;
    --) shift; break ;;
    *) echo "bcc-root: unknown option $1 (usage: $0 [--suite SUITE] -- CMD...)" >&2; exit 2 ;;
  esac
done
case "$suite" in
  ''|*[!a-z0-9-]*) echo "bcc-root: '$suite' is not a Debian suite name" >&2; exit 2 ;;
esac
[ $# -gt 0 ] || { echo "bcc-root: no command (usage: $0 [--suite SUITE] -- CMD...)" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "bcc-root: needs root (debootstrap, chroot, mounts)" >&2; exit 77; }
for tool in debootstrap unshare chroot flock python3; do
  command -v "$tool" >/dev/null || { echo "bcc-root: $tool is missing (scripts/setup.sh --dev)" >&2; exit 69; }
done

cache=${CLOSEWAIT_CACHE:-/var/cache/closewait-trace}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$cache/roots/$suite
log=$cache/roots/$suite.log
packages=python3-bpfcc,python3-venv,python3-yaml,bpftool,iproute2,procps,ca-certificates
mkdir -p "$cache/roots" "$cache/headers"

# What the venv gets: the project's dependencies and the test tools the kernel tests import.
pip_wants() {
  python3 - "$src/pyproject.toml" <<'EOF'
import re, sys
try:
    import tomllib
    project = tomllib.load(open(sys.argv[1], "rb"))["project"]
    tests = [r for r in project["optional-dependencies"]["test"]
             if re.match(r"(pytest|hypothesis)\b", r)]
except Exception as exc:  # Python before 3.11, or a pyproject.toml without them
    sys.exit(f"bcc-root: cannot read the dependencies from {sys.argv[1]}: {exc}")
print(" ".join(project["dependencies"] + tests))
EOF
}

# In a private mount namespace (debootstrap's own proc/sys mounts cannot outlive it there).
make_root() {
  local tmp want=$1
  rm -rf --one-file-system "$root" "$root".new.*
  tmp=$(mktemp -d "$root.new.XXXXXX")
  chmod 755 "$tmp"  # a root directory anyone may enter (the tests drop privileges)
  echo "bcc-root: debootstrap $suite (once; kept in $root)" >&2
  step() { "$@" >>"$log" 2>&1 || { echo "bcc-root: failed: $*" >&2; tail -5 "$log" >&2; exit 1; }; }
  : >"$log"
  step debootstrap --variant=minbase --include="$packages" "$suite" "$tmp" "$mirror"
  find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$tmp/usr/local/share/ca-certificates/" \; 2>/dev/null || true
  cp /etc/resolv.conf "$tmp/etc/resolv.conf"
  step chroot "$tmp" update-ca-certificates
  step chroot "$tmp" python3 -m venv --system-site-packages /opt/venv
  # shellcheck disable=SC2046
  step chroot "$tmp" /opt/venv/bin/pip install -q --no-warn-script-location $(pip_wants)
  rm -rf "$tmp"/var/cache/apt/archives/*.deb
  echo "$want" > "$tmp/.closewait-root"
  mv -T "$tmp" "$root"
}

exec 9>"$cache/roots/$suite.lock"
flock 9  # held until the command ends: a root in use is never made again under it
want="$suite $packages $(pip_wants)"
if [ "$(cat "$root/.closewait-root" 2>/dev/null)" != "$want" ]; then
  export -f make_root pip_wants
  export root suite mirror packages log src
  unshare --mount --propagation private bash -c 'set -euo pipefail; make_root "$1"' bcc-root "$want"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"

# The caller's CLOSEWAIT_* and CI variables, and nothing else of its environment.
keep=(PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}"
      PYTHONPATH=/src PYTHONDONTWRITEBYTECODE=1)
while IFS= read -r -d '' var; do
  case "$var" in CLOSEWAIT_*=*|CI=*) keep+=("$var") ;; esac
done < <(env -0)

# Inside a private mount namespace: the host's kernel-facing trees, then chroot.
inside='
set -eu
root=$1 src=$2 headers=$3; shift 3
mount --bind "$root" "$root"  # "/" a mount point in the chroot, as `ip netns` needs
mount --rbind /proc "$root/proc"; mount --rbind /sys "$root/sys"; mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"; mount -t tmpfs tmpfs "$root/run"
mkdir -p "$root/src" "$root/var/cache/closewait-trace/headers"
mount --bind "$src" "$root/src"
mount --bind "$headers" "$root/var/cache/closewait-trace/headers"
for d in /usr/src /lib/modules; do
  [ -d "$d" ] || continue
  mkdir -p "$root$d"; mount --bind -o ro "$d" "$root$d"
done
exec chroot "$root" /usr/bin/env -i -C /src "$@"
'
unshare --mount --propagation private sh -c "$inside" bcc-root "$root" "$src" "$cache/headers" \
  "${keep[@]}" "$@"
