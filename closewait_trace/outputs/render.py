"""Render stage: what the user sees. Plain lines, JSON lines, or a rich live view.

Renderers get a View (a snapshot of the session's state) and the Changes of each tick; they
hold no state of the tracer and open nothing themselves: streams and consoles are passed in.
The JSON format is documented in docs/json-schema.md; SCHEMA_VERSION changes with any
incompatible change to it.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..kernel.decode import LOSS_SOURCES, LOSS_STATS, ExitHow, Stat, exit_code_text
from ..pipeline.diagnose import Verdict, group_verdicts
from ..pipeline import timeline as tl
from ..facts.facts import Listener, ListenerHolder, NetnsSource
from ..pipeline.join import Change, ChangeKind, Connection, Direction
from ..options import TimelineMode
from .textsafe import visible

SCHEMA_VERSION = 1

EXIT_WORDS = {
    ExitHow.APP_CLOSE: "app-close",
    ExitHow.APP_ABORT: "app-abort",
    ExitHow.RESET: "reset",
    ExitHow.LISTENER_CLOSED: "listener-closed",
    ExitHow.PROCESS_EXIT: "process-exit",
    ExitHow.NONE: "unknown",
}


@dataclass
class TickStats:
    """How long the tracer's own ticks took (poll, join, enrich, diagnose, render): the
    live view is as fresh as the poll interval plus one tick."""

    ticks: int = 0
    last_ns: int = 0
    max_ns: int = 0
    over_1s: int = 0

    def add(self, ns: int) -> None:
        self.ticks += 1
        self.last_ns = ns
        self.max_ns = max(self.max_ns, ns)
        if ns > 1_000_000_000:
            self.over_1s += 1


@dataclass
class View:
    """A snapshot of the session for the renderers."""

    now_ns: int
    started_ns: int
    backend: str
    threshold_ns: int
    open: Sequence[Connection]
    verdicts: dict[tuple[int, int], Verdict]
    stats: dict[Stat, int]
    closed_total: int
    flagged_total: int
    lost_exits: int
    listeners: dict[tuple[int, int], Listener]  # by (netns inode or 0, port)
    accept_errors: dict[tuple[int, int], int] = field(default_factory=dict)
    exited_pids: Sequence[int] = ()
    closed_by_how: dict[str, int] = field(default_factory=dict)
    max_closed_ns: int = 0
    hist: Sequence[int] = ()
    #: wall clock minus CLOCK_MONOTONIC, ns; None: the current machine's (live)
    wall_offset_ns: int | None = None
    #: the tracer's own tick times (None: not a live tracer, e.g. a unit test's view)
    tick: TickStats | None = None
    #: seconds the accept syscall tracepoints were attached (None: accept() is probed directly)
    accept_watch_s: float | None = None

    @property
    def events_lost(self) -> int:
        return sum(self.stats.get(s, 0) for s in LOSS_STATS) + self.lost_exits

    def wall(self, ts_ns: int) -> dt.datetime:
        """Wall-clock time of a kernel CLOCK_MONOTONIC timestamp."""
        offset = self.wall_offset_ns
        if offset is None:
            offset = time.time_ns() - time.monotonic_ns()
        return dt.datetime.fromtimestamp((ts_ns + offset) / 1e9).astimezone()


class Renderer(Protocol):
    """An output. Each tick the session calls changes() (when there are any) and then
    refresh(), with the same view: an output may do its per-tick work in refresh() alone."""

    def notice(self, message: str) -> None: ...
    def ready(self, view: View, info: dict[str, Any]) -> None: ...
    def changes(self, changes: Sequence[Change], view: View) -> None: ...
    def refresh(self, view: View) -> None: ...
    def pid_exit(self, pid: int, view: View) -> None: ...
    def finish(self, view: View) -> None: ...


def fmt_duration(ns: int) -> str:
    if ns < 999_500_000:
        return f"{ns / 1e6:.0f}ms"
    if ns < 59_950_000_000:
        return f"{ns / 1e9:.1f}s"
    s = max(60, ns // 1_000_000_000)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def conn_age(conn: Connection, now_ns: int) -> str:
    text = fmt_duration(conn.age_ns(now_ns))
    return f">={text}" if conn.preexisting else text


def container_text(conn: Connection) -> str:
    """" [container]" for an owner in a container, else ""."""
    ident = conn.container
    label = ident.label if ident is not None else None
    if ident is None or label is None:
        return ""
    pod = ident.pod.full_name if ident.pod else None
    return f" [{pod}/{label}]" if pod else f" [{label}]"


def netns_text(conn: Connection) -> str:
    """The socket's network namespace, marked unless the kernel reported it: "(by 4-tuple)"
    when its 4-tuple was found in that namespace, "(owner's)" when it is the owner's."""
    if conn.netns is None:
        return "netns=?"
    how = {NetnsSource.OWNER: "(owner's)", NetnsSource.SOCK_DIAG: "(by 4-tuple)"}
    return f"netns={conn.netns}" + how.get(conn.netns_source, "") if conn.netns_source \
        else f"netns={conn.netns}"


def netns_dict(conn: Connection) -> dict[str, Any]:
    return {"netns": conn.netns,
            "netns_source": conn.netns_source.value if conn.netns_source else None}


def holder_dict(h: ListenerHolder) -> dict[str, Any]:
    return {"pid": h.pid, "comm": h.comm, "fds": list(h.fds), "state": h.state,
            "waiting": h.waiting, "serving": h.serving, "busy_in": list(h.busy_in),
            "open_files": h.open_files, "max_open_files": h.max_open_files}


def owner_text(conn: Connection) -> str:
    if conn.owner_pid is None:
        return "?"
    return f"{conn.owner_pid}/{conn.owner_comm or '?'}{container_text(conn)}"


def accepted_text(conn: Connection) -> str:
    if conn.direction is Direction.OUTBOUND:
        return "outbound"
    if conn.accepted.value == "yes":
        return "accepted-after-fin" if conn.accepted_after_fin else "accepted"
    if conn.accepted.value == "no":
        return "never-accepted"
    return "accept-unknown"


def conn_dict(conn: Connection, view: View) -> dict[str, Any]:
    verdict = view.verdicts.get(conn.key)
    d: dict[str, Any] = {
        "id": f"{conn.key[0]:x}-{conn.key[1]}",
        "family": "ipv6" if conn.family == 10 else "ipv4",
        "local": endpoint(conn.laddr, conn.lport),
        "remote": endpoint(conn.raddr, conn.rport),
        "direction": conn.direction.value,
        "pid": conn.owner_pid,
        "comm": conn.owner_comm,
        "container": conn.container.as_dict() if conn.container else None,
        **netns_dict(conn),
        "accepted": conn.accepted.value,
        "accepted_after_fin": conn.accepted_after_fin,
        "fd": conn.fd,
        "inode": conn.inode,
        "cw_since": view.wall(conn.since_ns).isoformat(timespec="milliseconds"),
        "cw_age_s": round(conn.age_ns(view.now_ns) / 1e9, 6),
        "cw_age_at_least": conn.preexisting,
        "open": conn.is_open,
        "exit": EXIT_WORDS[conn.exit_how] if conn.exit_how is not None else None,
        "closer_pid": conn.closer_pid,
        "flagged": conn.flagged_ns is not None,
        "verdict": verdict.as_dict() if verdict else None,
    }
    if conn.exit_code is not None:
        sig = conn.exit_code & 0x7F
        d["exit_signal" if sig else "exit_status"] = sig or (conn.exit_code >> 8) & 0xFF
    if conn.established_ns is not None and conn.cw_enter_ns is not None:
        d["established_before_fin_s"] = round((conn.cw_enter_ns - conn.established_ns) / 1e9, 6)
    if conn.accepted_ns is not None and conn.cw_enter_ns is not None:
        d["accept_after_fin_s"] = round((conn.accepted_ns - conn.cw_enter_ns) / 1e9, 6)
    if (acc := conn.other_acceptor) is not None:
        d["acceptor"] = {"pid": acc.pid, "comm": acc.comm}
    if conn.queued_on is not None:
        lst = conn.queued_on.listener
        d["listener"] = {"local": endpoint(lst.laddr, lst.lport), "inode": lst.inode,
                         "netns": lst.netns, "queue": lst.queue, "backlog": lst.backlog,
                         "why": conn.queued_on.why}
    return d


def stats_dict(view: View) -> dict[str, Any]:
    return {
        "cw_entered": view.stats.get(Stat.CW_ENTERED, 0),
        "cw_reported": view.stats.get(Stat.CW_REPORTED, 0),
        "cw_short": view.stats.get(Stat.CW_SHORT, 0),
        "open": len(view.open),
        "flagged": view.flagged_total,
        "closed": view.closed_total,
        "events_lost": view.events_lost,
        "lost": {**{name: view.stats.get(stat, 0) for name, stat in LOSS_SOURCES},
                 "exit_events": view.lost_exits},
        "kernel_skipped": view.stats.get(Stat.KERNEL_SKIPPED, 0),
        "accepts_seen": view.stats.get(Stat.ACCEPTS, 0),
        "accepts_unmatched": view.stats.get(Stat.ACCEPT_UNMATCHED, 0),
    }


def summary_dict(view: View) -> dict[str, Any]:
    by_pid: Counter[str] = Counter(owner_text(c) for c in view.open)
    by_port: Counter[int] = Counter(c.service_port for c in view.open)
    return {
        "duration_s": round((view.now_ns - view.started_ns) / 1e9, 3),
        "backend": view.backend,
        "threshold_s": view.threshold_ns / 1e9,
        **stats_dict(view),
        "complete": view.events_lost == 0,
        "closed_by": view.closed_by_how,
        "max_closed_cw_s": round(view.max_closed_ns / 1e9, 6),
        "open_by_process": dict(by_pid.most_common()),
        "open_by_port": {str(k): v for k, v in by_port.most_common()},
        "groups": group_verdicts(list(view.open), view.verdicts),
        "still_open": [conn_dict(c, view) for c in sorted(view.open, key=lambda c: c.since_ns)],
        "accept_errors": [
            {"pid": pid, "errno": err, "count": n}
            for (pid, err), n in sorted(view.accept_errors.items())
        ],
        "tracer": tracer_dict(view),
    }


def tracer_dict(view: View) -> dict[str, Any]:
    """The tracer process itself: tick times and peak memory (they describe this run of the
    tracer, not the traced host: a report of a recording shows the report's own)."""
    t = view.tick or TickStats()
    return {
        "ticks": t.ticks,
        "tick_s_max": round(t.max_ns / 1e9, 4),
        "ticks_over_1s": t.over_1s,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def timeline_wanted(ch: Change, mode: TimelineMode | None) -> bool:
    """Whether this change shows a timeline: every watched socket's end with --timeline all,
    and every flag with --timeline (flagged or all)."""
    if ch.conn is None or mode is None:
        return False
    return ch.kind is ChangeKind.TIMELINE or ch.kind is ChangeKind.FLAGGED


# --- JSON lines -----------------------------------------------------------------------------


class JsonRenderer:
    """One JSON object per line: see docs/json-schema.md."""

    def __init__(self, out: IO[str], timelines: TimelineMode | None = None,
                 exporter: tl.Exporter | None = None) -> None:
        self.out = out
        self.timelines = timelines
        self.exporter = exporter

    def _emit(self, kind: str, view: View | None, *, flush: bool = True, **body: Any) -> None:
        record: dict[str, Any] = {"schema": SCHEMA_VERSION, "type": kind}
        when = view.wall(view.now_ns) if view is not None else dt.datetime.now().astimezone()
        record["time"] = when.isoformat(timespec="milliseconds")
        record.update(body)
        self.out.write(json.dumps(record, sort_keys=False) + "\n")
        if flush:
            self.out.flush()

    def notice(self, message: str) -> None:
        self._emit("notice", None, message=message)

    def ready(self, view: View, info: dict[str, Any]) -> None:
        self._emit("ready", view, **info)

    def changes(self, changes: Sequence[Change], view: View) -> None:
        """The tick's records, flushed once at the end, also when one fails (not a write(2)
        per record: a tick may flag 4,000 leaks)."""
        try:
            for ch in changes:
                self._change(ch, view)
        finally:
            self.out.flush()

    def _change(self, ch: Change, view: View) -> None:
        if ch.conn is not None and ch.kind is not ChangeKind.TIMELINE:
            self._emit(ch.kind.value, view, flush=False, connection=conn_dict(ch.conn, view))
        if timeline_wanted(ch, self.timelines):
            assert ch.conn is not None
            self._emit("timeline", view, flush=False, connection=conn_dict(ch.conn, view),
                       timeline=tl.as_dict(ch.conn, view.now_ns))
            if self.exporter is not None:
                self.exporter.add(ch.conn, view.now_ns)
        elif ch.listener is not None:
            lst = ch.listener
            self._emit(ch.kind.value, view, flush=False, port=lst.lport, addr=lst.laddr,
                       pid=lst.pid, comm=lst.comm)

    def refresh(self, view: View) -> None:
        pass

    def pid_exit(self, pid: int, view: View) -> None:
        self._emit("pid_exit", view, pid=pid)

    def finish(self, view: View) -> None:
        exported = self.exporter.write() if self.exporter is not None else None
        self._emit("summary", view, **summary_dict(view),
                   timeline_export=str(exported) if exported else None)


# --- plain lines ----------------------------------------------------------------------------


def conn_line(kind: str, conn: Connection, view: View) -> str:
    verdict = view.verdicts.get(conn.key)
    parts = [
        view.wall(view.now_ns).strftime("%H:%M:%S.%f")[:-3],
        f"{kind:<6}",
        f"{endpoint(conn.laddr, conn.lport)} <- {endpoint(conn.raddr, conn.rport)}"
        if conn.direction is not Direction.OUTBOUND
        else f"{endpoint(conn.laddr, conn.lport)} -> {endpoint(conn.raddr, conn.rport)}",
        f"pid={owner_text(conn)}",
        accepted_text(conn),
    ]
    if conn.is_open:
        parts.append(f"cw={conn_age(conn, view.now_ns)}")
    else:
        exit_word = EXIT_WORDS[conn.exit_how] if conn.exit_how is not None else "lost"
        if conn.exit_code is not None:
            exit_word += f"({exit_code_text(conn.exit_code)})"
        parts.append(f"cw={conn_age(conn, view.now_ns)} exit={exit_word}")
    if conn.netns is not None:
        parts.append(netns_text(conn))
    if (acc := conn.other_acceptor) is not None:
        parts.append(f"accepted-by={acc.pid}/{acc.comm or '?'}")
    if verdict is not None and kind == "LEAK":
        parts.append(f"-- {verdict.summary}")
        if verdict.evidence:
            parts.append("[" + "; ".join(verdict.evidence) + "]")
    return "  ".join(parts)


class PlainRenderer:
    """Human-readable lines, for pipes and logs."""

    KINDS = {
        ChangeKind.OPENED: "OPEN",
        ChangeKind.FLAGGED: "LEAK",
        ChangeKind.CLOSED: "CLOSE",
        ChangeKind.LOST: "LOST",
    }

    def __init__(self, out: IO[str], timelines: TimelineMode | None = None,
                 exporter: tl.Exporter | None = None) -> None:
        self.out = out
        self.timelines = timelines
        self.exporter = exporter

    def _line(self, text: str) -> None:
        """One line: whatever it quotes from the traced system is shown, never acted on."""
        self._write(visible(text))

    def _write(self, safe: str) -> None:
        self.out.write(safe + "\n")
        self.out.flush()

    def notice(self, message: str) -> None:
        self._line(f"closewait-trace: {message}")

    def ready(self, view: View, info: dict[str, Any]) -> None:
        self._line(
            f"closewait-trace: tracing {info.get('target', 'all processes')} with the"
            f" {view.backend} backend; leak threshold {fmt_duration(view.threshold_ns)}."
            " Ctrl-C to stop."
        )

    def changes(self, changes: Sequence[Change], view: View) -> None:
        for ch in changes:
            kind = self.KINDS.get(ch.kind)
            if kind is not None and ch.conn is not None:
                self._line(conn_line(kind, ch.conn, view))
            if timeline_wanted(ch, self.timelines):
                assert ch.conn is not None
                self._write(tl.as_text(ch.conn, view.now_ns).rstrip("\n"))
                if self.exporter is not None:
                    self.exporter.add(ch.conn, view.now_ns)
            elif ch.listener is not None:
                word = "LISTEN" if ch.kind is ChangeKind.LISTEN else "UNLSTN"
                lst = ch.listener
                self._line(
                    f"{view.wall(view.now_ns).strftime('%H:%M:%S.%f')[:-3]}  {word}  "
                    f"{endpoint(lst.laddr, lst.lport)}  pid={lst.pid}/{lst.comm}"
                )

    def refresh(self, view: View) -> None:
        pass

    def pid_exit(self, pid: int, view: View) -> None:
        self._line(f"closewait-trace: traced process {pid} has exited; its sockets stay counted")

    def finish(self, view: View) -> None:
        for line in summary_lines(view):
            self._line(line)
        exported = self.exporter.write() if self.exporter is not None else None
        if exported is not None:
            self._line(f"  timelines: {exported}")


def summary_lines(view: View) -> list[str]:
    s = summary_dict(view)
    lines = [
        "",
        f"Summary after {fmt_duration(view.now_ns - view.started_ns)} ({view.backend} backend):",
        f"  sockets that entered CLOSE_WAIT: {s['cw_entered']} on this host,"
        f" {s['cw_reported']} matching the filters ({s['cw_short']} left within"
        f" the report minimum); leaks flagged {s['flagged']}, still open {s['open']}",
    ]
    if view.closed_by_how:
        closed = ", ".join(f"{k} {v}" for k, v in sorted(view.closed_by_how.items()))
        lines.append(
            f"  left CLOSE_WAIT: {closed}; longest {fmt_duration(view.max_closed_ns)}"
        )
    groups = s["groups"]
    if groups:
        lines.append("  still in CLOSE_WAIT, by process, service port and cause:")
    for g in groups[:10]:
        ctr = f" [{g['container']}]" if g.get("container") else ""
        lines.append(f"    {g['count']:>5} x pid {g['pid']}/{g['comm']}{ctr} :{g['port']}"
                     f"  {g['cause']} ({g['confidence']}): {g['summary']}")
        for ev in g["evidence"]:
            lines.append(f"            - {ev}")
    for conn in sorted(view.open, key=lambda c: c.since_ns)[:20]:
        verdict = view.verdicts.get(conn.key)
        lines.append(
            f"  open {conn_age(conn, view.now_ns):>8}  {endpoint(conn.laddr, conn.lport)}"
            f" <-> {endpoint(conn.raddr, conn.rport)}  pid={owner_text(conn)}"
            f"  {accepted_text(conn)}" + (f"  -- {verdict.summary}" if verdict else "")
        )
    if len(view.open) > 20:
        lines.append(f"  ... and {len(view.open) - 20} more open")
    if view.events_lost:
        lines.append(
            f"  RESULTS INCOMPLETE: {view.events_lost} events lost"
            f" ({', '.join(f'{k} {v}' for k, v in s['lost'].items() if v)})"
        )
    else:
        lines.append("  no events lost")
    if s["kernel_skipped"]:
        lines.append(f"  the kernel skipped {s['kernel_skipped']} run(s) of the tracer's programs"
                     " (a program busy on that CPU): a state change, accept or close may be unseen")
    return lines


# --- rich live view -------------------------------------------------------------------------


class LiveRenderer:
    """A live terminal view: open CLOSE_WAIT sockets, leaks, counts, events lost."""

    MAX_ROWS = 15
    RECENT = 8

    def __init__(self, console: Console, timelines: TimelineMode | None = None,
                 exporter: tl.Exporter | None = None) -> None:
        self.console = console
        self.timelines = timelines
        self.exporter = exporter
        self.live: Live | None = None
        self.recent: list[Text] = []
        self.info: dict[str, Any] = {}

    def notice(self, message: str) -> None:
        self.console.print(Text.assemble(("closewait-trace: ", "dim"), visible(message)))

    def ready(self, view: View, info: dict[str, Any]) -> None:
        self.info = info
        self.live = Live(self._render(view), console=self.console, refresh_per_second=4,
                         transient=False)
        self.live.start()

    def changes(self, changes: Sequence[Change], view: View) -> None:
        for ch in changes:
            if timeline_wanted(ch, self.timelines):
                assert ch.conn is not None
                self.console.print(tl.table(ch.conn, view.now_ns))
                if self.exporter is not None:
                    self.exporter.add(ch.conn, view.now_ns)
            if ch.conn is None or ch.kind not in (ChangeKind.FLAGGED, ChangeKind.CLOSED,
                                                  ChangeKind.LOST):
                continue
            style = {"leak": "bold red", "close": "green", "lost": "yellow"}[ch.kind.value]
            line = Text(visible(conn_line(PlainRenderer.KINDS[ch.kind], ch.conn, view)),
                        style=style)
            self.recent.append(line)
        del self.recent[: -self.RECENT]

    def refresh(self, view: View) -> None:
        if self.live is not None:
            self.live.update(self._render(view))

    def pid_exit(self, pid: int, view: View) -> None:
        self.recent.append(Text(f"traced process {pid} exited; its sockets stay counted",
                                style="yellow"))

    def finish(self, view: View) -> None:
        if self.live is not None:
            self.live.update(self._render(view))
            self.live.stop()
            self.live = None
        for line in summary_lines(view):
            self.console.print(Text(visible(line)), highlight=False)
        exported = self.exporter.write() if self.exporter is not None else None
        if exported is not None:
            self.console.print(Text.assemble(
                "  timelines: ", (visible(exported), f"link file://{exported.resolve()}")))

    def _render(self, view: View) -> Group:
        lost = view.events_lost
        head = Text.assemble(
            ("closewait-trace ", "bold"),
            visible(f"{self.info.get('target', 'all processes')} | {view.backend} backend | "
            f"threshold {fmt_duration(view.threshold_ns)} | up "
            f"{fmt_duration(view.now_ns - view.started_ns)} | "),
            (f"{len(view.open)} in CLOSE_WAIT", "bold"),
            " | ",
            (f"{sum(1 for c in view.open if c.flagged_ns is not None)} leaking",
             "bold red" if any(c.flagged_ns for c in view.open) else ""),
            f" | left {view.closed_total} | ",
            (f"events lost {lost}", "bold red" if lost else "green"),
        )
        table = Table(expand=True, box=None, header_style="bold")
        for col in ("age", "local", "remote", "owner", "state", "verdict"):
            table.add_column(col, overflow="fold")
        rows = sorted(view.open, key=lambda c: c.since_ns)
        for conn in rows[: self.MAX_ROWS]:
            verdict = view.verdicts.get(conn.key)
            flagged = conn.flagged_ns is not None
            cells = (conn_age(conn, view.now_ns), endpoint(conn.laddr, conn.lport),
                     endpoint(conn.raddr, conn.rport), owner_text(conn), accepted_text(conn),
                     verdict.summary if verdict else "")
            table.add_row(*(Text(visible(c)) for c in cells), style="red" if flagged else None)
        parts: list[Any] = [head, table]
        if len(rows) > self.MAX_ROWS:
            parts.append(Text(f"... {len(rows) - self.MAX_ROWS} more; grouped below", style="dim"))
        groups = Table(box=None, header_style="bold")
        groups.add_column("owner")
        groups.add_column("service port")
        groups.add_column("state")
        groups.add_column("count", justify="right")
        groups.add_column("netns")
        grouped: Counter[tuple[str, int, str, str]] = Counter(
            (owner_text(c), c.service_port, accepted_text(c),
             str(c.netns) if c.netns is not None else "?") for c in view.open
        )
        for (owner, port, state, ns), n in grouped.most_common(8):
            groups.add_row(Text(visible(owner)), str(port), state, str(n), ns)
        if grouped:
            parts.append(Panel(groups, title="by process and service", expand=False))
        if self.recent:
            parts.append(Panel(Group(*self.recent), title="recent", expand=True))
        return Group(*parts)
