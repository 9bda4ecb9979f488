"""The facts enrichment gathers about a socket's surroundings, as plain records.

One type per concept: a process (:class:`Process`), a listening socket (:class:`Listener`),
a process that holds a listener's file descriptor and what it does about it
(:class:`ListenerHolder`), and the network namespaces of the host (:class:`Namespaces`).
The World answers with these (live, recorded or replayed); the enrichment stage
(enrichment.py) joins them to connections; the diagnosis reads them. Pure data, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .containers import ContainerIdentity, Pod, Runtime
from .enrich import SocketOwner


@dataclass(frozen=True)
class Process:
    """A process as /proc shows it now."""

    pid: int
    alive: bool
    open_fds: int | None = None
    fd_limit: int | None = None
    #: syscall name -> threads blocked in it now ("running": on a CPU or in user space)
    threads: dict[str, int] = field(default_factory=dict)
    #: fds registered with EPOLLET in one of its epoll sets
    et_fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Listener:
    """A TCP socket in LISTEN: ``queue`` is its accept queue now, ``backlog`` its capacity,
    ``owners`` the processes whose fd table refers to it now (by pid)."""

    family: int
    laddr: str
    lport: int
    queue: int
    backlog: int
    owners: tuple[SocketOwner, ...] = ()
    #: its network namespace (inode); None where the answer did not say (format 1 records)
    netns: int | None = None
    inode: int = 0
    #: the process the kernel saw call listen() (kernel LISTEN events and the start-up
    #: seed); the processes that hold it now are ``owners``
    pid: int | None = None
    comm: str | None = None


#: Holder states (holders.ProcState values) that cannot run.
STOPPED_STATES = ("stopped", "traced")


@dataclass(frozen=True)
class ListenerHolder:
    """A process holding a listener's fd now, and whether it waits for it.

    ``waiting`` is a holders.Waiting value: "accept" (a thread blocked in accept() on it),
    "poll" (a thread in epoll_wait/poll/select on a set with it), "registered" (in an epoll
    set nobody waits on now), "unknown" (poll/select sets unreadable) or "no". ``serving``
    counts the connections of the listener's port it holds now (accepted, not closed): a
    worker busy with them, not a master that only keeps the fd. ``busy_in`` names the
    syscalls its threads are blocked in (or "running")."""

    pid: int
    comm: str
    fds: tuple[int, ...]
    state: str
    waiting: str
    accepting: int = 0
    polling: int = 0
    open_files: int | None = None
    max_open_files: int | None = None
    serving: int = 0
    busy_in: tuple[str, ...] = ()

    @property
    def stopped(self) -> bool:
        return self.state in STOPPED_STATES

    @property
    def ready(self) -> bool:
        """Waits for the listener now and can run."""
        return not self.stopped and self.waiting in ("accept", "poll")


@dataclass(frozen=True)
class Namespaces:
    """The host's network namespaces now: the tracer's own (``host``) and all of them."""

    host: int
    all: tuple[int, ...]


class NetnsSource(enum.Enum):
    """How a socket's network namespace is known."""

    KERNEL = "kernel"  # the kernel reported it with the socket
    SOCK_DIAG = "sock_diag"  # the socket's 4-tuple was found in that namespace
    OWNER = "owner"  # the namespace of the process that holds (or listens for) it


def container_from_dict(d: dict[str, str]) -> ContainerIdentity:
    """The inverse of ContainerIdentity.as_dict()."""
    runtime = d.get("runtime")
    return ContainerIdentity(
        cgroup=d["cgroup"], runtime=Runtime(runtime) if runtime else None,
        container_id=d.get("container_id"), container_name=d.get("container_name"),
        pod=Pod.from_dict(d))


__all__ = ["Listener", "ListenerHolder", "Namespaces", "NetnsSource", "Process",
           "STOPPED_STATES", "container_from_dict"]
