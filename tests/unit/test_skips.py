"""Runs the kernel skipped, from kprobe_profile and the programs' fdinfo (kernel/skips.py)."""

from __future__ import annotations

from pathlib import Path

from closewait_trace.kernel.decode import Stat
from closewait_trace.kernel.skips import SkipCounter, kretprobe_counts, misses_by_program, \
    recursion_misses, skipped_runs

#: As the 6.1-rt guest showed it (this process 285), with another process's probes and a kprobe.
PROFILE = """\
  r_inet_csk_accept_bcc_285                                 72               0
  r___sys_accept4_bcc_285                                   72               3
  r_inet_csk_accept_bcc_1285                                 9               9
  p_tcp_close_bcc_285                                      139               0
  r_garbage_bcc_285                                          x               0
"""

FDINFO = """pos:\t0
flags:\t02000002
prog_type:\t17
prog_jited:\t1
run_time_ns:\t7061457
run_cnt:\t726
recursion_misses:\t4
verified_insns:\t512
"""


def test_kprobe_profile_gives_this_process_kretprobes_by_function() -> None:
    assert kretprobe_counts(PROFILE, 285) == {"inet_csk_accept": (72, 0),
                                              "__sys_accept4": (72, 3)}
    assert kretprobe_counts(PROFILE, 1285) == {"inet_csk_accept": (9, 9)}
    assert kretprobe_counts("", 285) == {}


def test_recursion_misses_from_fdinfo_and_zero_before_5_12() -> None:
    assert recursion_misses(FDINFO) == 4
    assert recursion_misses(FDINFO.replace("recursion_misses:\t4\n", "")) == 0
    assert misses_by_program({"gone": 1_000_000}) == {"gone": 0}


def test_skipped_runs_are_hits_past_runs_plus_misses_plus_recursion() -> None:
    kret = kretprobe_counts(PROFILE, 285)
    stats = {Stat.ACCEPT_RET_RUNS: 67, Stat.ACCEPT_SYS_RUNS: 67}
    assert skipped_runs(stats, kret, {"raw_tp": 4, "cwt_tcp_close": 0}) == \
        (72 - 67) + (3 + 72 - 67) + 4
    # a program that ran more often than the hits read before it: not a negative skip
    assert skipped_runs({Stat.ACCEPT_RET_RUNS: 80, Stat.ACCEPT_SYS_RUNS: 72}, kret, {}) == 3
    # a kretprobe whose program counts no runs is not compared
    assert skipped_runs({}, {"tcp_v4_connect": (5, 1)}, {}) == 0
    # returns before the program was attached are not skips
    assert skipped_runs(stats, kret, {}, {"inet_csk_accept": 2}) == 3 + 3 + 5


def test_a_kretprobe_skip_counted_by_the_kernel_too_is_counted_once() -> None:
    """From 6.7 a skipped kretprobe program is in its recursion misses as well."""
    kret = {"inet_csk_accept": (72, 0)}
    stats = {Stat.ACCEPT_RET_RUNS: 67}
    assert skipped_runs(stats, kret, {"cwt_accept_ret": 5}) == 5
    assert skipped_runs(stats, {}, {"cwt_accept_ret": 5}) == 5  # made through the perf PMU


def test_counter_reads_only_its_own_kretprobes_and_never_goes_down(tmp_path: Path) -> None:
    profile = tmp_path / "kprobe_profile"
    profile.write_text(PROFILE)
    counter = SkipCounter(pid=285)
    assert counter.kretprobes() == {}
    counter.note_made("inet_csk_accept", profile)  # __sys_accept4 went through the PMU
    kret = counter.kretprobes()
    assert kret == {"inet_csk_accept": (72, 0)}
    counter.set_baseline({Stat.ACCEPT_RET_RUNS: 71}, kret)
    assert counter.update({Stat.ACCEPT_RET_RUNS: 70}, kret, {}) == 1
    # runs of hits that came after the profile was read: a dip, not fewer skips
    assert counter.update({Stat.ACCEPT_RET_RUNS: 74}, kret, {}) == 1
    profile.write_text(PROFILE.replace(" 72 ", " 80 ", 1))
    assert counter.update({Stat.ACCEPT_RET_RUNS: 75}, counter.kretprobes(), {}) == 4
    assert SkipCounter(pid=285, profile=tmp_path / "missing", made={"x"}).kretprobes() == {}
