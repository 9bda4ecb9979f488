"""Join stage: one Connection per stay in CLOSE_WAIT, built from what the kernel reports.

Three inputs reach the Tracker, in any order:
- polls of the kernel's cw map (sockets now in CLOSE_WAIT that passed the filters),
- ring buffer events (a socket left CLOSE_WAIT, a listener appeared or went),
- a sock_diag snapshot taken at start (sockets already in CLOSE_WAIT before the tracer).

A stay in CLOSE_WAIT is identified by (socket address, time it entered CLOSE_WAIT): the kernel
reuses socket addresses, never entry times. Everything here is pure logic on records, tested
without a kernel.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..facts.containers import ContainerIdentity
from ..kernel.decode import Event, EventType, ExitHow, SockFlag, SockInfo, TcpState
from ..facts.facts import Listener
from ..facts.facts import NetnsSource


class Direction(enum.Enum):
    INBOUND = "inbound"    # child of a listener on this host
    OUTBOUND = "outbound"  # connect()ed from this host
    UNKNOWN = "unknown"    # created before the tracer started


class Accepted(enum.Enum):
    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


class ChangeKind(enum.Enum):
    OPENED = "open"       # first seen in CLOSE_WAIT (at least report_min in it)
    UPDATED = "update"    # accepted or closed by the application while in CLOSE_WAIT
    FLAGGED = "leak"      # crossed the leak threshold
    CLOSED = "close"      # left CLOSE_WAIT
    LOST = "lost"         # left CLOSE_WAIT but its exit event was lost
    LISTEN = "listen"
    UNLISTEN = "unlisten"
    TIMELINE = "timeline"  # a socket under a timeline watch closed: its whole life


@dataclass(frozen=True)
class Acceptor:
    """The process the kernel saw accept or connect a socket: its pid and command name."""

    pid: int
    comm: str


@dataclass(frozen=True)
class QueuedOn:
    """The listener a never-accepted connection waits on (or the best candidate), and why
    that one."""

    listener: Listener
    why: str


@dataclass(eq=False)
class Connection:
    """One socket's stay in CLOSE_WAIT, and what is known of its life around it.
    Mutable, and equal only to itself."""

    key: tuple[int, int]
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    direction: Direction
    owner_pid: int | None = None
    owner_comm: str | None = None
    accepted: Accepted = Accepted.UNKNOWN
    accepted_ns: int | None = None
    accepted_after_fin: bool = False
    #: when the connection opened: ESTABLISHED where the kernel side timed it (timelines,
    #: accept matching), else its SYN (one round trip earlier)
    established_ns: int | None = None
    cw_enter_ns: int | None = None  # None: in CLOSE_WAIT since before the tracer started
    first_seen_ns: int = 0
    cw_exit_ns: int | None = None
    exit_how: ExitHow | None = None
    exit_code: int | None = None  # ExitHow.PROCESS_EXIT: the holder's exit code
    closer_pid: int | None = None
    app_close_ns: int | None = None
    flagged_ns: int | None = None
    inode: int | None = None
    fd: int | None = None
    uid: int | None = None
    enriched: bool = False
    enrich_tries: int = 0
    lost: bool = False  # left CLOSE_WAIT, but its exit event was lost
    #: sock_diag's view when last enriched: the app read the EOF (Recv-Q 0), and unread bytes
    eof_read: bool | None = None
    unread_bytes: int | None = None
    #: False for a one-shot snapshot: no tracer history, so no "not seen since start" facts
    history: bool = True
    #: Every transition, accept and close of a socket under a timeline watch.
    steps: list[Step] = field(default_factory=list)
    #: the kernel record last copied in: a poll that returns the very same (cached, unchanged)
    #: record costs nothing
    kernel: SockInfo | None = field(default=None, repr=False)
    #: its network namespace (inode), and how that is known (None: not known)
    netns: int | None = None
    netns_source: NetnsSource | None = None
    #: inode of the listener the kernel queued it on (kprobe/fentry), 0 where not seen
    listener_ino: int = 0
    #: the owner's cgroup and container (None: not read, or the owner is unknown)
    container: ContainerIdentity | None = None
    #: the process the kernel saw accept or connect it; the owner is whoever holds it now
    #: (a forked child, a process it was passed to over SCM_RIGHTS)
    acceptor: Acceptor | None = None
    #: never accepted: the listener it is queued on (or the best candidate), and why that one
    queued_on: QueuedOn | None = None

    @property
    def preexisting(self) -> bool:
        return self.cw_enter_ns is None

    @property
    def is_open(self) -> bool:
        return not self.lost and self.cw_exit_ns is None and self.exit_how is None

    @property
    def since_ns(self) -> int:
        """When its stay started, as far as the tracer knows (start time for preexisting)."""
        return self.cw_enter_ns if self.cw_enter_ns is not None else self.first_seen_ns

    def age_ns(self, now_ns: int) -> int:
        end = self.cw_exit_ns if self.cw_exit_ns is not None else now_ns
        return max(0, end - self.since_ns)

    @property
    def service_port(self) -> int:
        """The port that names the service: local for inbound, remote for outbound."""
        return self.rport if self.direction is Direction.OUTBOUND else self.lport

    @property
    def other_acceptor(self) -> Acceptor | None:
        """The acceptor when another process holds the socket now (it changed hands: forked,
        passed over SCM_RIGHTS, handed over on reload), else None."""
        acc = self.acceptor
        return acc if acc is not None and acc.pid != self.owner_pid else None


@dataclass(frozen=True)
class Step:
    """One moment of a socket's life seen by the kernel (timeline watch only)."""

    ts: int
    kind: str  # "state", "accept" or "close"
    oldstate: int
    newstate: int
    pid: int
    comm: str


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    conn: Connection | None = None
    listener: Listener | None = None


def _direction(flags: SockFlag) -> Direction:
    if flags & SockFlag.PASSIVE:
        return Direction.INBOUND
    if flags & SockFlag.ACTIVE:
        return Direction.OUTBOUND
    return Direction.UNKNOWN


def _accepted(s: SockInfo) -> Accepted:
    if s.flags & SockFlag.ACCEPTED:
        return Accepted.YES
    if s.flags & SockFlag.PASSIVE:
        # Not seen accepted. The kernel may have missed an accept() already blocked when the
        # probes attached; enrichment confirms with the socket's inode.
        return Accepted.NO
    return Accepted.UNKNOWN


def _closed_so_accepted(conn: Connection) -> None:
    """Closed by its application: a socket found in the accept queue (no inode) in CLOSE_WAIT
    was accepted since, after the peer's FIN, while no accept watch saw it."""
    if conn.accepted is Accepted.NO and conn.inode == 0 \
            and conn.direction is not Direction.OUTBOUND:
        conn.accepted = Accepted.YES
        conn.accepted_after_fin = True


class Tracker:
    """Joins kernel records into Connections and says what changed.

    `threshold_ns` is the age in CLOSE_WAIT at which a connection is flagged as a leak;
    `report_min_ns` the age below which polled entries are not yet reported (the kernel sends
    an exit event only for stays at least that long, so every reported stay gets its end).
    """

    #: Polls a reported connection may be missing from the cw map before its exit event is
    #: declared lost (the kernel deletes the entry just before it submits the event).
    MISSING_POLLS_BEFORE_LOST = 3
    #: Most connections one poll opens, and one tick flags: when thousands of sockets enter
    #: CLOSE_WAIT at once, the rest wait for the next ticks, so that every tick (and the live
    #: view's refresh) stays short.
    MAX_NEW_PER_TICK = 4000

    def __init__(self, *, threshold_ns: int, report_min_ns: int, start_ns: int) -> None:
        if threshold_ns < report_min_ns:
            raise ValueError("threshold must not be below report_min")
        self.threshold_ns = threshold_ns
        self.report_min_ns = report_min_ns
        self.start_ns = start_ns
        self.open: dict[tuple[int, int], Connection] = {}
        self.closed: list[Connection] = []
        #: listening sockets by (network namespace inode or 0 where not known, port)
        self.listeners: dict[tuple[int, int], Listener] = {}
        self.flagged_total = 0
        self.lost_exits = 0
        self._missing: dict[tuple[int, int], int] = {}
        self._recently_closed: dict[tuple[int, int], int] = {}
        self._preexisting_seq = 0
        #: Steps of sockets under a timeline watch, by socket address, until they close.
        self.steps_by_sk: dict[int, list[Step]] = {}
        #: Stays a filter the kernel could not apply excluded (another container or network
        #: namespace): not reported again, forgotten when they leave the cw map.
        self.ignored: set[tuple[int, int]] = set()

    # --- inputs -------------------------------------------------------------------------

    def seed_preexisting(
        self, sockets: Iterable[tuple[int, str, int, str, int]], now_ns: int
    ) -> list[Change]:
        """Sockets in CLOSE_WAIT at start: (family, laddr, lport, raddr, rport) each."""
        changes = []
        for family, laddr, lport, raddr, rport in sockets:
            self._preexisting_seq += 1
            conn = Connection(
                key=(0, self._preexisting_seq),
                family=family,
                laddr=laddr,
                lport=lport,
                raddr=raddr,
                rport=rport,
                direction=Direction.UNKNOWN,
                first_seen_ns=now_ns,
            )
            self.open[conn.key] = conn
            changes.append(Change(ChangeKind.OPENED, conn))
        return changes

    def apply_poll(self, socks: Iterable[SockInfo], now_ns: int) -> list[Change]:
        """A read of the kernel's cw map at now_ns."""
        changes: list[Change] = []
        seen: set[tuple[int, int]] = set()
        room = self.MAX_NEW_PER_TICK
        for s in socks:
            if s.ts_cw_enter == 0:
                continue
            key = s.key
            seen.add(key)
            if key in self._recently_closed or key in self.ignored:
                continue  # its exit event was handled before this poll was read
            conn = self.open.get(key)
            if conn is None:
                if now_ns - s.ts_cw_enter < self.report_min_ns or room <= 0:
                    continue
                room -= 1
                conn = self._new_connection(s, now_ns)
                self.open[key] = conn
                changes.append(Change(ChangeKind.OPENED, conn))
            elif conn.kernel is not s and self._update_from(conn, s):
                changes.append(Change(ChangeKind.UPDATED, conn))
        for key, conn in list(self.open.items()):
            if key[0] == 0 or key in seen:
                self._missing.pop(key, None)
                continue
            n = self._missing.get(key, 0) + 1
            if n < self.MISSING_POLLS_BEFORE_LOST:
                self._missing[key] = n
                continue
            # Gone from the map and no exit event: it was lost (the kernel counted it).
            self._missing.pop(key, None)
            del self.open[key]
            conn.lost = True
            self._recently_closed[key] = now_ns  # a late exit event must not count it twice
            self.lost_exits += 1
            self.closed.append(conn)
            changes.append(Change(ChangeKind.LOST, conn))
        self._expire_recent(now_ns)
        if self.ignored:
            self.ignored &= seen
        return changes

    def forget(self, conn: Connection) -> None:
        """Drop an open connection the filters exclude for now: the next poll that shows it
        opens it again, to be judged again once more is known of it."""
        self.open.pop(conn.key, None)

    def ignore(self, conn: Connection) -> None:
        """Drop an open connection that the filters exclude, for the rest of its stay."""
        self.open.pop(conn.key, None)
        self._missing.pop(conn.key, None)
        if conn.key[0] != 0:
            self.ignored.add(conn.key)

    def apply_event(self, ev: Event, now_ns: int) -> list[Change]:
        if ev.type is EventType.CW_EXIT:
            return self._on_exit(ev, now_ns)
        if ev.type is EventType.LISTEN:
            lst = Listener(
                family=ev.sock.family, laddr=ev.sock.laddr, lport=ev.sock.lport, queue=0,
                backlog=0, netns=ev.sock.netns or None,
                pid=ev.sock.owner_tgid, comm=ev.sock.owner_comm,
            )
            self.listeners[(lst.netns or 0, lst.lport)] = lst
            return [Change(ChangeKind.LISTEN, listener=lst)]
        if ev.type is EventType.UNLISTEN:
            old = self.listeners.pop((ev.sock.netns, ev.sock.lport), None)
            if old is None:
                return []
            return [Change(ChangeKind.UNLISTEN, listener=old)]
        return self._on_step(ev, now_ns)

    MAX_WATCHED = 65536

    def _on_step(self, ev: Event, now_ns: int) -> list[Change]:
        """A transition, accept or close of a socket under a timeline watch."""
        kind = {EventType.STATE: "state", EventType.ACCEPT: "accept",
                EventType.APP_CLOSE: "close"}.get(ev.type)
        if kind is None:
            return []
        sk = ev.sock.skaddr
        steps = self.steps_by_sk.get(sk)
        if steps is None:
            if len(self.steps_by_sk) >= self.MAX_WATCHED:
                return []
            steps = self.steps_by_sk[sk] = []
        steps.append(Step(ev.ts, kind, ev.oldstate, ev.newstate, ev.tgid, ev.comm))
        if not (kind == "state" and ev.newstate == int(TcpState.CLOSE)):
            return []
        del self.steps_by_sk[sk]
        conn = self._conn_of_sk(sk)
        if conn is None:
            conn = self._new_connection(ev.sock, now_ns)
            conn.cw_enter_ns = ev.sock.ts_cw_enter or None
            if conn.cw_enter_ns is None:
                conn.first_seen_ns = ev.sock.ts_first
        conn.steps = steps
        return [Change(ChangeKind.TIMELINE, conn)]

    def _conn_of_sk(self, sk: int) -> Connection | None:
        for conn in reversed(self.closed[-64:]):
            if conn.key[0] == sk:
                return conn
        for conn in self.open.values():
            if conn.key[0] == sk:
                return conn
        return None

    def add_listener(self, lst: Listener) -> None:
        """A listener found by the start-up scan."""
        self.listeners.setdefault((lst.netns or 0, lst.lport), lst)

    def listener_of(self, netns: int | None, port: int) -> Listener | None:
        """The listener of a port in a namespace; where the namespace is not known, the
        first of any namespace (the namespace-blind mode)."""
        if netns is not None:
            return self.listeners.get((netns, port)) or self.listeners.get((0, port))
        return next((lst for (_ns, p), lst in self.listeners.items() if p == port), None)

    def tick(self, now_ns: int) -> list[Change]:
        """Flag the open connections that crossed the threshold (at most MAX_NEW_PER_TICK)."""
        changes: list[Change] = []
        for conn in self.open.values():
            if len(changes) >= self.MAX_NEW_PER_TICK:
                break
            if conn.flagged_ns is None and conn.age_ns(now_ns) >= self.threshold_ns:
                conn.flagged_ns = now_ns
                self.flagged_total += 1
                changes.append(Change(ChangeKind.FLAGGED, conn))
        return changes

    # --- helpers ------------------------------------------------------------------------

    def _new_connection(self, s: SockInfo, now_ns: int) -> Connection:
        conn = Connection(
            key=s.key,
            family=s.family,
            laddr=s.laddr,
            lport=s.lport,
            raddr=s.raddr,
            rport=s.rport,
            direction=_direction(s.flags),
            cw_enter_ns=s.ts_cw_enter,
            first_seen_ns=now_ns,
        )
        self._update_from(conn, s)
        return conn

    def _update_from(self, conn: Connection, s: SockInfo) -> bool:
        """Copy the kernel's view into conn; True if something the user sees changed."""
        conn.kernel = s
        before = (conn.accepted, conn.owner_pid, conn.app_close_ns)
        if s.flags & SockFlag.OWNER_KNOWN:
            conn.acceptor = Acceptor(s.owner_tgid, s.owner_comm)
            if conn.fd is None:  # a holder found by its fd stays the owner
                conn.owner_pid = s.owner_tgid
                conn.owner_comm = s.owner_comm
        if s.netns:
            conn.netns, conn.netns_source = s.netns, NetnsSource.KERNEL
        conn.listener_ino = s.listener_ino or conn.listener_ino
        accepted = _accepted(s)
        # The kernel's "not accepted" never overrides enrichment's "accepted".
        if accepted is Accepted.YES or conn.accepted is Accepted.UNKNOWN:
            conn.accepted = accepted
        if s.ts_accept:
            conn.accepted_ns = s.ts_accept
        # (also set by enrichment, for an accept the kernel did not watch)
        conn.accepted_after_fin = conn.accepted_after_fin or bool(s.flags & SockFlag.ACCEPT_IN_CW)
        if s.ts_established:
            conn.established_ns = s.ts_established
        elif s.ts_first and s.flags & (SockFlag.PASSIVE | SockFlag.ACTIVE) \
                and not s.flags & SockFlag.PREEXISTING:
            conn.established_ns = s.ts_first
        if s.ts_close:
            conn.app_close_ns = s.ts_close
            conn.closer_pid = s.closer_tgid or conn.closer_pid
        return before != (conn.accepted, conn.owner_pid, conn.app_close_ns)

    def _on_exit(self, ev: Event, now_ns: int) -> list[Change]:
        s = ev.sock
        if s.flags & SockFlag.PREEXISTING and s.ts_cw_enter == 0:
            conn = self._match_preexisting(s)
            if conn is None:
                return []
        else:
            conn = self.open.get(s.key)
            if conn is None:
                if s.key in self._recently_closed or s.key in self.ignored:
                    self.ignored.discard(s.key)
                    return []
                conn = self._new_connection(s, now_ns)
            else:
                self._update_from(conn, s)
        self.open.pop(conn.key, None)
        self._missing.pop(conn.key, None)
        conn.cw_exit_ns = ev.ts
        how = ev.exit_how
        if (
            how is ExitHow.LISTENER_CLOSED
            and conn.accepted is Accepted.YES
        ):
            how = ExitHow.APP_ABORT  # enrichment saw an inode: it was accepted after all
        conn.exit_how = how
        conn.exit_code = ev.exit_code if how is ExitHow.PROCESS_EXIT else None
        if how in (ExitHow.APP_CLOSE, ExitHow.APP_ABORT, ExitHow.PROCESS_EXIT):
            _closed_so_accepted(conn)
            conn.closer_pid = s.closer_tgid or ev.tgid
            if conn.app_close_ns is None:
                conn.app_close_ns = s.ts_close or ev.ts
        self.closed.append(conn)
        self._recently_closed[conn.key] = now_ns
        return [Change(ChangeKind.CLOSED, conn)]

    def _match_preexisting(self, s: SockInfo) -> Connection | None:
        for conn in self.open.values():
            if (
                conn.preexisting
                and conn.lport == s.lport
                and conn.rport == s.rport
                and conn.laddr == s.laddr
                and conn.raddr == s.raddr
            ):
                return conn
        return None

    def _expire_recent(self, now_ns: int) -> None:
        horizon = 10 * 1_000_000_000
        if len(self._recently_closed) > 4096 or any(
            now_ns - t > horizon for t in self._recently_closed.values()
        ):
            self._recently_closed = {
                k: t for k, t in self._recently_closed.items() if now_ns - t <= horizon
            }

    def trim_closed(self, keep: int) -> None:
        """Bound memory: keep only the newest `keep` closed connections."""
        if len(self.closed) > keep:
            del self.closed[: len(self.closed) - keep]
