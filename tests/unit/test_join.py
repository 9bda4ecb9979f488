"""The Tracker on record sequences built as the kernel sends them (see tests/unit/events.py)."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from closewait_trace.kernel.decode import ExitHow, SockFlag, TcpState
from closewait_trace.facts.facts import Listener
from closewait_trace.pipeline.join import (
    Accepted,
    Change,
    ChangeKind,
    Connection,
    Direction,
    Tracker,
)

from .events import (
    MS,
    OWNER_COMM,
    OWNER_PID,
    S,
    cw_entry,
    cw_exit,
    listen_event,
    preexisting_exit,
    state_event,
    unlisten_event,
)

REPORT_MIN = 200 * MS
THRESHOLD = 10 * S
START = 1 * S

SK_A = 0xFFFF_8880_0000_A000
SK_B = 0xFFFF_8880_0000_B000


def tracker(threshold: int = THRESHOLD, report_min: int = REPORT_MIN) -> Tracker:
    return Tracker(threshold_ns=threshold, report_min_ns=report_min, start_ns=START)


def kinds(changes: list[Change]) -> list[tuple[ChangeKind, tuple[int, int] | None]]:
    return [(c.kind, c.conn.key if c.conn else None) for c in changes]


# --- the life of one connection ----------------------------------------------------------


def test_fin_first_then_app_close() -> None:
    t = tracker()
    enter = 5 * S
    entry = cw_entry(SK_A, enter=enter, accepted_at=enter - 2 * S)
    assert t.apply_poll([entry], enter + 100 * MS) == []  # younger than report_min
    opened = t.apply_poll([entry], enter + 300 * MS)
    assert kinds(opened) == [(ChangeKind.OPENED, (SK_A, enter))]
    conn = opened[0].conn
    assert conn is not None
    assert conn.direction is Direction.INBOUND
    assert conn.accepted is Accepted.YES and conn.accepted_ns == enter - 2 * S
    assert conn.accepted_after_fin is False
    assert (conn.owner_pid, conn.owner_comm) == (OWNER_PID, OWNER_COMM)
    assert (conn.cw_enter_ns, conn.first_seen_ns) == (enter, enter + 300 * MS)
    assert (conn.laddr, conn.lport, conn.raddr, conn.rport) == ("10.0.0.1", 8080, "10.0.0.2", 50_000)
    assert conn.established_ns == enter - 3 * S
    assert conn.is_open and conn.age_ns(enter + 2 * S) == 2 * S
    assert t.apply_poll([entry], enter + 500 * MS) == []  # nothing new

    close_at = enter + 7_250 * MS
    ev = cw_exit(entry, ts=close_at, how=ExitHow.APP_CLOSE, tgid=OWNER_PID, comm=OWNER_COMM)
    closed = t.apply_event(ev, close_at + 1 * MS)
    assert kinds(closed) == [(ChangeKind.CLOSED, (SK_A, enter))]
    assert closed[0].conn is conn
    assert conn.exit_how is ExitHow.APP_CLOSE
    assert conn.cw_exit_ns == close_at
    assert conn.age_ns(close_at + 99 * S) == 7_250 * MS  # exact, frozen at exit
    assert (conn.closer_pid, conn.app_close_ns) == (OWNER_PID, close_at)
    assert not conn.is_open
    assert t.open == {} and t.closed == [conn]
    assert t.apply_poll([], close_at + 200 * MS) == []
    assert t.lost_exits == 0


def test_rst_while_in_close_wait_is_reset() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S, accepted_at=1 * S)
    t.apply_poll([entry], 3 * S)
    # RST from the peer: CLOSE_WAIT -> CLOSE in softirq, no process of the owner running.
    ev = cw_exit(entry, ts=4_500 * MS, how=ExitHow.RESET, tgid=0)
    (ch,) = t.apply_event(ev, 4_600 * MS)
    assert ch.kind is ChangeKind.CLOSED and ch.conn is not None
    assert ch.conn.exit_how is ExitHow.RESET
    assert ch.conn.age_ns(10 * S) == 2_500 * MS
    assert ch.conn.closer_pid is None and ch.conn.app_close_ns is None


def test_app_abort_keeps_the_close_time_the_kernel_saw() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S, accepted_at=1 * S)
    t.apply_poll([entry], 3 * S)
    # kprobe backend: tcp_close ran first (ts_close), then CLOSE_WAIT -> CLOSE with a RST sent.
    closing = dataclasses.replace(
        entry, ts_close=5 * S, closer_tgid=OWNER_PID, flags=entry.flags | SockFlag.APP_CLOSED
    )
    ev = cw_exit(closing, ts=5 * S + 10_000, how=ExitHow.APP_ABORT, tgid=OWNER_PID)
    (ch,) = t.apply_event(ev, 6 * S)
    assert ch.conn is not None
    assert ch.conn.exit_how is ExitHow.APP_ABORT
    assert (ch.conn.app_close_ns, ch.conn.closer_pid) == (5 * S, OWNER_PID)
    assert ch.conn.cw_exit_ns == 5 * S + 10_000


STAY_KINDS = {ChangeKind.OPENED, ChangeKind.UPDATED, ChangeKind.FLAGGED, ChangeKind.CLOSED,
              ChangeKind.LOST}


def test_simultaneous_close_never_in_close_wait_produces_nothing() -> None:
    t = tracker()
    # Both sides sent FIN at once: ESTABLISHED -> FIN_WAIT1 -> CLOSING -> TIME_WAIT -> CLOSE.
    # The socket never enters CLOSE_WAIT: never in the cw map, no CW_EXIT; without a timeline
    # watch the kernel sends nothing else either. A healthy connection (FIN, then the app's
    # close within report_min) looks the same to userspace: polls that never list it.
    young = cw_entry(SK_B, enter=2 * S)
    out: list[Change] = []
    now = 2 * S
    for i in range(10):
        now += 50 * MS
        out += t.apply_poll([young] if i < 3 else [], now) + t.tick(now)
    assert out == []
    assert t.open == {} and t.closed == [] and t.lost_exits == 0 and t.flagged_total == 0


def test_simultaneous_close_under_a_timeline_watch_reports_no_close_wait_stay() -> None:
    t = tracker()
    sock = dataclasses.replace(
        cw_entry(SK_A, enter=0, accepted_at=1 * S),
        flags=SockFlag.PASSIVE | SockFlag.ACCEPTED | SockFlag.OWNER_KNOWN | SockFlag.TIMELINE,
    )
    out: list[Change] = []
    now = 2 * S
    for old, new in [
        (TcpState.ESTABLISHED, TcpState.FIN_WAIT1),
        (TcpState.FIN_WAIT1, TcpState.CLOSING),
        (TcpState.CLOSING, TcpState.TIME_WAIT),
        (TcpState.TIME_WAIT, TcpState.CLOSE),
    ]:
        now += 50 * MS
        out += t.apply_event(state_event(sock, ts=now, old=old, new=new, tgid=OWNER_PID), now)
        out += t.apply_poll([], now) + t.tick(now)
    for _ in range(5):
        now += 1 * S
        out += t.apply_poll([], now) + t.tick(now)
    assert [c for c in out if c.kind in STAY_KINDS] == []
    assert t.open == {} and t.closed == [] and t.lost_exits == 0 and t.flagged_total == 0


def test_listener_closed_with_queued_children_never_accepted() -> None:
    t = tracker()
    lpid, lcomm = 777, "lazy-srv"
    t.apply_event(listen_event(9000, lpid, lcomm, ts=1 * S), 1 * S)
    kids = [
        cw_entry(SK_A, enter=2 * S, lport=9000, rport=40_001, owner=(lpid, lcomm)),
        cw_entry(SK_B, enter=2_100 * MS, lport=9000, rport=40_002, owner=(lpid, lcomm)),
    ]
    opened = t.apply_poll(kids, 3 * S)
    assert [c.kind for c in opened] == [ChangeKind.OPENED] * 2
    for ch in opened:
        assert ch.conn is not None
        assert ch.conn.accepted is Accepted.NO
        assert ch.conn.direction is Direction.INBOUND
        assert (ch.conn.owner_pid, ch.conn.owner_comm) == (lpid, lcomm)

    # close(listener): LISTEN -> CLOSE, then each queued child CLOSE_WAIT -> CLOSE in the
    # listener owner's context: exit_how() gives LISTENER_CLOSED (owner known, not accepted).
    out = t.apply_event(unlisten_event(9000, lpid, lcomm, ts=8 * S), 8 * S)
    assert [c.kind for c in out] == [ChangeKind.UNLISTEN]
    assert out[0].listener == Listener(family=socket.AF_INET, laddr="0.0.0.0", lport=9000, queue=0, backlog=0, pid=lpid, comm=lcomm)
    for kid in kids:
        out = t.apply_event(cw_exit(kid, ts=8 * S + 1000, how=ExitHow.LISTENER_CLOSED, tgid=lpid), 8 * S)
        assert [c.kind for c in out] == [ChangeKind.CLOSED]
        conn = out[0].conn
        assert conn is not None
        assert conn.exit_how is ExitHow.LISTENER_CLOSED
        assert conn.accepted is Accepted.NO
        assert conn.closer_pid is None and conn.app_close_ns is None
        assert conn.cw_exit_ns == 8 * S + 1000
    assert t.listeners == {} and t.open == {} and len(t.closed) == 2
    assert [c.age_ns(0) for c in t.closed] == [6 * S + 1000, 5_900 * MS + 1000]


def test_listener_closed_exit_for_an_accepted_connection_becomes_app_abort() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S)  # the kernel did not see accept()
    (ch,) = t.apply_poll([entry], 3 * S)
    conn = ch.conn
    assert conn is not None and conn.accepted is Accepted.NO
    conn.accepted = Accepted.YES  # enrichment found an inode: it was accepted after all
    conn.inode = 12345
    ev = cw_exit(entry, ts=6 * S, how=ExitHow.LISTENER_CLOSED, tgid=OWNER_PID)
    (closed,) = t.apply_event(ev, 6 * S)
    assert closed.conn is conn
    assert conn.exit_how is ExitHow.APP_ABORT
    assert conn.accepted is Accepted.YES  # the kernel's "not accepted" did not override it
    assert (conn.closer_pid, conn.app_close_ns) == (OWNER_PID, 6 * S)


def test_accept_during_close_wait_is_an_update() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S)
    (ch,) = t.apply_poll([entry], 3 * S)
    conn = ch.conn
    assert conn is not None and conn.accepted is Accepted.NO
    accepted = cw_entry(SK_A, enter=2 * S, accepted_at=4 * S)
    assert accepted.flags & SockFlag.ACCEPT_IN_CW
    out = t.apply_poll([accepted], 4_200 * MS)
    assert kinds(out) == [(ChangeKind.UPDATED, (SK_A, 2 * S))]
    assert conn.accepted is Accepted.YES and conn.accepted_after_fin
    assert conn.accepted_ns == 4 * S
    assert t.apply_poll([accepted], 4_400 * MS) == []
    # the application closes it (kprobe backend updates the cw entry at tcp_close)
    closing = dataclasses.replace(
        accepted, ts_close=5 * S, closer_tgid=OWNER_PID, flags=accepted.flags | SockFlag.APP_CLOSED
    )
    out = t.apply_poll([closing], 5_000 * MS + 1)
    assert kinds(out) == [(ChangeKind.UPDATED, (SK_A, 2 * S))]
    assert (conn.app_close_ns, conn.closer_pid) == (5 * S, OWNER_PID)


def test_enrichment_accepted_is_not_overridden_by_polls() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S)
    (ch,) = t.apply_poll([entry], 3 * S)
    assert ch.conn is not None
    ch.conn.accepted = Accepted.YES
    assert t.apply_poll([entry], 4 * S) == []
    assert ch.conn.accepted is Accepted.YES


def test_outbound_connection_direction_and_service_port() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S, active=True, lport=45_000, rport=5432)
    (ch,) = t.apply_poll([entry], 3 * S)
    assert ch.conn is not None
    assert ch.conn.direction is Direction.OUTBOUND
    assert ch.conn.accepted is Accepted.UNKNOWN
    assert ch.conn.service_port == 5432


# --- identity and ordering ------------------------------------------------------------------


def test_address_reuse_gives_two_distinct_connections() -> None:
    t = tracker()
    first = cw_entry(SK_A, enter=1 * S, rport=40_001, accepted_at=500 * MS)
    second = cw_entry(SK_A, enter=20 * S, rport=40_002, accepted_at=19 * S)
    assert kinds(t.apply_poll([first], 2 * S)) == [(ChangeKind.OPENED, (SK_A, 1 * S))]
    # the first stay ends; the freed struct sock is reused for a new connection that also
    # reaches CLOSE_WAIT. The poll that shows the second is read before the first's exit
    # event is handled.
    assert kinds(t.apply_poll([second], 21 * S)) == [(ChangeKind.OPENED, (SK_A, 20 * S))]
    ev1 = cw_exit(first, ts=3 * S, how=ExitHow.APP_CLOSE, tgid=OWNER_PID)
    assert kinds(t.apply_event(ev1, 21 * S)) == [(ChangeKind.CLOSED, (SK_A, 1 * S))]
    assert list(t.open) == [(SK_A, 20 * S)]
    ev2 = cw_exit(second, ts=26 * S, how=ExitHow.RESET)
    assert kinds(t.apply_event(ev2, 26 * S)) == [(ChangeKind.CLOSED, (SK_A, 20 * S))]
    a, b = t.closed
    assert (a.rport, a.exit_how, a.age_ns(0)) == (40_001, ExitHow.APP_CLOSE, 2 * S)
    assert (b.rport, b.exit_how, b.age_ns(0)) == (40_002, ExitHow.RESET, 6 * S)
    assert a is not b and t.open == {} and t.lost_exits == 0


def test_exit_event_before_the_poll_that_still_showed_the_entry() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S, accepted_at=500 * MS)
    assert len(t.apply_poll([entry], 2 * S)) == 1
    # The map was read at 3.0s (entry still there), the exit (3.1s) handled before that read.
    stale = [entry]
    ev = cw_exit(entry, ts=3_100 * MS, how=ExitHow.APP_CLOSE, tgid=OWNER_PID)
    assert [c.kind for c in t.apply_event(ev, 3_200 * MS)] == [ChangeKind.CLOSED]
    assert t.apply_poll(stale, 3 * S) == []
    assert t.open == {}
    for i in range(1, 6):  # then it is gone from the map: not lost, not reopened
        assert t.apply_poll([], 3 * S + i * 200 * MS) == []
    assert len(t.closed) == 1 and t.lost_exits == 0


def test_exit_event_after_the_poll_that_showed_the_entry() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S, accepted_at=500 * MS)
    assert t.apply_poll([entry], 1_100 * MS) == []  # too young
    assert [c.kind for c in t.apply_poll([entry], 1_300 * MS)] == [ChangeKind.OPENED]
    assert t.apply_poll([], 1_500 * MS) == []  # gone once: not yet lost
    ev = cw_exit(entry, ts=1_400 * MS, how=ExitHow.APP_CLOSE, tgid=OWNER_PID)
    (ch,) = t.apply_event(ev, 1_600 * MS)
    assert ch.kind is ChangeKind.CLOSED and ch.conn is not None
    assert ch.conn.age_ns(0) == 400 * MS
    for i in range(5):
        assert t.apply_poll([], 1_800 * MS + i * 200 * MS) == []
    assert len(t.closed) == 1 and t.lost_exits == 0


def test_exit_of_a_stay_between_two_polls() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S, accepted_at=500 * MS)
    assert t.apply_poll([entry], 1_100 * MS) == []  # 100ms old: not reported yet
    # it leaves at 1.35s (350ms >= report_min, so the kernel sends the exit) before the next poll
    ev = cw_exit(entry, ts=1_350 * MS, how=ExitHow.APP_CLOSE, tgid=OWNER_PID)
    (ch,) = t.apply_event(ev, 1_400 * MS)
    assert ch.kind is ChangeKind.CLOSED and ch.conn is not None
    conn = ch.conn
    assert conn.key == (SK_A, 1 * S)
    assert conn.accepted is Accepted.YES and conn.owner_pid == OWNER_PID
    assert conn.exit_how is ExitHow.APP_CLOSE and conn.age_ns(0) == 350 * MS
    assert t.open == {}
    # a poll read before the exit still shows it: no resurrection
    assert t.apply_poll([entry], 1_300 * MS) == []
    assert t.apply_poll([], 1_500 * MS) == []
    assert t.closed == [conn] and t.lost_exits == 0


def test_entries_younger_than_report_min_are_not_reported() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S)
    assert t.apply_poll([entry], 1 * S + REPORT_MIN - 1) == []
    assert t.open == {}
    assert t.tick(1 * S + REPORT_MIN - 1) == []
    (ch,) = t.apply_poll([entry], 1 * S + REPORT_MIN)  # exactly report_min old: reported
    assert ch.kind is ChangeKind.OPENED


def test_short_stays_that_left_are_never_reported() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S)
    assert t.apply_poll([entry], 1_100 * MS) == []
    # it left at 1.15s: the kernel only counts it (CW_STAT_CW_SHORT), no event
    out = []
    for i in range(6):
        out += t.apply_poll([], 1_300 * MS + i * 200 * MS)
    assert out == [] and t.closed == [] and t.lost_exits == 0


def test_exits_out_of_order_across_cpus() -> None:
    t = tracker()
    a = cw_entry(SK_A, enter=1 * S, rport=40_001, accepted_at=500 * MS)
    b = cw_entry(SK_B, enter=1_500 * MS, rport=40_002, accepted_at=600 * MS)
    t.apply_poll([b, a], 2 * S)
    ev_a = cw_exit(a, ts=4 * S, how=ExitHow.APP_CLOSE, tgid=OWNER_PID)
    ev_b = cw_exit(b, ts=4_001 * MS, how=ExitHow.RESET)
    # B's exit (later, on another CPU) reaches userspace first
    assert kinds(t.apply_event(ev_b, 5 * S)) == [(ChangeKind.CLOSED, (SK_B, 1_500 * MS))]
    assert list(t.open) == [(SK_A, 1 * S)]
    assert kinds(t.apply_event(ev_a, 5 * S)) == [(ChangeKind.CLOSED, (SK_A, 1 * S))]
    by_port = {c.rport: c for c in t.closed}
    assert by_port[40_001].exit_how is ExitHow.APP_CLOSE
    assert by_port[40_001].age_ns(0) == 3 * S
    assert by_port[40_002].exit_how is ExitHow.RESET
    assert by_port[40_002].age_ns(0) == 2_501 * MS
    assert t.open == {} and t.lost_exits == 0


def test_exit_for_never_polled_socket_while_another_is_polled() -> None:
    t = tracker()
    a = cw_entry(SK_A, enter=1 * S, rport=40_001)
    b = cw_entry(SK_B, enter=1_100 * MS, rport=40_002)
    # B is created and exits between polls; its exit arrives before A's first report
    ev_b = cw_exit(b, ts=1_400 * MS, how=ExitHow.RESET)
    out = t.apply_event(ev_b, 1_500 * MS) + t.apply_poll([a], 1_500 * MS)
    assert kinds(out) == [(ChangeKind.CLOSED, (SK_B, 1_100 * MS)), (ChangeKind.OPENED, (SK_A, 1 * S))]


# --- lost exits -----------------------------------------------------------------------------


def test_lost_exit_after_missing_polls() -> None:
    t = tracker()
    n = Tracker.MISSING_POLLS_BEFORE_LOST
    assert n == 3
    entry = cw_entry(SK_A, enter=1 * S)
    other = cw_entry(SK_B, enter=1 * S, rport=40_002)
    (ch_a, ch_b) = t.apply_poll([entry, other], 2 * S)
    conn = ch_a.conn
    assert conn is not None
    now = 2 * S
    for _ in range(n - 1):
        now += 200 * MS
        assert t.apply_poll([other], now) == []
    assert conn.key in t.open
    now += 200 * MS
    out = t.apply_poll([other], now)
    assert kinds(out) == [(ChangeKind.LOST, (SK_A, 1 * S))]
    assert out[0].conn is conn
    assert t.lost_exits == 1
    assert conn.key not in t.open and t.closed == [conn]
    assert conn.exit_how is None and conn.cw_exit_ns is None
    assert list(t.open) == [other.key]
    # a lost connection is not flagged any more, nor lost twice
    assert t.tick(now + 60 * S) == [(Change(ChangeKind.FLAGGED, ch_b.conn))]
    assert t.apply_poll([other], now + 61 * S) == []
    assert t.lost_exits == 1


def test_missing_count_resets_when_the_entry_is_seen_again() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S)
    t.apply_poll([entry], 2 * S)
    now = 2 * S
    for seen in [False, False, True, False, False, True, False, False]:
        now += 200 * MS
        assert t.apply_poll([entry] if seen else [], now) == []
    assert list(t.open) == [entry.key] and t.lost_exits == 0


def test_lost_connection_is_not_open() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S)
    t.apply_poll([entry], 2 * S)
    out: list[Change] = []
    for i in range(1, 4):
        out += t.apply_poll([], 2 * S + i * 200 * MS)
    (lost,) = out
    assert lost.kind is ChangeKind.LOST and lost.conn is not None
    assert lost.conn.is_open is False


def test_late_exit_after_lost_does_not_count_the_stay_twice() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S, accepted_at=500 * MS)
    t.apply_poll([entry], 2 * S)
    for i in range(1, 4):
        t.apply_poll([], 2 * S + i * 200 * MS)
    assert t.lost_exits == 1
    ev = cw_exit(entry, ts=2_100 * MS, how=ExitHow.APP_CLOSE, tgid=OWNER_PID)
    t.apply_event(ev, 3 * S)
    assert [c.key for c in t.closed] == [entry.key]


# --- sockets in CLOSE_WAIT before the tracer started --------------------------------------


def test_preexisting_seeded_then_exit_matched_by_tuple() -> None:
    t = tracker()
    seeded = t.seed_preexisting(
        [
            (socket.AF_INET, "10.0.0.1", 8080, "10.0.0.9", 33_333),
            (socket.AF_INET6, "2001:db8::1", 443, "2001:db8::2", 44_444),
        ],
        now_ns=START,
    )
    assert [c.kind for c in seeded] == [ChangeKind.OPENED] * 2
    v4, v6 = (c.conn for c in seeded)
    assert v4 is not None and v6 is not None
    assert v4.key != v6.key and v4.key[0] == 0 == v6.key[0]
    assert v4.preexisting and v4.direction is Direction.UNKNOWN
    assert v4.since_ns == START and v4.age_ns(START + 3 * S) == 3 * S
    assert v4.accepted is Accepted.UNKNOWN

    # polls never contain them (the kernel does not know them): they are never lost
    for i in range(6):
        assert t.apply_poll([], START + i * 200 * MS) == []

    # a preexisting exit with another tuple matches nothing
    other = preexisting_exit(ts=START + 2 * S, how=ExitHow.RESET, laddr="10.0.0.1", lport=8080,
                             raddr="10.0.0.9", rport=33_334)
    assert t.apply_event(other, START + 2 * S) == []

    ev = preexisting_exit(ts=START + 4 * S, how=ExitHow.APP_CLOSE, laddr="10.0.0.1", lport=8080,
                          raddr="10.0.0.9", rport=33_333, tgid=321)
    (ch,) = t.apply_event(ev, START + 4 * S)
    assert ch.kind is ChangeKind.CLOSED and ch.conn is v4
    assert v4.exit_how is ExitHow.APP_CLOSE and v4.cw_exit_ns == START + 4 * S
    assert v4.age_ns(START + 100 * S) == 4 * S  # "at least 4s": counted from the start
    assert v4.preexisting and v4.closer_pid == 321
    assert list(t.open.values()) == [v6]

    ev6 = preexisting_exit(ts=START + 5 * S, how=ExitHow.RESET, family=socket.AF_INET6,
                           laddr="2001:db8::1", lport=443, raddr="2001:db8::2", rport=44_444)
    (ch6,) = t.apply_event(ev6, START + 5 * S)
    assert ch6.conn is v6 and v6.exit_how is ExitHow.RESET
    assert t.open == {} and t.lost_exits == 0
    # a second exit for the same tuple finds nothing left to match
    assert t.apply_event(ev6, START + 6 * S) == []


def test_poll_entries_without_entry_time_are_ignored() -> None:
    t = tracker()
    entry = dataclasses.replace(cw_entry(SK_A, enter=1 * S), ts_cw_enter=0)
    assert t.apply_poll([entry], 100 * S) == []
    assert t.open == {}


# --- flagging -------------------------------------------------------------------------------


def test_flagged_exactly_once_when_the_age_crosses_the_threshold() -> None:
    t = tracker(threshold=1 * S)
    entry = cw_entry(SK_A, enter=5 * S)
    t.apply_poll([entry], 5_300 * MS)
    assert t.tick(5_300 * MS) == []
    assert t.tick(6 * S - 1) == []
    (ch,) = t.tick(6 * S)
    assert ch.kind is ChangeKind.FLAGGED and ch.conn is not None
    assert ch.conn.flagged_ns == 6 * S
    assert t.tick(6_200 * MS) == []
    assert t.tick(60 * S) == []
    t.apply_poll([entry], 61 * S)
    assert t.tick(61 * S) == []
    assert t.flagged_total == 1
    # closing it does not unflag it or count it again
    t.apply_event(cw_exit(entry, ts=62 * S, how=ExitHow.APP_CLOSE, tgid=OWNER_PID), 62 * S)
    assert t.tick(63 * S) == [] and t.flagged_total == 1
    assert t.closed[0].flagged_ns == 6 * S


def test_preexisting_is_flagged_by_its_age_since_start() -> None:
    t = tracker(threshold=2 * S)
    (seed,) = t.seed_preexisting([(socket.AF_INET, "10.0.0.1", 80, "10.0.0.2", 1234)], START)
    assert t.tick(START + 2 * S - 1) == []
    (ch,) = t.tick(START + 2 * S)
    assert ch.conn is seed.conn and t.flagged_total == 1


def test_threshold_below_report_min_is_rejected() -> None:
    with pytest.raises(ValueError, match="threshold must not be below report_min"):
        Tracker(threshold_ns=1 * S, report_min_ns=2 * S, start_ns=0)
    t = Tracker(threshold_ns=2 * S, report_min_ns=2 * S, start_ns=0)  # equal is fine
    assert (t.threshold_ns, t.report_min_ns) == (2 * S, 2 * S)


# --- listeners ------------------------------------------------------------------------------


def test_listen_and_unlisten_events() -> None:
    t = tracker()
    (ch,) = t.apply_event(listen_event(8080, 55, "nginx", ts=1 * S), 1 * S)
    assert ch.kind is ChangeKind.LISTEN and ch.conn is None
    assert ch.listener == Listener(family=socket.AF_INET, laddr="0.0.0.0", lport=8080, queue=0, backlog=0, pid=55, comm="nginx")
    assert t.listeners == {(0, 8080): ch.listener}
    (ch6,) = t.apply_event(
        listen_event(8443, 56, "envoy", ts=1 * S, addr="::", family=socket.AF_INET6), 1 * S
    )
    assert ch6.listener == Listener(family=socket.AF_INET6, laddr="::", lport=8443, queue=0, backlog=0, pid=56, comm="envoy")
    # add_listener (start-up scan) never replaces what the kernel reported
    t.add_listener(Listener(family=socket.AF_INET, laddr="0.0.0.0", lport=8080, queue=0, backlog=0, pid=99, comm="other"))
    t.add_listener(Listener(family=socket.AF_INET, laddr="127.0.0.1", lport=9090, queue=0, backlog=0, pid=98, comm="scan"))
    assert t.listener_of(None, 8080).pid == 55 and t.listener_of(None, 9090).pid == 98
    (gone,) = t.apply_event(unlisten_event(8080, 55, "nginx", ts=2 * S), 2 * S)
    assert gone.kind is ChangeKind.UNLISTEN and gone.listener == ch.listener
    assert sorted(t.listeners) == [(0, 8443), (0, 9090)]
    assert t.apply_event(unlisten_event(7070, 1, "x", ts=3 * S), 3 * S) == []  # unknown port
    assert t.open == {} and t.closed == []


def test_timeline_events_do_not_open_or_close_stays() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=1 * S)
    t.apply_poll([entry], 2 * S)
    st = state_event(entry, ts=2 * S, old=TcpState.ESTABLISHED, new=TcpState.CLOSE_WAIT)
    assert [c for c in t.apply_event(st, 2 * S) if c.kind in STAY_KINDS] == []
    assert list(t.open) == [entry.key] and t.closed == []


# --- memory bound ---------------------------------------------------------------------------


def test_trim_closed_keeps_the_newest() -> None:
    t = tracker()
    for i in range(5):
        e = cw_entry(SK_A + i, enter=(i + 1) * S, rport=40_000 + i)
        t.apply_event(cw_exit(e, ts=(i + 2) * S, how=ExitHow.RESET), (i + 2) * S)
    assert [c.rport for c in t.closed] == [40_000, 40_001, 40_002, 40_003, 40_004]
    t.trim_closed(10)
    assert len(t.closed) == 5
    t.trim_closed(3)
    assert [c.rport for c in t.closed] == [40_002, 40_003, 40_004]
    t.trim_closed(0)
    assert t.closed == []


def test_connection_defaults() -> None:
    c = Connection(key=(1, 2), family=2, laddr="a", lport=1, raddr="b", rport=2,
                   direction=Direction.INBOUND)
    assert c.is_open and c.preexisting and c.accepted is Accepted.UNKNOWN


# --- many sockets at once ------------------------------------------------------------------


def test_thousands_at_once_are_opened_and_flagged_over_a_few_ticks_never_lost() -> None:
    """A burst bigger than one tick's share is spread over the next ticks, in order, with
    nothing dropped and nothing counted twice."""
    t = tracker()
    cap = Tracker.MAX_NEW_PER_TICK
    n = cap * 2 + 123
    socks = [cw_entry(0xFFFF_8880_0000_0000 + 64 * i, enter=START, rport=10_000 + i % 50_000)
             for i in range(n)]
    now = START + S
    opened: list[tuple[int, int]] = []
    for _ in range(3):
        ch = t.apply_poll(socks, now)
        assert len(ch) <= cap and {c.kind for c in ch} <= {ChangeKind.OPENED}
        opened += [c.conn.key for c in ch if c.conn]
        now += 200 * MS
    assert len(opened) == len(set(opened)) == n
    assert opened == [s.key for s in socks]  # first come, first opened
    assert t.apply_poll(socks, now) == []
    now = START + THRESHOLD
    flagged: list[tuple[int, int]] = []
    for _ in range(3):
        ch = t.tick(now)
        assert len(ch) <= cap
        flagged += [c.conn.key for c in ch if c.conn]
        now += 200 * MS
    assert len(flagged) == len(set(flagged)) == n == t.flagged_total
    assert t.tick(now) == []


def test_an_ignored_stay_is_not_reported_again_until_it_leaves() -> None:
    t = tracker()
    enter = 5 * S
    entry = cw_entry(SK_A, enter=enter, accepted_at=enter - 2 * S)
    [opened] = t.apply_poll([entry], enter + 300 * MS)
    assert opened.conn is not None
    t.ignore(opened.conn)  # another container's: excluded by --container
    assert t.open == {}
    assert t.apply_poll([entry], enter + 500 * MS) == []
    assert t.tick(enter + 20 * S) == []  # never flagged
    ev = cw_exit(entry, ts=enter + 30 * S, how=ExitHow.APP_CLOSE, tgid=OWNER_PID,
                 comm=OWNER_COMM)
    assert t.apply_event(ev, enter + 30 * S) == []  # its end is not reported either
    assert t.ignored == set() and t.closed == []
    # a new stay of the same socket address is a new stay: reported
    again = cw_entry(SK_A, enter=enter + 40 * S, accepted_at=enter + 39 * S)
    assert kinds(t.apply_poll([again], enter + 41 * S)) == \
        [(ChangeKind.OPENED, (SK_A, enter + 40 * S))]


def test_ignored_stays_are_forgotten_when_they_leave_the_map() -> None:
    t = tracker()
    entry = cw_entry(SK_B, enter=5 * S, accepted_at=4 * S)
    [opened] = t.apply_poll([entry], 6 * S)
    assert opened.conn is not None
    t.ignore(opened.conn)
    t.apply_poll([], 7 * S)
    assert t.ignored == set()


def test_closed_by_its_application_after_being_found_in_the_queue_was_accepted_late() -> None:
    """The accept watch was detached when it was accepted: its close says it was."""
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S)  # not seen accepted
    (ch,) = t.apply_poll([entry], 3 * S)
    conn = ch.conn
    assert conn is not None and conn.accepted is Accepted.NO
    conn.inode = 0  # enrichment found it in the accept queue while in CLOSE_WAIT
    (closed,) = t.apply_event(cw_exit(entry, ts=9 * S, how=ExitHow.APP_CLOSE, tgid=OWNER_PID),
                              9 * S)
    assert closed.conn is conn
    assert conn.accepted is Accepted.YES and conn.accepted_after_fin
    assert conn.accepted_ns is None  # when, nobody saw


def test_a_socket_never_looked_up_or_ended_by_its_listener_is_not_called_accepted() -> None:
    t = tracker()
    entry = cw_entry(SK_A, enter=2 * S)
    (ch,) = t.apply_poll([entry], 3 * S)
    assert ch.conn is not None and ch.conn.inode is None  # never looked up: nothing known
    t.apply_event(cw_exit(entry, ts=9 * S, how=ExitHow.APP_CLOSE, tgid=OWNER_PID), 9 * S)
    assert ch.conn.accepted is Accepted.NO
    other = cw_entry(SK_B, enter=2 * S)
    (ch2,) = t.apply_poll([other], 3 * S)
    assert ch2.conn is not None
    ch2.conn.inode = 0
    t.apply_event(cw_exit(other, ts=9 * S, how=ExitHow.LISTENER_CLOSED, tgid=OWNER_PID), 9 * S)
    assert ch2.conn.accepted is Accepted.NO
