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
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import AcceptWatch

_S = 1_000_000_000


@dataclass(frozen=True)
class DutyCycle:
    #: continuous at the start of an incident: the first evidence comes at once
    first_ns: int = 30 * _S
    #: then attached this long ...
    on_ns: int = 2 * _S
    #: ... at the start of every period
    period_ns: int = 20 * _S
    #: an incident ends this long after its last never-accepted socket
    linger_ns: int = 30 * _S

    @property
    def fraction(self) -> float:
        return self.on_ns / self.period_ns


class AcceptWatchPlan:
    """Decides, tick by tick, whether the accept watch should be attached."""

    def __init__(self, mode: AcceptWatch, cycle: DutyCycle = DutyCycle()) -> None:
        self.mode = mode
        self.cycle = cycle
        self._incident_ns: int | None = None  # when the current incident began
        self._last_need_ns = 0
        #: time the watch was attached, as far as the plan was asked
        self.attached_ns = 0
        self._on = False
        self._asked_ns: int | None = None

    def wanted(self, now_ns: int, needed: bool) -> bool:
        """needed: a never-accepted socket is open now. Called once a tick."""
        if self._on and self._asked_ns is not None:
            self.attached_ns += now_ns - self._asked_ns
        self._on = self._decide(now_ns, needed)
        self._asked_ns = now_ns
        return self._on

    def _decide(self, now_ns: int, needed: bool) -> bool:
        if self.mode is AcceptWatch.ALWAYS:
            return True
        if needed:
            self._last_need_ns = now_ns
            if self._incident_ns is None:
                self._incident_ns = now_ns
        elif self._incident_ns is not None \
                and now_ns - self._last_need_ns >= self.cycle.linger_ns:
            self._incident_ns = None
        if self._incident_ns is None:
            return False
        if not self.sampling(now_ns):
            return True
        since = now_ns - self._incident_ns - self.cycle.first_ns
        return since % self.cycle.period_ns < self.cycle.on_ns

    def sampling(self, now_ns: int) -> bool:
        """Past the continuous start of an incident, in auto mode: attached part-time."""
        return self.mode is AcceptWatch.AUTO and self._incident_ns is not None \
            and now_ns - self._incident_ns >= self.cycle.first_ns

    def coverage(self, now_ns: int) -> float:
        """The share of recent time accept() outcomes were seen (1.0: all of it)."""
        return self.cycle.fraction if self.sampling(now_ns) else 1.0

    def describe(self) -> str:
        c = self.cycle
        return (f"accept() is now watched {c.on_ns / _S:g} s in every {c.period_ns / _S:g} s"
                f" (continuously for the first {c.first_ns / _S:g} s): the accept syscall"
                " tracepoints slow every syscall on the machine while attached;"
                " --accept-watch while-needed keeps them on")
