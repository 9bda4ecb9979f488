"""Enrichment stage: a connection plus what the World says, turned into facts.

Used alike by the live session, `report` (the same calls answered from a recording) and
`snapshot`. For each connection it finds, in the socket's own network namespace:

* the socket by its 4-tuple (sock_diag): inode 0 = never accepted, else accepted; its
  queues (the EOF read or not). The namespace is the kernel's where it reports one, else the
  one whose sock_diag knows the 4-tuple (the owner's namespace is asked first);
* the owner: whoever holds the socket's fd now (which may differ from the process the
  kernel saw accept or connect it: a forked child, a process it was passed to);
* for a socket never accepted, the listener it waits on (the only one of that namespace and
  port, or the one of a SO_REUSEPORT group whose queue is not empty) and the processes that
  hold that listener now, with what each is doing;
* the owner's container (cgroup, runtime, id, names).

Every question goes through the World, so a recording replays it. A World that cannot name
namespaces (a format-1 recording) gets the questions the tracer asked before namespaces
existed, in the same order: the tracer's own namespace only.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..facts.containers import ContainerIdentity
from .diagnose import AcceptStats, DurationStats, Facts, ListenerFacts, responsible_holders
from ..facts.enrich import DiagSocket, TupleIndex, normalize_addr
from ..facts.facts import Listener, ListenerHolder, Namespaces, NetnsSource, Process
from .join import Accepted, Connection, Direction, QueuedOn, Tracker
from ..world import Counters, HostFacts

_WILDCARDS = ("0.0.0.0", "::")
#: tries at finding a connection's socket before giving up on it
MAX_TRIES = 5


def choose_listener(listeners: Iterable[Listener], conn: Connection) -> QueuedOn | None:
    """The listener a never-accepted connection waits on, among its namespace's, and why
    that one: the one the kernel queued it on (kprobe/fentry), else the only one bound to
    its address and port, or, in a SO_REUSEPORT group, the one whose accept queue is not
    empty."""
    listeners = list(listeners)
    if conn.listener_ino:
        queued_on = [lst for lst in listeners if lst.inode == conn.listener_ino]
        if queued_on:
            return QueuedOn(queued_on[0], f"the listener the kernel queued it on (inode"
                                          f" {conn.listener_ino})")
    laddr = normalize_addr(conn.laddr)
    same = [lst for lst in listeners if lst.lport == conn.lport
            and (normalize_addr(lst.laddr) == laddr or lst.laddr in _WILDCARDS)]
    exact = [lst for lst in same if normalize_addr(lst.laddr) == laddr]
    group = exact or same
    where = f"namespace {conn.netns}" if conn.netns is not None else "this namespace"
    if not group:
        return None
    if len(group) == 1:
        return QueuedOn(group[0], f"the only listener of {where} on port {conn.lport}")
    queued = [lst for lst in group if lst.queue > 0]
    n = len(group)
    if len(queued) == 1:
        return QueuedOn(queued[0], f"the one of {n} SO_REUSEPORT listeners on port"
                                   f" {conn.lport} whose accept queue is not empty")
    if queued:
        best = max(queued, key=lambda lst: lst.queue)
        return QueuedOn(best, f"{len(queued)} of {n} SO_REUSEPORT listeners on port"
                              f" {conn.lport} have queued connections: the fullest"
                              " (a candidate)")
    return QueuedOn(group[0], f"{n} SO_REUSEPORT listeners on port {conn.lport}, none with"
                              " a queue now (a candidate)")


def container_matches(ident: ContainerIdentity | None, query: str) -> bool:
    """Whether a --container value names this identity: a container or pod name,
    namespace/pod, a pod UID, or a prefix (3+ characters) of the container id."""
    return ident is not None and ident.match(query) is not None


@dataclass
class _TickCache:
    """Answers asked once per tick, however many connections need them."""

    procs: dict[int, Process]
    listeners: dict[int | None, list[Listener]]
    holders: dict[tuple[int | None, int], list[ListenerHolder]]
    containers: dict[int, ContainerIdentity | None]


class Enrichment:
    """The enrichment stage of one session (or one snapshot)."""

    #: Per-connection lookups (0.02 ms each) per batch before one dump per namespace
    #: (4-14 ms each) is the cheaper way.
    LOOKUP_BUDGET = 2000
    NAMESPACES_EVERY_NS = 1_000_000_000

    def __init__(self, world: HostFacts, tracker: Tracker, *, relook_at_flag: bool = True
                 ) -> None:
        self.world = world
        self.tracker = tracker
        #: the flag's second look at queued sockets (where the accept watch is attached only
        #: while needed); False also when replaying a recording made before it (format 2)
        self.relook_at_flag = relook_at_flag
        self.counters = Counters()
        #: the share of the time since start accept() outcomes were seen, and how long they
        #: were seen between two times (the session's accept watch; by default: always)
        self.accept_coverage = 1.0
        self.accept_watched_ns: Callable[[int, int], int] = lambda since, now: now - since
        self._ns: Namespaces | None = None
        self._ns_at: int | None = None
        self._now = 0
        self._tick = _TickCache({}, {}, {}, {})

    # --- per tick -------------------------------------------------------------------------

    def begin_tick(self, now_ns: int) -> None:
        self._now = now_ns
        self._tick = _TickCache({}, {}, {}, {})

    def namespaces(self) -> Namespaces | None:
        """The host's namespaces, asked at most once a second."""
        if self._ns_at is None or self._now - self._ns_at >= self.NAMESPACES_EVERY_NS:
            self._ns, self._ns_at = self.world.namespaces(), self._now
        return self._ns

    def process(self, pid: int) -> Process:
        info = self._tick.procs.get(pid)
        if info is None:
            info = self._tick.procs[pid] = self.world.process(pid)
        return info

    def _listeners(self, netns: int | None) -> list[Listener]:
        if netns not in self._tick.listeners:
            self._tick.listeners[netns] = self.world.listeners(netns)
        return self._tick.listeners[netns]

    def _container(self, pid: int) -> ContainerIdentity | None:
        if pid not in self._tick.containers:
            self._tick.containers[pid] = self.world.container(pid)
        return self._tick.containers[pid]

    # --- finding the socket ---------------------------------------------------------------

    def enrich(self, conns: list[Connection]) -> None:
        """Inode (accepted or not), queues, namespace, owner and container of each."""
        needs = [c for c in conns if c.enrich_tries < MAX_TRIES]
        if not needs:
            return
        found = self._locate(needs)
        for conn in needs:
            self.apply(conn, found.get(id(conn)))

    def accepted_since(self, conns: list[Connection]) -> list[Connection]:
        """Sockets found never accepted, looked up again: those that have an inode now were
        accepted after the peer's FIN (when the kernel's accept watch did not see it)."""
        found = self._locate(conns)
        out = []
        for conn in conns:
            d = found.get(id(conn))
            if d is None or not d.inode:
                continue
            self.apply(conn, d)
            conn.accepted_after_fin = conn.accepted is Accepted.YES
            out.append(conn)
        return out

    def _locate(self, conns: list[Connection]) -> dict[int, DiagSocket | None]:
        ns = self.namespaces()
        if ns is None:  # namespace-blind: the tracer's own namespace
            index = TupleIndex(self.world.diag_close_wait())
            return {id(c): index.find(c.family, c.laddr, c.lport, c.raddr, c.rport)
                    for c in conns}
        order = {id(c): self._candidates(c, ns) for c in conns}
        if sum(len(o) for o in order.values()) > self.LOOKUP_BUDGET:
            return self._locate_by_dump(conns, order)
        out: dict[int, DiagSocket | None] = {}
        for conn in conns:
            out[id(conn)] = None
            for netns in order[id(conn)]:
                d = self.world.lookup(netns, conn.family, conn.laddr, conn.lport, conn.raddr,
                                      conn.rport)
                if d is not None:
                    out[id(conn)] = d
                    break
        return out

    def _locate_by_dump(self, conns: list[Connection], order: dict[int, list[int]]
                        ) -> dict[int, DiagSocket | None]:
        wanted = sorted({n for o in order.values() for n in o})
        index = {n: TupleIndex(self.world.diag_close_wait(n)) for n in wanted}
        out: dict[int, DiagSocket | None] = {}
        for conn in conns:
            out[id(conn)] = next(
                (d for n in order[id(conn)]
                 if (d := index[n].find(conn.family, conn.laddr, conn.lport, conn.raddr,
                                        conn.rport)) is not None), None)
        return out

    def _candidates(self, conn: Connection, ns: Namespaces) -> list[int]:
        """Namespaces to look for the socket in, likeliest first."""
        if conn.netns is not None and conn.netns_source is NetnsSource.KERNEL:
            return [conn.netns]
        first: list[int] = []
        if conn.netns is not None:
            first.append(conn.netns)
        elif conn.owner_pid is not None:
            owner_ns = self.world.netns_of(conn.owner_pid)
            if owner_ns is not None:
                first.append(owner_ns)
        first.append(ns.host)
        rest = [n for n in ns.all if n not in first]
        return list(dict.fromkeys(first)) + rest

    # --- what the socket says -------------------------------------------------------------

    def apply(self, conn: Connection, d: DiagSocket | None) -> None:
        """What sock_diag's row of the socket (None: not found) tells about it."""
        conn.enriched = True
        conn.enrich_tries += 1
        if d is None:
            self._identify(conn)
            return
        if d.netns is not None and conn.netns_source is not NetnsSource.KERNEL:
            conn.netns, conn.netns_source = d.netns, NetnsSource.SOCK_DIAG
        conn.inode = d.inode
        conn.uid = d.uid
        if d.inode == 0:
            self._never_accepted(conn)
            return
        # It has an inode: a file descriptor refers (or referred) to it. In CLOSE_WAIT the
        # peer's FIN counts as one unread byte until the application reads the EOF.
        conn.queued_on = None  # accepted since an earlier look
        conn.eof_read = d.rqueue == 0
        conn.unread_bytes = max(0, d.rqueue - 1)
        if conn.direction is not Direction.OUTBOUND and conn.accepted is not Accepted.YES:
            if self.tracker.listener_of(conn.netns, conn.lport) is not None \
                    or conn.direction is Direction.INBOUND \
                    or self._has_listener(conn):
                conn.accepted = Accepted.YES
                conn.direction = Direction.INBOUND
        self.assign_owner(conn)

    def _has_listener(self, conn: Connection) -> bool:
        """A listener of the socket's own namespace serves its local port (inbound)."""
        if conn.netns is None or conn.direction is not Direction.UNKNOWN:
            return False
        return choose_listener(self._listeners(conn.netns), conn) is not None

    def _never_accepted(self, conn: Connection) -> None:
        if conn.accepted is Accepted.UNKNOWN and conn.direction is not Direction.OUTBOUND:
            conn.accepted = Accepted.NO
        if conn.direction is Direction.UNKNOWN:
            conn.direction = Direction.INBOUND
        if conn.netns is not None:
            conn.queued_on = choose_listener(self._listeners(conn.netns), conn)
            lst = conn.queued_on.listener if conn.queued_on else None
            if lst is not None and lst.owners and (conn.owner_pid is None
                                                   or conn.netns_source is not None):
                owner = min(lst.owners, key=lambda o: o.pid)
                conn.owner_pid, conn.owner_comm = owner.pid, owner.comm
        elif conn.owner_pid is None:
            kernel_lst = self.tracker.listener_of(conn.netns, conn.lport)
            if kernel_lst is not None and kernel_lst.pid is not None:
                conn.owner_pid, conn.owner_comm = kernel_lst.pid, kernel_lst.comm
        self._identify(conn)

    def assign_owner(self, conn: Connection) -> None:
        """The process holding the socket's fd (a forked child may hold it, not the
        acceptor)."""
        assert conn.inode
        owners = self.world.owners(conn.inode)
        if owners:
            pref = [o for o in owners if o.pid == conn.owner_pid] or owners
            conn.owner_pid, conn.owner_comm, conn.fd = pref[0].pid, pref[0].comm, pref[0].fd
        self._identify(conn)

    def _identify(self, conn: Connection) -> None:
        """The owner's container, and its namespace where the socket's is not known."""
        if self.namespaces() is None or conn.owner_pid is None:
            return
        conn.container = self._container(conn.owner_pid)
        if conn.netns is None:
            owner_ns = self.world.netns_of(conn.owner_pid)
            if owner_ns is not None:
                conn.netns, conn.netns_source = owner_ns, NetnsSource.OWNER

    def at_flag(self, conns: list[Connection]) -> None:
        """A leak is reported with what its socket says now: what the application has read
        (accepted ones), and, where the accept watch is attached only while needed, whether
        one found in the accept queue has an inode by now (an accept() between that look and
        the watch's attach was seen by no one). Each is asked in its own namespace."""
        accepted = [c for c in conns if c.inode]
        queued = [c for c in conns if c.inode == 0 and c.accepted is Accepted.NO] \
            if self.relook_at_flag else []
        found = self._in_own_netns(accepted + queued)
        for conn in accepted:
            d = found.get(id(conn))
            if d is not None and d.inode:
                conn.eof_read = d.rqueue == 0
                conn.unread_bytes = max(0, d.rqueue - 1)
        for conn in queued:
            d = found.get(id(conn))
            if d is not None and d.inode:
                self.apply(conn, d)
                conn.accepted_after_fin = conn.accepted is Accepted.YES

    def _in_own_netns(self, conns: list[Connection]) -> dict[int, DiagSocket | None]:
        """Sockets found again in the namespace they were found in: one lookup each, or one
        dump per namespace for many."""
        if not conns:
            return {}
        if self.namespaces() is None or not self.relook_at_flag and \
                len(conns) > self.LOOKUP_BUDGET:  # (as sessions before format 3 did)
            return self._locate(conns)
        if len(conns) > self.LOOKUP_BUDGET:
            return self._locate_by_dump(
                conns, {id(c): [] if c.netns is None else [c.netns] for c in conns})
        return {id(c): self.world.lookup(c.netns, c.family, c.laddr, c.lport, c.raddr,
                                         c.rport) if c.netns is not None else None
                for c in conns}

    def owners_at_flag(self, conns: list[Connection]) -> None:
        """A leak is reported with the process that holds it: sockets whose holder was not
        found yet (the fd index is rescanned at most once a second) get one fresh scan."""
        need = [c for c in conns if c.inode and c.fd is None]
        if not need:
            return
        self.world.refresh_owners()
        for conn in need:
            self.assign_owner(conn)

    # --- facts for the diagnosis ----------------------------------------------------------

    def facts(self, conn: Connection, durations: DurationStats | None = None) -> Facts:
        pid = conn.owner_pid
        acc = None
        proc = None
        if pid is not None:
            acc = self._accept_stats(pid)
            proc = self.process(pid)
        lst_facts = None
        if conn.direction is not Direction.OUTBOUND and conn.accepted is Accepted.NO:
            lst_facts = self._listener_facts(conn, pid)
            if lst_facts is not None and lst_facts.holders:
                proc, acc = self._blame(conn, lst_facts, proc, acc)
        return Facts(accept=acc, process=proc, listener=lst_facts,
                     durations=durations if not conn.is_open else None,
                     accept_coverage=self.accept_coverage)

    def _accept_stats(self, pid: int) -> AcceptStats | None:
        st = self.counters.accept.get(pid)
        if st is None:
            return None
        return AcceptStats(
            ok=st.ok, err=st.err, last_ok_ns=st.last_ok_ns, last_err_ns=st.last_err_ns,
            last_err=st.last_err,
            watched_since_ok_ns=self.accept_watched_ns(st.last_ok_ns, self._now)
            if st.ok else None,
            errors={e: n for (p, e), n in self.counters.accept_errs.items() if p == pid},
        )

    def _blame(self, conn: Connection, lf: ListenerFacts, proc: Process | None,
               acc: AcceptStats | None) -> tuple[Process | None, AcceptStats | None]:
        """The owner of a never-accepted socket is the holder that should accept it."""
        _kind, who = responsible_holders(lf.holders)
        if not who or who[0].pid == conn.owner_pid:
            return proc, acc
        conn.owner_pid, conn.owner_comm = who[0].pid, who[0].comm
        conn.container = self._container(who[0].pid) if self.namespaces() else None
        return self.process(who[0].pid), self._accept_stats(who[0].pid)

    def _listener_facts(self, conn: Connection, owner: int | None) -> ListenerFacts | None:
        if conn.netns is None or self.namespaces() is None:
            lst = next((x for x in self._listeners(None) if x.lport == conn.lport), None)
            why = None
        else:
            conn.queued_on = choose_listener(self._listeners(conn.netns), conn)
            lst = conn.queued_on.listener if conn.queued_on else None
            why = conn.queued_on.why if conn.queued_on else None
        if lst is None:
            return None
        fds = [o for o in lst.owners if o.pid == owner] or list(lst.owners)
        fd = fds[0].fd if fds else None
        et = fd in self.process(fds[0].pid).et_fds if fds else None
        holders: tuple[ListenerHolder, ...] = ()
        if conn.flagged_ns is not None or not conn.history:
            holders = tuple(self._holders(lst))
        return ListenerFacts(port=lst.lport, queue=lst.queue, backlog=lst.backlog, fd=fd,
                             edge_triggered=et, laddr=lst.laddr, netns=lst.netns,
                             inode=lst.inode, reason=why, holders=holders)

    def _holders(self, lst: Listener) -> list[ListenerHolder]:
        if self.namespaces() is None or not lst.inode:
            return []
        key = (lst.netns, lst.inode)
        if key not in self._tick.holders:
            self._tick.holders[key] = self.world.holders(lst)
        return self._tick.holders[key]


def family_name(family: int) -> str:
    return "ipv6" if family == socket.AF_INET6 else "ipv4"


__all__ = ["Enrichment", "MAX_TRIES", "choose_listener", "container_matches", "family_name"]
