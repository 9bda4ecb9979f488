"""One tracing session: loop (events, poll, enrich, diagnose, render) until told to stop.

The loop wakes every poll interval. Per tick it drains the ring buffer, reads the kernel's
cw map (the sockets now in CLOSE_WAIT that passed the filters), enriches the connections it
has not seen before, flags those that crossed the threshold, and hands the changes to the
renderer. Nothing here runs per connection: the kernel only reports sockets that stay in
CLOSE_WAIT. All inputs come from a World (world.py), live or replayed from a recording.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .acceptwatch import ListenerKey, plan_for
from .pipeline.diagnose import Confidence, DurationStats, Facts, Verdict, diagnose
from .facts.enrich import DiagSocket, normalize_addr
from .pipeline.enrichment import MAX_TRIES, Enrichment, container_matches
from .facts.facts import Listener
from .pipeline.join import Accepted, Change, ChangeKind, Connection, Tracker
from .outputs.render import EXIT_WORDS, Renderer, TickStats, View
from .options import AcceptWatch, Options
from .kernel.decode import SockInfo
from .world import CallOrder, Counters, World, WorldEnded


@dataclass
class _PidWatch:
    pids: set[int]
    exited: list[int] = field(default_factory=list)
    descendants: set[int] = field(default_factory=set)


def _worth_another_look(conn: Connection) -> bool:
    """Its socket was not found yet, its holder was not, or it was found never accepted and
    the kernel has seen it accepted since."""
    if conn.inode is None:
        return True
    if conn.inode:
        return conn.fd is None
    return conn.accepted is Accepted.YES


def _tuple(laddr: str, lport: int, raddr: str, rport: int) -> tuple[str, int, str, int]:
    return (normalize_addr(laddr), lport, normalize_addr(raddr), rport)


def seedable(first: list[DiagSocket], held: list[SockInfo],
             second: list[DiagSocket]) -> list[DiagSocket]:
    """The swept sockets that were in CLOSE_WAIT before the programs acted: found by both
    sweeps (namespace and 4-tuple), and not in the kernel's map read between them (4-tuple,
    and namespace where both sides know it). A socket in CLOSE_WAIT at both sweeps that
    entered it after the programs acted was in the map at the read between."""
    again = {(d.netns, *_tuple(d.laddr, d.lport, d.raddr, d.rport)) for d in second}
    nets: dict[tuple[str, int, str, int], set[int]] = {}
    for s in held:
        if s.ts_cw_enter:
            nets.setdefault(_tuple(s.laddr, s.lport, s.raddr, s.rport), set()).add(s.netns)

    def keep(d: DiagSocket) -> bool:
        key = _tuple(d.laddr, d.lport, d.raddr, d.rport)
        if (d.netns, *key) not in again:
            return False  # left CLOSE_WAIT during the sweeps
        found = nets.get(key)
        return found is None or not (d.netns is None or 0 in found or d.netns in found)

    return [d for d in first if keep(d)]


def _listener_key(conn: Connection) -> ListenerKey:
    """The listener a never-accepted socket waits on, for the accept watch: its namespace (as
    the kernel gave it, where it did) and its port."""
    netns = conn.kernel.netns if conn.kernel is not None else conn.netns
    return (netns or None, conn.lport)


class Session:
    def __init__(self, options: Options, renderer: Renderer, world: World,
                 info: dict[str, Any], stop_event: threading.Event | None = None, *,
                 call_order: CallOrder = CallOrder()) -> None:
        self.options = options
        self.renderer = renderer
        self.world = world
        self.call_order = call_order
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
        self.accept_plan = plan_for(info, options.accept_watch, start_ns=self._now)
        self.enrichment = Enrichment(
            world, self.tracker,
            relook_at_flag=call_order.relook_at_flag
            and self.accept_plan.mode is not AcceptWatch.ALWAYS)
        self.enrichment.accept_watched_ns = self.accept_plan.watched_ns
        self._said_sampling = False
        #: each never-accepted socket's listener, as first seen (enrichment may learn its
        #: namespace later: the same listener must not become new)
        self._listener_keys: dict[tuple[int, int], ListenerKey] = {}
        self._rechecked_ns = 0
        self._recheck_turn = 0
        self.ticks = TickStats()
        self._rediagnose_turn = 0

    # --- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """Seed the listeners, let the programs act, sweep the sockets already in CLOSE_WAIT,
        then say we are ready. The sweep comes after the programs act, so that no socket
        entering CLOSE_WAIT meanwhile is missed; `seedable` says which sockets it found
        were there before them (a recording made before format 4 asks in its own order)."""
        try:
            self._seed_listeners()
            if self.call_order.sweep_after_arm:
                self._arm()
                self._seed_close_wait(after_arm=True)
            else:
                self._seed_close_wait(after_arm=False)
                self._arm()
        except WorldEnded:
            self._ended = True
        self._started = True
        self.renderer.ready(self.view(self._now), self.info)

    def _arm(self) -> None:
        """The filters and switches the programs need, then let them act."""
        self._watch_pids(self._now)  # descendants that exist now, before the programs act
        if self.options.accept_watch is AcceptWatch.ALWAYS:
            self.world.controls.set_accept_watch(True)
        self.world.controls.arm()

    def _every_listener(self) -> list[Listener]:
        """The listeners of every network namespace (of the tracer's own where the
        namespaces cannot be listed)."""
        found = self.world.namespaces()
        if found is None:
            return self.world.listeners()
        return [lst for inode in found.all for lst in self.world.listeners(inode)]

    def _seed_listeners(self) -> None:
        """Listeners that existed before the probes attached, with their owners."""
        for lst in self._every_listener():
            owners = [o for o in lst.owners if o.pid in self.options.pids] or list(lst.owners)
            if not owners:
                continue
            owner = min(owners, key=lambda o: o.pid)
            self.world.controls.seed_listener(lst.netns, lst.lport, owner.pid, owner.comm)
            self.tracker.add_listener(dataclasses.replace(lst, pid=owner.pid, comm=owner.comm))

    def _seed_close_wait(self, after_arm: bool) -> None:
        """Sockets in CLOSE_WAIT before the programs acted, each a Connection with an
        "at least" age. After they act: swept twice, the kernel's map read in between
        (`seedable`). Not covered, within the few milliseconds of the sweeps: a socket there
        before that leaves CLOSE_WAIT between the sweeps is not reported (neither its stay
        nor its close); a socket entering CLOSE_WAIT whose entry the kernel could not keep
        (a full map, an owner over its room; counted lost) is seeded as there before, and
        is then never seen to close."""
        now = self._now
        self.enrichment.begin_tick(now)
        rows = self._swept_close_wait()
        if after_arm:
            held = self.world.close_wait()
            rows = seedable(rows, held, self._swept_close_wait())
        pids = self.watch.pids | self.watch.descendants if after_arm else self.options.pids
        changes = self.tracker.seed_preexisting(
            [(d.family, d.laddr, d.lport, d.raddr, d.rport) for d in rows], now)
        kept = 0
        for ch, d in zip(changes, rows):
            assert ch.conn is not None
            self.enrichment.apply(ch.conn, d)
            if pids and ch.conn.owner_pid not in pids or not self._wanted(ch.conn, pids):
                self.tracker.forget(ch.conn)
                continue
            kept += 1
        if kept:
            self.renderer.notice(
                f"{kept} socket(s) were already in CLOSE_WAIT; their age is counted"
                " from now (shown as >=)"
            )

    def _swept_close_wait(self) -> list[DiagSocket]:
        """Sockets in CLOSE_WAIT now (sock_diag), on the --port ports if given."""
        return [d for d in self._preexisting_close_wait()
                if not self.options.ports or {d.lport, d.rport} & self.options.ports]

    def _preexisting_close_wait(self) -> list[DiagSocket]:
        """Sockets in CLOSE_WAIT now, in every network namespace the World can name."""
        ns = self.enrichment.namespaces()
        if ns is None:
            return self.world.diag_close_wait()
        return [d for n in ns.all for d in self.world.diag_close_wait(n)]

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
        self.enrichment.begin_tick(now)
        changes: list[Change] = []
        for ev in events:
            changes += self.tracker.apply_event(ev, now)
        changes += self.tracker.apply_poll(self.world.close_wait(), now)
        slow_due = now - self._last_slow_ns >= 1_000_000_000 or final
        new = [c.conn for c in changes if c.kind is ChangeKind.OPENED and c.conn]
        if slow_due or new:
            self._set_counters(self.world.counters())
        retried: list[Connection] = []
        if slow_due:
            # Owners found by /proc need a rescan the index allows only every second.
            fresh = {id(c) for c in new}
            retried = [c for c in self.tracker.open.values()
                       if c.enrich_tries < MAX_TRIES and not c.preexisting and id(c) not in fresh
                       and _worth_another_look(c)]
        if new or retried:
            self.enrichment.enrich(new + retried)
        changes = self._apply_pid_filter(changes)
        flagged = self.tracker.tick(now)
        if flagged:
            if not (slow_due or new):
                # the flag's verdict needs fresh counts
                self._set_counters(self.world.counters())
            flagged_conns = [ch.conn for ch in flagged if ch.conn is not None]
            self.enrichment.at_flag(flagged_conns)
            self.enrichment.owners_at_flag(flagged_conns)
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
            changes += self._accepted_unwatched(now)
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
        """Attach the accept syscall tracepoints (tracepoint backend) as the plan says: while
        sockets that were never accepted are open (their accept() failures and late accepts
        are the evidence), part-time in a long incident. They tax every syscall."""
        plan = self.accept_plan
        waiting = [c for c in self.tracker.open.values() if c.accepted is Accepted.NO]
        self._listener_keys = {c.key: self._listener_keys.get(c.key) or _listener_key(c)
                               for c in waiting}
        on = plan.wanted(now, set(self._listener_keys.values()))
        if plan.mode is not AcceptWatch.ALWAYS:  # (attached once, at start)
            self.world.controls.set_accept_watch(
                on, [c.kernel.skaddr for c in waiting if c.kernel is not None])
        self.enrichment.accept_coverage = plan.coverage(now)
        joined = plan.joined()
        if joined:  # said once attached
            self.renderer.notice(plan.describe_renewal(joined))
        if plan.sampling(now) and not self._said_sampling:
            self.renderer.notice(plan.describe())
            self._said_sampling = True
        elif not plan.in_incident:  # a new incident is sampled, and said so, afresh
            self._said_sampling = False

    #: How often sockets found never accepted are looked up again while accept() is sampled,
    #: and how many at most each time (they take turns: the lookups stay cheap, and so does
    #: what a recording keeps of them).
    RECHECK_NS = 5_000_000_000
    RECHECK_MAX = 500

    def _accepted_unwatched(self, now: int) -> list[Change]:
        """While the accept watch is attached part-time, a late accept may fall between its
        windows: sockets found never accepted are looked up again (one sock_diag dump per
        namespace for many), and those with an inode now were accepted."""
        if not self.accept_plan.sampling(now) or now - self._rechecked_ns < self.RECHECK_NS:
            return []
        self._rechecked_ns = now
        waiting = [c for c in self.tracker.open.values()
                   if c.accepted is Accepted.NO and c.inode == 0]
        if not waiting:
            return []
        start = self._recheck_turn % len(waiting)
        waiting = (waiting[start:] + waiting[:start])[: self.RECHECK_MAX]
        self._recheck_turn = start + len(waiting)
        accepted = self.enrichment.accepted_since(waiting)
        for conn in accepted:
            self.verdicts[conn.key] = diagnose(conn, self._facts(conn), now)
        return [Change(ChangeKind.UPDATED, c) for c in accepted]

    def _set_counters(self, counters: Counters) -> None:
        self.counters = self.enrichment.counters = counters

    def _facts(self, conn: Connection) -> Facts:
        durations = None if conn.is_open else self._duration_stats(conn.service_port)
        return self.enrichment.facts(conn, durations)

    def _wanted(self, conn: Connection, pids: frozenset[int] | set[int]) -> bool:
        """The filters the kernel could not apply: the owner's pid where the kernel did not
        know it, its container and its network namespace (filtered here for now)."""
        opts = self.options
        if pids and conn.owner_pid is not None and conn.owner_pid not in pids:
            return False
        if opts.netns and conn.netns not in opts.netns:
            return False
        if opts.containers and not any(container_matches(conn.container, q)
                                       for q in opts.containers):
            return False
        return True

    def _excluded_for_good(self, conn: Connection) -> bool:
        """Its namespace or container is known, and not one asked for."""
        opts = self.options
        if opts.netns and conn.netns is not None and conn.netns not in opts.netns:
            return True
        return bool(opts.containers) and conn.container is not None and not any(
            container_matches(conn.container, q) for q in opts.containers)

    def _apply_pid_filter(self, changes: list[Change]) -> list[Change]:
        """Connections the kernel's filters could not judge are filtered here."""
        opts = self.options
        if not (opts.pids or opts.netns or opts.containers):
            return changes
        allowed = self.watch.pids | self.watch.descendants if opts.pids else set()
        out = []
        for ch in changes:
            conn = ch.conn
            if conn is not None and not self._wanted(conn, allowed):
                if self._excluded_for_good(conn):
                    self.tracker.ignore(conn)  # another container or namespace
                else:
                    self.tracker.forget(conn)  # judged again when known
                continue
            out.append(ch)
        return out

    def _duration_stats(self, port: int) -> DurationStats | None:
        d = sorted(self.durations.get(port, ()))
        if not d:
            return None
        return DurationStats(count=len(d), p50_ns=d[len(d) // 2],
                             p90_ns=d[min(len(d) - 1, int(len(d) * 0.9))], max_ns=d[-1])

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
            if pid not in self.watch.exited and not self.enrichment.process(pid).alive:
                self.watch.exited.append(pid)
                self.renderer.pid_exit(pid, self.view(now))
        live = [p for p in sorted(self.watch.pids) if p not in self.watch.exited]
        desc = set(self.world.descendants(live))
        if desc != self.watch.descendants:
            self.watch.descendants = desc
            self.world.controls.set_pids(self.watch.pids | desc)

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
            accept_watch_s=self.accept_plan.attached_ns / 1e9
            if self.backend == "tracepoint" else None,
        )


__all__ = ["Session"]
