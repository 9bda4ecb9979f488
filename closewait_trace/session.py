"""One tracing session: attach, then loop (events, poll, enrich, diagnose, render) until told to stop.

The loop wakes every poll interval. Per tick it drains the ring buffer, reads the kernel's
cw map (the sockets now in CLOSE_WAIT that passed the filters), enriches the connections it
has not seen before, flags those that crossed the threshold, and hands the changes to the
renderer. Nothing here runs per connection: the kernel only reports sockets that stay in
CLOSE_WAIT.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from . import enrich
from .attach import ProbeSettings, Probes
from .decode import CAcceptStat, Event, Stat
from .diagnose import AcceptStats, Facts, ListenerFacts, ProcessFacts, Verdict, diagnose
from .errors import PrivilegeError, UsageError
from .features import Backend, choose_backend, ensure_tracefs, is_privileged, probe_features
from .headers import HeaderCandidate, candidate_header_dirs, user_header_dir
from .join import Accepted, Change, ChangeKind, Connection, Direction, Listener, Tracker
from .render import EXIT_WORDS, Renderer, View


@dataclass(frozen=True)
class Options:
    pids: frozenset[int] = frozenset()
    ports: frozenset[int] = frozenset()
    threshold_ns: int = 10_000_000_000
    report_min_ns: int = 200_000_000
    backend: str | None = None  # None or "auto": the best the kernel allows
    kernel_headers: Path | None = None
    duration_s: float | None = None
    poll_interval_s: float = 0.2
    timeline_all: bool = False
    max_socks: int = 131072
    max_cw: int = 32768
    keep_closed: int = 10000


@dataclass
class _PidWatch:
    pids: set[int]
    exited: list[int] = field(default_factory=list)
    descendants: set[int] = field(default_factory=set)


def _descendants(pids: Iterable[int]) -> set[int]:
    """Children (recursively) of the traced processes: pre-fork servers accept in workers."""
    try:
        import psutil
    except ImportError:
        return set()
    out: set[int] = set()
    for pid in pids:
        try:
            out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    return out


class Session:
    def __init__(self, options: Options, renderer: Renderer) -> None:
        self.options = options
        self.renderer = renderer
        self.probes: Probes | None = None
        self.backend: Backend | None = None
        self.tracker = Tracker(
            threshold_ns=options.threshold_ns,
            report_min_ns=options.report_min_ns,
            start_ns=time.monotonic_ns(),
        )
        self.verdicts: dict[tuple[int, int], Verdict] = {}
        self.stats: dict[Stat, int] = {}
        self.accept_stats: dict[int, CAcceptStat] = {}
        self.accept_errs: dict[tuple[int, int], int] = {}
        self.closed_by_how: Counter[str] = Counter()
        self.max_closed_ns = 0
        self.closed_total = 0
        self.hist: list[int] = []
        self.index = enrich.ProcessIndex()
        self.watch = _PidWatch(set(options.pids))
        self.stop_event = threading.Event()
        self._pending: list[Event] = []
        self._last_slow = 0.0

    # --- start ----------------------------------------------------------------------------

    def start(self, on_compile: Callable[[HeaderCandidate], None] | None = None) -> None:
        """Check the targets, pick a backend, compile, attach, and seed what predates us."""
        for pid in self.options.pids:
            if not enrich.pid_alive(pid):
                raise UsageError(f"no process with PID {pid}")
        privileged, why = is_privileged()
        if not privileged:
            raise PrivilegeError(f"closewait-trace needs privileges to load BPF programs: {why}")
        for notice in ensure_tracefs():
            self.renderer.notice(notice)
        features = probe_features()
        self.backend = choose_backend(features, self.options.backend)
        if self.options.kernel_headers is not None:
            headers = [user_header_dir(self.options.kernel_headers)]
        else:
            headers = candidate_header_dirs()
        settings = ProbeSettings(
            backend=self.backend,
            accept_nargs=features.inet_csk_accept_args,
            report_min_ns=self.options.report_min_ns,
            pids=frozenset(self.options.pids),
            ports=frozenset(self.options.ports),
            timeline_all=self.options.timeline_all,
            max_socks=self.options.max_socks,
            max_cw=self.options.max_cw,
        )
        self.probes = Probes.load(settings, headers, on_compile=on_compile)
        for notice in self.probes.notices:
            self.renderer.notice(notice)
        self.probes.open_events(self._pending.append)
        self._seed()
        self.renderer.ready(self.view(), self._ready_info())

    def _ready_info(self) -> dict[str, object]:
        target = (
            "pid " + ",".join(str(p) for p in sorted(self.options.pids))
            if self.options.pids
            else "all processes"
        )
        if self.options.ports:
            target += " port " + ",".join(str(p) for p in sorted(self.options.ports))
        header = self.probes.header if self.probes else None
        return {
            "target": target,
            "backend": self.backend.name.lower() if self.backend else None,
            "pids": sorted(self.options.pids),
            "ports": sorted(self.options.ports),
            "threshold_s": self.options.threshold_ns / 1e9,
            "report_min_s": self.options.report_min_ns / 1e9,
            "headers": str(header.path) if header else None,
            "kernel": os.uname().release,
            "tracer_pid": os.getpid(),
        }

    def _seed(self) -> None:
        """Listeners and CLOSE_WAIT sockets that existed before the probes attached."""
        assert self.probes is not None
        now = time.monotonic_ns()
        try:
            listeners = enrich.listeners_with_owners(self.index)
        except Exception as exc:  # sock_diag is best effort at start
            self.renderer.notice(f"could not list existing listeners: {exc}")
            listeners = []
        for lst in listeners:
            owners = [o for o in lst.owners if o.pid in self.options.pids] or list(lst.owners)
            if not owners:
                continue
            owner = min(owners, key=lambda o: o.pid)
            self.probes.seed_listener(lst.lport, owner.pid, owner.comm)
            self.tracker.add_listener(
                Listener(lst.lport, lst.family, lst.laddr, owner.pid, owner.comm)
            )
        try:
            existing = enrich.diag_sockets({enrich.TcpState.CLOSE_WAIT})
        except Exception as exc:
            self.renderer.notice(f"could not list sockets already in CLOSE_WAIT: {exc}")
            existing = []
        rows = []
        for d in existing:
            if self.options.ports and not {d.lport, d.rport} & self.options.ports:
                continue
            rows.append((d, (d.family, d.laddr, d.lport, d.raddr, d.rport)))
        changes = self.tracker.seed_preexisting([r for _, r in rows], now)
        kept = []
        for ch, (d, _) in zip(changes, rows):
            assert ch.conn is not None
            self._enrich_one(ch.conn, d)
            if self.options.pids and ch.conn.owner_pid not in self.options.pids:
                self.tracker.open.pop(ch.conn.key, None)
                continue
            kept.append(ch)
        if kept:
            self.renderer.notice(
                f"{len(kept)} socket(s) were already in CLOSE_WAIT; their age is counted"
                " from now (shown as >=)"
            )

    # --- loop -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: FrameType | None) -> None:
            self.stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)

    def run(self) -> View:
        """Trace until stopped (signal, --duration); detach and render the summary."""
        assert self.probes is not None
        deadline = (
            time.monotonic() + self.options.duration_s
            if self.options.duration_s is not None
            else None
        )
        interval_ms = max(1, int(self.options.poll_interval_s * 1000))
        try:
            while not self.stop_event.is_set():
                self.probes.poll_events(interval_ms)
                self.step()
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            self.probes.poll_events(0)
            self.step(final=True)
            self.probes.close()
        view = self.view()
        self.renderer.finish(view)
        return view

    def step(self, final: bool = False) -> None:
        """One tick: events, poll, enrich, flag, diagnose, render."""
        assert self.probes is not None
        now = time.monotonic_ns()
        changes: list[Change] = []
        events, self._pending[:] = list(self._pending), []
        for ev in events:
            changes += self.tracker.apply_event(ev, now)
        if not self.probes._closed:
            changes += self.tracker.apply_poll(self.probes.read_cw(), now)
        slow_due = time.monotonic() - self._last_slow >= 1.0 or final
        new = [c.conn for c in changes if c.kind is ChangeKind.OPENED and c.conn]
        if slow_due or new:
            self._read_counters()
        if slow_due:
            # Owners found by /proc need a rescan the index allows only every second.
            new += [c for c in self.tracker.open.values()
                    if c.enrich_tries < 5 and not c.preexisting
                    and (c.inode is None or (c.inode != 0 and c.fd is None))
                    and c not in new]
        if new:
            self._enrich(new)
        changes = self._apply_pid_filter(changes)
        changes += self.tracker.tick(now)
        for ch in changes:
            if ch.conn is None:
                continue
            if ch.kind is ChangeKind.CLOSED:
                self._account_closed(ch.conn)
            if ch.kind in (ChangeKind.FLAGGED, ChangeKind.CLOSED, ChangeKind.OPENED,
                           ChangeKind.UPDATED):
                self.verdicts[ch.conn.key] = diagnose(ch.conn, self._facts(ch.conn), now)
        for conn in new:
            if conn.is_open and conn.key in self.tracker.open:
                self.verdicts[conn.key] = diagnose(conn, self._facts(conn), now)
        if slow_due:
            self._last_slow = time.monotonic()
            self._watch_pids()
            self.tracker.trim_closed(self.options.keep_closed)
            self._trim_verdicts()
        view = self.view(now)
        if changes:
            self.renderer.changes(changes, view)
        self.renderer.refresh(view)

    # --- helpers --------------------------------------------------------------------------

    def _read_counters(self) -> None:
        assert self.probes is not None
        if self.probes._closed:
            return
        self.stats = self.probes.read_stats()
        self.accept_stats = self.probes.read_accept_stats()
        self.accept_errs = self.probes.read_accept_errs()
        self.hist = self.probes.read_hist()

    def _enrich(self, conns: list[Connection]) -> None:
        """Facts that need kernel structs: inode (accepted or not), owner fd, uid."""
        needs = [c for c in conns if c.enrich_tries < 5]
        if not needs:
            return
        try:
            diag = enrich.diag_sockets({enrich.TcpState.CLOSE_WAIT})
        except Exception:
            diag = []
        for conn in needs:
            d = enrich.find_by_tuple(diag, conn.family, conn.laddr, conn.lport, conn.raddr,
                                     conn.rport)
            self._enrich_one(conn, d)

    def _enrich_one(self, conn: Connection, d: enrich.DiagSocket | None) -> None:
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
        # It has an inode: a file descriptor refers (or referred) to it.
        if conn.direction is not Direction.OUTBOUND and conn.accepted is not Accepted.YES:
            if conn.lport in self.tracker.listeners or conn.direction is Direction.INBOUND:
                conn.accepted = Accepted.YES
                conn.direction = Direction.INBOUND
        owners = self.index.owners(d.inode)
        if owners:
            pref = [o for o in owners if o.pid == conn.owner_pid] or owners
            conn.owner_pid, conn.owner_comm, conn.fd = pref[0].pid, pref[0].comm, pref[0].fd

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
            st = self.accept_stats.get(pid)
            if st is not None:
                acc = AcceptStats(
                    ok=int(st.ok),
                    err=int(st.err),
                    last_ok_ns=int(st.last_ok_ts),
                    last_err_ns=int(st.last_err_ts),
                    last_err=int(st.last_err),
                    errors={e: n for (p, e), n in self.accept_errs.items() if p == pid},
                )
            alive = enrich.pid_alive(pid)
            fds = limit = None
            if alive:
                try:
                    fds, limit = enrich.open_files(pid)
                except Exception:
                    pass
            proc = ProcessFacts(pid=pid, alive=alive, open_fds=fds, fd_limit=limit)
        lst_facts = None
        if conn.direction is not Direction.OUTBOUND and conn.accepted is Accepted.NO:
            lst_facts = self._listener_facts(conn.lport)
        return Facts(accept=acc, process=proc, listener=lst_facts)

    def _listener_facts(self, port: int) -> ListenerFacts | None:
        try:
            for d in enrich.listeners():
                if d.lport == port:
                    return ListenerFacts(port=port, queue=d.rqueue, backlog=d.wqueue)
        except Exception:
            return None
        return None

    def _account_closed(self, conn: Connection) -> None:
        self.closed_total += 1
        word = EXIT_WORDS[conn.exit_how] if conn.exit_how is not None else "lost"
        self.closed_by_how[word] += 1
        if conn.cw_exit_ns is not None and not conn.preexisting:
            self.max_closed_ns = max(self.max_closed_ns, conn.age_ns(conn.cw_exit_ns))

    def _watch_pids(self) -> None:
        if not self.watch.pids:
            return
        for pid in sorted(self.watch.pids):
            if pid not in self.watch.exited and not enrich.pid_alive(pid):
                self.watch.exited.append(pid)
                self.renderer.pid_exit(pid, self.view())
        live = {p for p in self.watch.pids if p not in self.watch.exited}
        desc = _descendants(live)
        if desc != self.watch.descendants and self.probes is not None:
            self.watch.descendants = desc
            self.probes.set_pids(self.watch.pids | desc)

    def _trim_verdicts(self) -> None:
        keep = set(self.tracker.open) | {c.key for c in self.tracker.closed}
        if len(self.verdicts) > len(keep):
            self.verdicts = {k: v for k, v in self.verdicts.items() if k in keep}

    def view(self, now_ns: int | None = None) -> View:
        return View(
            now_ns=now_ns if now_ns is not None else time.monotonic_ns(),
            started_ns=self.tracker.start_ns,
            backend=self.backend.name.lower() if self.backend else "?",
            threshold_ns=self.options.threshold_ns,
            open=list(self.tracker.open.values()),
            verdicts=self.verdicts,
            stats=self.stats,
            closed_total=self.closed_total,
            flagged_total=self.tracker.flagged_total,
            lost_exits=self.tracker.lost_exits,
            listeners=self.tracker.listeners,
            accept_errors=self.accept_errs,
            exited_pids=list(self.watch.exited),
            closed_by_how=dict(self.closed_by_how),
            max_closed_ns=self.max_closed_ns,
            hist=self.hist,
        )

