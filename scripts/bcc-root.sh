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
# changed is made again. CMD runs chrooted, in a private mount namespace (its mounts vanish
# with it), in /src (this checkout), with the host's /proc, /sys (tracefs, bpffs, BTF), /dev,
# kernel headers (/usr/src and /lib/modules, read-only) and the tracer's header cache.
# The CA certificates this machine trusts locally are trusted in the root too (PyPI through a
# proxy). Needs root. Environment: CLOSEWAIT_CACHE, DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)

suite=trixie
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "bcc-root: unknown option $1 (usage: $0 [--suite SUITE] -- CMD...)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "bcc-root: no command (usage: $0 [--suite SUITE] -- CMD...)" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "bcc-root: needs root (debootstrap, chroot, mounts)" >&2; exit 77; }
for tool in debootstrap unshare chroot; do
  command -v "$tool" >/dev/null || { echo "bcc-root: $tool is missing (scripts/setup.sh --dev)" >&2; exit 69; }
done

cache=${CLOSEWAIT_CACHE:-/var/cache/closewait-trace}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$cache/roots/$suite
packages=python3-bpfcc,python3-venv,python3-yaml,bpftool,iproute2,procps,ca-certificates

# What the venv gets: the project's dependencies and the test tools the kernel tests import.
pip_wants() {
  python3 - "$src/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
tests = [r for r in project["optional-dependencies"]["test"]
         if re.match(r"(pytest|hypothesis)\b", r)]
print(" ".join(project["dependencies"] + tests))
EOF
}

make_root() {
  local tmp want=$1
  mkdir -p "$cache/roots"
  rm -rf "$root" "$root".new.*
  tmp=$(mktemp -d "$root.new.XXXXXX")
  chmod 755 "$tmp"  # a root directory anyone may enter (the tests drop privileges)
  echo "bcc-root: debootstrap $suite (once; kept in $root)" >&2
  debootstrap --variant=minbase --include="$packages" "$suite" "$tmp" "$mirror" \
    >"$cache/roots/$suite.log" 2>&1 || { tail -5 "$cache/roots/$suite.log" >&2; exit 1; }
  cp /usr/local/share/ca-certificates/*.crt "$tmp/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp /etc/resolv.conf "$tmp/etc/resolv.conf"
  chroot "$tmp" update-ca-certificates >/dev/null 2>&1
  chroot "$tmp" python3 -m venv --system-site-packages /opt/venv
  # shellcheck disable=SC2046
  chroot "$tmp" /opt/venv/bin/pip install -q --no-warn-script-location $(pip_wants) \
    >>"$cache/roots/$suite.log" 2>&1 || { tail -5 "$cache/roots/$suite.log" >&2; exit 1; }
  rm -rf "$tmp"/var/cache/apt/archives/*.deb
  echo "$want" > "$tmp/.closewait-root"
  mv "$tmp" "$root"
}

want="$suite $packages $(pip_wants)"
if [ "$(cat "$root/.closewait-root" 2>/dev/null)" != "$want" ]; then
  make_root "$want"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"

# Inside a private mount namespace: the host's kernel-facing trees, then chroot.
inside='
set -eu
root=$1 src=$2 cache=$3; shift 3
mount --bind "$root" "$root"  # "/" a mount point in the chroot, as `ip netns` needs
mount --rbind /proc "$root/proc"; mount --rbind /sys "$root/sys"; mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"; mount -t tmpfs tmpfs "$root/run"
mkdir -p "$root/src" "$root/var/cache/closewait-trace"
mount --bind "$src" "$root/src"
mount --bind "$cache" "$root/var/cache/closewait-trace"
for d in /usr/src /lib/modules; do
  [ -d "$d" ] || continue
  mkdir -p "$root$d"; mount --bind -o ro "$d" "$root$d"
done
exec chroot "$root" /usr/bin/env -C /src PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  PYTHONPATH=/src PYTHONDONTWRITEBYTECODE=1 "$@"
'
exec unshare --mount --propagation private sh -c "$inside" bcc-root "$root" "$src" "$cache" "$@"
