"""`closewait-trace snapshot`: the sockets in CLOSE_WAIT right now, from sock_diag and /proc.

No BPF and no history, so it works where tracing cannot. Each socket is diagnosed by the same
rules as in live mode, with the facts a single look can give: accepted or not (inode 0),
owner and fd, whether the application read the EOF (Recv-Q), the listener's queue against
its backlog, the owner's open files and thread states, edge-triggered epoll registration.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, cast

from . import enrich
from .diagnose import Facts, ListenerFacts, ProcessFacts, Verdict, diagnose, group_verdicts
from .errors import EnrichError
from .join import Accepted, Connection, Direction
from .render import endpoint
from .world import ProcessInfo, process_info


@dataclass
class Snapshot:
    taken_ns: int
    connections: list[Connection]
    verdicts: dict[tuple[int, int], Verdict]
    listeners: list[enrich.Listener]
    et_listeners: dict[int, bool]

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "type": "snapshot",
            "close_wait": len(self.connections),
            "groups": group_verdicts(self.connections, self.verdicts),
            "listeners": [
                {"local": endpoint(lst.laddr, lst.lport), "queue": lst.queue,
                 "backlog": lst.backlog, "edge_triggered": self.et_listeners.get(lst.lport),
                 "owners": [{"pid": o.pid, "fd": o.fd, "comm": o.comm} for o in lst.owners]}
                for lst in self.listeners
            ],
            "sockets": [self._conn(c) for c in self.connections],
        }

    def _conn(self, c: Connection) -> dict[str, Any]:
        v = self.verdicts.get(c.key)
        return {
            "local": endpoint(c.laddr, c.lport), "remote": endpoint(c.raddr, c.rport),
            "family": "ipv6" if c.family == socket.AF_INET6 else "ipv4",
            "direction": c.direction.value, "accepted": c.accepted.value, "pid": c.owner_pid,
            "comm": c.owner_comm, "fd": c.fd, "inode": c.inode, "eof_read": c.eof_read,
            "unread_bytes": c.unread_bytes, "verdict": v.as_dict() if v else None,
        }


def take(*, ports: frozenset[int] = frozenset(), pids: frozenset[int] = frozenset()) -> Snapshot:
    now = time.monotonic_ns()
    try:
        cws = enrich.diag_sockets({enrich.TcpState.CLOSE_WAIT})
    except EnrichError:
        raise
    index = enrich.ProcessIndex()
    lsts = enrich.listeners_with_owners(index)
    by_port = {lst.lport: lst for lst in lsts}
    procs: dict[int, ProcessInfo] = {}

    def proc(pid: int) -> ProcessInfo:
        if pid not in procs:
            procs[pid] = process_info(pid)
        return procs[pid]

    conns: list[Connection] = []
    verdicts: dict[tuple[int, int], Verdict] = {}
    et_listeners: dict[int, bool] = {}
    for n, d in enumerate(cws, 1):
        if ports and not {d.lport, d.rport} & ports:
            continue
        lst = by_port.get(d.lport)
        inbound = lst is not None or d.inode == 0
        conn = Connection(
            key=(0, n), family=d.family, laddr=d.laddr, lport=d.lport, raddr=d.raddr,
            rport=d.rport, direction=Direction.INBOUND if inbound else Direction.OUTBOUND,
            first_seen_ns=now, inode=d.inode, uid=d.uid, history=False, enriched=True,
        )
        if d.inode == 0:
            conn.accepted = Accepted.NO
            if lst is not None and lst.owners:
                owner = min(lst.owners, key=lambda o: o.pid)
                conn.owner_pid, conn.owner_comm = owner.pid, owner.comm
        else:
            if inbound:
                conn.accepted = Accepted.YES
            conn.eof_read = d.rqueue == 0
            conn.unread_bytes = max(0, d.rqueue - 1)
            owners = index.owners(d.inode)
            if owners:
                conn.owner_pid, conn.owner_comm, conn.fd = owners[0].pid, owners[0].comm, \
                    owners[0].fd
        if pids and conn.owner_pid not in pids:
            continue
        facts = Facts()
        if conn.owner_pid is not None:
            info = proc(conn.owner_pid)
            pf = ProcessFacts(pid=info.pid, alive=info.alive, open_fds=info.open_fds,
                              fd_limit=info.fd_limit, threads=dict(info.threads))
            lf = None
            if lst is not None and conn.accepted is Accepted.NO:
                mine = [o for o in lst.owners if o.pid == conn.owner_pid] or list(lst.owners)
                fd = mine[0].fd if mine else None
                et = fd in proc(mine[0].pid).et_fds if mine else None
                et_listeners[lst.lport] = bool(et)
                lf = ListenerFacts(port=lst.lport, queue=lst.queue, backlog=lst.backlog, fd=fd,
                                   edge_triggered=et)
            facts = Facts(process=pf, listener=lf)
        verdicts[conn.key] = diagnose(conn, facts, now)
        conns.append(conn)
    shown = {c.lport for c in conns if c.direction is Direction.INBOUND}
    return Snapshot(now, conns, verdicts, [lst for lst in lsts if lst.lport in shown],
                    et_listeners)


def render_lines(snap: Snapshot, verbose: bool = False) -> list[str]:
    lines = [f"{len(snap.connections)} socket(s) in CLOSE_WAIT now"
             " (a snapshot: no history; `closewait-trace` traces them live)"]
    groups = group_verdicts(snap.connections, snap.verdicts)
    if groups:
        lines.append("by process, service port and cause:")
    for g in groups:
        lines.append(f"  {g['count']:>5} x pid {g['pid']}/{g['comm']} :{g['port']}"
                     f" {g['direction']}  {g['cause']} ({g['confidence']}): {g['summary']}")
        for ev in cast("list[str]", g["evidence"]):
            lines.append(f"          - {ev}")
    if snap.listeners:
        lines.append("listeners with sockets in CLOSE_WAIT:")
    for lst in snap.listeners:
        owners = ", ".join(f"{o.pid}/{o.comm} fd {o.fd}" for o in lst.owners) or "?"
        et = " edge-triggered" if snap.et_listeners.get(lst.lport) else ""
        lines.append(f"  {endpoint(lst.laddr, lst.lport)}  accept queue {lst.queue}/"
                     f"{lst.backlog}{et}  owners {owners}")
    if verbose:
        lines.append("sockets:")
        for c in snap.connections:
            v = snap.verdicts.get(c.key)
            fd = f" fd {c.fd}" if c.fd is not None else ""
            lines.append(f"  {endpoint(c.laddr, c.lport)} <-> {endpoint(c.raddr, c.rport)}"
                         f"  pid {c.owner_pid}/{c.owner_comm}{fd}  inode {c.inode}"
                         f"  {c.accepted.value}  {v.cause.value if v else ''}")
    return lines
