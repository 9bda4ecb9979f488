"""Everything a session asks of the outside world, behind one interface.

The session's logic sees the kernel (events, the cw map, counters), sock_diag, /proc and the
clock only through a World. LiveWorld answers from the real machine; record.RecordingWorld
writes every answer to a file as it passes; record.ReplayWorld answers from such a file. So
`closewait-trace report` runs the very code that ran live, on the very same inputs.
What the session tells the kernel programs goes through the World's `controls`: commands, not
answers, so a recording does not write them and a replay has no kernel to tell.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .facts import containers, enrich, holders, netns
from .kernel.attach import Probes
from .facts.containers import ContainerIdentity
from .kernel.decode import Event, SockInfo, Stat
from .facts.enrich import DiagSocket, SocketOwner, TcpState
from .errors import CloseWaitError
from .facts.facts import Listener, ListenerHolder, Namespaces, Process


@dataclass(frozen=True)
class AcceptCounters:
    ok: int
    err: int
    last_ok_ns: int
    last_err_ns: int
    last_err: int


@dataclass(frozen=True)
class Counters:
    """The kernel's counters, read together."""

    stats: dict[Stat, int] = field(default_factory=dict)
    accept: dict[int, AcceptCounters] = field(default_factory=dict)
    accept_errs: dict[tuple[int, int], int] = field(default_factory=dict)
    hist: tuple[int, ...] = ()


#: The one process type, under the name the World used first.
ProcessInfo = Process


@dataclass(frozen=True)
class CallOrder:
    """What a session asks of its World that earlier versions did not: a replay must ask a
    recording exactly what the session that wrote it asked (record.ReplayWorld says which)."""

    #: the flag's second look at a socket found in an accept queue (recording format 3 on)
    relook_at_flag: bool = True
    #: the programs act before the sweep of sockets already in CLOSE_WAIT, which is made
    #: twice with the kernel's map read in between (format 4 on); before, a socket entering
    #: CLOSE_WAIT between the sweep and the programs' start was seen by neither
    sweep_after_arm: bool = True


class WorldEnded(Exception):
    """A replayed world ran out (end of a recording, or a line it cannot read) mid-step."""


def process_info(pid: int) -> Process:
    """A process's open files, limit, thread states and edge-triggered fds, from /proc."""
    if not enrich.pid_alive(pid):
        return Process(pid, False)
    threads = enrich.thread_syscalls(pid)
    et = tuple(sorted(enrich.edge_triggered_fds(pid)))
    try:
        fds, limit = enrich.open_files(pid)
    except Exception:
        return Process(pid, True, threads=threads, et_fds=et)
    return Process(pid, True, fds, limit if limit >= 0 else None, threads, et)


class HostFacts(Protocol):
    """What the enrichment stage asks: sock_diag in each namespace, /proc, containers."""

    def diag_close_wait(self, netns: int | None = None) -> list[DiagSocket]:
        """The sockets in CLOSE_WAIT of one namespace (None: the tracer's own)."""
        ...
    def listeners(self, netns: int | None = None) -> list[Listener]: ...
    def namespaces(self) -> Namespaces | None:
        """The host's network namespaces; None: this World cannot tell (a format-1
        recording), and every question is the tracer's own namespace's."""
        ...
    def lookup(self, netns: int, family: int, laddr: str, lport: int, raddr: str,
               rport: int) -> DiagSocket | None: ...
    def netns_of(self, pid: int) -> int | None: ...
    def container(self, pid: int) -> ContainerIdentity | None: ...
    def holders(self, listener: Listener) -> list[ListenerHolder]: ...
    def owners(self, inode: int) -> list[SocketOwner]: ...
    def refresh_owners(self) -> None: ...
    def process(self, pid: int) -> Process: ...


class Controls(Protocol):
    """What a session tells the kernel programs (attach.Probes in a live run)."""

    def set_pids(self, pids: Iterable[int]) -> None: ...
    def seed_listener(self, netns: int | None, port: int, pid: int, comm: str) -> None:
        """A listener that existed before the tracer (netns: its namespace's inode, None
        for the tracer's own): its children get this owner."""
        ...
    def set_accept_watch(self, on: bool, waiting: Collection[int] = ()) -> None:
        """Attach the accept watch (tracepoint backend) or not; waiting: the struct sock
        addresses of the sockets in CLOSE_WAIT still believed never accepted."""
        ...
    def arm(self) -> None:
        """Filters and seeds are written: the kernel programs act from now on."""
        ...


class World(HostFacts, Protocol):
    """Everything a tracing session asks, and its controls of the kernel programs."""

    def now_ns(self) -> int: ...
    def checkpoint(self, stop: bool) -> bool:
        """The loop's decision to stop, so that a replay stops where the live run did."""
        ...
    def events(self, timeout_ms: int) -> list[Event]: ...
    def close_wait(self) -> list[SockInfo]: ...
    def counters(self) -> Counters: ...
    def descendants(self, pids: Collection[int]) -> list[int]: ...
    @property
    def controls(self) -> Controls: ...
    def finished(self) -> bool: ...
    def close(self) -> None: ...


class HostWorld:
    """The machine without probes: sock_diag in every network namespace and /proc. What
    `snapshot` asks; LiveWorld adds the kernel's side."""

    #: Containers (by pid) remembered; a pid's cgroup rarely changes while it lives.
    MAX_CONTAINERS = 4096

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.index = enrich.ProcessIndex()
        self.diag = netns.NetnsDiag()
        self.names = containers.NameResolver()
        self._containers: dict[int, ContainerIdentity | None] = {}

    def now_ns(self) -> int:
        return self.clock()

    def diag_close_wait(self, netns: int | None = None) -> list[DiagSocket]:
        try:
            if netns is None:
                return enrich.diag_sockets({TcpState.CLOSE_WAIT})
            return self.diag.diag_sockets(netns, {TcpState.CLOSE_WAIT})
        except CloseWaitError:
            return []

    def listeners(self, netns: int | None = None) -> list[Listener]:
        try:
            if netns is None:
                return enrich.listeners_with_owners(self.index)
            sock, lock = self.diag._socket(netns)
            with lock:
                return enrich.listeners_with_owners(self.index, nl=sock, netns=netns)
        except (CloseWaitError, OSError):
            return []

    def namespaces(self) -> Namespaces | None:
        return Namespaces(self.diag.host_inode, tuple(sorted(self.diag.namespaces())))

    def lookup(self, netns: int, family: int, laddr: str, lport: int, raddr: str,
               rport: int) -> DiagSocket | None:
        try:
            return self.diag.lookup(netns, family, laddr, lport, raddr, rport)
        except CloseWaitError:
            return None

    def netns_of(self, pid: int) -> int | None:
        return netns.netns_inode(pid)

    def container(self, pid: int) -> ContainerIdentity | None:
        if pid in self._containers:
            return self._containers[pid]
        ident = containers.identity_of_pid(pid)
        if ident is not None:
            ident = self.names.resolve(ident)
        if len(self._containers) >= self.MAX_CONTAINERS:
            self._containers.clear()
        self._containers[pid] = ident
        return ident

    def holders(self, listener: Listener) -> list[ListenerHolder]:
        if not listener.inode:
            return []
        found = holders.listener_holders(listener.inode)
        serving = self._serving(listener, [h.pid for h in found])
        return [holder_facts(h, serving.get(h.pid, 0)) for h in found]

    def _serving(self, listener: Listener, pids: list[int]) -> dict[int, int]:
        """pid -> connections of the listener's port it holds now (one dump of the
        listener's port in its namespace, filtered by the kernel)."""
        if not pids:
            return {}
        try:
            states = set(TcpState) - {TcpState.LISTEN, TcpState.SYN_SENT, TcpState.SYN_RECV,
                                      TcpState.NEW_SYN_RECV, TcpState.TIME_WAIT}
            socks = (enrich.diag_sockets(states, sport=listener.lport) if listener.netns is None
                     else self.diag.diag_sockets(listener.netns, states, sport=listener.lport))
        except CloseWaitError:
            return {}
        # (the kernel filtered by port; a walk that ignores the id would still be caught here)
        mine = {d.inode for d in socks if d.lport == listener.lport and d.inode}
        return {pid: len(self.index.inodes_of(pid) & mine) for pid in pids}

    def owners(self, inode: int) -> list[SocketOwner]:
        return self.index.owners(inode)

    def refresh_owners(self) -> None:
        """Rescan the processes' fd tables now (owners() rescans at most once a second)."""
        self.index.refresh()

    def process(self, pid: int) -> Process:
        return process_info(pid)

    def close(self) -> None:
        self.diag.close()


def holder_facts(h: holders.Holder, serving: int) -> ListenerHolder:
    """The recorded facts of one holder of a listener."""
    waiting = set(h.accepting_tids) | set(h.polling_tids)
    busy = sorted({t.syscall or "running" for t in h.threads if t.tid not in waiting})
    return ListenerHolder(
        pid=h.pid, comm=h.comm, fds=h.fds, state=h.state.value, waiting=h.waiting.value,
        accepting=len(h.accepting_tids), polling=len(h.polling_tids),
        open_files=h.open_files, max_open_files=h.max_open_files, serving=serving,
        busy_in=tuple(busy))


class LiveWorld(HostWorld):
    """The running kernel (through the loaded probes), sock_diag and /proc."""

    def __init__(self, probes: Probes, clock: Callable[[], int] = time.monotonic_ns) -> None:
        super().__init__(clock)
        self.probes = probes
        self.controls: Controls = probes
        self._pending: list[Event] = []
        probes.open_events(self._pending.append)

    def checkpoint(self, stop: bool) -> bool:
        return stop

    def events(self, timeout_ms: int) -> list[Event]:
        if not self.probes.closed:
            self.probes.poll_events(timeout_ms)
        out, self._pending[:] = list(self._pending), []
        return out

    def close_wait(self) -> list[SockInfo]:
        return [] if self.probes.closed else self.probes.read_cw()

    def counters(self) -> Counters:
        if self.probes.closed:
            return Counters()
        acc = {
            pid: AcceptCounters(int(s.ok), int(s.err), int(s.last_ok_ts), int(s.last_err_ts),
                                int(s.last_err))
            for pid, s in self.probes.read_accept_stats().items()
        }
        return Counters(
            stats=self.probes.read_stats(),
            accept=acc,
            accept_errs=self.probes.read_accept_errs(),
            hist=tuple(self.probes.read_hist()),
        )

    def descendants(self, pids: Collection[int]) -> list[int]:
        try:
            import psutil
        except ImportError:
            return []
        out: set[int] = set()
        for pid in pids:
            try:
                out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                continue
        return sorted(out)

    def finished(self) -> bool:
        return False

    def close(self) -> None:
        try:
            self.probes.close()
        finally:
            super().close()
