"""What a tracing session was asked to do: one typed record, each default written once.

The CLI builds it (cli.py), the session and the start-up read it, a recording stores it
(``to_dict``) so that ``report`` replays with the options the live run had.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Default sizes of the kernel's per-socket and CLOSE_WAIT maps (entries).
DEFAULT_MAX_SOCKS = 131072
DEFAULT_MAX_CW = 32768
#: Closed connections kept for the summary and the diagnosis of later ones.
DEFAULT_KEEP_CLOSED = 10000
DEFAULT_THRESHOLD_NS = 10_000_000_000
DEFAULT_REPORT_MIN_NS = 200_000_000
DEFAULT_POLL_INTERVAL_S = 0.2
#: Backend names a user may give; "auto" picks the best the kernel allows.
BACKEND_NAMES = ("auto", "kprobe", "fentry", "tracepoint")


class TimelineMode(enum.Enum):
    """Which lifecycle timelines are shown."""

    FLAGGED = "flagged"  # every flagged socket's, from the milestones the kernel keeps
    ALL = "all"  # every matching socket's at its end: the kernel sends all transitions


class AcceptWatch(enum.Enum):
    """Tracepoint backend: when the accept() syscall tracepoints are attached."""

    AUTO = "auto"  # while never-accepted sockets need explaining; part-time in a long incident
    WHILE_NEEDED = "while-needed"  # all the time while they need explaining
    ALWAYS = "always"


@dataclass(frozen=True)
class Options:
    pids: frozenset[int] = frozenset()
    ports: frozenset[int] = frozenset()
    threshold_ns: int = DEFAULT_THRESHOLD_NS
    report_min_ns: int = DEFAULT_REPORT_MIN_NS
    backend: str | None = None  # a name of BACKEND_NAMES; None or "auto": the best there is
    kernel_headers: Path | None = None
    duration_s: float | None = None
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    timelines: TimelineMode | None = None
    max_socks: int = DEFAULT_MAX_SOCKS
    max_cw: int = DEFAULT_MAX_CW
    #: CLOSE_WAIT map entries one uid may hold (None: three quarters of max_cw; 0: no limit)
    owner_room: int | None = None
    keep_closed: int = DEFAULT_KEEP_CLOSED
    accept_watch: AcceptWatch = AcceptWatch.AUTO
    #: --container values (names, id prefixes, pods) and --netns inodes (userspace filters)
    containers: tuple[str, ...] = ()
    netns: frozenset[int] = frozenset()

    @property
    def timeline_all(self) -> bool:
        """The kernel sends every transition of matching sockets."""
        return self.timelines is TimelineMode.ALL

    def to_dict(self) -> dict[str, Any]:
        return {
            "pids": sorted(self.pids),
            "ports": sorted(self.ports),
            "threshold_ns": self.threshold_ns,
            "report_min_ns": self.report_min_ns,
            "backend": self.backend,
            "poll_interval_s": self.poll_interval_s,
            "timeline_all": self.timeline_all,
            "timelines": self.timelines.value if self.timelines else None,
            "max_socks": self.max_socks,
            "max_cw": self.max_cw,
            "owner_room": self.owner_room,
            "keep_closed": self.keep_closed,
            "accept_watch": self.accept_watch.value,
            "containers": list(self.containers),
            "netns": sorted(self.netns),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Options:
        """The options a recording was made with (its header); raises ValueError, KeyError
        or TypeError on a malformed one."""
        timelines = d.get("timelines")
        return cls(
            pids=frozenset(int(p) for p in d.get("pids", ())),
            ports=frozenset(int(p) for p in d.get("ports", ())),
            threshold_ns=int(d["threshold_ns"]),
            report_min_ns=int(d["report_min_ns"]),
            backend=d.get("backend"),
            poll_interval_s=float(d.get("poll_interval_s", DEFAULT_POLL_INTERVAL_S)),
            timelines=TimelineMode(timelines) if timelines else None,
            max_socks=int(d.get("max_socks", DEFAULT_MAX_SOCKS)),
            max_cw=int(d.get("max_cw", DEFAULT_MAX_CW)),
            owner_room=None if d.get("owner_room") is None else int(d["owner_room"]),
            keep_closed=int(d.get("keep_closed", DEFAULT_KEEP_CLOSED)),
            accept_watch=AcceptWatch(str(d.get("accept_watch", AcceptWatch.AUTO.value))),
            containers=tuple(str(c) for c in d.get("containers", ())),
            netns=frozenset(int(n) for n in d.get("netns", ())),
        )
