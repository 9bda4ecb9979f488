"""Each real-world case, traced live, gets its cause.

The scenarios' own workloads (closewait_trace.workloads.scenarios: servers and clients in
child processes) run one after the other under one tracer started for the module, the way a
tracer already running on a server meets each case; the tests read its JSON records for each
scenario's ports. One tracer start instead of one per scenario: starting is most of a test's
time under the VM matrix's emulation. The demo command itself is test_demo.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from closewait_trace.workloads.scenarios import SCENARIOS, ScenarioRun

from .harness import Record, Tracer, conns, on_port, stopped_cleanly, verdict_text

pytestmark = pytest.mark.kernel

THRESHOLD = 1.0
#: Under the VM matrix's software emulation every child Python process takes seconds to
#: start: scenarios run longer there (the runner sets CLOSEWAIT_VM=1 in its guests).
TIME_SCALE = 4.0 if os.environ.get("CLOSEWAIT_VM") == "1" else 1.0


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracer() -> Iterator[Tracer]:
    """The live tracer every scenario of the module runs under (default accept watch)."""
    t = Tracer(["--threshold", f"{THRESHOLD}s", "--report-min", "200ms"]).start()
    try:
        yield t
    finally:
        rc = t.stop()
    stopped_cleanly(t, rc)


@dataclass
class Run:
    """One scenario's run under the shared tracer: its processes and what the tracer said
    while they ran."""

    roles: dict[str, tuple[int, int | None]]  # label -> (pid, port or None)
    records: list[Record]


#: After what a test waits for has come: long enough for one more leak to cross the threshold
#: and be printed at the next tick, so that what should not come has had its chance. That is
#: the tracer's clock, not a child's start-up: under emulation twice, not TIME_SCALE times.
SETTLE = (THRESHOLD + 1.0) * min(TIME_SCALE, 2.0)


def run_scenario(tracer: Tracer, name: str, limit: float,
                 until: Callable[[Run], bool]) -> Run:
    """Start scenario ``name``'s servers and clients, run it until ``until`` holds (at most
    ``limit`` seconds, scaled under emulation), then SETTLE more, and stop its processes; the
    records are those printed meanwhile."""
    run = ScenarioRun(SCENARIOS[name])
    start = len(tracer.records)
    try:
        run.start_servers()
        run.start_clients()
        roles = {label: (pid, run.ports.get(label)) for label, pid in run.pids().items()}
        deadline = time.monotonic() + limit * TIME_SCALE
        while time.monotonic() < deadline and not until(Run(roles, tracer.records[start:])):
            time.sleep(0.2)
        time.sleep(SETTLE)
        records = tracer.records[start:]
    finally:
        run.stop()
    return Run(roles, records)


def leaks_at_least(n: int, role: str = "server", side: str = "local") -> Callable[[Run], bool]:
    """Until ``n`` sockets on ``role``'s port (its ``side`` of the connection) were flagged."""
    return lambda r: len(conns(r.records, "leak", on_port(r.roles[role][1], side))) >= n


# --- one test per scenario ------------------------------------------------------------------


def test_fd_limit_queue_full_of_never_accepted_with_emfile(tracer: Tracer) -> None:
    params = SCENARIOS["fd-limit"].params
    backlog = int(params["backlog"])
    nofile = int(params["nofile"])
    t = run_scenario(tracer, "fd-limit", 7, leaks_at_least(backlog + 1))
    pid, port = t.roles["server"]
    leaks = conns(t.records, "leak", on_port(port))
    never = [c for c in leaks if c["accepted"] == "no"]
    # The accept queue holds backlog+1 connections; the other clients' SYNs were dropped.
    assert len(never) == backlog + 1, [verdict_text(c) for c in leaks]
    assert len(leaks) == len(never)
    for c in never:
        assert c["pid"] == pid
        assert c["inode"] == 0
        v = c["verdict"]
        assert v["cause"] == "accept-failing", verdict_text(c)
        ev = " | ".join(v["evidence"])
        assert "EMFILE" in ev, ev
        assert f"open files {nofile}/{nofile}" in ev, ev
        assert f"accept queue {backlog + 1}/{backlog}" in ev, ev
        assert "full" in ev, ev
    # Nothing leaves while the server runs: the queue stays full.
    assert conns(t.records, "close", on_port(port)) == []


def test_forgotten_close_is_accepted_not_closed_after_reading_eof(tracer: Tracer) -> None:
    n = int(SCENARIOS["forgotten-close"].params["connections"])
    t = run_scenario(tracer, "forgotten-close", 6, leaks_at_least(n))
    pid, port = t.roles["server"]
    leaks = conns(t.records, "leak", on_port(port))
    assert len(leaks) == n, [verdict_text(c) for c in leaks]
    for c in leaks:
        assert c["pid"] == pid
        assert c["accepted"] == "yes"
        assert c["inode"]
        v = c["verdict"]
        assert v["cause"] == "accepted-not-closed", verdict_text(c)
        assert any("its FIN included (Recv-Q 0)" in e for e in v["evidence"]), verdict_text(c)
    assert conns(t.records, "close", on_port(port)) == []


def test_et_accept_loop_leaves_the_burst_in_the_queue(tracer: Tracer) -> None:
    params = SCENARIOS["et-accept"].params
    stuck = int(params["burst"]) - int(params["limit"])
    t = run_scenario(tracer, "et-accept", 6, leaks_at_least(stuck))
    pid, port = t.roles["server"]
    leaks = conns(t.records, "leak", on_port(port))
    never = [c for c in leaks if c["accepted"] == "no"]
    # One edge for the whole burst: the holder was accepted, the next one accepted and closed
    # (over the limit), and the rest never.
    assert len(never) == stuck, [verdict_text(c) for c in leaks]
    assert len(leaks) == len(never)
    for c in never:
        assert c["pid"] == pid
        assert c["inode"] == 0
        v = c["verdict"]
        assert v["cause"] == "et-accept-loop", verdict_text(c)
        assert any("epoll" in e.lower() for e in v["evidence"]), verdict_text(c)
    # The clients close what the server closes or resets: nothing leaks on their side.
    assert conns(t.records, "leak", on_port(port, "remote")) == []


def test_slow_handler_is_closed_late_with_its_close_wait_time(tracer: Tracer) -> None:
    params = SCENARIOS["slow-handler"].params
    # The handler sleeps `delay` from accept; the client gave up `patience` after connecting.
    expected = params["delay"] - params["patience"]
    t = run_scenario(tracer, "slow-handler", 6, lambda r: bool(conns(
        r.records, "close", lambda c: on_port(r.roles["server"][1])(c) and c["flagged"])))
    pid, port = t.roles["server"]
    closes = conns(t.records, "close", lambda c: on_port(port)(c) and c["flagged"])
    assert closes, [verdict_text(c) for c in conns(t.records, "leak", on_port(port))]
    for c in closes:
        assert c["exit"] == "app-close", c
        assert c["closer_pid"] == pid
        assert c["accepted"] == "yes" and c["accepted_after_fin"] is False
        assert abs(c["cw_age_s"] - expected) <= 0.15, (c["cw_age_s"], expected)
        assert c["verdict"]["cause"] == "closed-late", verdict_text(c)
    # Flagged first (it was still open then), closed afterwards.
    flagged_ids = {c["id"] for c in conns(t.records, "leak", on_port(port))}
    assert {c["id"] for c in closes} <= flagged_ids


def test_client_pool_is_outbound_not_closed_on_the_pool_process(tracer: Tracer) -> None:
    pool_size = int(SCENARIOS["client-pool"].params["pool"])
    t = run_scenario(tracer, "client-pool", 5, leaks_at_least(pool_size, side="remote"))
    _, port = t.roles["server"]
    pool_pid, _ = t.roles["pool"]
    leaks = conns(t.records, "leak", on_port(port, "remote"))
    assert len(leaks) == pool_size, [verdict_text(c) for c in leaks]
    for c in leaks:
        assert c["direction"] == "outbound"
        assert c["pid"] == pool_pid
        assert c["verdict"]["cause"] == "outbound-not-closed", verdict_text(c)
    # The server closed first: nothing of it stays in CLOSE_WAIT.
    assert conns(t.records, "leak", on_port(port)) == []


def test_mixed_scenario_gets_every_cause_it_stands_for(tracer: Tracer) -> None:
    expected = set(SCENARIOS["mixed"].expected)
    t = run_scenario(tracer, "mixed", 6, lambda r: expected <= causes_of(r))
    assert expected <= causes_of(t), causes_of(t)


def causes_of(run: Run) -> set[str]:
    return {c["verdict"]["cause"] for c in conns(run.records, "leak") if c["verdict"]}
