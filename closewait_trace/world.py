"""Everything a session asks of the outside world, behind one interface.

The session's logic sees the kernel (events, the cw map, counters), sock_diag, /proc and the
clock only through a World. LiveWorld answers from the real machine; record.RecordingWorld
writes every answer to a file as it passes; record.ReplayWorld answers from such a file. So
`closewait-trace report` runs the very code that ran live, on the very same inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from . import enrich
from .attach import Probes
from .decode import Event, SockInfo, Stat
from .enrich import DiagSocket, SocketOwner, TcpState


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


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    alive: bool
    open_fds: int | None = None
    fd_limit: int | None = None
    #: syscall name -> threads blocked in it now ("running": on a CPU or in user space)
    threads: dict[str, int] = field(default_factory=dict)
    #: fds registered with EPOLLET in one of its epoll sets
    et_fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class ListenerInfo:
    family: int
    laddr: str
    lport: int
    queue: int
    backlog: int
    owners: tuple[SocketOwner, ...]


class WorldEnded(Exception):
    """A replayed world ran out (end of a recording, or a line it cannot read) mid-step."""


def process_info(pid: int) -> ProcessInfo:
    """A process's open files, limit, thread states and edge-triggered fds, from /proc."""
    if not enrich.pid_alive(pid):
        return ProcessInfo(pid, False)
    threads = enrich.thread_syscalls(pid)
    et = tuple(sorted(enrich.edge_triggered_fds(pid)))
    try:
        fds, limit = enrich.open_files(pid)
    except Exception:
        return ProcessInfo(pid, True, threads=threads, et_fds=et)
    return ProcessInfo(pid, True, fds, limit if limit >= 0 else None, threads, et)


class World(Protocol):
    def now_ns(self) -> int: ...
    def checkpoint(self, stop: bool) -> bool:
        """The loop's decision to stop, so that a replay stops where the live run did."""
        ...
    def events(self, timeout_ms: int) -> list[Event]: ...
    def close_wait(self) -> list[SockInfo]: ...
    def counters(self) -> Counters: ...
    def diag_close_wait(self) -> list[DiagSocket]: ...
    def listeners(self) -> list[ListenerInfo]: ...
    def owners(self, inode: int) -> list[SocketOwner]: ...
    def refresh_owners(self) -> None: ...
    def process(self, pid: int) -> ProcessInfo: ...
    def descendants(self, pids: Collection[int]) -> list[int]: ...
    def set_pids(self, pids: Iterable[int]) -> None: ...
    def seed_listener(self, port: int, pid: int, comm: str) -> None: ...
    def set_accept_watch(self, on: bool) -> None: ...
    def arm(self) -> None:
        """Filters and seeds are written: the kernel programs act from now on."""
        ...
    def finished(self) -> bool: ...
    def close(self) -> None: ...


class LiveWorld:
    """The running kernel (through the loaded probes), sock_diag and /proc."""

    def __init__(self, probes: Probes, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.probes = probes
        self.clock = clock
        self.index = enrich.ProcessIndex()
        self._pending: list[Event] = []
        probes.open_events(self._pending.append)

    def now_ns(self) -> int:
        return self.clock()

    def checkpoint(self, stop: bool) -> bool:
        return stop

    def events(self, timeout_ms: int) -> list[Event]:
        if not self.probes._closed:
            self.probes.poll_events(timeout_ms)
        out, self._pending[:] = list(self._pending), []
        return out

    def close_wait(self) -> list[SockInfo]:
        return [] if self.probes._closed else self.probes.read_cw()

    def counters(self) -> Counters:
        if self.probes._closed:
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

    def diag_close_wait(self) -> list[DiagSocket]:
        try:
            return enrich.diag_sockets({TcpState.CLOSE_WAIT})
        except Exception:
            return []

    def listeners(self) -> list[ListenerInfo]:
        try:
            found = enrich.listeners_with_owners(self.index)
        except Exception:
            return []
        return [
            ListenerInfo(lst.family, lst.laddr, lst.lport, lst.queue, lst.backlog,
                         tuple(lst.owners))
            for lst in found
        ]

    def owners(self, inode: int) -> list[SocketOwner]:
        return self.index.owners(inode)

    def refresh_owners(self) -> None:
        """Rescan the processes' fd tables now (owners() rescans at most once a second)."""
        self.index.refresh()

    def process(self, pid: int) -> ProcessInfo:
        return process_info(pid)

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

    def set_pids(self, pids: Iterable[int]) -> None:
        if not self.probes._closed:
            self.probes.set_pids(pids)

    def seed_listener(self, port: int, pid: int, comm: str) -> None:
        self.probes.seed_listener(port, pid, comm)

    def set_accept_watch(self, on: bool) -> None:
        self.probes.set_accept_watch(on)

    def arm(self) -> None:
        self.probes.arm()

    def finished(self) -> bool:
        return False

    def close(self) -> None:
        self.probes.close()
