"""One tracing session: loop (events, poll, enrich, diagnose, render) until told to stop.

The loop wakes every poll interval. Per tick it drains the ring buffer, reads the kernel's
cw map (the sockets now in CLOSE_WAIT that passed the filters), enriches the connections it
has not seen before, flags those that crossed the threshold, and hands the changes to the
renderer. Nothing here runs per connection: the kernel only reports sockets that stay in
CLOSE_WAIT. All inputs come from a World (world.py), live or replayed from a recording.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .diagnose import (
    AcceptStats, Confidence, DurationStats, Facts, ListenerFacts, ProcessFacts, Verdict,
    diagnose,
)
from .enrich import DiagSocket, TupleIndex
from .join import Accepted, Change, ChangeKind, Connection, Direction, Listener, Tracker
from .render import EXIT_WORDS, Renderer, TickStats, View
from .options import AcceptWatch, Options
from .world import Counters, ListenerInfo, ProcessInfo, World, WorldEnded


@dataclass
class _PidWatch:
    pids: set[int]
    exited: list[int] = field(default_factory=list)
    descendants: set[int] = field(default_factory=set)


class Session:
    def __init__(self, options: Options, renderer: Renderer, world: World,
                 info: dict[str, Any], stop_event: threading.Event | None = None) -> None:
        self.options = options
        self.renderer = renderer
        self.world = world
        self.info = info
        self.backend = str(info.get("backend", "?"))
        self.wall_offset_ns = int(info.get("wall_offset_ns", 0)) or None
        self._now = world.now_ns()
        self.tracker = Tracker(
            threshold_ns=options.threshold_ns,
            report_min_ns=options.report_min_ns,
            start_ns=self._now,
        )
        self.verdicts: dict[tuple[int, int], Verdict] = {}
        self.counters = Counters()
        self.closed_by_how: Counter[str] = Counter()
        self.durations: dict[int, deque[int]] = {}
        self.max_closed_ns = 0
        self.closed_total = 0
        self.watch = _PidWatch(set(options.pids))
        #: set (by the CLI's signal handler) to end the session after its current tick
        self.stop_event = stop_event or threading.Event()
        self._last_slow_ns = 0
        self._started = False
        self._ended = False
        # Per-tick caches: many connections flagged at once cost one scan, not one each.
        self._tick_listeners: list[ListenerInfo] | None = None
        self._tick_procs: dict[int, ProcessInfo] = {}
        self._accept_watch_until = 0
        self.ticks = TickStats()
        self._rediagnose_turn = 0

    # --- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """Seed what predates the probes, then say we are ready."""
        try:
            self._seed()
            self._watch_pids(self._now)  # descendants that exist now, before the programs act
            if self.options.accept_watch is AcceptWatch.ALWAYS:
                self.world.set_accept_watch(True)
            self.world.arm()
        except WorldEnded:
            self._ended = True
        self._started = True
        self.renderer.ready(self.view(self._now), self.info)

    def _seed(self) -> None:
        """Listeners and CLOSE_WAIT sockets that existed before the probes attached."""
        now = self._now
        for lst in self.world.listeners():
            owners = [o for o in lst.owners if o.pid in self.options.pids] or list(lst.owners)
            if not owners:
                continue
            owner = min(owners, key=lambda o: o.pid)
            self.world.seed_listener(lst.lport, owner.pid, owner.comm)
            self.tracker.add_listener(
                Listener(lst.lport, lst.family, lst.laddr, owner.pid, owner.comm)
            )
        rows = [
            d for d in self.world.diag_close_wait()
            if not self.options.ports or {d.lport, d.rport} & self.options.ports
        ]
        changes = self.tracker.seed_preexisting(
            [(d.family, d.laddr, d.lport, d.raddr, d.rport) for d in rows], now)
        kept = 0
        for ch, d in zip(changes, rows):
            assert ch.conn is not None
            self._enrich_one(ch.conn, d)
            if self.options.pids and ch.conn.owner_pid not in self.options.pids:
                self.tracker.open.pop(ch.conn.key, None)
                continue
            kept += 1
        if kept:
            self.renderer.notice(
                f"{kept} socket(s) were already in CLOSE_WAIT; their age is counted"
                " from now (shown as >=)"
            )

    # --- loop -----------------------------------------------------------------------------

    def run(self) -> View:
        """Trace until stopped (signal, --duration, end of a recording); render the summary."""
        deadline = (
            self._now + int(self.options.duration_s * 1e9)
            if self.options.duration_s is not None
            else None
        )
        interval_ms = max(1, int(self.options.poll_interval_s * 1000))
        try:
            while not self._ended:
                want_stop = self.stop_event.is_set() or (
                    deadline is not None and self._now >= deadline)
                if self.world.checkpoint(want_stop):
                    break
                self.step(self.world.events(interval_ms))
            if not self._ended:
                self.step(self.world.events(0), final=True)
        except WorldEnded:
            pass  # a recording ended: report what its whole steps showed
        finally:
            self.world.close()
        view = self.view(self._now)
        self.renderer.finish(view)
        return view

    def step(self, events: list[Any], final: bool = False) -> None:
        """One tick: events, poll, enrich, flag, diagnose, render."""
        t0 = time.monotonic_ns()
        try:
            self._step(events, final)
        finally:
            self.ticks.add(time.monotonic_ns() - t0)

    def _step(self, events: list[Any], final: bool) -> None:
        now = self._now = self.world.now_ns()
        self._tick_listeners = None
        self._tick_procs = {}
        changes: list[Change] = []
        for ev in events:
            changes += self.tracker.apply_event(ev, now)
        changes += self.tracker.apply_poll(self.world.close_wait(), now)
        slow_due = now - self._last_slow_ns >= 1_000_000_000 or final
        new = [c.conn for c in changes if c.kind is ChangeKind.OPENED and c.conn]
        if slow_due or new:
            self.counters = self.world.counters()
        retried: list[Connection] = []
        if slow_due:
            # Owners found by /proc need a rescan the index allows only every second.
            fresh = {id(c) for c in new}
            retried = [c for c in self.tracker.open.values()
                       if c.enrich_tries < 5 and not c.preexisting and id(c) not in fresh
                       and (c.inode is None or (c.inode != 0 and c.fd is None))]
        if new or retried:
            self._enrich(new + retried)
        changes = self._apply_pid_filter(changes)
        flagged = self.tracker.tick(now)
        if flagged:
            if not (slow_due or new):
                self.counters = self.world.counters()  # the flag's verdict needs fresh counts
            flagged_conns = [ch.conn for ch in flagged if ch.conn is not None]
            self._refresh_read_state(flagged_conns)
            self._owners_at_flag(flagged_conns)
        changes += flagged
        for ch in changes:
            if ch.conn is None:
                continue
            if ch.kind in (ChangeKind.CLOSED, ChangeKind.LOST):
                self._account_closed(ch.conn)
            if ch.kind in (ChangeKind.FLAGGED, ChangeKind.CLOSED, ChangeKind.OPENED,
                           ChangeKind.UPDATED):
                self.verdicts[ch.conn.key] = diagnose(ch.conn, self._facts(ch.conn), now)
        for conn in retried:
            if conn.is_open and conn.key in self.tracker.open:
                self.verdicts[conn.key] = diagnose(conn, self._facts(conn), now)
        if slow_due:
            changes += self._rediagnose_uncertain(now, {id(ch.conn) for ch in changes})
        if slow_due or new:
            self._steer_accept_watch(now)
        if slow_due:
            self._last_slow_ns = now
            self._watch_pids(now)
            self.tracker.trim_closed(self.options.keep_closed)
            self._trim_verdicts()
        view = self.view(now)
        if changes:
            self.renderer.changes(changes, view)
        self.renderer.refresh(view)

    # --- helpers --------------------------------------------------------------------------

    def _enrich(self, conns: list[Connection]) -> None:
        """Facts that need kernel structs: inode (accepted or not), owner fd, uid."""
        needs = [c for c in conns if c.enrich_tries < 5]
        if not needs:
            return
        diag = TupleIndex(self.world.diag_close_wait())
        for conn in needs:
            self._enrich_one(conn, diag.find(conn.family, conn.laddr, conn.lport, conn.raddr,
                                             conn.rport))

    ACCEPT_WATCH_LINGER_NS = 30_000_000_000

    #: Most uncertain verdicts judged again per second; with more, they take turns.
    REDIAGNOSE_PER_SECOND = 2000

    def _rediagnose_uncertain(self, now: int, done: set[int]) -> list[Change]:
        """Evidence keeps coming after the flag (accept() failures, a thread now blocked in
        epoll_wait): flagged leaks whose verdict is not certain yet are judged again, and an
        update is shown when the verdict changes. Thousands of them take turns."""
        due = []
        for conn in self.tracker.open.values():
            old = self.verdicts.get(conn.key)
            if conn.flagged_ns is None or id(conn) in done or \
                    (old is not None and old.confidence is Confidence.CERTAIN):
                continue
            due.append(conn)
        if len(due) > self.REDIAGNOSE_PER_SECOND:
            start = self._rediagnose_turn % len(due)
            due = (due[start:] + due[:start])[: self.REDIAGNOSE_PER_SECOND]
            self._rediagnose_turn = start + len(due)
        out = []
        for conn in due:
            old = self.verdicts.get(conn.key)
            verdict = diagnose(conn, self._facts(conn), now)
            self.verdicts[conn.key] = verdict
            if old is None or (verdict.cause, verdict.confidence) != (old.cause, old.confidence):
                out.append(Change(ChangeKind.UPDATED, conn))
        return out

    def _steer_accept_watch(self, now: int) -> None:
        """Keep the accept syscall tracepoints (tracepoint backend) attached while sockets
        that were never accepted are open, and 30 s after: their accept() failures and late
        accepts are the evidence. They tax every syscall, so they are off otherwise."""
        if self.options.accept_watch is not AcceptWatch.AUTO:
            return
        if any(c.accepted is Accepted.NO for c in self.tracker.open.values()):
            self._accept_watch_until = now + self.ACCEPT_WATCH_LINGER_NS
        self.world.set_accept_watch(now < self._accept_watch_until)

    def _refresh_read_state(self, conns: list[Connection]) -> None:
        """At the flag, what the application has read by now (EOF or not)."""
        accepted = [c for c in conns if c.inode]
        if not accepted:
            return
        diag = TupleIndex(self.world.diag_close_wait())
        for conn in accepted:
            d = diag.find(conn.family, conn.laddr, conn.lport, conn.raddr, conn.rport)
            if d is not None and d.inode:
                conn.eof_read = d.rqueue == 0
                conn.unread_bytes = max(0, d.rqueue - 1)

    def _enrich_one(self, conn: Connection, d: DiagSocket | None) -> None:
        conn.enriched = True
        conn.enrich_tries += 1
        if d is None:
            return
        conn.inode = d.inode
        conn.uid = d.uid
        if d.inode == 0:
            if conn.accepted is Accepted.UNKNOWN and conn.direction is not Direction.OUTBOUND:
                conn.accepted = Accepted.NO
            if conn.direction is Direction.UNKNOWN:
                conn.direction = Direction.INBOUND
            if conn.owner_pid is None:
                lst = self.tracker.listeners.get(conn.lport)
                if lst is not None:
                    conn.owner_pid, conn.owner_comm = lst.pid, lst.comm
            return
        # It has an inode: a file descriptor refers (or referred) to it. In CLOSE_WAIT the
        # peer's FIN counts as one unread byte until the application reads the EOF.
        conn.eof_read = d.rqueue == 0
        conn.unread_bytes = max(0, d.rqueue - 1)
        if conn.direction is not Direction.OUTBOUND and conn.accepted is not Accepted.YES:
            if conn.lport in self.tracker.listeners or conn.direction is Direction.INBOUND:
                conn.accepted = Accepted.YES
                conn.direction = Direction.INBOUND
        self._assign_owner(conn)

    def _assign_owner(self, conn: Connection) -> None:
        """The process holding the socket's fd (a forked child may hold it, not the acceptor)."""
        assert conn.inode
        owners = self.world.owners(conn.inode)
        if owners:
            pref = [o for o in owners if o.pid == conn.owner_pid] or owners
            conn.owner_pid, conn.owner_comm, conn.fd = pref[0].pid, pref[0].comm, pref[0].fd

    def _owners_at_flag(self, conns: list[Connection]) -> None:
        """A leak is reported with the process that holds it: sockets whose holder was not
        found yet (the fd index is rescanned at most once a second) get one fresh scan."""
        need = [c for c in conns if c.inode and c.fd is None]
        if not need:
            return
        self.world.refresh_owners()
        for conn in need:
            self._assign_owner(conn)

    def _apply_pid_filter(self, changes: list[Change]) -> list[Change]:
        """Connections whose owner the kernel could not know are filtered here."""
        if not self.options.pids:
            return changes
        allowed = self.watch.pids | self.watch.descendants
        out = []
        for ch in changes:
            conn = ch.conn
            if conn is not None and conn.owner_pid is not None and conn.owner_pid not in allowed:
                self.tracker.open.pop(conn.key, None)
                continue
            out.append(ch)
        return out

    def _facts(self, conn: Connection) -> Facts:
        pid = conn.owner_pid
        acc = None
        proc = None
        if pid is not None:
            st = self.counters.accept.get(pid)
            if st is not None:
                acc = AcceptStats(
                    ok=st.ok, err=st.err, last_ok_ns=st.last_ok_ns, last_err_ns=st.last_err_ns,
                    last_err=st.last_err,
                    errors={e: n for (p, e), n in self.counters.accept_errs.items() if p == pid},
                )
            info = self._process(pid)
            proc = ProcessFacts(pid=pid, alive=info.alive, open_fds=info.open_fds,
                                fd_limit=info.fd_limit, threads=dict(info.threads))
        lst_facts = None
        if conn.direction is not Direction.OUTBOUND and conn.accepted is Accepted.NO:
            lst_facts = self._listener_facts(conn.lport, pid)
        durations = None
        if not conn.is_open:
            durations = self._duration_stats(conn.service_port)
        return Facts(accept=acc, process=proc, listener=lst_facts, durations=durations)

    def _duration_stats(self, port: int) -> DurationStats | None:
        d = sorted(self.durations.get(port, ()))
        if not d:
            return None
        return DurationStats(count=len(d), p50_ns=d[len(d) // 2],
                             p90_ns=d[min(len(d) - 1, int(len(d) * 0.9))], max_ns=d[-1])

    def _process(self, pid: int) -> ProcessInfo:
        info = self._tick_procs.get(pid)
        if info is None:
            info = self._tick_procs[pid] = self.world.process(pid)
        return info

    def _listener_facts(self, port: int, owner: int | None) -> ListenerFacts | None:
        if self._tick_listeners is None:
            self._tick_listeners = self.world.listeners()
        for lst in self._tick_listeners:
            if lst.lport != port:
                continue
            fds = [o for o in lst.owners if o.pid == owner] or list(lst.owners)
            fd = fds[0].fd if fds else None
            et = None
            if fds:
                et = fd in self._process(fds[0].pid).et_fds
            return ListenerFacts(port=port, queue=lst.queue, backlog=lst.backlog, fd=fd,
                                 edge_triggered=et)
        return None

    def _account_closed(self, conn: Connection) -> None:
        self.closed_total += 1
        word = "lost" if conn.lost or conn.exit_how is None else EXIT_WORDS[conn.exit_how]
        self.closed_by_how[word] += 1
        if conn.cw_exit_ns is not None and not conn.preexisting:
            dur = conn.age_ns(conn.cw_exit_ns)
            self.max_closed_ns = max(self.max_closed_ns, dur)
            self.durations.setdefault(conn.service_port, deque(maxlen=2048)).append(dur)

    def _watch_pids(self, now: int) -> None:
        if not self.watch.pids:
            return
        for pid in sorted(self.watch.pids):
            if pid not in self.watch.exited and not self._process(pid).alive:
                self.watch.exited.append(pid)
                self.renderer.pid_exit(pid, self.view(now))
        live = [p for p in sorted(self.watch.pids) if p not in self.watch.exited]
        desc = set(self.world.descendants(live))
        if desc != self.watch.descendants:
            self.watch.descendants = desc
            self.world.set_pids(self.watch.pids | desc)

    def _trim_verdicts(self) -> None:
        keep = set(self.tracker.open) | {c.key for c in self.tracker.closed}
        if len(self.verdicts) > len(keep):
            self.verdicts = {k: v for k, v in self.verdicts.items() if k in keep}

    def view(self, now_ns: int | None = None) -> View:
        c = self.counters
        return View(
            now_ns=now_ns if now_ns is not None else self._now,
            started_ns=self.tracker.start_ns,
            backend=self.backend,
            threshold_ns=self.options.threshold_ns,
            open=list(self.tracker.open.values()),
            verdicts=self.verdicts,
            stats=c.stats,
            closed_total=self.closed_total,
            flagged_total=self.tracker.flagged_total,
            lost_exits=self.tracker.lost_exits,
            listeners=self.tracker.listeners,
            accept_errors=c.accept_errs,
            exited_pids=list(self.watch.exited),
            closed_by_how=dict(self.closed_by_how),
            max_closed_ns=self.max_closed_ns,
            hist=list(c.hist),
            wall_offset_ns=self.wall_offset_ns,
            tick=self.ticks,
        )


__all__ = ["Session"]
