"""`closewait-trace demo`: the built-in workloads end to end (the tracer starts before the
servers listen, the notices say the scenario and name its processes, the children stop with
the demo however it ends). What each scenario is diagnosed as is test_scenarios.py's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from closewait_trace.workloads.scenarios import SCENARIOS

from .harness import PREEMPT_RT, Tracer, conns, on_port, summary_of, verdict_text

pytestmark = pytest.mark.kernel

THRESHOLD = 1.0
#: Under the VM matrix's software emulation every child Python process takes seconds to
#: start: the demo runs longer there (the runner sets CLOSEWAIT_VM=1 in its guests).
TIME_SCALE = 4.0 if os.environ.get("CLOSEWAIT_VM") == "1" else 1.0


def run_demo(args: list[str], duration: float, scale: float = TIME_SCALE) -> Tracer:
    """Run `demo ARGS --duration ... --threshold 1s` to its end; return the tracer."""
    duration *= scale
    t = Tracer([*args, "--duration", f"{duration}s", "--threshold", f"{THRESHOLD}s"],
               command="demo").start()
    try:
        t.wait_for(lambda r: r["type"] == "summary", duration + 30, what="summary")
    finally:
        rc = t.stop()
    assert rc == 0, "".join(t.stderr_lines)
    summary = summary_of(t.records)
    assert summary["events_lost"] == 0, {k: v for k, v in summary["lost"].items() if v}
    assert roles_gone(t), f"demo children left running: {roles(t)} {_demo_children(t)}"
    return t


def roles(t: Tracer) -> dict[str, tuple[int, int | None]]:
    """The demo's processes from its notice: label -> (pid, port or None)."""
    msg = next(r["message"] for r in t.records
               if r["type"] == "notice" and r["message"].startswith("demo: "))
    out: dict[str, tuple[int, int | None]] = {}
    for part in msg[len("demo: "):].split(", "):
        m = re.fullmatch(r"(\S+) pid (\d+)(?: port (\d+|-))?", part)
        assert m, part
        port = m.group(3)
        out[m.group(1)] = (int(m.group(2)), int(port) if port and port != "-" else None)
    return out


def roles_gone(t: Tracer, timeout: float = 5.0) -> bool:
    """Whether every child of the demo has gone: those its notice names, and any process
    started by it (demo children carry CLOSEWAIT_DEMO_PARENT=<its pid>)."""
    pids = [pid for pid, _ in roles(t).values()]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids) and not _demo_children(t):
            return True
        time.sleep(0.1)
    return False


def _demo_children(t: Tracer) -> list[int]:
    assert t.proc is not None
    mark = f"CLOSEWAIT_DEMO_PARENT={t.proc.pid}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if mark in env and _alive(int(entry)):
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_large_backlog_connections_are_drained_late() -> None:
    """`demo --scenario` end to end: the tracer starts before the servers listen, says the
    scenario and names its processes, and stops them at the end. Telling a late accept needs
    accept() seen from the start: the tracepoint backend's accept tracepoints attach on demand
    otherwise, possibly after the first late accepts."""
    # The children start up while the tracer compiles: half the usual scale is enough.
    t = run_demo(["--scenario", "large-backlog", "--accept-watch", "always"], 7,
                 scale=max(1.0, TIME_SCALE / 2))
    notices = [r["message"] for r in t.records if r["type"] == "notice"]
    assert notices and notices[0].startswith("scenario large-backlog: "), notices
    assert "seed" not in notices[0]  # what happens, not our catalogue numbers
    assert set(roles(t)) == {"server", "clients"}
    pid, port = roles(t)["server"]
    drained = [c for c in conns(t.records, "close", on_port(port))
               if c["verdict"] and c["verdict"]["cause"] == "drained-late"]
    assert drained, [verdict_text(c) for c in conns(t.records, "close", on_port(port))
                     if c["verdict"]]
    summary = summary_of(t.records)
    for c in drained:
        # A late close of a connection accepted after its peer's FIN.
        why = (f"{json.dumps(c)}; accepts seen {summary['accepts_seen']},"
               f" unmatched {summary['accepts_unmatched']}")
        assert c["exit"] == "app-close", why
        assert c["closer_pid"] == pid, why
        assert c["accepted"] == "yes", why
        assert c["accepted_after_fin"] is True, why
        # Certain once it crossed the threshold while it waited; likely below it.
        assert c["verdict"]["confidence"] == ("certain" if c["flagged"] else "likely"), why
        if PREEMPT_RT and "accept_after_fin_s" not in c:
            # The kernel skipped the accept program's run (PREEMPT_RT preempts a task inside a
            # program; 6.1 counts no skip of a syscall tracepoint's): the accept after the FIN
            # is known from the socket's inode, its time is not.
            continue
        assert c["accept_after_fin_s"] >= 0, why
        assert any("accept queue" in e for e in c["verdict"]["evidence"]), why


@pytest.mark.host_only  # the CLI's notice; the mixed scenario covers the kernel side
def test_plain_demo_prints_no_scenario_notice() -> None:
    t = run_demo([], 5)
    notices = [r["message"] for r in t.records if r["type"] == "notice"]
    assert notices[0].startswith("demo: never-accept pid "), notices
    assert set(roles(t)) == {"never-accept", "no-close", "healthy", "idle-closer", "clients",
                             "pool"}
    causes = {c["verdict"]["cause"] for c in conns(t.records, "leak") if c["verdict"]}
    assert {"never-accepted", "accepted-not-closed", "outbound-not-closed"} <= causes, causes


# --- listing and clean-up -------------------------------------------------------------------


@pytest.mark.per_kernel  # no BPF
def test_list_scenarios() -> None:
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "demo", "--list-scenarios"],
                         check=True, capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == list(SCENARIOS)
    assert {"fd-limit", "forgotten-close", "et-accept", "slow-handler", "large-backlog",
            "client-pool", "mixed"} == set(names)


@pytest.mark.host_only  # process management, the same on every kernel
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_demo_and_its_children(sig: int) -> None:
    t = Tracer(["--scenario", "forgotten-close", "--duration", "60s", "--threshold", "1s"],
               command="demo").start()
    try:
        port = roles(t)["server"][1]
        t.wait_for(lambda r: r["type"] == "leak" and on_port(port or 0)(r["connection"]), 10,
                   what="a leak")
        # The check below sees the children while they run.
        assert set(_demo_children(t)) == {pid for pid, _ in roles(t).values()}
    finally:
        rc = t.stop(sig)
    assert rc == 0, "".join(t.stderr_lines)
    assert any(r["type"] == "summary" for r in t.records)
    assert roles_gone(t), f"demo children left running: {roles(t)}"


@pytest.mark.per_kernel  # it fails before the compile
def test_error_after_start_stops_the_children(tmp_path: Any) -> None:
    missing = tmp_path / "no-such-headers"
    t = Tracer(["--scenario", "client-pool", "--kernel-headers", str(missing)], command="demo")
    with pytest.raises(AssertionError, match="tracer ready"):
        t.start()  # it fails before it is ready
    rc = t.stop()
    assert rc != 0
    assert any("no such directory" in line for line in t.stderr_lines), t.stderr_lines
    assert roles_gone(t), f"demo children left running: {roles(t)}"
    for pid, _ in roles(t).values():
        assert not os.path.exists(f"/proc/{pid}") or not _alive(pid)
