"""Stand-in guest tests: prove a tests/vm/runner.py guest boots the right kernel and runs BPF.

Run inside a guest by the runner (they skip anywhere else)::

    python3 -m tests.vm.runner --kernels 6.1,6.12 --backends none -- \\
      '/usr/bin/python3 -m pytest -c tests/vm/selftest/pytest.ini tests/vm/selftest -v --junitxml={junit}'

Uses Debian's /usr/bin/python3 (BCC 0.26 from python3-bpfcc, pytest from python3-pytest) and
the merged 6.1 header tree the runner builds on the host (CLOSEWAIT_VM_KHEADERS); BCC 0.26
cannot compile against Debian's 6.12 headers, and 6.1 headers work on both kernels for
programs that read no kernel struct layout.  Compile+load times go to
$CLOSEWAIT_VM_RESULTS/selftest-timings.txt.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import pytest

IN_VM = os.environ.get("CLOSEWAIT_VM") == "1"
pytestmark = pytest.mark.skipif(not IN_VM, reason="runs only inside a tests/vm/runner.py guest")

TCP_CLOSE_WAIT = 8


def _record_timing(name: str, seconds: float) -> None:
    print(f"{name}: {seconds:.1f}s")
    results = os.environ.get("CLOSEWAIT_VM_RESULTS")
    if results:
        with open(Path(results) / "selftest-timings.txt", "a") as f:
            f.write(f"{name} {seconds:.2f}\n")


@pytest.fixture(scope="module")
def kheaders() -> str:
    path = os.environ.get("CLOSEWAIT_VM_KHEADERS", "")
    if not path:
        # Fallback: build it here (slow over 9p in a TCG guest; the runner normally does it).
        from .. import kheaders as kh

        t = time.monotonic()
        tree = kh.merged_tree("6.1", dest_root=Path("/tmp/closewait-vm-guest-kheaders"))
        assert tree is not None, "no /usr/src/linux-headers-6.1.*-{common,amd64}"
        _record_timing("guest_kheaders_build", time.monotonic() - t)
        path = str(tree)
    assert (Path(path) / "include" / "linux" / "bpf.h").exists(), path
    assert (Path(path) / "include" / "generated").exists(), f"{path}: flavour half missing"
    return path


def _bpf(text: str, kheaders: str, name: str):  # type: ignore[no-untyped-def]
    os.environ["BCC_KERNEL_SOURCE"] = kheaders
    from bcc import BPF  # Debian's python3-bpfcc

    t = time.monotonic()
    b = BPF(text=text.encode())
    _record_timing(f"bcc_compile_load_{name}", time.monotonic() - t)
    return b


def _loopback_connections(n: int) -> None:
    """n connections on 127.0.0.1, each accepted; the client closes first (server: CLOSE_WAIT)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    for _ in range(n):
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        cli.close()
        time.sleep(0.05)  # let the FIN arrive: server side ESTABLISHED -> CLOSE_WAIT
        conn.close()
    srv.close()
    time.sleep(0.2)


def test_kernel_release() -> None:
    series = os.environ["CLOSEWAIT_VM_KERNEL"]  # "6.1", or "6.1-rt" for PREEMPT_RT
    release = platform.release()
    version, _, variant = series.partition("-")
    assert release.startswith(version + "."), f"booted {release}, expected {series}.x"
    assert (f"-{variant}-" in release) if variant else "-rt-" not in release, release
    assert release == os.environ["CLOSEWAIT_VM_RELEASE"]
    assert subprocess.check_output(["uname", "-r"], text=True).strip() == release
    _record_timing("guest_uptime_at_test", float(Path("/proc/uptime").read_text().split()[0]))


def test_guest_filesystems() -> None:
    results = Path(os.environ["CLOSEWAIT_VM_RESULTS"])
    (results / "guest-wrote-this").write_text(platform.release() + "\n")  # reaches the host
    Path("/tmp/closewait-vm-selftest").write_text("x")  # guest-only overlay
    # The repository is an overlay in the guest (runner default): writable, host unchanged.
    probe = Path.cwd() / ".vm-selftest-probe"
    probe.write_text("x")
    probe.unlink()
    # BCC 0.26 looks for tracefs under debugfs; virtme-ng-init mounts both.
    assert Path("/sys/kernel/debug/tracing/events/sock/inet_sock_set_state").is_dir()
    assert Path("/sys/kernel/btf/vmlinux").exists()


def test_bcc_tracepoint_inet_sock_set_state(kheaders: str) -> None:
    b = _bpf(
        r"""
        #include <uapi/linux/in.h>
        BPF_ARRAY(states, u64, 16);
        TRACEPOINT_PROBE(sock, inet_sock_set_state) {
            if (args->protocol != IPPROTO_TCP)
                return 0;
            int s = args->newstate;
            u64 *v = states.lookup(&s);
            if (v)
                __sync_fetch_and_add(v, 1);
            return 0;
        }
        """,
        kheaders,
        "tracepoint",
    )
    try:
        _loopback_connections(3)
        counts = {k.value: v.value for k, v in b["states"].items()}
        assert counts.get(TCP_CLOSE_WAIT, 0) >= 3, counts
    finally:
        b.cleanup()


def test_bcc_kretprobe_inet_csk_accept(kheaders: str) -> None:
    b = _bpf(
        r"""
        #include <uapi/linux/ptrace.h>
        BPF_ARRAY(accepted, u64, 1);
        int ret_accept(struct pt_regs *ctx) {
            if (PT_REGS_RC(ctx) == 0)
                return 0;
            int k = 0;
            u64 *v = accepted.lookup(&k);
            if (v)
                __sync_fetch_and_add(v, 1);
            return 0;
        }
        """,
        kheaders,
        "kretprobe",
    )
    try:
        b.attach_kretprobe(event="inet_csk_accept", fn_name="ret_accept")
        assert b.num_open_kprobes() == 1
        _loopback_connections(3)
        assert b["accepted"][0].value >= 3
    finally:
        b.cleanup()
