"""Renderers: JSON lines (a documented schema), plain lines, and the rich live view."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import socket
from typing import Any

import pytest
from rich.console import Console

from closewait_trace.outputs import render
from closewait_trace.kernel.decode import ExitHow, Stat
from closewait_trace.pipeline.diagnose import Cause, Confidence, Verdict
from closewait_trace.facts.containers import ContainerIdentity, Pod, Runtime
from closewait_trace.facts.facts import Listener
from closewait_trace.pipeline.join import (
    Accepted,
    Acceptor,
    Change,
    ChangeKind,
    Connection,
    Direction,
)
from closewait_trace.outputs.render import (
    JsonRenderer,
    LiveRenderer,
    PlainRenderer,
    View,
    conn_dict,
    container_text,
    endpoint,
    fmt_duration,
)

from .events import MS, S, connection

NOW = 1_000 * S
STARTED = NOW - 125 * S
SK = 0xFFFF_8880_1234_0000

CONN_KEYS = {
    "id", "family", "local", "remote", "direction", "pid", "comm", "accepted",
    "accepted_after_fin", "fd", "inode", "cw_since", "cw_age_s", "cw_age_at_least", "open",
    "exit", "closer_pid", "flagged", "verdict", "container", "netns", "netns_source",
}
CONN_OPTIONAL_KEYS = {"established_before_fin_s", "accept_after_fin_s"}
RECORD_KEYS = {"schema", "type", "time"}
SUMMARY_KEYS = {
    "duration_s", "backend", "threshold_s", "cw_entered", "cw_reported", "cw_short", "open",
    "flagged", "closed", "events_lost", "lost", "kernel_skipped", "accepts_seen",
    "accepts_unmatched", "complete",
    "closed_by", "max_closed_cw_s", "open_by_process", "open_by_port", "still_open", "groups",
    "accept_errors", "tracer",
    "timeline_export",  # JSON summary only: path of the exported timelines, or null
}
LOST_KEYS = {"ringbuf", "socks_map_full", "cw_map_full", "listener_map_full", "accept_map_full",
             "pid_map_full", "owner_room_full", "exit_events"}

VERDICT = Verdict(Cause.NOT_CLOSED, Confidence.CERTAIN, "accepted by pid 42 (app) and never closed",
                  ("accepted 30.0s ago", "still open as fd 7"))


def open_conn(**kw: Any) -> Connection:
    enter = kw.pop("enter", NOW - 30 * S)
    kw.setdefault("owner_pid", 42)
    kw.setdefault("owner_comm", "app")
    kw.setdefault("accepted", Accepted.YES)
    return connection(key=(kw.pop("sk", SK), enter), **kw)


def view(open_: list[Connection] | None = None, **kw: Any) -> View:
    base: dict[str, Any] = dict(
        now_ns=NOW, started_ns=STARTED, backend="kprobe", threshold_ns=10 * S,
        open=open_ or [], verdicts={}, stats={}, closed_total=0, flagged_total=0, lost_exits=0,
        listeners={},
    )
    base.update(kw)
    return View(**base)


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# --- helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ns, text",
    [
        (0, "0ms"),
        (1 * MS, "1ms"),
        (999 * MS, "999ms"),
        (1 * S, "1.0s"),
        (1_260 * MS, "1.3s"),
        (59_900 * MS, "59.9s"),
        (60 * S, "1m00s"),
        (61_900 * MS, "1m01s"),
        (3_599 * S, "59m59s"),
        (3_600 * S, "1h00m"),
        (3_660 * S, "1h01m"),
        (100 * 3_600 * S, "100h00m"),
    ],
)
def test_fmt_duration(ns: int, text: str) -> None:
    assert fmt_duration(ns) == text


@pytest.mark.parametrize("ns, text", [(999_600_000, "1.0s"), (59_960 * MS, "1m00s")])
def test_fmt_duration_unit_boundaries(ns: int, text: str) -> None:
    assert fmt_duration(ns) == text


def test_endpoint_brackets_ipv6_only() -> None:
    assert endpoint("10.0.0.1", 80) == "10.0.0.1:80"
    assert endpoint("2001:db8::1", 443) == "[2001:db8::1]:443"
    assert endpoint("::", 0) == "[::]:0"


# --- JSON -----------------------------------------------------------------------------------


def test_conn_dict_exact_keys_and_values() -> None:
    conn = open_conn(
        accepted_ns=NOW - 29 * S, established_ns=NOW - 40 * S, fd=7, inode=1234,
        flagged_ns=NOW - 20 * S,
    )
    v = view([conn], verdicts={conn.key: VERDICT})
    d = conn_dict(conn, v)
    assert set(d) == CONN_KEYS | CONN_OPTIONAL_KEYS
    assert d["id"] == f"{SK:x}-{NOW - 30 * S}"
    assert (d["family"], d["local"], d["remote"]) == ("ipv4", "10.0.0.1:8080", "10.0.0.2:50000")
    assert (d["direction"], d["pid"], d["comm"]) == ("inbound", 42, "app")
    assert (d["accepted"], d["accepted_after_fin"], d["fd"], d["inode"]) == ("yes", False, 7, 1234)
    assert (d["cw_age_s"], d["cw_age_at_least"], d["open"], d["exit"]) == (30.0, False, True, None)
    assert (d["closer_pid"], d["flagged"]) == (None, True)
    assert d["verdict"] == {
        "cause": "accepted-not-closed", "confidence": "certain",
        "summary": "accepted by pid 42 (app) and never closed",
        "evidence": ["accepted 30.0s ago", "still open as fd 7"],
    }
    assert (d["established_before_fin_s"], d["accept_after_fin_s"]) == (10.0, 1.0)
    since = dt.datetime.fromisoformat(d["cw_since"])
    assert since.tzinfo is not None
    # cw_since is the wall time of the entry: now minus its age
    wall_now = v.wall(NOW)
    assert abs((wall_now - since).total_seconds() - 30.0) < 0.01


def test_conn_dict_preexisting_ipv6_closed() -> None:
    conn = connection(
        key=(0, 3), family=socket.AF_INET6, laddr="2001:db8::1", lport=443, raddr="2001:db8::2",
        rport=55_555, direction=Direction.UNKNOWN, first_seen_ns=NOW - 5 * S,
        cw_exit_ns=NOW - 1 * S, exit_how=ExitHow.RESET,
    )
    d = conn_dict(conn, view())
    assert set(d) == CONN_KEYS  # no entry time: no *_fin_s keys
    assert d["id"] == "0-3"
    assert (d["family"], d["local"], d["remote"]) == ("ipv6", "[2001:db8::1]:443", "[2001:db8::2]:55555")
    assert (d["cw_age_s"], d["cw_age_at_least"], d["open"], d["exit"]) == (4.0, True, False, "reset")
    assert (d["accepted"], d["direction"], d["pid"], d["verdict"]) == ("unknown", "unknown", None, None)


class _CountingOut(io.StringIO):
    """An output that counts flushes (each is a write(2) on a pipe or file)."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_json_records_of_one_tick_are_flushed_once_at_its_end() -> None:
    out = _CountingOut()
    r = JsonRenderer(out)
    conns = [open_conn(sk=SK + i) for i in range(50)]
    v = view(conns)
    r.changes([Change(ChangeKind.FLAGGED, c) for c in conns], v)
    assert out.flushes == 1
    assert [x["type"] for x in json_lines(out)] == ["leak"] * 50
    r.notice("hello")  # a record outside a tick goes out at once
    assert out.flushes == 2
    with pytest.raises(AttributeError):  # a change that cannot be rendered
        r.changes([Change(ChangeKind.FLAGGED, conns[0]), Change(ChangeKind.FLAGGED, "x")], v)  # type: ignore[arg-type]
    assert out.flushes == 3  # the records before it are flushed, not held back


def test_json_records_for_open_leak_close_lost_and_listeners() -> None:
    out = io.StringIO()
    r = JsonRenderer(out)
    conn = open_conn(established_ns=NOW - 40 * S)
    closed = open_conn(sk=SK + 1, cw_exit_ns=NOW - S, exit_how=ExitHow.APP_CLOSE, closer_pid=42)
    lst = Listener(family=socket.AF_INET, laddr="0.0.0.0", lport=8080, queue=0, backlog=0, pid=55, comm="nginx")
    v = view([conn])
    r.ready(v, {"target": "all processes", "backend": "kprobe"})
    r.changes([
        Change(ChangeKind.OPENED, conn),
        Change(ChangeKind.FLAGGED, conn),
        Change(ChangeKind.CLOSED, closed),
        Change(ChangeKind.LOST, open_conn(sk=SK + 2)),
        Change(ChangeKind.UPDATED, conn),
        Change(ChangeKind.LISTEN, listener=lst),
        Change(ChangeKind.UNLISTEN, listener=lst),
    ], v)
    r.notice("hello")
    r.pid_exit(42, v)
    r.refresh(v)  # writes nothing
    recs = json_lines(out)
    assert [x["type"] for x in recs] == [
        "ready", "open", "leak", "close", "lost", "update", "listen", "unlisten", "notice", "pid_exit",
    ]
    for x in recs:
        assert x["schema"] == render.SCHEMA_VERSION == 1
        dt.datetime.fromisoformat(x["time"])
    assert set(recs[0]) == RECORD_KEYS | {"target", "backend"}
    for x in recs[1:6]:
        assert set(x) == RECORD_KEYS | {"connection"}
        assert set(x["connection"]) >= CONN_KEYS
    assert set(recs[1]["connection"]) == CONN_KEYS | {"established_before_fin_s"}
    assert recs[3]["connection"]["exit"] == "app-close"
    assert recs[3]["connection"]["open"] is False and recs[3]["connection"]["closer_pid"] == 42
    assert recs[6] == {**recs[6], "port": 8080, "addr": "0.0.0.0", "pid": 55, "comm": "nginx"}
    assert set(recs[6]) == RECORD_KEYS | {"port", "addr", "pid", "comm"}
    assert recs[8]["message"] == "hello" and recs[9]["pid"] == 42


def _summary(v: View) -> dict[str, Any]:
    out = io.StringIO()
    JsonRenderer(out).finish(v)
    (rec,) = json_lines(out)
    assert rec["type"] == "summary" and rec["schema"] == render.SCHEMA_VERSION
    assert set(rec) == RECORD_KEYS | SUMMARY_KEYS
    assert set(rec["lost"]) == LOST_KEYS
    assert rec["timeline_export"] is None  # no exporter given
    return rec


def test_json_summary_complete() -> None:
    conns = [open_conn(), open_conn(sk=SK + 1, direction=Direction.OUTBOUND, lport=45_000,
                                    rport=5432, owner_pid=77, owner_comm="worker")]
    v = view(conns, stats={Stat.CW_ENTERED: 10, Stat.CW_REPORTED: 6, Stat.CW_SHORT: 3,
                           Stat.ACCEPTS: 4, Stat.ACCEPT_UNMATCHED: 1},
             closed_total=4, flagged_total=2, closed_by_how={"app-close": 3, "reset": 1},
             max_closed_ns=12_500 * MS, accept_errors={(42, 24): 5})
    s = _summary(v)
    assert s["complete"] is True and s["events_lost"] == 0
    assert (s["duration_s"], s["backend"], s["threshold_s"]) == (125.0, "kprobe", 10.0)
    assert (s["cw_entered"], s["cw_reported"], s["cw_short"]) == (10, 6, 3)
    assert (s["open"], s["flagged"], s["closed"]) == (2, 2, 4)
    assert (s["accepts_seen"], s["accepts_unmatched"]) == (4, 1)
    assert s["closed_by"] == {"app-close": 3, "reset": 1}
    assert s["max_closed_cw_s"] == 12.5
    assert s["open_by_process"] == {"42/app": 1, "77/worker": 1}
    assert s["open_by_port"] == {"8080": 1, "5432": 1}
    assert [c["local"] for c in s["still_open"]] == ["10.0.0.1:8080", "10.0.0.1:45000"]
    assert s["accept_errors"] == [{"pid": 42, "errno": 24, "count": 5}]
    assert set(s["lost"].values()) == {0}
    assert (s["tracer"]["ticks"], s["tracer"]["tick_s_max"]) == (0, 0.0)
    assert s["tracer"]["peak_rss_mb"] > 0


def test_tick_stats_and_the_summary_tracer_record() -> None:
    ticks = render.TickStats()
    for ns in (40 * MS, 1_200 * MS, 90 * MS):
        ticks.add(ns)
    assert (ticks.ticks, ticks.last_ns, ticks.max_ns, ticks.over_1s) == (3, 90 * MS, 1_200 * MS, 1)
    t = _summary(view([], tick=ticks))["tracer"]
    assert (t["ticks"], t["tick_s_max"], t["ticks_over_1s"]) == (3, 1.2, 1)


@pytest.mark.parametrize(
    "stats, lost_exits, key",
    [
        ({Stat.RINGBUF_LOST: 2}, 0, "ringbuf"),
        ({Stat.SOCKS_FULL: 1}, 0, "socks_map_full"),
        ({Stat.CW_FULL: 1}, 0, "cw_map_full"),
        ({Stat.LISTEN_FULL: 1}, 0, "listener_map_full"),
        ({Stat.PENDING_FULL: 1}, 0, "accept_map_full"),
        ({}, 3, "exit_events"),
    ],
)
def test_json_summary_incomplete_when_anything_was_lost(
    stats: dict[Stat, int], lost_exits: int, key: str
) -> None:
    s = _summary(view(stats={Stat.CW_ENTERED: 5, **stats}, lost_exits=lost_exits))
    assert s["complete"] is False
    assert s["events_lost"] == sum(stats.values()) + lost_exits
    assert s["lost"][key] == s["events_lost"]


def test_short_stays_and_unmatched_accepts_are_not_losses() -> None:
    s = _summary(view(stats={Stat.CW_SHORT: 9, Stat.ACCEPT_UNMATCHED: 4, Stat.CW_ENTERED: 20}))
    assert s["complete"] is True and s["events_lost"] == 0


def test_runs_the_kernel_skipped_are_counted_apart_from_losses() -> None:
    s = _summary(view(stats={Stat.KERNEL_SKIPPED: 3}))
    assert (s["kernel_skipped"], s["events_lost"], s["complete"]) == (3, 0, True)


# --- plain lines ----------------------------------------------------------------------------


def plain(changes: list[Change], v: View) -> list[str]:
    out = io.StringIO()
    PlainRenderer(out).changes(changes, v)
    return out.getvalue().splitlines()


def test_plain_open_leak_close_lines() -> None:
    conn = open_conn(fd=7)
    closed = open_conn(sk=SK + 1, enter=NOW - 12 * S, cw_exit_ns=NOW, exit_how=ExitHow.APP_CLOSE)
    v = view([conn], verdicts={conn.key: VERDICT})
    op, leak, close = plain([Change(ChangeKind.OPENED, conn), Change(ChangeKind.FLAGGED, conn),
                             Change(ChangeKind.CLOSED, closed)], v)
    for line in (op, leak, close):
        assert "10.0.0.1:8080 <- 10.0.0.2:50000" in line
        assert "pid=42/app" in line and "  accepted  " in line
    assert op.split()[1] == "OPEN" and op.endswith("cw=30.0s")
    assert "accepted by pid 42" not in op  # verdicts only on LEAK lines
    assert leak.split()[1] == "LEAK"
    assert "cw=30.0s  -- accepted by pid 42 (app) and never closed" in leak
    assert leak.endswith("[accepted 30.0s ago; still open as fd 7]")
    assert close.split()[1] == "CLOSE" and close.endswith("cw=12.0s exit=app-close")


def test_container_text_names_the_pod_as_far_as_known() -> None:
    def text(pod: Pod | None) -> str:
        return container_text(open_conn(container=ContainerIdentity(
            cgroup="/k", runtime=Runtime.CRI, container_name="app", pod=pod)))
    assert text(None) == " [app]"
    assert text(Pod(uid="u-1")) == " [app]"
    assert text(Pod(name="web-1")) == " [web-1/app]"
    assert text(Pod(name="web-1", namespace="shop")) == " [shop/web-1/app]"
    assert container_text(open_conn()) == ""


def test_the_acceptor_shows_only_when_the_socket_changed_hands() -> None:
    kept = open_conn(acceptor=Acceptor(42, "app"))
    passed = open_conn(sk=SK + 1, acceptor=Acceptor(7, "master"))
    v = view()
    assert "acceptor" not in conn_dict(kept, v)
    assert conn_dict(passed, v)["acceptor"] == {"pid": 7, "comm": "master"}
    op_kept, op_passed = plain([Change(ChangeKind.OPENED, kept),
                                Change(ChangeKind.OPENED, passed)], v)
    assert "accepted-by" not in op_kept and "accepted-by=7/master" in op_passed


def test_plain_accepted_states_and_directions() -> None:
    v = view()
    cases = [
        (open_conn(accepted=Accepted.NO, owner_pid=None, owner_comm=None), "never-accepted", "pid=?"),
        (open_conn(accepted=Accepted.YES, accepted_after_fin=True), "accepted-after-fin", "pid=42/app"),
        (open_conn(accepted=Accepted.UNKNOWN, owner_comm=None), "accept-unknown", "pid=42/?"),
    ]
    for conn, state, pid in cases:
        (line,) = plain([Change(ChangeKind.OPENED, conn)], v)
        assert f"  {state}  " in line and pid in line
    out = open_conn(direction=Direction.OUTBOUND, lport=45_000, raddr="10.9.9.9", rport=5432)
    (line,) = plain([Change(ChangeKind.OPENED, out)], v)
    assert "10.0.0.1:45000 -> 10.9.9.9:5432" in line and "  outbound  " in line


def test_plain_ipv6_and_preexisting() -> None:
    conn = connection(key=(0, 1), family=socket.AF_INET6, laddr="2001:db8::1", lport=443,
                      raddr="2001:db8::2", rport=55_555, direction=Direction.UNKNOWN,
                      first_seen_ns=NOW - 3 * S)
    (line,) = plain([Change(ChangeKind.OPENED, conn)], view())
    assert "[2001:db8::1]:443 <- [2001:db8::2]:55555" in line
    assert line.endswith("cw=>=3.0s")


def test_plain_lost_line_says_lost() -> None:
    from closewait_trace.pipeline.join import Tracker

    from .events import cw_entry

    t = Tracker(threshold_ns=10 * S, report_min_ns=200 * MS, start_ns=0)
    t.apply_poll([cw_entry(SK, enter=NOW - 30 * S)], NOW - 29 * S)
    changes: list[Change] = []
    for i in range(1, 4):
        changes += t.apply_poll([], NOW - 29 * S + i * 200 * MS)
    (lost,) = changes
    (line,) = plain([lost], view())
    assert line.split()[1] == "LOST"
    assert "exit=lost" in line


def test_plain_listener_lines_and_ignored_updates() -> None:
    lst6 = Listener(family=socket.AF_INET6, laddr="::", lport=8443, queue=0, backlog=0, pid=56, comm="envoy")
    lines = plain([Change(ChangeKind.LISTEN, listener=lst6),
                   Change(ChangeKind.UNLISTEN, listener=lst6),
                   Change(ChangeKind.UPDATED, open_conn())], view())
    assert len(lines) == 2
    assert lines[0].endswith("  LISTEN  [::]:8443  pid=56/envoy")
    assert lines[1].endswith("  UNLSTN  [::]:8443  pid=56/envoy")


def test_plain_ready_notice_pid_exit_and_summary() -> None:
    out = io.StringIO()
    r = PlainRenderer(out)
    conns = [open_conn(sk=SK + i, enter=NOW - (100 - i) * S) for i in range(23)]
    v = view(conns, verdicts={conns[0].key: VERDICT},
             stats={Stat.CW_ENTERED: 40, Stat.CW_REPORTED: 30, Stat.CW_SHORT: 5,
                    Stat.RINGBUF_LOST: 2},
             flagged_total=23, lost_exits=1, closed_by_how={"reset": 2, "app-close": 5},
             max_closed_ns=90 * S)
    r.ready(v, {"target": "pid 42"})
    r.notice("1 socket(s) were already in CLOSE_WAIT")
    r.pid_exit(42, v)
    r.finish(v)
    lines = out.getvalue().splitlines()
    assert lines[0] == ("closewait-trace: tracing pid 42 with the kprobe backend; leak threshold"
                        " 10.0s. Ctrl-C to stop.")
    assert lines[1] == "closewait-trace: 1 socket(s) were already in CLOSE_WAIT"
    assert lines[2] == "closewait-trace: traced process 42 has exited; its sockets stay counted"
    assert lines[3] == ""
    assert lines[4] == "Summary after 2m05s (kprobe backend):"
    # entered 40, reported (matching the filters) 30, short 5, flagged 23, open 23
    assert re.fullmatch(r"\s+\D*\b40\b\D+\b30\b\D+\b5\b\D+\b23\b\D+\b23", lines[5]), lines[5]
    assert lines[5].endswith("leaks flagged 23, still open 23")
    assert lines[6] == "  left CLOSE_WAIT: app-close 5, reset 2; longest 1m30s"
    opens = [x for x in lines if x.startswith("  open ")]
    assert len(opens) == 20
    assert opens[0] == ("  open    1m40s  10.0.0.1:8080 <-> 10.0.0.2:50000  pid=42/app  accepted"
                        "  -- accepted by pid 42 (app) and never closed")
    assert "  ... and 3 more open" in lines
    assert lines[-1] == "  RESULTS INCOMPLETE: 3 events lost (ringbuf 2, exit_events 1)"


def test_plain_summary_no_loss() -> None:
    out = io.StringIO()
    PlainRenderer(out).finish(view())
    lines = out.getvalue().splitlines()
    assert lines[-1] == "  no events lost"
    assert not any("left CLOSE_WAIT" in x or "more open" in x for x in lines)


def test_plain_summary_says_what_the_kernel_skipped() -> None:
    out = io.StringIO()
    PlainRenderer(out).finish(view(stats={Stat.KERNEL_SKIPPED: 2}))
    lines = out.getvalue().splitlines()
    assert lines[-2:] == ["  no events lost", "  the kernel skipped 2 run(s) of the tracer's"
                          " programs (a program busy on that CPU): a state change, accept or"
                          " close may be unseen"]


# --- rich live view -------------------------------------------------------------------------


def rendered(renderable: Any) -> str:
    c = Console(file=io.StringIO(), width=120, force_terminal=False, record=True)
    c.print(renderable)
    return c.export_text()


def test_live_renderer_table_groups_and_summary() -> None:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, record=True)
    r = LiveRenderer(console)
    inbound = [open_conn(sk=SK + i, enter=NOW - (200 - i) * S, accepted=Accepted.NO, rport=41_000 + i,
                         flagged_ns=NOW - 100 * S if i < 3 else None)
               for i in range(20)]
    outbound = [open_conn(sk=SK + 100 + i, enter=NOW - (50 - i) * S, direction=Direction.OUTBOUND,
                          lport=46_000 + i, raddr="10.9.9.9", rport=5432, owner_pid=77,
                          owner_comm="worker")
                for i in range(5)]
    conns = inbound + outbound
    first = Verdict(Cause.NEVER_ACCEPTED, Confidence.CERTAIN, "never accepted: queue not drained")
    v = view(conns, verdicts={conns[0].key: first}, closed_total=4, flagged_total=3,
             stats={Stat.CW_ENTERED: 30})
    r.notice("warming up")
    r.ready(v, {"target": "all processes"})
    try:
        closed = open_conn(sk=SK + 999, enter=NOW - 15 * S, cw_exit_ns=NOW, exit_how=ExitHow.RESET)
        r.changes([Change(ChangeKind.OPENED, conns[5]), Change(ChangeKind.FLAGGED, conns[0]),
                   Change(ChangeKind.CLOSED, closed)], v)
        r.refresh(v)
        assert r.live is not None
        live = rendered(r.live.renderable)
    finally:
        r.finish(v)
    assert r.live is None

    flat = " ".join(live.split())  # the head line wraps at 120 columns
    assert flat.startswith(
        "closewait-trace all processes | kprobe backend | threshold 10.0s | up 2m05s | "
        "25 in CLOSE_WAIT | 3 leaking | left 4 | events lost 0 "
    )
    table_rows = [x for x in live.splitlines()
                  if ("10.0.0.2:" in x or "10.9.9.9:" in x) and "\u2502" not in x]  # not in panels
    assert len(table_rows) == render.LiveRenderer.MAX_ROWS == 15
    assert "3m20s" in table_rows[0] and "10.0.0.2:41000" in table_rows[0]
    assert "never accepted: queue not drained" in table_rows[0]
    assert all("10.0.0.2:" in x for x in table_rows)  # oldest first: all inbound ones
    assert "... 10 more; grouped below" in live
    assert "by process and service" in live
    groups = {tuple(x.split()[1:5]) for x in live.splitlines() if "never-accepted" in x or "outbound" in x}
    assert ("42/app", "8080", "never-accepted", "20") in groups
    assert ("77/worker", "5432", "outbound", "5") in groups
    assert "recent" in live
    assert "LEAK" in live and "CLOSE" in live and "exit=reset" in live
    assert "OPEN " not in live  # opened connections are in the table, not in the recent lines

    text = console.export_text()
    assert "warming up" in text
    assert "Summary after 2m05s (kprobe backend):" in text
    assert "leaks flagged 3, still open 25" in " ".join(text.split())  # wrapped at 120
    assert "  ... and 5 more open" in text
    assert "no events lost" in text


def test_live_renderer_keeps_the_recent_lines_bounded_and_shows_losses() -> None:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, record=True)
    r = LiveRenderer(console)
    conns = [open_conn(sk=SK + i, rport=42_000 + i) for i in range(12)]
    v = view([], lost_exits=2)
    r.changes([Change(ChangeKind.CLOSED, c) for c in conns], v)
    assert len(r.recent) == LiveRenderer.RECENT
    assert "42011" in r.recent[-1].plain and "42004" in r.recent[0].plain
    out = rendered(r._render(v))
    assert "events lost 2" in out and "0 in CLOSE_WAIT" in out
    assert "by process and service" not in out  # nothing open: no group panel
    r.finish(v)  # never started: prints the summary only
    assert "RESULTS INCOMPLETE: 2 events lost (exit_events 2)" in console.export_text()
