"""AcceptWatchPlan: when the tracepoint backend's accept syscall tracepoints are attached."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from closewait_trace.acceptwatch import AcceptWatchPlan, DutyCycle, ListenerKey, plan_for
from closewait_trace.options import AcceptWatch

S = 1_000_000_000
T0 = 100 * S  # the tracer's start


A: ListenerKey = (4026531840, 8080)
B: ListenerKey = (4026532001, 80)
C: ListenerKey = (None, 9000)


def _run(plan: AcceptWatchPlan, needed: Sequence[bool | set[ListenerKey]],
         start: int = T0) -> list[bool]:
    """One decision a second, needed[i] at second i (True: sockets wait on listener A)."""
    return [plan.wanted(start + i * S, _listeners(n)) for i, n in enumerate(needed)]


def _listeners(n: bool | set[ListenerKey]) -> set[ListenerKey]:
    return n if isinstance(n, set) else ({A} if n else set())


def test_off_until_needed_then_on_through_the_first_window() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO, start_ns=T0)
    got = _run(plan, [False] * 3 + [True] * 30)
    assert got[:3] == [False] * 3
    assert all(got[3:33])  # 30 s continuously from the first never-accepted socket


def test_a_long_incident_is_watched_on_for_two_seconds_in_every_twenty() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO, start_ns=T0)
    got = _run(plan, [True] * 130)
    assert all(got[:30])
    sampled = got[30:130]
    assert sampled[:20] == [True, True] + [False] * 18
    assert sum(sampled) == 10  # 2 s in each of five periods
    now = T0 + 129 * S
    assert plan.sampling(now)
    assert plan.attached_ns == 30 * S + 10 * S  # each decision holds until the next one
    assert plan.watched_ns(T0, now) == 40 * S
    assert plan.coverage(now) == pytest.approx(40 / 129)
    assert plan.watched_ns(T0 + 100 * S, now) == 2 * S  # the window at 110-112 s
    assert plan.watched_ns(T0 + 111 * S, now) == S  # half of it


def test_the_incident_ends_after_the_linger_and_a_new_one_starts_afresh() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO, start_ns=T0)
    got = _run(plan, [True] * 40 + [False] * 31 + [True] * 3)
    assert not got[69]  # off (between samples) and ...
    assert got[71:74] == [True, True, True]  # ... a new incident: on from its first second
    assert not plan.sampling(T0 + 73 * S)
    assert plan.watched_ns(T0 + 60 * S, T0 + 73 * S) == 2 * S  # off from 69 s, on from 71 s


def test_while_needed_stays_on_the_whole_incident_and_lingers() -> None:
    plan = AcceptWatchPlan(AcceptWatch.WHILE_NEEDED, start_ns=T0)
    got = _run(plan, [True] * 100 + [False] * 35)
    assert all(got[:129])  # needed, then 30 s of linger since the last need
    assert not any(got[129:])
    assert plan.coverage(T0 + 50 * S) == 1.0
    assert plan.coverage(T0 + 258 * S) == pytest.approx(129 / 258)  # off the second half
    assert not plan.sampling(T0 + 50 * S)


def test_always_is_always_on_and_never_sampled() -> None:
    plan = AcceptWatchPlan(AcceptWatch.ALWAYS, start_ns=T0)
    assert all(_run(plan, [False, True] * 50))
    assert plan.coverage(T0 + 300 * S) == 1.0
    assert plan.watched_ns(T0, T0 + 7 * S) == 7 * S


def test_a_custom_cycle_and_its_description() -> None:
    cycle = DutyCycle(first_ns=2 * S, on_ns=1 * S, period_ns=4 * S, linger_ns=S)
    plan = AcceptWatchPlan(AcceptWatch.AUTO, cycle, start_ns=T0)
    assert _run(plan, [True] * 10) == [True, True, True, False, False, False,
                                       True, False, False, False]
    assert cycle.fraction == 0.25
    assert plan.describe().startswith("accept() is now watched 1 s in every 4 s"
                                      " (continuously for the first 2 s, and again when")


def test_the_plan_comes_from_the_ready_info_and_old_recordings_keep_their_meaning() -> None:
    cycle = DutyCycle(first_ns=5 * S, on_ns=S, period_ns=10 * S, linger_ns=3 * S)
    assert DutyCycle.from_info(cycle.as_info()) == cycle
    live = plan_for({"accept_watch": "auto", "accept_watch_cycle": cycle.as_info()},
                    AcceptWatch.AUTO)
    assert (live.mode, live.cycle) == (AcceptWatch.AUTO, cycle)
    # Recorded before the watch was sampled: "auto" was attached the whole incident.
    old = plan_for({"accept_watch": "auto"}, AcceptWatch.AUTO, start_ns=T0)
    assert old.mode is AcceptWatch.WHILE_NEEDED
    _run(old, [False] * 10)  # and, as its diagnoses did, takes accept() as always watched
    assert old.coverage(T0 + 10 * S) == 1.0 and old.watched_ns(T0, T0 + 10 * S) == 10 * S
    assert plan_for({"accept_watch": "always"}, AcceptWatch.AUTO).mode is AcceptWatch.ALWAYS
    assert plan_for({}, AcceptWatch.ALWAYS).mode is AcceptWatch.ALWAYS


def test_a_listener_joining_a_sampled_incident_is_watched_continuously_again() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO, start_ns=T0)
    got = _run(plan, [{A}] * 50 + [{A, B}] * 60)
    assert sum(got[30:50]) == 2  # sampled: A has waited since second 0
    assert plan.joined() == [B] and plan.joined() == []  # told once
    assert all(got[50:80])  # B joined at 50 s: 30 s continuously, at once
    assert got[80:100] == [True, True] + [False] * 18  # then sampled again
    assert plan.sampling(T0 + 109 * S)
    assert plan.describe_renewal([B]) == ("accept() is watched continuously again for 30 s:"
                                          " sockets now wait unaccepted on a listener new to"
                                          " the incident (port 80)")
    many = [(None, p) for p in (9000, 80, 443, 8080, 22, 5432, 80)]
    assert plan.describe_renewal(many).endswith("on listeners new to the incident"
                                                " (ports 22, 80, 443, 5432, 8080, ...)")


def test_listeners_joining_in_the_continuous_window_do_not_extend_it() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO, start_ns=T0)
    got = _run(plan, [{A}] * 10 + [{A, B}] * 30)
    assert plan.joined() == []
    assert got[30:40] == [True, True] + [False] * 8  # sampled from 30 s, as for A alone


def test_renewals_are_at_least_renew_ns_apart_so_the_cost_stays_bounded() -> None:
    cycle = DutyCycle(first_ns=10 * S, on_ns=S, period_ns=10 * S, linger_ns=5 * S,
                      renew_ns=100 * S)
    plan = AcceptWatchPlan(AcceptWatch.AUTO, cycle, start_ns=T0)
    # B joins at 20 s (renewed), C at 40 s (too soon), B leaves and joins again at 130 s.
    needed = [{A}] * 20 + [{A, B}] * 20 + [{A, B, C}] * 20 + [{A, C}] * 70 + [{A, B, C}] * 15
    got = _run(plan, needed)
    assert all(got[20:30])  # B's renewal
    assert sum(got[40:50]) == 1  # C: sampled, not renewed
    assert plan.joined() == [B, B]  # B at 20 s, and again at 130 s: 110 s after
    assert all(got[130:140]) and not plan.sampling(T0 + 139 * S)
    assert plan.sampling(T0 + 140 * S)
    # At most first_ns continuously per renew_ns, besides the duty cycle.
    assert sum(got) <= 10 + 2 * 10 + len(got) * cycle.fraction + 1


def test_the_renewal_is_recorded_and_recordings_without_it_replay_as_they_ran() -> None:
    cycle = DutyCycle(first_ns=5 * S, on_ns=S, period_ns=10 * S, linger_ns=3 * S,
                      renew_ns=60 * S)
    assert cycle.as_info()["renew_s"] == 60.0
    assert DutyCycle.from_info(cycle.as_info()) == cycle
    old_info = {k: v for k, v in cycle.as_info().items() if k != "renew_s"}
    old = plan_for({"accept_watch": "auto", "accept_watch_cycle": old_info}, AcceptWatch.AUTO,
                   start_ns=T0)
    assert old.cycle.renew_ns is None and "again when" not in old.describe()
    got = _run(old, [{A}] * 10 + [{A, B}] * 10)
    assert old.joined() == [] and sum(got[10:20]) == 1  # B sampled, as it was live
