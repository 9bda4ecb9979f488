"""The tracepoint backend's accept watch over a long incident, on the running kernel: the
accept syscall tracepoints are attached continuously for its first 30 s, then 2 s in every
20 s; a socket accepted while they are detached is still found accepted (by its inode); a
server whose accept() starts failing on another listener meanwhile has the watch on again at
once, and its EMFILE seen. Host only: the host is the machine whose kernel has neither
kprobes nor fentry."""

from __future__ import annotations

import os
import socket
import time

import pytest

from closewait_trace.workloads.scenarios import SCENARIOS, ScenarioRun

from .harness import Tracer, bpftool_perf_list, conns, on_port, verdict_text

pytestmark = [pytest.mark.kernel, pytest.mark.host_only]

SAMPLED_NOTICE = "accept() is now watched 2 s in every 20 s"
RENEWED_NOTICE = "accept() is watched continuously again for 30 s"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _attached(pid: int) -> int:
    """The tracer's BPF programs attached to syscall tracepoints now (bpftool perf: a
    program stays loaded once attached; what it is attached to comes and goes)."""
    return sum(1 for a in bpftool_perf_list() if a.get("pid") == pid
               and str(a.get("tracepoint", "")).startswith("sys_"))


def _fds_detached(pid: int) -> int:
    """The tracer's open fds once the accept watch is detached (waits for a window to end)."""
    while _attached(pid):
        time.sleep(0.1)
    return _fds(pid)


def _watch_states(pid: int, seconds: float) -> list[int]:
    """The tracer's syscall tracepoint attachments, every 0.25 s."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(_attached(pid))
        time.sleep(0.25)
    return out


def _another_listener_fails(tracer: Tracer, pid: int) -> None:
    """The fd-limit scenario's server (accept() failing with EMFILE) on a new listener while
    the incident is sampled: the watch is on continuously again, and its EMFILE is seen."""
    run = ScenarioRun(SCENARIOS["fd-limit"])
    start = len(tracer.records)
    try:
        run.start_servers()
        port = run.ports["server"]
        run.start_clients()
        tracer.wait_for(lambda r: r["type"] == "notice"
                        and r["message"].startswith(RENEWED_NOTICE)
                        and f"port {port}" in r["message"], 20, what="renewal")
        deadline = time.monotonic() + 5  # the notice is said once attached: a slow tick
        while not _attached(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert min(_watch_states(pid, 3)) > 0  # continuously, not 2 s in 20
        backlog = int(SCENARIOS["fd-limit"].params["backlog"])
        tracer.wait_for(lambda r: r["type"] == "leak" and on_port(port)(r["connection"])
                        and "EMFILE" in " ".join(r["connection"]["verdict"]["evidence"]),
                        20, what="EMFILE evidence")
        leaks = conns(tracer.records[start:], "leak", on_port(port))
        assert len(leaks) <= backlog + 1
        assert all(c["verdict"]["cause"] == "accept-failing" for c in leaks), \
            [verdict_text(c) for c in leaks]
    finally:
        run.stop()


def test_a_long_incident_is_sampled_and_a_late_accept_is_still_seen() -> None:
    tracer = Tracer(["--threshold", "2s", "--report-min", "200ms"]).start()
    assert tracer.proc is not None
    pid = tracer.proc.pid
    srv = socket.create_server(("127.0.0.1", 0), backlog=16)
    port = srv.getsockname()[1]
    clients = []
    try:
        ready = next(r for r in tracer.records if r["type"] == "ready")
        assert ready["backend"] == "tracepoint" and ready["accept_watch"] == "auto"
        assert _attached(pid) == 0
        for _ in range(3):  # never accepted: the incident begins
            c = socket.create_connection(("127.0.0.1", port))
            c.close()
            clients.append(c)
        tracer.wait_for(lambda r: r["type"] == "leak"
                        and r["connection"]["local"].endswith(f":{port}"), 10, what="leak")
        assert max(_watch_states(pid, 2)) > 0  # attached at once
        tracer.wait_for(lambda r: r["type"] == "notice"
                        and r["message"].startswith(SAMPLED_NOTICE), 40, what="sampling")
        fds = _fds_detached(pid)
        states = _watch_states(pid, 42)  # two periods and some
        attached = sum(1 for n in states if n) / len(states)
        assert 0.05 < attached < 0.25, states  # about 2 s in 20
        assert _fds_detached(pid) == fds  # detaching gives back what attaching took
        late, _ = srv.accept()  # accepted while the accept watch is detached
        try:
            rec = tracer.wait_for(
                lambda r: r["type"] == "update" and r["connection"]["local"].endswith(f":{port}")
                and r["connection"]["accepted"] == "yes", 10, what="late accept seen")
            assert rec["connection"]["accepted_after_fin"] is True
            assert rec["connection"]["inode"]
        finally:
            late.close()
        _another_listener_fails(tracer, pid)  # the other two still wait on srv: sampled
    finally:
        srv.close()
        rc = tracer.stop()
    assert rc == 0, "".join(tracer.stderr_lines)
