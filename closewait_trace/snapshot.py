"""`closewait-trace snapshot`: the sockets in CLOSE_WAIT right now, from sock_diag and /proc.

No BPF and no history, so it works where tracing cannot. Each socket is diagnosed by the same
rules as in live mode, with the facts a single look can give: accepted or not (inode 0),
owner and fd, whether the application read the EOF (Recv-Q), the listener's queue against
its backlog, the owner's open files and thread states, edge-triggered epoll registration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from .pipeline.diagnose import ListenerFacts, Verdict, diagnose, group_verdicts
from .pipeline.enrichment import Enrichment, choose_listener, container_matches, family_name
from .pipeline.join import Connection, Direction, Tracker
from .outputs.render import container_text, endpoint, holder_dict, netns_dict
from .world import HostFacts, HostWorld


@dataclass
class Snapshot:
    taken_ns: int
    connections: list[Connection]
    verdicts: dict[tuple[int, int], Verdict]
    #: the listeners of never-accepted sockets, as each was seen (queue, holders)
    listeners: list[ListenerFacts]

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "type": "snapshot",
            "close_wait": len(self.connections),
            "groups": group_verdicts(self.connections, self.verdicts),
            "listeners": [
                {"local": endpoint(lst.laddr or "?", lst.port), "netns": lst.netns,
                 "inode": lst.inode, "queue": lst.queue, "backlog": lst.backlog,
                 "edge_triggered": lst.edge_triggered,
                 "holders": [holder_dict(h) for h in lst.holders]}
                for lst in self.listeners
            ],
            "sockets": [self._conn(c) for c in self.connections],
        }

    def _conn(self, c: Connection) -> dict[str, Any]:
        v = self.verdicts.get(c.key)
        return {
            "local": endpoint(c.laddr, c.lport), "remote": endpoint(c.raddr, c.rport),
            "family": family_name(c.family), **netns_dict(c),
            "container": c.container.as_dict() if c.container else None,
            "direction": c.direction.value, "accepted": c.accepted.value, "pid": c.owner_pid,
            "comm": c.owner_comm, "fd": c.fd, "inode": c.inode, "eof_read": c.eof_read,
            "unread_bytes": c.unread_bytes, "verdict": v.as_dict() if v else None,
        }


def take(*, ports: frozenset[int] = frozenset(), pids: frozenset[int] = frozenset(),
         containers: tuple[str, ...] = (), netns: frozenset[int] = frozenset(),
         world: HostFacts | None = None) -> Snapshot:
    """Every socket in CLOSE_WAIT now, in every network namespace, diagnosed."""
    now = time.monotonic_ns()
    host = world or HostWorld()
    stage = Enrichment(host, Tracker(threshold_ns=0, report_min_ns=0, start_ns=now))
    stage.begin_tick(now)
    ns = stage.namespaces()
    rows = ([d for n in ns.all for d in host.diag_close_wait(n)] if ns is not None
            else host.diag_close_wait())
    conns: list[Connection] = []
    verdicts: dict[tuple[int, int], Verdict] = {}
    listeners: dict[tuple[int | None, int], ListenerFacts] = {}
    for n, d in enumerate(rows, 1):
        if ports and not {d.lport, d.rport} & ports:
            continue
        conn = Connection(
            key=(0, n), family=d.family, laddr=d.laddr, lport=d.lport, raddr=d.raddr,
            rport=d.rport, direction=Direction.OUTBOUND, netns=d.netns, first_seen_ns=now,
            history=False)
        if choose_listener(stage._listeners(d.netns), conn) is not None or d.inode == 0:
            conn.direction = Direction.INBOUND
        stage.apply(conn, d)
        facts = stage.facts(conn)
        if pids and conn.owner_pid not in pids or netns and conn.netns not in netns or \
                containers and not any(container_matches(conn.container, q)
                                       for q in containers):
            continue
        verdicts[conn.key] = diagnose(conn, facts, now)
        conns.append(conn)
        if facts.listener is not None:
            listeners.setdefault((facts.listener.netns, facts.listener.inode), facts.listener)
    if isinstance(host, HostWorld) and world is None:
        host.close()
    return Snapshot(now, conns, verdicts, list(listeners.values()))


def render_lines(snap: Snapshot, verbose: bool = False) -> list[str]:
    lines = [f"{len(snap.connections)} socket(s) in CLOSE_WAIT now"
             " (a snapshot: no history; `closewait-trace` traces them live)"]
    groups = group_verdicts(snap.connections, snap.verdicts)
    if groups:
        lines.append("by process, service port and cause:")
    for g in groups:
        ctr = f" [{g['container']}]" if g.get("container") else ""
        lines.append(f"  {g['count']:>5} x pid {g['pid']}/{g['comm']}{ctr} :{g['port']}"
                     f" {g['direction']}  {g['cause']} ({g['confidence']}): {g['summary']}")
        for ev in cast("list[str]", g["evidence"]):
            lines.append(f"          - {ev}")
    if snap.listeners:
        lines.append("listeners with sockets in CLOSE_WAIT:")
    for lst in snap.listeners:
        holders = ", ".join(f"{h.pid}/{h.comm} ({h.state}, waits: {h.waiting})"
                            for h in lst.holders) or "?"
        et = " edge-triggered" if lst.edge_triggered else ""
        lines.append(f"  {endpoint(lst.laddr or '?', lst.port)}  netns {lst.netns}"
                     f"  accept queue {lst.queue}/{lst.backlog}{et}  holders {holders}")
    if verbose:
        lines.append("sockets:")
        for c in snap.connections:
            v = snap.verdicts.get(c.key)
            fd = f" fd {c.fd}" if c.fd is not None else ""
            lines.append(f"  {endpoint(c.laddr, c.lport)} <-> {endpoint(c.raddr, c.rport)}"
                         f"  pid {c.owner_pid}/{c.owner_comm}{fd}{container_text(c)}"
                         f"  netns {c.netns}  inode {c.inode}"
                         f"  {c.accepted.value}  {v.cause.value if v else ''}")
    return lines
