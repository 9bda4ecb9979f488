"""Who holds a listening socket now, and whether each holder waits for it.

The owners of a listener are the processes whose fd table refers to its inode now (after a
fork every worker of a pre-fork server holds it; a master that called listen() may hold it
and never accept).  For each holder this module reads, from ``/proc`` only:

* its state (``/proc/PID/stat``: running, sleeping, stopped, ...);
* where each thread is (``/proc/PID/task/TID/syscall``): blocked in accept()/accept4() on the
  listener, in epoll_wait on an epoll set that has the listener registered, in poll()/select()
  with the listener among the fds (the fd array is read from ``/proc/PID/mem``, which needs
  the same privilege as ptrace), or elsewhere;
* the listener's registrations in its epoll sets (``/proc/PID/fdinfo/EPFD`` lines
  ``tfd: N events: X ... ino: I``; ``ino`` is the target's inode, in hex);
* its open files and limit.

The verdict (which process should be accepting and is not) is the diagnosis's job; this
module only states the facts.  Processes that vanish while read are left out.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from closewait_trace.pipeline.diagnose import EPOLL_WAITS
from closewait_trace.facts.enrich import (
    EPOLLET,
    PROC,
    _pids,
    _scan_socket_fds,
    comm_of,
    open_files,
    syscall_name,
)
from closewait_trace.errors import EnrichError

__all__ = [
    "EpollEntry",
    "Holder",
    "ProcState",
    "ThreadSyscall",
    "Waiting",
    "describe_holder",
    "find_holders",
    "listener_holders",
    "parse_epoll_entries",
    "parse_fd_set",
    "parse_pollfds",
    "parse_stat_state",
    "parse_syscall",
    "read_epoll",
    "read_threads",
]

ACCEPTS = frozenset({"accept", "accept4"})
POLLS = frozenset({"poll", "ppoll"})
SELECTS = frozenset({"select", "pselect6"})
EPOLLEXCLUSIVE = 1 << 28
_MAX_POLL_FDS = 1 << 16
_POLLFD = struct.Struct("=ihh")


class ProcState(enum.Enum):
    """The scheduler state of a process or thread (the letter of ``/proc/PID/stat``)."""

    RUNNING = "running"
    SLEEPING = "sleeping"
    DISK = "disk-sleep"
    STOPPED = "stopped"
    TRACED = "traced"
    ZOMBIE = "zombie"
    IDLE = "idle"
    OTHER = "other"

    @classmethod
    def from_letter(cls, letter: str) -> ProcState:
        return _STATE_LETTERS.get(letter, cls.OTHER)


_STATE_LETTERS = {
    "R": ProcState.RUNNING, "S": ProcState.SLEEPING, "D": ProcState.DISK,
    "T": ProcState.STOPPED, "t": ProcState.TRACED, "Z": ProcState.ZOMBIE,
    "X": ProcState.ZOMBIE, "I": ProcState.IDLE,
}


class Waiting(enum.Enum):
    """Whether a holder waits for the listener now (regardless of being stopped)."""

    ACCEPT = "accept"  # a thread is blocked in accept()/accept4() on it
    POLL = "poll"  # a thread is blocked in epoll_wait/poll/select on a set that includes it
    REGISTERED = "registered"  # in one of its epoll sets, but no thread waits there now
    UNKNOWN = "unknown"  # threads in poll/select whose fd sets could not be read
    NO = "no"  # nothing in the process waits for it: it only keeps the fd


@dataclass(frozen=True)
class ThreadSyscall:
    """Where one thread is: its state and the syscall it is blocked in (None: running in
    user space or on a CPU), with the syscall's six arguments."""

    tid: int
    state: ProcState
    syscall: str | None
    args: tuple[int, ...] = ()


@dataclass(frozen=True)
class EpollEntry:
    """One registration in an epoll set: the holder's epoll fd, the registered fd number,
    the event mask and the target's inode (None on kernels that do not print it)."""

    epfd: int
    tfd: int
    events: int
    inode: int | None

    @property
    def edge_triggered(self) -> bool:
        return bool(self.events & EPOLLET)

    @property
    def exclusive(self) -> bool:
        return bool(self.events & EPOLLEXCLUSIVE)


@dataclass(frozen=True)
class Holder:
    """A process holding the listener's file descriptor, and what it is doing about it."""

    pid: int
    comm: str
    fds: tuple[int, ...]  # its fds that refer to the listener
    state: ProcState
    waiting: Waiting
    accepting_tids: tuple[int, ...]  # blocked in accept()/accept4() on the listener
    polling_tids: tuple[int, ...]  # blocked in epoll_wait/poll/select including it
    epoll: tuple[EpollEntry, ...]  # the listener's registrations in its epoll sets
    threads: tuple[ThreadSyscall, ...]
    open_files: int | None = None
    max_open_files: int | None = None

    @property
    def stopped(self) -> bool:
        return self.state in (ProcState.STOPPED, ProcState.TRACED)

    @property
    def ready_to_accept(self) -> bool:
        """Waits for the listener now and can run (not stopped)."""
        return not self.stopped and self.waiting in (Waiting.ACCEPT, Waiting.POLL)


# --------------------------------------------------------------------------- parsing /proc text


def parse_stat_state(text: str) -> ProcState | None:
    """The state of ``/proc/PID/stat`` (or a task's) text: ``PID (comm) S ...``; the comm may
    hold spaces and parentheses, so the state follows the last ``)``."""
    end = text.rfind(")")
    if end < 0:
        return None
    fields = text[end + 1 :].split()
    return ProcState.from_letter(fields[0]) if fields else None


def parse_syscall(text: str) -> tuple[int | None, tuple[int, ...]]:
    """(syscall number, its six arguments) from ``/proc/PID/task/TID/syscall``.

    ``running`` (on a CPU) and ``-1 SP PC`` (blocked, but not in a syscall) give
    ``(None, ())``; so does text that is neither.
    """
    fields = text.split()
    if not fields or fields[0] in ("running", "-1"):
        return None, ()
    try:
        nr = int(fields[0])
        args = tuple(int(f, 16) for f in fields[1:7])
    except ValueError:
        return None, ()
    return nr, args


def parse_epoll_entries(epfd: int, text: str) -> list[EpollEntry]:
    """The registrations of an epoll fd from its ``/proc/PID/fdinfo/EPFD`` text
    (``tfd: 3 events: 19 data: 3 pos:0 ino:166057 sdev:9``; events and ino are hex)."""
    out: list[EpollEntry] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] != "tfd:" or parts[2] != "events:":
            continue
        try:
            tfd, events = int(parts[1]), int(parts[3], 16)
            inode: int | None = None
            for part in parts[4:]:
                if part.startswith("ino:"):
                    inode = int(part[4:], 16)
        except ValueError:
            continue
        out.append(EpollEntry(epfd=epfd, tfd=tfd, events=events, inode=inode))
    return out


def parse_pollfds(raw: bytes) -> list[int]:
    """The fds of a ``struct pollfd`` array (negative fds are ignored by poll())."""
    usable = len(raw) - len(raw) % _POLLFD.size
    return [fd for fd, _ev, _rev in _POLLFD.iter_unpack(raw[:usable]) if fd >= 0]


def parse_fd_set(raw: bytes, nfds: int) -> list[int]:
    """The fds set in a select() ``fd_set`` bitmap of ``nfds`` bits (little-endian words)."""
    out: list[int] = []
    for fd in range(min(nfds, len(raw) * 8)):
        if raw[fd // 8] & (1 << (fd % 8)):
            out.append(fd)
    return out


# --------------------------------------------------------------------------- reading /proc


def _read(path: str, limit: int = 1 << 16) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_memory(pid: int, addr: int, size: int, proc_root: Path) -> bytes | None:
    """``size`` bytes of a process's memory at ``addr`` (None without privilege or when the
    address is not mapped)."""
    if addr == 0 or size <= 0:
        return None
    try:
        with open(f"{os.fspath(proc_root)}/{pid}/mem", "rb", buffering=0) as fh:
            fh.seek(addr)
            data = fh.read(size)
    except (OSError, OverflowError, ValueError):
        return None
    return data if len(data) == size else None


def read_threads(pid: int, proc_root: Path = PROC) -> list[ThreadSyscall]:
    """Where each thread of ``pid`` is now ([] when the process is gone)."""
    base = f"{os.fspath(proc_root)}/{pid}/task"
    try:
        tids = sorted(int(t) for t in os.listdir(base) if t.isdigit())
    except OSError:
        return []
    out: list[ThreadSyscall] = []
    for tid in tids:
        stat = _read(f"{base}/{tid}/stat", 1024)
        text = _read(f"{base}/{tid}/syscall", 512)
        if stat is None or text is None:
            continue  # exited meanwhile
        state = parse_stat_state(stat) or ProcState.OTHER
        nr, args = parse_syscall(text)
        out.append(ThreadSyscall(tid=tid, state=state,
                                 syscall=None if nr is None else syscall_name(nr), args=args))
    return out


def read_epoll(pid: int, proc_root: Path = PROC) -> list[EpollEntry]:
    """Every registration in every epoll set ``pid`` holds."""
    fd_dir = f"{os.fspath(proc_root)}/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return []
    out: list[EpollEntry] = []
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}") != "anon_inode:[eventpoll]":
                continue
        except OSError:
            continue
        text = _read(f"{os.fspath(proc_root)}/{pid}/fdinfo/{name}", 1 << 20)
        if text is not None:
            out.extend(parse_epoll_entries(int(name), text))
    return out


def _polled_fds(pid: int, thread: ThreadSyscall, proc_root: Path) -> list[int] | None:
    """The fds a thread blocked in poll()/select() waits on (None when unreadable)."""
    args = thread.args
    if len(args) < 2:
        return None
    if thread.syscall in POLLS:
        nfds = min(args[1], _MAX_POLL_FDS)
        raw = _read_memory(pid, args[0], nfds * _POLLFD.size, proc_root)
        return None if raw is None else parse_pollfds(raw)
    nfds = min(args[0], _MAX_POLL_FDS)  # select, pselect6: (n, readfds, writefds, ...)
    if args[1] == 0:
        return []
    raw = _read_memory(pid, args[1], (nfds + 63) // 64 * 8, proc_root)
    return None if raw is None else parse_fd_set(raw, nfds)


# --------------------------------------------------------------------------- holders


def find_holders(inodes: Collection[int], proc_root: Path = PROC
                 ) -> dict[int, dict[int, tuple[int, ...]]]:
    """inode -> {pid: the fds of pid that refer to it}, scanning every ``/proc/PID/fd`` now
    (a fresh scan: a worker forked a moment ago is a holder too)."""
    wanted = {i for i in inodes if i > 0}
    out: dict[int, dict[int, tuple[int, ...]]] = {}
    if not wanted:
        return out
    root = os.fspath(proc_root)
    for pid in _pids(proc_root):
        for fd, inode in _scan_socket_fds(f"{root}/{pid}/fd"):
            if inode in wanted:
                per_pid = out.setdefault(inode, {})
                per_pid[pid] = (*per_pid.get(pid, ()), fd)
    return {inode: {pid: tuple(sorted(fds)) for pid, fds in holders.items()}
            for inode, holders in out.items()}


def _waits_on(pid: int, thread: ThreadSyscall, fds: Collection[int], epoll_sets: set[int],
              proc_root: Path, read_memory: bool) -> str | None:
    """"accept", "poll", "unknown" (a poll/select set that cannot be read) or None."""
    name = thread.syscall
    if not thread.args or name is None:
        return None
    if name in ACCEPTS:
        return "accept" if thread.args[0] in fds else None
    if name in EPOLL_WAITS:
        return "poll" if thread.args[0] in epoll_sets else None
    if name in POLLS or name in SELECTS:
        polled = _polled_fds(pid, thread, proc_root) if read_memory else None
        if polled is None:
            return "unknown"
        return "poll" if set(polled) & set(fds) else None
    return None


def _waiting(accepting: list[int], polling: list[int], unknown: bool, registered: bool
             ) -> Waiting:
    if accepting:
        return Waiting.ACCEPT
    if polling:
        return Waiting.POLL
    if registered:
        return Waiting.REGISTERED
    return Waiting.UNKNOWN if unknown else Waiting.NO


def describe_holder(pid: int, listener_inode: int, fds: Collection[int], *,
                    proc_root: Path = PROC, read_memory: bool = True) -> Holder | None:
    """The facts about one holder of the listener (``fds``: its fds that refer to it), or
    None when the process is gone.  ``read_memory=False`` never reads ``/proc/PID/mem``
    (poll()/select() sets then count as unknown)."""
    stat = _read(f"{os.fspath(proc_root)}/{pid}/stat", 1024)
    state = parse_stat_state(stat) if stat is not None else None
    if state is None:
        return None
    threads = read_threads(pid, proc_root)
    epoll = tuple(e for e in read_epoll(pid, proc_root)
                  if (e.inode == listener_inode if e.inode is not None else e.tfd in fds))
    epoll_sets = {e.epfd for e in epoll}
    accepting: list[int] = []
    polling: list[int] = []
    unknown = False
    for thread in threads:
        how = _waits_on(pid, thread, fds, epoll_sets, proc_root, read_memory)
        if how == "accept":
            accepting.append(thread.tid)
        elif how == "poll":
            polling.append(thread.tid)
        elif how == "unknown":
            unknown = True
    count: int | None = None
    limit: int | None = None
    try:
        count, limit = open_files(pid, proc_root)
    except EnrichError:
        pass  # exited, or unreadable: the rest still stands
    return Holder(
        pid=pid, comm=comm_of(pid, proc_root) or "", fds=tuple(sorted(fds)), state=state,
        waiting=_waiting(accepting, polling, unknown, bool(epoll)),
        accepting_tids=tuple(accepting), polling_tids=tuple(polling), epoll=epoll,
        threads=tuple(threads), open_files=count, max_open_files=limit)


def listener_holders(listener_inode: int, *, proc_root: Path = PROC,
                     read_memory: bool = True) -> list[Holder]:
    """Every process holding the listener now, described, by pid."""
    found = find_holders((listener_inode,), proc_root).get(listener_inode, {})
    out = [describe_holder(pid, listener_inode, fds, proc_root=proc_root,
                           read_memory=read_memory) for pid, fds in sorted(found.items())]
    return [h for h in out if h is not None]
