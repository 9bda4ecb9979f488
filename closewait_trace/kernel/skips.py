"""Runs of the tracer's programs that the kernel skipped, from the kernel's own counts.

The kernel runs a program only if no other BPF program of its kind is running on that CPU
(kprobe and classic tracepoint programs share one per-CPU guard; raw tracepoint and fentry
programs have one each), and a kretprobe follows only as many calls at once as it has room
for. A skipped run is an accept, close or state change the tracer never hears of. It is rare
on most kernels; on PREEMPT_RT, where a task can be preempted inside a program, it was seen
(Debian's 6.1-rt: 5 of 72 accept returns in a burst on one CPU). The counts:

- a kretprobe made through tracefs (the kprobe backend's, for their room: attach.py) has its
  hits and its misses (out of room) in ``kprobe_profile``; its program counts its own runs in
  a stat, so hits minus runs is what the guard skipped;
- every program's ``recursion_misses`` (``/proc/self/fdinfo`` of its fd, Linux 5.12+) counts
  the skipped runs of raw tracepoint and fentry/fexit programs.

Before 6.7 the kernel counts no skip of a kprobe program made through the perf PMU (the
kprobe backend's ``tcp_close`` and ``inet_csk_complete_hashdance``): those stay uncounted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .decode import Stat

@dataclass(frozen=True)
class CountedKretprobe:
    """A kretprobe whose program counts its own runs in a stat."""

    function: str  # the probed kernel function
    program: str  # its program's name
    runs: Stat


COUNTED_KRETPROBES = (
    CountedKretprobe("inet_csk_accept", "cwt_accept_ret", Stat.ACCEPT_RET_RUNS),
    CountedKretprobe("__sys_accept4", "cwt_accept_syscall_ret", Stat.ACCEPT_SYS_RUNS),
)

_RECURSION_MISSES = re.compile(r"^recursion_misses:\s*(\d+)\s*$", re.MULTILINE)


def kretprobe_counts(profile: str, pid: int) -> dict[str, tuple[int, int]]:
    """(hits, misses) of the kretprobes process ``pid`` made, by probed function, from the
    text of tracefs' ``kprobe_profile`` (BCC names them ``r_<function>_bcc_<pid>``)."""
    suffix = f"_bcc_{pid}"
    out: dict[str, tuple[int, int]] = {}
    for line in profile.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[0].startswith("r_") or not parts[0].endswith(suffix):
            continue
        if parts[1].isdigit() and parts[2].isdigit():
            out[parts[0][2:-len(suffix)]] = (int(parts[1]), int(parts[2]))
    return out


def recursion_misses(fdinfo: str) -> int:
    """A program's skipped runs from the text of its fd's fdinfo (0 before Linux 5.12)."""
    m = _RECURSION_MISSES.search(fdinfo)
    return int(m.group(1)) if m else 0


def misses_by_program(fds: Mapping[str, int]) -> dict[str, int]:
    """Each program's recursion misses, by name, from ``/proc/self/fdinfo`` of its fd."""
    out: dict[str, int] = {}
    for name, fd in fds.items():
        try:
            out[name] = recursion_misses(Path(f"/proc/self/fdinfo/{fd}").read_text())
        except OSError:
            out[name] = 0
    return out


def skipped_runs(stats: Mapping[Stat, int], kretprobes: Mapping[str, tuple[int, int]],
                 misses: Mapping[str, int], baseline: Mapping[str, int] | None = None) -> int:
    """Skipped runs: the programs' recursion misses, and for each counted kretprobe made
    through tracefs its misses and its hits beyond its program's runs (less ``baseline``, the
    returns that came while it was being attached, before it had its program). From 6.7 the
    kernel also counts a kretprobe program's skips in its recursion misses: the larger of the
    two is taken, not their sum."""
    baseline = baseline or {}
    counted = {k.program for k in COUNTED_KRETPROBES}
    total = sum(n for name, n in misses.items() if name not in counted)
    for k in COUNTED_KRETPROBES:
        recursion = misses.get(k.program, 0)
        if k.function not in kretprobes:
            total += recursion
            continue
        hits, missed = kretprobes[k.function]
        gap = max(0, hits - stats.get(k.runs, 0) - baseline.get(k.function, 0))
        total += missed + max(gap, recursion)
    return total


@dataclass
class SkipCounter:
    """Reads the counts and keeps their total from ever going down. The hits are read first
    (a hit is counted before its program runs, so runs read first could fall short of hits
    that were not skipped); the runs read after may then include runs of hits the profile
    did not show yet, and the total would dip for a moment."""

    pid: int
    #: tracefs' kprobe_profile, once a kretprobe was made through tracefs
    profile: Path | None = None
    #: the functions whose kretprobes this process made through tracefs (only those are
    #: read: another BCC tool in another pid namespace can have the same pid)
    made: set[str] = field(default_factory=set)
    baseline: dict[str, int] = field(default_factory=dict)
    total: int = 0

    def note_made(self, function: str, profile: Path | None) -> None:
        self.made.add(function)
        self.profile = profile

    def kretprobes(self) -> dict[str, tuple[int, int]]:
        """Read before the stats (the hits first, then the runs)."""
        if self.profile is None or not self.made:
            return {}
        try:
            counts = kretprobe_counts(self.profile.read_text(), self.pid)
        except OSError:
            return {}
        return {fn: c for fn, c in counts.items() if fn in self.made}

    def set_baseline(self, stats: Mapping[Stat, int],
                     kretprobes: Mapping[str, tuple[int, int]]) -> None:
        """Once attached: the hits that had no program yet are not skips."""
        for k in COUNTED_KRETPROBES:
            if k.function in kretprobes:
                self.baseline[k.function] = max(0, kretprobes[k.function][0]
                                                - stats.get(k.runs, 0))

    def update(self, stats: Mapping[Stat, int], kretprobes: Mapping[str, tuple[int, int]],
               misses: Mapping[str, int]) -> int:
        """The total so far, given the stats read after ``kretprobes`` and each loaded
        program's recursion misses."""
        found = skipped_runs(stats, kretprobes, misses, self.baseline)
        self.total = max(self.total, found)
        return self.total
