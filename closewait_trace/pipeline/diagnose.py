"""Diagnose stage: why a connection sits (or sat) in CLOSE_WAIT, with the evidence.

A verdict is a cause, a confidence and the facts it rests on. Where the facts are missing
(a backend that could not see accept, a process that is gone), the verdict says so rather
than guess. Pure logic: the facts come in as plain records.
"""

from __future__ import annotations

import enum
import errno as errno_mod
from dataclasses import dataclass, field

from ..kernel.decode import ExitHow, exit_code_text
from ..facts.facts import ListenerHolder, Process
from .join import Accepted, Connection, Direction


class Cause(enum.Enum):
    NEVER_ACCEPTED = "never-accepted"      # the process does not call accept (stalled)
    ACCEPT_FAILING = "accept-failing"      # accept() fails: EMFILE, ENFILE, ENOBUFS, ENOMEM
    ET_ACCEPT_LOOP = "et-accept-loop"      # edge-triggered epoll loop that stops before EAGAIN
    NOT_CLOSED = "accepted-not-closed"
    OUTBOUND_NOT_CLOSED = "outbound-not-closed"
    CLOSED_LATE = "closed-late"
    DRAINED_LATE = "drained-late"
    UNKNOWN = "unknown"


class Confidence(enum.Enum):
    CERTAIN = "certain"
    LIKELY = "likely"
    POSSIBLE = "possible"


@dataclass(frozen=True)
class AcceptStats:
    """accept()/accept4() outcomes of one process, from the kernel's accept_stats map."""

    ok: int
    err: int
    last_ok_ns: int
    last_err_ns: int
    last_err: int
    errors: dict[int, int] = field(default_factory=dict)  # errno -> count
    #: how long accept() was watched since the last success (None: all of the time since)
    watched_since_ok_ns: int | None = None


#: The one process type (facts.Process), by the name the diagnosis used first.
ProcessFacts = Process


@dataclass(frozen=True)
class ListenerFacts:
    """The listener a never-accepted connection waits on, as seen for that connection."""

    port: int
    queue: int
    backlog: int
    fd: int | None = None  # the owner's fd for the listener
    edge_triggered: bool | None = None  # that fd is in an epoll set with EPOLLET
    laddr: str | None = None
    netns: int | None = None
    inode: int = 0
    #: why this listener (the only one of its namespace and port, or the one of a
    #: SO_REUSEPORT group whose queue is not empty); None: not chosen among several
    reason: str | None = None
    #: the processes holding it now, and what each does about it
    holders: tuple[ListenerHolder, ...] = ()


@dataclass(frozen=True)
class DurationStats:
    """CLOSE_WAIT durations of the stays that ended on one service port."""

    count: int
    p50_ns: int
    p90_ns: int
    max_ns: int


@dataclass(frozen=True)
class Facts:
    """What enrichment found around one connection; every part may be missing."""

    accept: AcceptStats | None = None
    process: Process | None = None
    listener: ListenerFacts | None = None
    durations: DurationStats | None = None
    #: the share of the time since the tracer started that accept() was watched
    accept_coverage: float = 1.0


@dataclass(frozen=True)
class Verdict:
    cause: Cause
    confidence: Confidence
    summary: str
    evidence: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "cause": self.cause.value,
            "confidence": self.confidence.value,
            "summary": self.summary,
            "evidence": list(self.evidence),
        }


#: accept() failures that leave connections in the queue.
RESOURCE_ERRNOS = (errno_mod.EMFILE, errno_mod.ENFILE, errno_mod.ENOBUFS, errno_mod.ENOMEM)


def _secs(ns: int) -> str:
    return f"{ns / 1e9:.1f}s"


def errno_name(n: int) -> str:
    return errno_mod.errorcode.get(n, f"errno {n}")


EPOLL_WAITS = ("epoll_wait", "epoll_pwait", "epoll_pwait2")
ACCEPTS = ("accept", "accept4")


def threads_text(threads: dict[str, int]) -> str:
    return ", ".join(f"{n} in {name}" for name, n in sorted(threads.items(), key=lambda x: -x[1]))


def _durations_text(d: DurationStats, port: int) -> str:
    return (f"CLOSE_WAIT durations on :{port}: {d.count} stays, p50 {_secs(d.p50_ns)},"
            f" p90 {_secs(d.p90_ns)}, max {_secs(d.max_ns)}")


def _released_at_exit(conn: Connection, now_ns: int, who: str, evidence: list[str]) -> Verdict:
    """The kernel closed it because its holder's process ended: the application never did."""
    how = exit_code_text(conn.exit_code) if conn.exit_code is not None else "ended"
    evidence.append(f"the process {how} while holding it")
    cause = Cause.OUTBOUND_NOT_CLOSED if conn.direction is Direction.OUTBOUND else Cause.NOT_CLOSED
    sure = Confidence.CERTAIN if conn.flagged_ns is not None else Confidence.LIKELY
    return Verdict(
        cause, sure,
        f"never closed by {who}: the kernel closed it at process exit ({how}) after"
        f" {_secs(conn.age_ns(now_ns))} in CLOSE_WAIT",
        tuple(evidence),
    )


def diagnose(conn: Connection, facts: Facts, now_ns: int) -> Verdict:
    """The cause of one connection's stay in CLOSE_WAIT."""
    evidence: list[str] = []
    if conn.owner_pid is not None:
        who = f"pid {conn.owner_pid} ({conn.owner_comm or '?'})"
    else:
        who = "an unknown process"
    if facts.process is not None and not facts.process.alive:
        evidence.append(f"owner pid {facts.process.pid} has exited")

    if not conn.is_open and conn.exit_how is ExitHow.PROCESS_EXIT:
        return _released_at_exit(conn, now_ns, who, evidence)
    closed_by_app = conn.exit_how in (ExitHow.APP_CLOSE, ExitHow.APP_ABORT)
    if not conn.is_open and closed_by_app:
        return _closed_by_app(conn, facts, now_ns, evidence)

    if conn.direction is Direction.OUTBOUND:
        evidence.append(f"connected to {conn.raddr}:{conn.rport}; the server closed it")
        if conn.established_ns is not None and conn.cw_enter_ns is not None:
            evidence.append(
                f"open {_secs(conn.cw_enter_ns - conn.established_ns)} before the server's FIN"
            )
        return Verdict(
            Cause.OUTBOUND_NOT_CLOSED,
            Confidence.CERTAIN,
            f"{who} connected out and never closed after the server closed"
            " (idle pooled connection?)",
            tuple(evidence),
        )

    if conn.accepted is Accepted.NO:
        return _never_accepted(conn, facts, now_ns, who, evidence)

    if conn.accepted is Accepted.YES:
        return _accepted_not_closed(conn, facts, now_ns, who, evidence)

    if conn.history:
        evidence.append("the tracer did not see this socket's creation or accept")
    return Verdict(
        Cause.UNKNOWN,
        Confidence.POSSIBLE,
        f"in CLOSE_WAIT, owned by {who}; how it got there is unknown",
        tuple(evidence),
    )


def _closed_by_app(conn: Connection, facts: Facts, now_ns: int, evidence: list[str]
                   ) -> Verdict:
    """Closed by the application after a stay in CLOSE_WAIT: late, or drained late."""
    # Certain once it crossed the threshold; below it, a slow close rather than a leak.
    sure = Confidence.CERTAIN if conn.flagged_ns is not None else Confidence.LIKELY
    dur = conn.age_ns(now_ns)
    if conn.accepted_after_fin:
        if conn.accepted_ns is not None and conn.cw_enter_ns:
            evidence.append(f"waited {_secs(conn.accepted_ns - conn.cw_enter_ns)} in the"
                            " accept queue after the peer had closed")
        else:
            evidence.append("found in the accept queue after the peer had closed, accepted"
                            " later (while accept() was not watched)")
        return Verdict(
            Cause.DRAINED_LATE,
            sure,
            f"accepted late and closed after {_secs(dur)} in CLOSE_WAIT:"
            " the accept queue drains slower than clients give up",
            tuple(evidence),
        )
    if conn.established_ns is not None and conn.cw_enter_ns is not None:
        evidence.append(f"the peer closed {_secs(conn.cw_enter_ns - conn.established_ns)}"
                        " after the connection was established (its timeout?)")
    if conn.accepted_ns is not None and conn.cw_enter_ns is not None \
            and conn.accepted_ns <= conn.cw_enter_ns:
        evidence.append(f"accepted {_secs(conn.cw_enter_ns - conn.accepted_ns)} before the"
                        " peer's FIN; the handler took the rest")
    if facts.durations is not None:
        evidence.append(_durations_text(facts.durations, conn.service_port))
    return Verdict(
        Cause.CLOSED_LATE,
        sure,
        f"closed by the application after {_secs(dur)} in CLOSE_WAIT:"
        " a slow handler, or a peer timeout shorter than the service time",
        tuple(evidence),
    )


def _accepted_not_closed(conn: Connection, facts: Facts, now_ns: int, who: str,
                         evidence: list[str]) -> Verdict:
    """Accepted, and not closed since the peer closed."""
    if (acc := conn.other_acceptor) is not None:
        evidence.append(f"accepted by pid {acc.pid} ({acc.comm or '?'});"
                        f" held now by {who} (inherited, or passed over a unix socket)")
    if conn.accepted_ns is not None:
        evidence.append(f"accepted {_secs(now_ns - conn.accepted_ns)} ago")
        if conn.accepted_after_fin and conn.cw_enter_ns is not None:
            evidence.append(
                f"accepted {_secs(conn.accepted_ns - conn.cw_enter_ns)} after the peer's FIN"
            )
    elif conn.accepted_after_fin:
        evidence.append("found in the accept queue after the peer had closed, accepted"
                        " later (while accept() was not watched)")
    elif conn.history:
        evidence.append(
            "accept() not seen (it may have been blocked in accept() before tracing"
            " started); the socket has an inode, so it was accepted"
        )
    if conn.fd is not None:
        evidence.append(f"still open as fd {conn.fd}")
    if conn.eof_read:
        evidence.append("the application has read everything the peer sent, its FIN"
                        " included (Recv-Q 0), and still did not close")
        return Verdict(
            Cause.NOT_CLOSED,
            Confidence.CERTAIN,
            f"accepted by {who}, read the EOF and never closed: a missing close() in the"
            " application",
            tuple(evidence),
        )
    if conn.eof_read is False:
        unread = conn.unread_bytes or 0
        evidence.append(f"the EOF is not read yet ({unread} data bytes unread):"
                        " the handler is slow, blocked, or never reads")
    proc = facts.process
    if proc is not None and proc.threads:
        evidence.append(f"threads of pid {proc.pid}: {threads_text(proc.threads)}")
    return Verdict(
        Cause.NOT_CLOSED,
        Confidence.CERTAIN,
        f"accepted by {who} and never closed after the peer closed",
        tuple(evidence),
    )


def _listener_evidence(lst: ListenerFacts, evidence: list[str]) -> None:
    where = f"{lst.laddr}:{lst.port}" if lst.laddr and lst.netns is not None \
        else f":{lst.port}"
    evidence.append(f"listener {where} accept queue {lst.queue}/{lst.backlog}"
                    + (" (full: capacity is backlog+1)" if lst.queue > lst.backlog > 0
                       else "")
                    + (f" in netns {lst.netns} (inode {lst.inode})"
                       if lst.netns is not None else ""))
    if lst.reason:
        evidence.append(f"listener chosen as {lst.reason}")


def _never_accepted(conn: Connection, facts: Facts, now_ns: int, who: str,
                    evidence: list[str]) -> Verdict:
    """A socket in the accept queue: which of the accept-side failures keeps it there."""
    acc = facts.accept
    lst = facts.listener
    proc = facts.process
    if lst is not None:
        _listener_evidence(lst, evidence)
    at_limit = False
    if proc is not None and proc.open_fds is not None and proc.fd_limit is not None:
        at_limit = proc.open_fds >= proc.fd_limit - 1
        evidence.append(f"open files {proc.open_fds}/{proc.fd_limit}"
                        + (" (limit reached)" if at_limit else ""))
    if conn.inode == 0:
        evidence.append("socket has no inode: no file descriptor ever referred to it")

    # 1. accept() fails for lack of a resource (seed: open files limit reached).
    failing = [e for e in RESOURCE_ERRNOS if acc is not None and e in acc.errors]
    if failing and acc is not None:
        worst = max(failing, key=lambda e: acc.errors[e])
        evidence.append(f"accept() failed {acc.errors[worst]}x with {errno_name(worst)}")
        summary = f"never accepted: {who}'s accept() fails with {errno_name(worst)}"
        if worst == errno_mod.EMFILE:
            summary += " (open-files limit reached)"
        return Verdict(Cause.ACCEPT_FAILING, Confidence.CERTAIN, summary, tuple(evidence))
    if at_limit:
        return Verdict(Cause.ACCEPT_FAILING, Confidence.LIKELY,
                       f"never accepted: {who} has no file descriptor left for accept()"
                       " (open-files limit reached; no failed accept() seen yet)",
                       tuple(evidence))
    if lst is not None and lst.holders:
        by_holders = _holders_verdict(conn, lst, evidence)
        if by_holders is not None:
            return by_holders

    return _not_draining(conn, facts, now_ns, who, evidence)


def _not_draining(conn: Connection, facts: Facts, now_ns: int, who: str,
                  evidence: list[str]) -> Verdict:
    """Nothing fails and no holder is to blame: how the process treats its queue."""
    acc, lst, proc = facts.accept, facts.listener, facts.process
    queued = lst is not None and lst.queue > 0
    if acc is not None and acc.ok:
        ago = now_ns - acc.last_ok_ns
        watched = _watched_since_ok(acc, now_ns)
        evidence.append(f"accept() succeeded {acc.ok}x, the last {_secs(ago)} ago"
                        + (f" (watched {_secs(watched)} since)" if watched < ago else ""))
    elif conn.history:
        evidence.append("no successful accept() seen since the tracer started"
                        + _sampled(facts.accept_coverage))
    threads = proc.threads if proc is not None else {}
    if threads:
        evidence.append(f"threads of pid {proc.pid if proc else '?'}: {threads_text(threads)}")
    waiting = sum(threads.get(w, 0) for w in EPOLL_WAITS)
    accepting = sum(threads.get(a, 0) for a in ACCEPTS)

    # 2. Edge-triggered epoll loop that stopped before EAGAIN (seed 003): the process waits
    #    for events while connections sit in the queue; no new edge will come for them.
    if queued and waiting and not accepting:
        if lst is not None and lst.edge_triggered:
            evidence.append(f"listener fd {lst.fd} is registered with EPOLLET")
            confidence = Confidence.CERTAIN if acc is not None and acc.ok else Confidence.LIKELY
            return Verdict(
                Cause.ET_ACCEPT_LOOP, confidence,
                f"never accepted: {who} waits in epoll_wait while its edge-triggered listener"
                " has queued connections; its accept loop stops before accept() returns EAGAIN",
                tuple(evidence))
        return Verdict(
            Cause.NEVER_ACCEPTED, Confidence.LIKELY,
            f"never accepted: {who} waits in epoll_wait with connections queued"
            " (listener not seen in an edge-triggered set: check the accept loop)",
            tuple(evidence))

    # 3. It accepts, but slower than connections come and go (seed 001: backlog too large).
    if acc is not None and acc.ok and _watched_since_ok(acc, now_ns) < 60 * 1_000_000_000:
        return Verdict(
            Cause.DRAINED_LATE, Confidence.LIKELY,
            f"not accepted yet: {who} accepts, but slower than peers give up; the queue"
            " holds connections whose peer has already closed",
            tuple(evidence))

    # 4. It does not call accept() at all (stalled, deadlocked, or never meant to).
    confidence = Confidence.CERTAIN if conn.inode == 0 else Confidence.LIKELY
    return Verdict(
        Cause.NEVER_ACCEPTED, confidence,
        f"never accepted: {who} does not drain its accept queue"
        + (" (no thread is in accept())" if threads and not accepting else ""),
        tuple(evidence))


def _sampled(coverage: float) -> str:
    return f" (accept() watched {coverage:.0%} of that time)" if coverage < 1 else ""


def _watched_since_ok(acc: AcceptStats, now_ns: int) -> int:
    """How long accept() was watched since the last success: a process that accepted within
    the last minute of watching still accepts (the watch may be attached part-time)."""
    if acc.watched_since_ok_ns is None:
        return now_ns - acc.last_ok_ns
    return acc.watched_since_ok_ns


def responsible_holders(holders: tuple[ListenerHolder, ...] | list[ListenerHolder]
                        ) -> tuple[str, list[ListenerHolder]]:
    """Which holders of a listener should be accepting and are not, and how:
    "stopped" (cannot run), "busy" (every holder that accepts is serving connections and
    none waits for the listener), "never-polls" (holds it and never waits for it), "ready"
    (someone waits for it now: none to blame) or "" (nothing known). A holder that only
    keeps the fd (a pre-fork master) is named only when no other holder could accept."""
    if not holders:
        return "", []
    stopped = [h for h in holders if h.stopped]
    if stopped:
        return "stopped", stopped
    if any(h.ready for h in holders):
        return "ready", []
    busy = [h for h in holders if h.serving > 0]
    if busy:
        return "busy", busy
    return "never-polls", list(holders)


def _holder_text(h: ListenerHolder) -> str:
    parts = [f"holder pid {h.pid} ({h.comm}): {h.state}", f"waits for it: {h.waiting}"]
    if h.serving:
        parts.append(f"serving {h.serving} connection(s) of this port")
    if h.busy_in:
        parts.append("threads in " + ", ".join(h.busy_in))
    if h.open_files is not None and h.max_open_files is not None:
        parts.append(f"open files {h.open_files}/{h.max_open_files}")
    return ", ".join(parts)


def _pids_text(holders: list[ListenerHolder]) -> str:
    return ", ".join(f"pid {h.pid} ({h.comm})" for h in holders)


def _holders_verdict(conn: Connection, lst: ListenerFacts, evidence: list[str]
                     ) -> Verdict | None:
    """A listener held by several processes (pre-fork servers, passed fds): the verdict
    names the holder that should accept and does not."""
    kind, who = responsible_holders(lst.holders)
    evidence.extend(_holder_text(h) for h in lst.holders)
    sure = Confidence.CERTAIN if conn.inode == 0 else Confidence.LIKELY
    where = f"{lst.laddr}:{lst.port}" if lst.laddr else f":{lst.port}"
    if kind == "stopped":
        holds, stopped = ("hold", "are") if len(who) > 1 else ("holds", "is")
        return Verdict(Cause.NEVER_ACCEPTED, sure,
                       f"never accepted: {_pids_text(who)} {holds} the listener {where} and"
                       f" {stopped} stopped (SIGSTOP or a debugger): nothing accepts from its"
                       " queue", tuple(evidence))
    if kind == "busy":
        return Verdict(Cause.NEVER_ACCEPTED, Confidence.LIKELY,
                       f"never accepted: every process that accepts from {where} is busy"
                       f" serving connections ({_pids_text(who)}); none waits for the"
                       " listener", tuple(evidence))
    if kind == "never-polls":
        return Verdict(Cause.NEVER_ACCEPTED, sure,
                       f"never accepted: {_pids_text(who)}"
                       f" {'hold' if len(who) > 1 else 'holds'} the listener {where} but"
                       " never waits for it (no thread in accept() or polling it), and no"
                       " other process accepts from it", tuple(evidence))
    return None


def group_verdicts(conns: list[Connection], verdicts: dict[tuple[int, int], Verdict]
                   ) -> list[dict[str, object]]:
    """One line per (process, service port, cause): how many sockets, and why."""
    groups: dict[tuple[object, int, str, int | None], list[Connection]] = {}
    for c in conns:
        v = verdicts.get(c.key)
        cause = v.cause.value if v else Cause.UNKNOWN.value
        groups.setdefault((c.owner_pid, c.service_port, cause, c.netns), []).append(c)
    out: list[dict[str, object]] = []
    for (pid, port, cause, netns), members in sorted(groups.items(),
                                                     key=lambda kv: -len(kv[1])):
        first = members[0]
        v = verdicts.get(first.key)
        ctr = first.container
        out.append({
            "pid": pid, "comm": first.owner_comm, "port": port, "cause": cause,
            "netns": netns, "container": ctr.label if ctr is not None else None,
            "count": len(members), "direction": first.direction.value,
            "summary": v.summary if v else "", "confidence": v.confidence.value if v else None,
            "evidence": list(v.evidence) if v else [],
        })
    return out
