"""Scale and churn on the real kernel: 20,000 sockets in CLOSE_WAIT at once, seen by two
tracers at the same time; a full CLOSE_WAIT map counted and reported; 100,000 connections of
churn with a few leaks among them. Host only: in an emulated guest the load alone takes tens
of minutes, and the kernel side under test is the same program."""

from __future__ import annotations

import time

import pytest

from bench.load import SCALE_SYSCTLS, Role, Sysctls

from .harness import Record, Tracer

pytestmark = [pytest.mark.kernel, pytest.mark.host_only]


def _leaks(t: Tracer) -> dict[tuple[str, str], Record]:
    return {(r["connection"]["local"], r["connection"]["remote"]): r
            for r in list(t.records) if r["type"] == "leak"}


def _wait_leaks(t: Tracer, n: int, timeout: float) -> dict[tuple[str, str], Record]:
    deadline = time.monotonic() + timeout
    leaks = _leaks(t)
    while len(leaks) < n and time.monotonic() < deadline:
        time.sleep(0.5)
        leaks = _leaks(t)
    return leaks


def _summary(t: Tracer) -> Record:
    assert t.stop() == 0, "".join(t.stderr_lines)[-2000:]
    return next(r for r in reversed(t.records) if r["type"] == "summary")


def _port_args(*ports: int) -> list[str]:
    return [a for p in ports for a in ("--port", str(p))]


def test_twenty_thousand_close_wait_sockets_counted_by_two_tracers_at_once() -> None:
    n = 10_000
    roles: list[Role] = []
    tracers: list[Tracer] = []
    with Sysctls(SCALE_SYSCTLS):
        try:
            lst = Role(["listen", "--backlog", str(n + 1000)]).start()
            srv = Role(["server", "--mode", "close-now", "--backlog", str(n + 1000)]).start()
            roles += [lst, srv]
            args = ["--threshold", "3s", *_port_args(lst.port, srv.port)]
            first = Tracer(args).start()
            tracers.append(first)
            second = Tracer(args).start()  # a second tracer must not disturb the first
            tracers.append(second)
            queued = Role(["connect-close", "--port", str(lst.port), "--count", str(n)]).start()
            held = Role(["hold", "--port", str(srv.port), "--count", str(n)]).start()
            roles += [queued, held]
            queued.wait_done(300)
            held.wait_done(300)
            expected = set(queued.leaked()) | set(held.leaked())
            assert len(expected) == 2 * n
            for t in tracers:
                leaks = _wait_leaks(t, 2 * n, 180)
                assert set(leaks) == expected
                causes = {(r["connection"]["verdict"]["cause"], r["connection"]["pid"])
                          for r in leaks.values()}
                assert causes == {("never-accepted", lst.pid), ("outbound-not-closed", held.pid)}
            for t in tracers:
                s = _summary(t)
                assert (s["open"], s["flagged"], s["cw_reported"]) == (2 * n, 2 * n, 2 * n)
                assert s["events_lost"] == 0 and s["complete"] is True, s["lost"]
                groups = {(g["cause"], g["pid"]): g["count"] for g in s["groups"]}
                assert groups == {("never-accepted", lst.pid): n,
                                  ("outbound-not-closed", held.pid): n}
                assert s["open_by_port"] == {str(lst.port): n, str(srv.port): n}
                assert len(s["still_open"]) == 2 * n
        finally:
            for t in tracers:
                t.stop(timeout=30)
            for r in roles:
                r.stop()


def test_full_close_wait_map_is_counted_and_the_results_marked_incomplete() -> None:
    size, n = 256, 600
    roles: list[Role] = []
    t: Tracer | None = None
    try:
        lst = Role(["listen", "--backlog", str(n + 100)]).start()
        roles.append(lst)
        t = Tracer(["--threshold", "2s", "--max-close-wait", str(size), "--owner-room", "0",
                    *_port_args(lst.port)]).start()
        queued = Role(["connect-close", "--port", str(lst.port), "--count", str(n)]).start()
        roles.append(queued)
        queued.wait_done(120)
        leaks = _wait_leaks(t, size, 60)
        time.sleep(3)  # nothing beyond the map's size may ever show up
        s = _summary(t)
        assert len(_leaks(t)) == size == len(leaks)
        assert s["lost"]["cw_map_full"] == n - size
        assert s["events_lost"] == n - size and s["complete"] is False
        assert s["cw_entered"] >= n and s["cw_reported"] == n
    finally:
        if t is not None:
            t.stop(timeout=30)
        for r in roles:
            r.stop()


def test_hundred_thousand_connections_of_churn_every_leak_flagged_no_healthy_one() -> None:
    per_client = 25_000  # x 4 clients = 100,000 connections
    roles: list[Role] = []
    t: Tracer | None = None
    try:
        echo = Role(["server", "--mode", "echo-close"]).start()
        closer = Role(["server", "--mode", "close-now"]).start()
        lst = Role(["listen", "--backlog", "64"]).start()
        roles += [echo, closer, lst]
        t = Tracer(["--threshold", "3s", *_port_args(echo.port, closer.port, lst.port)]).start()
        clients = [
            Role(["churn", "--port", str(echo.port), "--count", str(per_client),
                  "--mode", "client-first", "--leak-every", "10000"]).start(),
            Role(["churn", "--port", str(echo.port), "--count", str(per_client),
                  "--mode", "client-first", "--leak-every", "10000"]).start(),
            Role(["churn", "--port", str(closer.port), "--count", str(per_client),
                  "--mode", "server-first", "--leak-every", "7000"]).start(),
            Role(["churn", "--port", str(closer.port), "--count", str(per_client),
                  "--mode", "server-first", "--leak-every", "7000"]).start(),
        ]
        queued = Role(["connect-close", "--port", str(lst.port), "--count", "5"]).start()
        roles += [*clients, queued]
        for c in clients:
            c.wait_done(900)
        queued.wait_done(60)
        # 2 + 2 accepted-not-closed, 3 + 3 outbound, 5 never accepted
        expected = set(queued.leaked())
        for c in clients:
            expected |= set(c.leaked())
        assert len(expected) == 15
        leaks = _wait_leaks(t, len(expected), 60)
        time.sleep(4)  # past the threshold again: no healthy connection may be flagged late
        s = _summary(t)
        leaks = _leaks(t)
        assert set(leaks) == expected
        assert s["flagged"] == len(expected) and s["open"] == len(expected)
        assert s["events_lost"] == 0 and s["complete"] is True, s["lost"]
        # Every connection's server or client side passed through CLOSE_WAIT.
        assert s["cw_reported"] >= 4 * per_client
        causes = {r["connection"]["verdict"]["cause"] for r in leaks.values()}
        assert causes == {"accepted-not-closed", "outbound-not-closed", "never-accepted"}
    finally:
        if t is not None:
            t.stop(timeout=30)
        for r in roles:
            r.stop()
