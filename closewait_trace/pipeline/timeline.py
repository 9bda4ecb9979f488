"""Per-socket lifecycle timelines: states as bars on a time axis, and the moments that matter
(accept, the peer's FIN, the flag, the application's close).

A timeline is drawn from the socket's full transitions when the kernel sent them (a timeline
watch, `--timeline all`) and otherwise from the milestones the kernel keeps for every socket
(established, accepted, FIN received, closed), which is what a flagged socket has.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..kernel.decode import TcpState
from ..errors import OutputError, UsageError
from .join import Connection, Direction
from ..outputs.textsafe import visible

BAR_WIDTH = 48

STATE_STYLE = {
    "SYN_SENT": "cyan", "SYN_RECV": "cyan", "ESTABLISHED": "green", "CLOSE_WAIT": "bold red",
    "LAST_ACK": "yellow", "FIN_WAIT1": "blue", "FIN_WAIT2": "blue", "CLOSING": "yellow",
    "TIME_WAIT": "dim",
}


@dataclass(frozen=True)
class Segment:
    state: str
    start: int
    end: int
    pid: int | None = None


@dataclass(frozen=True)
class Marker:
    ts: int
    label: str
    pid: int | None = None


def _state_name(n: int) -> str:
    try:
        return TcpState(n).name
    except ValueError:
        return f"state {n}"


def build(conn: Connection, now_ns: int) -> tuple[list[Segment], list[Marker]]:
    """The bars and marks of one socket's life."""
    segments: list[Segment] = []
    markers: list[Marker] = []
    if conn.steps:
        current: tuple[str, int, int | None] | None = None
        for st in conn.steps:
            if st.kind == "state":
                if current is not None:
                    segments.append(Segment(current[0], current[1], st.ts, current[2]))
                name = _state_name(st.newstate)
                if st.newstate == TcpState.CLOSE_WAIT:
                    markers.append(Marker(st.ts, "FIN from peer"))
                current = None if st.newstate == TcpState.CLOSE else (name, st.ts, st.pid)
            elif st.kind == "accept":
                markers.append(Marker(st.ts, "accept()", st.pid))
            elif st.kind == "close":
                markers.append(Marker(st.ts, "close() by app", st.pid))
        if current is not None:
            segments.append(Segment(current[0], current[1], now_ns, current[2]))
    else:
        start = conn.established_ns or (conn.cw_enter_ns if conn.cw_enter_ns else conn.since_ns)
        fin = conn.since_ns
        if start < fin:
            segments.append(Segment("ESTABLISHED", start, fin))
        end = conn.cw_exit_ns if conn.cw_exit_ns is not None else now_ns
        segments.append(Segment("CLOSE_WAIT", fin, end))
        if conn.cw_enter_ns is not None:
            markers.append(Marker(fin, "FIN from peer"))
        else:
            markers.append(Marker(fin, "already in CLOSE_WAIT when tracing started"))
        if conn.accepted_ns is not None:
            markers.append(Marker(conn.accepted_ns, "accept()", conn.owner_pid))
        if conn.app_close_ns is not None:
            markers.append(Marker(conn.app_close_ns, "close() by app", conn.closer_pid))
        if conn.cw_exit_ns is not None and conn.exit_how is not None:
            markers.append(Marker(conn.cw_exit_ns, f"left CLOSE_WAIT ({conn.exit_how.name})"))
    if conn.flagged_ns is not None:
        markers.append(Marker(conn.flagged_ns, "flagged as leak"))
    markers.sort(key=lambda m: m.ts)
    return segments, markers


def title(conn: Connection) -> str:
    arrow = "->" if conn.direction is Direction.OUTBOUND else "<-"
    owner = f"{conn.owner_pid}/{conn.owner_comm}" if conn.owner_pid is not None else "?"
    state = (conn.direction.value if conn.direction is Direction.OUTBOUND
             else f"{conn.direction.value}, accepted: {conn.accepted.value}")
    return f"{conn.laddr}:{conn.lport} {arrow} {conn.raddr}:{conn.rport}  pid {owner}  {state}"


def table(conn: Connection, now_ns: int) -> Table:
    """The timeline as a rich table: one row per state (a bar) and per moment (a mark)."""
    segments, markers = build(conn, now_ns)
    times = [s.start for s in segments] + [s.end for s in segments] + [m.ts for m in markers]
    t0 = min(times) if times else now_ns
    t1 = max(times) if times else now_ns
    span = max(t1 - t0, 1)

    def pos(ts: int) -> int:
        return min(BAR_WIDTH - 1, max(0, int((ts - t0) / span * (BAR_WIDTH - 1))))

    tbl = Table(title=Text(visible(title(conn))), title_justify="left", box=None, header_style="bold",
                pad_edge=False)
    tbl.add_column("t+", justify="right")
    tbl.add_column("what")
    tbl.add_column("pid", justify="right")
    tbl.add_column(f"0 {'-' * (BAR_WIDTH - 12)} {(t1 - t0) / 1e9:.3f}s", no_wrap=True)
    rows: list[tuple[int, str, str, Text]] = []
    for seg in segments:
        a, b = pos(seg.start), pos(seg.end)
        bar = Text(" " * a)
        bar.append("█" * max(1, b - a), style=STATE_STYLE.get(seg.state, ""))
        rows.append((seg.start, seg.state, str(seg.pid or ""), bar))
    for m in markers:
        bar = Text(" " * pos(m.ts))
        bar.append("▲", style="bold magenta")
        rows.append((m.ts, m.label, str(m.pid or ""), bar))
    for ts, what, pid, bar in sorted(rows, key=lambda r: r[0]):
        tbl.add_row(f"{(ts - t0) / 1e9:.3f}s", Text(visible(what)), pid, bar)
    return tbl


def as_dict(conn: Connection, now_ns: int) -> dict[str, Any]:
    segments, markers = build(conn, now_ns)
    t0 = min([s.start for s in segments] + [m.ts for m in markers], default=now_ns)
    return {
        "states": [{"state": s.state, "start_s": round((s.start - t0) / 1e9, 6),
                    "end_s": round((s.end - t0) / 1e9, 6), "pid": s.pid} for s in segments],
        "moments": [{"what": m.label, "at_s": round((m.ts - t0) / 1e9, 6), "pid": m.pid}
                    for m in markers],
    }


def as_text(conn: Connection, now_ns: int, width: int = 110) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    console.print(table(conn, now_ns))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return str(out)


class Exporter:
    """Collects timelines and writes them as one HTML or SVG page."""

    def __init__(self, path: Path) -> None:
        """Opens the file now, before any tracing: a path that cannot be written fails at once,
        not after the trace."""
        if path.suffix.lower() not in (".html", ".htm", ".svg"):
            raise UsageError(f"--timeline-export {path}: use a .html or .svg file name")
        if not path.parent.is_dir():
            raise OutputError(f"--timeline-export {path}: no folder {path.parent}")
        try:
            self.out = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"--timeline-export {path}: {exc.strerror or exc}") from exc
        self.path = path
        self.tables: list[Table] = []

    def add(self, conn: Connection, now_ns: int) -> None:
        self.tables.append(table(conn, now_ns))

    def write(self) -> Path:
        """The page, with every timeline added (or a line saying there was none)."""
        console = Console(record=True, file=io.StringIO(), width=120, force_terminal=True)
        if self.tables:
            console.print(Group(*[x for t in self.tables for x in (t, Text(""))]))
        else:
            console.print(Text("closewait-trace: no socket's timeline to show in this run"))
        if self.path.suffix.lower() == ".svg":
            page = console.export_svg(title="closewait-trace timelines")
        else:
            page = console.export_html()
        try:
            with self.out:
                self.out.write(page)
        except OSError as exc:
            raise OutputError(f"--timeline-export {self.path}: {exc.strerror or exc}") from exc
        return self.path
