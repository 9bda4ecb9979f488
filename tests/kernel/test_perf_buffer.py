"""The perf buffer event path (kernels without BPF ring buffers, before 5.8), forced on this
kernel with CLOSEWAIT_FORCE_PERF_BUFFER=1: events arrive, and a full buffer's losses are
counted and shown as the ring buffer's are ("ringbuf" in the summary's lost sources)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .harness import Server, Tracer

# On the host kernel only in CI: each test starts its own tracer, 45-100 s in an emulated guest;
# the VM cells will run them once tracer starts are shared (docs: README, supported kernels).
pytestmark = [pytest.mark.kernel, pytest.mark.host_only]


@pytest.fixture
def perf_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOSEWAIT_FORCE_PERF_BUFFER", "1")  # the tracer inherits the environment


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def _summary(t: Tracer) -> dict:
    rc = t.stop()
    assert rc == 0, "".join(t.stderr_lines)
    return next(r for r in t.records if r["type"] == "summary")


def test_exit_from_close_wait_arrives_through_the_perf_buffer(
    perf_env: None, servers: list[Server]
) -> None:
    t = Tracer(["--threshold", "5s", "--report-min", "100ms"]).start()
    try:
        ready = next(r for r in t.records if r["type"] == "ready")
        assert ready["events"] == "perf buffer"
        notices = [r["message"] for r in t.records if r["type"] == "notice"]
        assert any("CLOSEWAIT_FORCE_PERF_BUFFER=1" in n and "perf buffer" in n for n in notices)
        srv = Server(accept=True, close_after=1.0).start()
        servers.append(srv)
        c = srv.connect()
        time.sleep(0.3)
        c.close()
        rec = t.wait_for(
            lambda r: r["type"] == "close" and r["connection"]["local"].endswith(f":{srv.port}"),
            10, what="close record")
        conn = rec["connection"]
        assert conn["exit"] == "app-close"
        assert abs(conn["cw_age_s"] - 1.0) <= 0.05, conn
        assert conn["closer_pid"] == srv.pid
    finally:
        summary = _summary(t)
    assert summary["events_lost"] == 0, summary["lost"]
    assert summary["complete"] is True


def test_a_full_perf_buffer_counts_its_losses(
    perf_env: None, monkeypatch: pytest.MonkeyPatch, servers: list[Server]
) -> None:
    """One page per CPU holds about twenty events; a listener closed with 300 never-accepted
    children in CLOSE_WAIT writes 300 in one system call."""
    monkeypatch.setenv("CLOSEWAIT_PERF_BUFFER_PAGES", "1")
    burst = 300
    t = Tracer(["--threshold", "30s", "--report-min", "10ms"]).start()
    try:
        srv = Server(accept=False, backlog=burst + 10).start()
        servers.append(srv)
        clients = [srv.connect() for _ in range(burst)]
        for c in clients:
            c.close()
        time.sleep(0.5)  # every child in CLOSE_WAIT for longer than --report-min
        srv.stop()  # its listener closes: the children leave CLOSE_WAIT at once
        time.sleep(1.0)
        closes = t.of_port(srv.port, "close")
    finally:
        summary = _summary(t)
    lost = summary["lost"]
    print(f"burst {burst}: {len(closes)} close records, lost {lost}")
    assert lost["ringbuf"] > 0, lost
    assert summary["events_lost"] >= lost["ringbuf"]
    assert summary["complete"] is False
    # every exit of the burst either arrived or is counted lost
    assert len(closes) < burst
    assert len(closes) + lost["ringbuf"] >= burst, (len(closes), lost)


def test_ring_buffer_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel has ring buffers (as the VM matrix's and the host's do), they are used."""
    from closewait_trace.kernel.features import ringbuf_probe

    if ringbuf_probe()[0] is not True:
        pytest.skip("this kernel has no BPF ring buffer")
    monkeypatch.delenv("CLOSEWAIT_FORCE_PERF_BUFFER", raising=False)
    t = Tracer(["--threshold", "5s"]).start()
    try:
        ready = next(r for r in t.records if r["type"] == "ready")
        notices = [r["message"] for r in t.records if r["type"] == "notice"]
    finally:
        _summary(t)
    assert ready["events"] == "ring buffer"
    assert not any("perf buffer" in n for n in notices), notices
