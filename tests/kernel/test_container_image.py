"""The container image, built here (debootstrap base + podman build) and run the way these
machines allow: the agent in a container with the host's PID and network namespaces and only
CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE, tracing a leak made by another container."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .agentproc import free_port, http_get
from .test_metrics import _value

pytestmark = [pytest.mark.kernel, pytest.mark.host_only]

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/closewait-trace:test"
PODMAN = ["podman", "--runtime", "/usr/sbin/runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
#: The smallest set proven here: host PID namespace (owners), host network namespace (sock_diag
#: answers for its own), three capabilities, no seccomp filter (podman's default profile allows
#: bpf() and perf_event_open() only with CAP_SYS_ADMIN), tracefs, and a writable header cache on
#: a read-only root (podman's --read-only puts a tmpfs on /tmp by itself).
AGENT_FLAGS = ["--pid", "host", "--network", "host", "--cap-drop", "ALL",
               "--cap-add", "BPF,PERFMON,SYS_PTRACE", "--security-opt", "seccomp=unconfined",
               "-v", "/sys/kernel/debug:/sys/kernel/debug", "--read-only"]
#: A server that never accepts, and three clients that connect and close, in one process.
LEAKER = """
import socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
for _ in range(3):
    socket.create_connection(srv.getsockname()).close()
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    for tool in ("podman", "debootstrap", "/usr/sbin/runc"):
        if shutil.which(tool) is None:
            from tests.conftest import kernel_skip

            kernel_skip(f"{tool} is missing (scripts/setup.sh --dev)")
    t0 = time.monotonic()
    build = subprocess.run([str(ROOT / "deploy" / "container" / "build.sh"), TAG],
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-3000:]
    print(f"\nimage build: {time.monotonic() - t0:.1f}s")
    yield TAG


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def _rm(*names: str) -> None:
    for name in names:
        _podman("rm", "-f", "-t", "5", name)


def test_agent_in_a_container_flags_a_leak_in_another(image: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    agent, leaker, cache = f"cw-agent-{run}", f"cw-leaker-{run}", f"cw-cache-{run}"
    port = free_port()
    try:
        started = _podman("run", "-d", "--name", agent, *LIMITS, *AGENT_FLAGS,
                          "-v", f"{cache}:/var/cache/closewait-trace",
                          "-e", f"CLOSEWAIT_METRICS=127.0.0.1:{port}",
                          "-e", "CLOSEWAIT_THRESHOLD=1s", "-e", "CLOSEWAIT_NODE_NAME=podman-node",
                          image, "agent")
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 240
        while http_get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
            assert time.monotonic() < deadline, _podman("logs", agent).stderr[-3000:]
            assert _podman("inspect", "-f", "{{.State.Running}}", agent).stdout.strip() == \
                "true", _podman("logs", agent).stdout[-2000:] + _podman("logs", agent).stderr
            time.sleep(0.5)
        made = _podman("run", "-d", "--name", leaker, *LIMITS, "--network", "host",
                       "--rootfs", "/:O", "python3", "-c", LEAKER)
        assert made.returncode == 0, made.stderr
        cid = made.stdout.strip()
        assert len(cid) == 64
        deadline = time.monotonic() + 30
        lport = ""
        while not lport and time.monotonic() < deadline:
            lport = _podman("logs", leaker).stdout.strip()
            time.sleep(0.3)
        text, want = "", dict(container=cid[:12], port=lport, cause="never-accepted")
        while time.monotonic() < deadline:
            text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
            if _value(text, "closewait_leaking_sockets", **want) == 3:
                break
            time.sleep(0.5)
        assert _value(text, "closewait_leaking_sockets", **want) == 3, text
        assert _value(text, "closewait_tracer_info", node="podman-node",
                      backend="tracepoint") == 1 or "kprobe" in text
        logs = _podman("logs", agent).stdout.splitlines()
        records = [json.loads(line) for line in logs if line.startswith("{")]
        leaks = [r for r in records if r["type"] == "leak"
                 and r["connection"]["local"].endswith(f":{lport}")]
        assert len(leaks) == 3 and all(r["connection"]["verdict"]["cause"] == "never-accepted"
                                       for r in leaks)
        headers = [r["message"] for r in records if r["type"] == "notice"
                   and r["message"].startswith("using kernel headers")]
        print(f"\ncontainer {cid[:12]} leak record: {json.dumps(leaks[0])}\n{headers}")
        assert headers  # which headers the image used is said
        stop = _podman("stop", "-t", "30", agent)
        assert stop.returncode == 0
        state = _podman("inspect", "-f", "{{.State.ExitCode}}", agent).stdout.strip()
        assert state == "0"
    finally:
        _rm(agent, leaker)
        _podman("volume", "rm", "-f", cache)


def test_default_seccomp_refuses_bpf_without_sys_admin_and_says_what_to_do(image: str) -> None:
    flags = list(AGENT_FLAGS)
    i = flags.index("--security-opt")
    del flags[i:i + 2]
    cache = f"cw-cache-{uuid.uuid4().hex[:8]}"
    try:
        res = _podman("run", "--rm", *LIMITS, *flags, "-v",
                      f"{cache}:/var/cache/closewait-trace", "-e",
                      f"CLOSEWAIT_METRICS=127.0.0.1:{free_port()}", image, "agent", timeout=240)
    finally:
        _podman("volume", "rm", "-f", cache)
    lines = res.stderr.strip().splitlines()
    assert res.returncode in (69, 70) and len(lines) == 2, (res.returncode, res.stderr)
    assert "seccomp=unconfined" in lines[0] and "Operation not permitted" in lines[1]


@pytest.mark.parametrize("drop, says", [
    (["--pid", "host"], "--pid host"),
    (["--cap-add", "BPF,PERFMON,SYS_PTRACE"], "--cap-add BPF --cap-add PERFMON"),
    (["-v", "/sys/kernel/debug:/sys/kernel/debug"], "-v /sys/kernel/debug:/sys/kernel/debug"),
    (["tmp"], "--tmpfs /tmp"),
    (["cache"], "-v closewait-cache:/var/cache/closewait-trace"),
])
def test_a_missing_flag_or_mount_is_named_in_one_line(image: str, drop: list[str],
                                                       says: str) -> None:
    flags = [*AGENT_FLAGS, "-v", "cw-never-created:/var/cache/closewait-trace"]
    if drop == ["cache"]:
        flags = flags[:-2]
    elif drop == ["tmp"]:
        flags.append("--read-only-tmpfs=false")
    else:
        i = flags.index(drop[0])
        del flags[i:i + len(drop)]
    res = _podman("run", "--rm", *LIMITS, *flags, image, "agent")
    _podman("volume", "rm", "-f", "cw-never-created")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 78 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith("closewait-trace: error: ") and says in lines[0], lines[0]
