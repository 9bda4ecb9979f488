"""AcceptWatchPlan: when the tracepoint backend's accept syscall tracepoints are attached."""

from __future__ import annotations

from closewait_trace.acceptwatch import AcceptWatchPlan, DutyCycle
from closewait_trace.options import AcceptWatch

S = 1_000_000_000


def _run(plan: AcceptWatchPlan, needed: list[bool], start: int = 100 * S) -> list[bool]:
    """One decision a second, needed[i] at second i."""
    return [plan.wanted(start + i * S, n) for i, n in enumerate(needed)]


def test_off_until_needed_then_on_through_the_first_window() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO)
    got = _run(plan, [False] * 3 + [True] * 30)
    assert got[:3] == [False] * 3
    assert all(got[3:33])  # 30 s continuously from the first never-accepted socket


def test_a_long_incident_is_watched_on_for_two_seconds_in_every_twenty() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO)
    got = _run(plan, [True] * 130)
    assert all(got[:30])
    sampled = got[30:130]
    assert sampled[:20] == [True, True] + [False] * 18
    assert sum(sampled) == 10  # 2 s in each of five periods
    assert plan.sampling(129 * S + 100 * S)
    assert plan.coverage(129 * S + 100 * S) == 0.1
    assert plan.attached_ns == 30 * S + 10 * S  # each decision holds until the next one


def test_the_incident_ends_after_the_linger_and_a_new_one_starts_afresh() -> None:
    plan = AcceptWatchPlan(AcceptWatch.AUTO)
    got = _run(plan, [True] * 40 + [False] * 31 + [True] * 3)
    assert not got[69]  # off (between samples) and ...
    assert got[71:74] == [True, True, True]  # ... a new incident: on from its first second
    assert plan.coverage(173 * S) == 1.0


def test_while_needed_stays_on_the_whole_incident_and_lingers() -> None:
    plan = AcceptWatchPlan(AcceptWatch.WHILE_NEEDED)
    got = _run(plan, [True] * 100 + [False] * 35)
    assert all(got[:129])  # needed, then 30 s of linger since the last need
    assert not any(got[129:])
    assert plan.coverage(150 * S) == 1.0
    assert not plan.sampling(150 * S)


def test_always_is_always_on_and_never_sampled() -> None:
    plan = AcceptWatchPlan(AcceptWatch.ALWAYS)
    assert all(_run(plan, [False, True] * 50))
    assert plan.coverage(300 * S) == 1.0


def test_a_custom_cycle_and_its_description() -> None:
    cycle = DutyCycle(first_ns=2 * S, on_ns=1 * S, period_ns=4 * S, linger_ns=S)
    plan = AcceptWatchPlan(AcceptWatch.AUTO, cycle)
    assert _run(plan, [True] * 10) == [True, True, True, False, False, False,
                                       True, False, False, False]
    assert cycle.fraction == 0.25
    assert plan.describe().startswith("accept() is now watched 1 s in every 4 s"
                                      " (continuously for the first 2 s)")
