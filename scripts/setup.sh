#!/usr/bin/env bash
# Idempotent set-up on Debian/Ubuntu: distro packages (BCC, kernel headers, tools), then a
# virtual environment that sees the distro's bcc module, with the package installed in it.
#
#   scripts/setup.sh [--dev] [--vm] [--vm-extra] [--bench]
#     --dev    test tools (pytest, hypothesis, mypy, kubernetes-validate) into the venv, nginx
#              and wrk (the tests run the benchmarks' short versions), and the deployment
#              tools (prometheus/promtool, podman, runc, debootstrap, debhelper)
#     --vm     what the kernel x backend VM matrix needs (QEMU, Debian kernels, virtme-ng)
#     --vm-extra  Debian 11's 5.10 and Debian 12's PREEMPT_RT kernels unpacked into a cache
#              (scripts/vm-kernels.sh: not installed, the host's package set stays as it is)
#     --bench  what the overhead benchmark needs (nginx, wrk)
# Safe to run again: it installs only what is missing. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0 vm=0 vm_extra=0 bench=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --vm) vm=1 ;;
    --vm-extra) vm_extra=1 ;;
    --bench) bench=1 ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- distro packages --------------------------------------------------------------------------
. /etc/os-release
pkgs=(python3 python3-venv python3-bpfcc bpfcc-tools iproute2 bpftool)
case "${ID:-}" in
  debian)
    if ! ls -d /usr/src/linux-headers-*-common >/dev/null 2>&1 && [ ! -e "/lib/modules/$(uname -r)/build" ]; then
      pkgs+=(linux-headers-amd64)
    fi ;;
  ubuntu)
    if [ ! -e "/lib/modules/$(uname -r)/build" ]; then
      if apt-cache show "linux-headers-$(uname -r)" >/dev/null 2>&1; then
        pkgs+=("linux-headers-$(uname -r)")
      else
        pkgs+=(linux-headers-generic)
      fi
    fi ;;
  *) echo "setup: ${PRETTY_NAME:-this system} is not Debian or Ubuntu; install BCC (python3 bindings), bpftool and kernel headers yourself" >&2 ;;
esac
# The VM matrix: QEMU (TCG), Debian's 6.1 and 6.12 kernels, a static busybox for virtme-ng's
# initramfs (Debian builds 9p and virtio as modules), pytest for the guests' selftest, and
# Vagrant to validate vagrant/Vagrantfile. Debian's 6.12 headers too: BCC 0.26 cannot compile
# against them, so the 6.12 guests go through the tracer's header fallback as a user would.
[ "$vm" = 1 ] && pkgs+=(qemu-system-x86 linux-image-amd64 linux-image-6.12-amd64 linux-headers-6.12-amd64 busybox-static python3-pytest vagrant)
{ [ "$bench" = 1 ] || [ "$dev" = 1 ]; } && pkgs+=(nginx-light wrk)
# Fleet deployment (deploy/, docs/deploy.md): promtool and a real Prometheus for the rules and
# the end-to-end test, systemd-analyze for the unit, podman + runc + debootstrap for the image
# (no registry here: the base is built from Debian's packages), dpkg-dev + debhelper for the .deb.
[ "$dev" = 1 ] && pkgs+=(prometheus systemd podman runc debootstrap dpkg-dev debhelper)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- virtual environment ------------------------------------------------------------------------
# The distro's python3 (the one python3-bpfcc is built for) without the system's site-packages:
# the venv sees Debian's bcc module alone, through a directory holding one link to it named by
# a .pth file. With --system-site-packages every Python process would also run the .pth hooks
# of the machine's dist-packages (measured in the VM guests: 1.2 s a process under emulation).
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ] || grep -qs "include-system-site-packages = true" .venv/pyvenv.cfg \
    || ! grep -qsx "home = $(dirname "$PY")" .venv/pyvenv.cfg; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
link_distro_bcc() {
  local bcc_dir purelib
  if ! bcc_dir="$("$PY" -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null)"; then
    echo "setup: $PY cannot import bcc: install python3-bpfcc (Debian/Ubuntu)" >&2
    return 0
  fi
  purelib="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  mkdir -p .venv/distro
  ln -sfn "$bcc_dir" .venv/distro/bcc
  echo "$PWD/.venv/distro" > "$purelib/closewait-distro-bcc.pth"
}
.venv/bin/python -c 'import bcc' >/dev/null 2>&1 || link_distro_bcc
stamp=.venv/.closewait-setup
want="$(cat pyproject.toml | sha1sum | cut -c1-12)-dev$dev-vm$vm"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  extras=""
  [ "$dev" = 1 ] && extras="[test]"
  .venv/bin/python -m pip install -q -e ".$extras"
  [ "$vm" = 1 ] && .venv/bin/python -m pip install -q "virtme-ng==1.42"
  echo "$want" > "$stamp"
fi
[ "$vm_extra" = 1 ] && $SUDO scripts/vm-kernels.sh
echo "setup: ready (.venv/bin/closewait-trace)"
