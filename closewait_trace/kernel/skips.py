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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .decode import Stat

#: The kretprobes whose programs count their own runs: probed function -> the stat of runs.
KRETPROBE_RUNS: Mapping[str, Stat] = {"inet_csk_accept": Stat.ACCEPT_RET_RUNS,
                                      "__sys_accept4": Stat.ACCEPT_SYS_RUNS}

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


def skipped_runs(stats: Mapping[Stat, int], kretprobes: Mapping[str, tuple[int, int]],
                 misses: Iterable[int]) -> int:
    """Skipped runs: each counted kretprobe's misses and hits beyond its program's runs, and
    the programs' recursion misses."""
    total = sum(misses)
    for fn, (hits, missed) in kretprobes.items():
        runs = KRETPROBE_RUNS.get(fn)
        if runs is not None:
            total += missed + max(0, hits - stats.get(runs, 0))
    return total


@dataclass
class SkipCounter:
    """Reads the counts and keeps their total from ever going down. The hits are read first
    (a hit is counted before its program runs, so runs read first could fall short of hits
    that were not skipped); the runs read after may then include runs of hits the profile
    did not show yet, and the total would dip for a moment."""

    pid: int
    #: tracefs' kprobe_profile; None where no kretprobe was made through tracefs
    profile: Path | None = None
    total: int = 0

    def kretprobes(self) -> dict[str, tuple[int, int]]:
        """Read before the stats (the hits first, then the runs)."""
        if self.profile is None:
            return {}
        try:
            return kretprobe_counts(self.profile.read_text(), self.pid)
        except OSError:
            return {}

    def update(self, stats: Mapping[Stat, int], kretprobes: Mapping[str, tuple[int, int]],
               prog_fds: Iterable[int]) -> int:
        """The total so far, given the stats read after ``kretprobes`` and the fds of the
        programs loaded now."""
        misses = _recursion_misses_of(prog_fds)
        self.total = max(self.total, skipped_runs(stats, kretprobes, misses))
        return self.total


def _recursion_misses_of(prog_fds: Iterable[int]) -> Iterable[int]:
    for fd in prog_fds:
        try:
            yield recursion_misses(Path(f"/proc/self/fdinfo/{fd}").read_text())
        except OSError:
            continue
