"""Property tests of the Tracker: random socket lives, polls and event deliveries.

A scenario is a set of stays in CLOSE_WAIT on a few socket addresses (addresses are reused
one stay after another), a few sockets already in CLOSE_WAIT when the tracer started, and a
schedule of ticks. The model plays the kernel:

- a poll at time t reads every stay with enter <= t < exit (entries may be listed twice,
  as a BPF hash map iteration does under concurrent deletes; order is random);
- a stay that lasted at least report_min gets an exit event, which may be dropped (ring
  buffer full), delayed by one tick, and delivered in any order with the other events;
- a poll may be handled a second time one tick later (a stale read: it still shows stays
  whose exit event was already handled).

The one ordering the Tracker relies on is kept: an exit event that is delivered at all is
delivered before MISSING_POLLS_BEFORE_LOST polls have missed its entry (the kernel deletes
the entry right before it submits the event).
"""

from __future__ import annotations

import random
import socket
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closewait_trace.kernel.decode import ExitHow
from closewait_trace.pipeline.join import Accepted, Change, ChangeKind, Connection, Tracker

from .events import MS, OWNER_PID, cw_entry, cw_exit, preexisting_exit

REPORT_MIN = 200 * MS
THRESHOLD = 700 * MS
TICK = 200 * MS
START = 1_000 * MS


@dataclass
class Stay:
    skaddr: int
    rport: int
    enter: int
    exit: int | None  # None: still in CLOSE_WAIT at the end
    how: ExitHow
    accepted_at: int | None
    dropped: bool
    lag: int  # ticks the exit event is delivered late (0 or 1)

    @property
    def key(self) -> tuple[int, int]:
        return (self.skaddr, self.enter)

    def entry(self, t: int):  # type: ignore[no-untyped-def]
        """The cw map value at t (accepted or not yet); built once per state."""
        acc = self.accepted_at if self.accepted_at is not None and self.accepted_at <= t else None
        cache = self.__dict__.setdefault("_entries", {})
        if acc not in cache:
            cache[acc] = cw_entry(self.skaddr, enter=self.enter, rport=self.rport, accepted_at=acc)
        return cache[acc]

    def exit_event(self):  # type: ignore[no-untyped-def]
        assert self.exit is not None
        acc = self.accepted_at if self.accepted_at is not None and self.accepted_at <= self.exit else None
        base = cw_entry(self.skaddr, enter=self.enter, rport=self.rport, accepted_at=acc)
        return cw_exit(base, ts=self.exit, how=self.how,
                       tgid=OWNER_PID if self.how is not ExitHow.RESET else 0)

    @property
    def sends_exit(self) -> bool:
        return self.exit is not None and self.exit - self.enter >= REPORT_MIN


@dataclass
class Pre:
    """A socket in CLOSE_WAIT before the tracer started."""

    rport: int
    exit: int | None
    how: ExitHow
    dropped: bool


# Strategies built once: building them inside the composite dominates the run time.
N_ADDRS = st.integers(1, 4)
N_STAYS = st.integers(1, 4)
OFFSET_MS = st.integers(0, 400)
GAP_MS = st.integers(1, 500)
DUR_MS = st.integers(1, 1_500)
DUR_OR_OPEN_MS = st.one_of(st.none(), DUR_MS)
ACCEPTED = st.sampled_from(["never", "before", "during"])
ACCEPT_DELAY_MS = st.integers(0, 2_000)
HOW_ACCEPTED = st.sampled_from([ExitHow.APP_CLOSE, ExitHow.APP_ABORT, ExitHow.RESET])
HOW_NOT_ACCEPTED = st.sampled_from([ExitHow.LISTENER_CLOSED, ExitHow.RESET])
HOW_PRE = st.sampled_from([ExitHow.APP_CLOSE, ExitHow.RESET])
LAG = st.integers(0, 1)
N_PRE = st.integers(0, 2)
PRE_EXIT = st.one_of(st.none(), st.integers(1, 3_000).map(lambda ms: START + ms * MS))
SEED = st.integers(0, 2**32 - 1)
BOOL = st.booleans()


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Stay], list[Pre], int, random.Random, list[bool]]:
    stays: list[Stay] = []
    rport = 40_000
    for a in range(draw(N_ADDRS)):
        skaddr = 0xFFFF_8880_0000_0000 + a * 0x1000
        t = START + draw(OFFSET_MS) * MS + a * 1_000 + 7  # off the tick grid
        n = draw(N_STAYS)
        for i in range(n):
            t += draw(GAP_MS) * MS + 13
            enter = t
            last = i == n - 1
            dur_ms = draw(DUR_OR_OPEN_MS) if last else draw(DUR_MS)
            exit_ = None if dur_ms is None else enter + dur_ms * MS + 3
            accepted = draw(ACCEPTED)
            if accepted == "before":
                accepted_at = enter - 100 * MS
            elif accepted == "during":
                accepted_at = enter + draw(ACCEPT_DELAY_MS) * MS
            else:
                accepted_at = None
            acc_at_exit = accepted_at is not None and (exit_ is None or accepted_at <= exit_)
            how = draw(HOW_ACCEPTED if acc_at_exit else HOW_NOT_ACCEPTED)
            stays.append(Stay(skaddr, rport, enter, exit_, how, accepted_at,
                              dropped=draw(BOOL) and draw(BOOL),
                              lag=draw(LAG)))
            rport += 1
            if exit_ is None:
                break
            t = exit_
    pres = [
        Pre(
            rport=30_000 + i,
            exit=draw(PRE_EXIT),
            how=draw(HOW_PRE),
            dropped=draw(BOOL) and draw(BOOL),
        )
        for i in range(draw(N_PRE))
    ]
    end = max([s.exit or s.enter for s in stays] + [p.exit or 0 for p in pres])
    n_ticks = (end - START) // TICK + 4
    dup_polls = draw(st.lists(BOOL, min_size=n_ticks, max_size=n_ticks))
    return stays, pres, n_ticks, random.Random(draw(SEED)), dup_polls


def _check_consistency(t: Tracker, now: int) -> None:
    open_keys = set(t.open)
    closed_keys = [c.key for c in t.closed]
    assert not open_keys & set(closed_keys), "a connection is both open and closed"
    assert not any(c in t.closed for c in t.open.values())
    assert all(k == c.key for k, c in t.open.items())
    for c in t.open.values():
        assert now - c.since_ns >= 0, "negative age"
    for c in t.closed:
        if c.cw_exit_ns is not None:
            assert c.cw_exit_ns - c.since_ns >= 0, "negative duration"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_interleavings(scenario: tuple[list[Stay], list[Pre], int, random.Random, list[bool]]) -> None:
    stays, pres, n_ticks, rnd, dup_polls = scenario
    t = Tracker(threshold_ns=THRESHOLD, report_min_ns=REPORT_MIN, start_ns=START)
    changes: list[Change] = []
    seeded = t.seed_preexisting(
        [(socket.AF_INET, "10.0.0.1", 8080, "10.0.0.3", p.rport) for p in pres], START
    )
    changes += seeded
    pre_conn = {p.rport: ch.conn for p, ch in zip(pres, seeded)}

    # (delivery tick, event): the tick whose time first reaches the exit, plus the lag
    deliveries: dict[int, list] = {}  # type: ignore[type-arg]
    for s in stays:
        if s.sends_exit and not s.dropped:
            assert s.exit is not None
            tick = -(-(s.exit - START) // TICK) + s.lag
            deliveries.setdefault(tick, []).append(s.exit_event())
    for p in pres:
        if p.exit is not None and not p.dropped:
            tick = -(-(p.exit - START) // TICK)
            deliveries.setdefault(tick, []).append(preexisting_exit(
                ts=p.exit, how=p.how, laddr="10.0.0.1", lport=8080, raddr="10.0.0.3", rport=p.rport,
                tgid=OWNER_PID if p.how is ExitHow.APP_CLOSE else 0))

    poll_times: list[int] = []
    prev_poll: tuple[list, int] | None = None  # type: ignore[type-arg]
    flush = Tracker.MISSING_POLLS_BEFORE_LOST + 1
    for i in range(n_ticks + flush):
        now = START + i * TICK
        batch = deliveries.pop(i, [])
        rnd.shuffle(batch)
        for ev in batch:
            changes += t.apply_event(ev, now)
        if prev_poll is not None and i < n_ticks and dup_polls[i]:
            changes += t.apply_poll(*prev_poll)  # the previous read, handled again
        snap = [s.entry(now) for s in stays if s.enter <= now and (s.exit is None or now < s.exit)]
        snap += [x for x in snap if rnd.random() < 0.1]  # duplicates from map iteration
        rnd.shuffle(snap)
        changes += t.apply_poll(snap, now)
        poll_times.append(now)
        prev_poll = (snap, now)
        changes += t.tick(now)
        _check_consistency(t, now)
    assert not deliveries
    end = START + (n_ticks + flush - 1) * TICK

    # --- every stay ends up exactly where the model says -----------------------------------
    closed_count = Counter(c.key for c in t.closed)
    assert all(n == 1 for n in closed_count.values()), "a stay was closed twice"
    closed = {c.key: c for c in t.closed}
    for s in stays:
        polled_old = any(s.enter + REPORT_MIN <= pt and (s.exit is None or pt < s.exit)
                         for pt in poll_times)
        delivered = s.sends_exit and not s.dropped
        if delivered:
            c = closed.get(s.key)
            assert c is not None and c.key not in t.open
            assert c.exit_how is s.how
            assert c.cw_exit_ns == s.exit
            assert s.exit is not None and c.age_ns(end) == s.exit - s.enter
            want_acc = s.accepted_at is not None and s.accepted_at <= s.exit
            assert (c.accepted is Accepted.YES) == want_acc
            assert c.rport == s.rport
            if s.how in (ExitHow.APP_CLOSE, ExitHow.APP_ABORT):
                assert c.closer_pid == OWNER_PID and c.app_close_ns == s.exit
        elif s.exit is None:
            if polled_old:
                assert s.key in t.open and s.key not in closed
                assert t.open[s.key].age_ns(end) == end - s.enter
            else:
                assert s.key not in t.open and s.key not in closed
        else:  # left CLOSE_WAIT, no exit event reached userspace
            if polled_old:
                c = closed.get(s.key)
                assert c is not None, "a reported stay with a lost exit was never declared lost"
                assert c.exit_how is None and c.cw_exit_ns is None
            else:
                assert s.key not in t.open and s.key not in closed
    for p in pres:
        conn = pre_conn[p.rport]
        assert conn is not None
        if p.exit is not None and not p.dropped:
            assert conn in t.closed and conn.exit_how is p.how
            assert conn.age_ns(end) == p.exit - START
        else:
            assert conn.key in t.open

    # --- the counts add up ----------------------------------------------------------------
    known = {s.key for s in stays} | {c.key for c in pre_conn.values() if c is not None}
    reported = {c.conn.key for c in changes if c.conn is not None
                and c.kind in (ChangeKind.OPENED, ChangeKind.CLOSED)}
    assert reported <= known
    lost = [c for c in changes if c.kind is ChangeKind.LOST]
    assert t.lost_exits == len(lost) == sum(1 for c in t.closed if c.exit_how is None)
    assert len({c.conn.key for c in lost if c.conn}) == len(lost)
    assert len(t.open) + len(t.closed) == len(reported)
    assert set(t.open) | set(closed) == reported

    everyone: list[Connection] = list(t.open.values()) + t.closed
    flagged = [c for c in everyone if c.flagged_ns is not None]
    assert t.flagged_total == len(flagged) == len({c.key for c in flagged})
    flag_changes = [c.conn.key for c in changes if c.kind is ChangeKind.FLAGGED and c.conn]
    assert sorted(flag_changes) == sorted(c.key for c in flagged)
    for c in flagged:
        assert c.flagged_ns is not None and c.flagged_ns - c.since_ns >= THRESHOLD
    for c in t.open.values():  # the last tick flagged every open connection old enough
        assert (c.flagged_ns is not None) == (c.age_ns(end) >= THRESHOLD)
