"""The Debian package: built with Debian's tools, installed with apt into a clean Debian 12
root made by debootstrap, where `closewait-trace doctor` and a short leak trace run."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from .harness import Server

pytestmark = [pytest.mark.kernel, pytest.mark.host_only]

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/closewait-trace/container")
TARBALL = CACHE / "debian-bookworm-minbase.tar"
#: Run a command chrooted in ROOT, in a private mount namespace (its mounts vanish with it):
#: the host's /proc, /sys (with tracefs), /dev, DNS, and its kernel headers read-only.
CHROOT = r"""
set -eu
root=$1; shift
mount --rbind /proc "$root/proc"; mount --rbind /sys "$root/sys"; mount --rbind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"
for d in /usr/src /lib/modules; do
  [ -d "$d" ] || continue
  mkdir -p "$root/host$d"; mount --bind -o ro "$d" "$root/host$d"
done
exec chroot "$root" "$@"
"""


def _tools() -> None:
    for tool in ("dpkg-buildpackage", "dh", "debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            from tests.conftest import kernel_skip

            kernel_skip(f"{tool} is missing (scripts/setup.sh --dev)")


def _in_root(root: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           CHROOT, "chroot-sh", str(root), *cmd],
                          capture_output=True, text=True, timeout=timeout)


def _debian_root(dest: Path) -> Path:
    if not TARBALL.exists():  # deploy/container/build.sh makes and caches it
        built = subprocess.run([str(ROOT / "deploy" / "container" / "build.sh"),
                                "localhost/closewait-trace:test"], capture_output=True,
                               text=True, timeout=1800)
        assert built.returncode == 0, built.stderr[-2000:]
    root = dest / "root"
    root.mkdir()
    with tarfile.open(TARBALL) as tar:
        tar.extractall(root, numeric_owner=True)  # noqa: S202 (our own tarball)
    return root


def test_deb_installs_into_clean_debian_and_traces_a_leak(tmp_path: Path) -> None:
    _tools()
    t0 = time.monotonic()
    built = subprocess.run([str(ROOT / "deploy" / "debian" / "build.sh"), str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    deb = Path(built.stdout.strip().splitlines()[-1])
    t_build = time.monotonic() - t0
    root = _debian_root(tmp_path)
    shutil.copy(deb, root / "tmp" / deb.name)
    install = _in_root(root, "sh", "-c",
                       "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y"
                       f" -qq --no-install-recommends /tmp/{deb.name}")
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    t_install = time.monotonic() - t0 - t_build
    # The host's headers, where the tracer looks for them (the clean root has none).
    link = _in_root(root, "sh", "-c", "rmdir /usr/src 2>/dev/null || rm -rf /usr/src;"
                    " ln -s /host/usr/src /usr/src")
    assert link.returncode == 0, link.stderr
    doctor = _in_root(root, "closewait-trace", "doctor", timeout=120)
    assert doctor.returncode == 0 and "tracing is possible" in doctor.stdout, \
        doctor.stdout + doctor.stderr
    assert "/usr/lib/python3/dist-packages/closewait_trace" in \
        _in_root(root, "python3", "-c", "import closewait_trace; print(closewait_trace.__file__)"
                 ).stdout

    srv = Server(accept=False, backlog=8).start()
    tracer = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", CHROOT, "chroot-sh",
         str(root), "closewait-trace", "--json", "--port", str(srv.port), "--threshold", "1s",
         "--duration", "8s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout is not None
        records = []
        for line in tracer.stdout:
            records.append(json.loads(line))
            if records[-1]["type"] == "ready":
                for c in [srv.connect() for _ in range(2)]:
                    c.close()
        assert tracer.wait(timeout=60) == 0, tracer.stderr.read() if tracer.stderr else ""
    finally:
        if tracer.poll() is None:
            tracer.terminate()
            tracer.wait(timeout=30)
        srv.stop()
    leaks = [r for r in records if r["type"] == "leak"]
    assert len(leaks) == 2, records[-5:]
    assert all(r["connection"]["verdict"]["cause"] == "never-accepted" for r in leaks)
    assert all(r["connection"]["pid"] == srv.pid for r in leaks)
    print(f"\n.deb built in {t_build:.1f}s, installed with its dependencies in"
          f" {t_install:.1f}s; doctor: {doctor.stdout.strip().splitlines()[-1]}")
