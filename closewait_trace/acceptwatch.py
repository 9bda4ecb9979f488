"""When the tracepoint backend's accept watch is attached.

Without kprobes or fentry, accept() outcomes (the socket it returned, EMFILE and other
failures) come from the accept syscall tracepoints. While any syscall tracepoint is attached,
every syscall of every thread on the machine takes the kernel's slower tracing path: an
empty program on `syscalls:sys_exit_accept4` cost a busy nginx about a fifth of its connection
rate here. So the watch is attached only while sockets that were never accepted need
explaining (an incident), and during a long incident only part of the time: continuously for
its first `first_ns`, then `on_ns` in every `period_ns`. The cost is then bounded by the duty
cycle, and what the diagnosis reads from accept() outcomes is a sample, which it is told
through `coverage`.

An incident has listeners: those its never-accepted sockets wait on. A listener that joins a
long incident (another service starts failing while an old never-accepted socket is still
open) is a new story whose first evidence should come at once, so it restarts the continuous
watch, at most once in every `renew_ns`: the cost stays bounded when listeners keep joining.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from .options import AcceptWatch

_S = 1_000_000_000

#: a listener never-accepted sockets wait on: (network namespace inode or None, local port)
ListenerKey = tuple[int | None, int]


@dataclass(frozen=True)
class DutyCycle:
    #: continuous at the start of an incident (and when a listener joins it): the first
    #: evidence comes at once
    first_ns: int = 30 * _S
    #: then attached this long ...
    on_ns: int = 2 * _S
    #: ... at the start of every period
    period_ns: int = 20 * _S
    #: an incident ends this long after its last never-accepted socket
    linger_ns: int = 30 * _S
    #: a listener joining a running incident restarts the continuous watch at most once in
    #: this long (None: never; recordings made before listeners were told apart)
    renew_ns: int | None = 300 * _S

    @property
    def fraction(self) -> float:
        return self.on_ns / self.period_ns

    def as_info(self) -> dict[str, float]:
        """For the ready record (and so recordings): seconds."""
        info = {"first_s": self.first_ns / _S, "on_s": self.on_ns / _S,
                "period_s": self.period_ns / _S, "linger_s": self.linger_ns / _S}
        if self.renew_ns is not None:
            info["renew_s"] = self.renew_ns / _S
        return info

    @classmethod
    def from_info(cls, d: Mapping[str, Any]) -> DutyCycle:
        renew = d.get("renew_s")
        first, on, period, linger = (int(float(d[k]) * _S)
                                     for k in ("first_s", "on_s", "period_s", "linger_s"))
        return cls(first, on, period, linger,
                   None if renew is None else int(float(renew) * _S))


def plan_for(info: Mapping[str, Any], default: AcceptWatch, start_ns: int = 0
             ) -> AcceptWatchPlan:
    """The plan a session (live, or replaying a recording) follows, from its ready info.
    Recordings made before sampling existed have no cycle: their "auto" was continuous."""
    mode = AcceptWatch(str(info.get("accept_watch", default.value)))
    cycle = info.get("accept_watch_cycle")
    if not isinstance(cycle, Mapping):  # and its diagnoses knew nothing of coverage
        return AcceptWatchPlan(AcceptWatch.WHILE_NEEDED if mode is AcceptWatch.AUTO else mode,
                               start_ns=start_ns, measured=False)
    return AcceptWatchPlan(mode, DutyCycle.from_info(cycle), start_ns=start_ns)


class AcceptWatchPlan:
    """Decides, tick by tick, whether the accept watch should be attached, and remembers
    when it was: how long accept() was watched since a given time."""

    #: attachment intervals kept (a day of sampling at the default cycle)
    MAX_INTERVALS = 5000

    def __init__(self, mode: AcceptWatch, cycle: DutyCycle = DutyCycle(), *,
                 start_ns: int = 0, measured: bool = True) -> None:
        self.mode = mode
        #: False: watched_ns and coverage say "all the time" (replaying an old recording)
        self.measured = measured
        self.cycle = cycle
        self.start_ns = start_ns
        self._incident_ns: int | None = None  # when the current incident began
        self._last_need_ns = 0
        #: when the current continuous watch began (the incident's start, or a renewal)
        self._window_ns = 0
        self._renewed_ns: int | None = None
        #: the incident's listeners, each with the last time a socket waited on it
        self._listeners: dict[ListenerKey, int] = {}
        #: listeners that restarted the continuous watch, not yet told (see `joined`)
        self._joined: list[ListenerKey] = []
        #: [attached, detached (None: still attached)] of each attachment, oldest first
        self._intervals: deque[list[int | None]] = deque(maxlen=self.MAX_INTERVALS)
        #: time the watch was attached since start, as far as the plan was asked
        self.attached_ns = 0
        self._asked_ns: int | None = None

    @property
    def on(self) -> bool:
        return bool(self._intervals) and self._intervals[-1][1] is None

    def wanted(self, now_ns: int, needed: Set[ListenerKey]) -> bool:
        """needed: the listeners never-accepted sockets open now wait on. Once a tick."""
        if self.on and self._asked_ns is not None:
            self.attached_ns += now_ns - self._asked_ns
        on = self._decide(now_ns, needed)
        if on and not self.on:
            self._intervals.append([now_ns, None])
        elif self.on and not on:
            self._intervals[-1][1] = now_ns
        self._asked_ns = now_ns
        return on

    def watched_ns(self, since_ns: int, now_ns: int) -> int:
        """How long accept() was watched between since_ns and now_ns."""
        if self.mode is AcceptWatch.ALWAYS or not self.measured:
            return max(0, now_ns - since_ns)
        total = 0
        for begin, end in reversed(self._intervals):  # newest first: stop at since_ns
            stop = now_ns if end is None else min(end, now_ns)
            if stop <= since_ns:
                break
            assert begin is not None
            total += max(0, stop - max(begin, since_ns))
        return total

    def joined(self) -> list[ListenerKey]:
        """The listeners that restarted the continuous watch since last asked."""
        out, self._joined = self._joined, []
        return out

    def _decide(self, now_ns: int, needed: Set[ListenerKey]) -> bool:
        if self.mode is AcceptWatch.ALWAYS:
            return True
        self._follow_listeners(now_ns, needed)
        if needed:
            self._last_need_ns = now_ns
            if self._incident_ns is None:
                self._incident_ns = self._window_ns = now_ns
        elif self._incident_ns is not None \
                and now_ns - self._last_need_ns >= self.cycle.linger_ns:
            self._incident_ns = None
        if self._incident_ns is None:
            return False
        if not self.sampling(now_ns):
            return True
        since = now_ns - self._window_ns - self.cycle.first_ns
        return since % self.cycle.period_ns < self.cycle.on_ns

    def _follow_listeners(self, now_ns: int, needed: Set[ListenerKey]) -> None:
        """Listeners join the incident and leave it a linger after their last need; one that
        joins while the watch is sampled restarts the continuous watch (renew_ns apart)."""
        renew = self.cycle.renew_ns
        new = [k for k in needed if k not in self._listeners]
        if new and renew is not None and self.sampling(now_ns) and (
                self._renewed_ns is None or now_ns - self._renewed_ns >= renew):
            self._window_ns = self._renewed_ns = now_ns
            self._joined.extend(new)
        for key in needed:
            self._listeners[key] = now_ns
        for key in [k for k, t in self._listeners.items()
                    if now_ns - t >= self.cycle.linger_ns]:
            del self._listeners[key]

    @property
    def in_incident(self) -> bool:
        return self._incident_ns is not None

    def sampling(self, now_ns: int) -> bool:
        """Past the continuous start of an incident (or of its renewal), in auto mode:
        attached part-time."""
        return self.mode is AcceptWatch.AUTO and self._incident_ns is not None \
            and now_ns - self._window_ns >= self.cycle.first_ns

    def coverage(self, now_ns: int) -> float:
        """The share of the time since start that accept() outcomes were seen."""
        if self.mode is AcceptWatch.ALWAYS or not self.measured or now_ns <= self.start_ns:
            return 1.0
        return min(1.0, self.watched_ns(self.start_ns, now_ns) / (now_ns - self.start_ns))

    def describe(self) -> str:
        c = self.cycle
        renew = "" if c.renew_ns is None else (
            f", and again when a listener new to the incident has sockets waiting, at most"
            f" once in {c.renew_ns / _S:g} s")
        return (f"accept() is now watched {c.on_ns / _S:g} s in every {c.period_ns / _S:g} s"
                f" (continuously for the first {c.first_ns / _S:g} s{renew}): the accept"
                " syscall tracepoints slow every syscall on the machine while attached;"
                " --accept-watch while-needed keeps them on")

    def describe_renewal(self, joined: list[ListenerKey]) -> str:
        ports = sorted({str(port) for _, port in joined}, key=lambda p: (len(p), p))
        where = ", ".join(ports[:5]) + (", ..." if len(ports) > 5 else "")
        which = "a listener" if len(ports) == 1 else "listeners"
        return (f"accept() is watched continuously again for {self.cycle.first_ns / _S:g} s:"
                f" sockets now wait unaccepted on {which} new to the incident"
                f" (port{'s' if len(ports) > 1 else ''} {where})")
