"""Diagnose stage: why a connection sits (or sat) in CLOSE_WAIT, with the evidence.

A verdict is a cause, a confidence and the facts it rests on. Where the facts are missing
(a backend that could not see accept, a process that is gone), the verdict says so rather
than guess. Pure logic: the facts come in as plain records.
"""

from __future__ import annotations

import enum
import errno as errno_mod
from dataclasses import dataclass, field

from .decode import ExitHow
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


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    alive: bool
    open_fds: int | None = None
    fd_limit: int | None = None


@dataclass(frozen=True)
class ListenerFacts:
    port: int
    queue: int
    backlog: int


@dataclass(frozen=True)
class Facts:
    """What enrichment found around one connection; every part may be missing."""

    accept: AcceptStats | None = None
    process: ProcessFacts | None = None
    listener: ListenerFacts | None = None


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


def diagnose(conn: Connection, facts: Facts, now_ns: int) -> Verdict:
    """The cause of one connection's stay in CLOSE_WAIT."""
    evidence: list[str] = []
    if conn.owner_pid is not None:
        who = f"pid {conn.owner_pid} ({conn.owner_comm or '?'})"
    else:
        who = "an unknown process"
    if facts.process is not None and not facts.process.alive:
        evidence.append(f"owner pid {facts.process.pid} has exited")

    closed_by_app = conn.exit_how in (ExitHow.APP_CLOSE, ExitHow.APP_ABORT)
    if not conn.is_open and conn.flagged_ns is not None and closed_by_app:
        dur = conn.age_ns(now_ns)
        if conn.accepted_after_fin and conn.accepted_ns is not None and conn.cw_enter_ns:
            evidence.append(
                f"waited {_secs(conn.accepted_ns - conn.cw_enter_ns)} in the accept queue"
                " after the peer had closed"
            )
            return Verdict(
                Cause.DRAINED_LATE,
                Confidence.CERTAIN,
                f"accepted late and closed after {_secs(dur)} in CLOSE_WAIT:"
                " the accept queue drains slower than clients give up",
                tuple(evidence),
            )
        return Verdict(
            Cause.CLOSED_LATE,
            Confidence.CERTAIN,
            f"closed by the application after {_secs(dur)} in CLOSE_WAIT",
            tuple(evidence),
        )

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
        acc = facts.accept
        lst = facts.listener
        if lst is not None:
            evidence.append(f"listener :{lst.port} accept queue {lst.queue}/{lst.backlog}")
            if lst.queue >= lst.backlog > 0:
                evidence.append("accept queue full")
        proc = facts.process
        if proc is not None and proc.open_fds is not None and proc.fd_limit is not None:
            evidence.append(f"open files {proc.open_fds}/{proc.fd_limit}")
        if acc is not None and any(e in acc.errors for e in RESOURCE_ERRNOS):
            worst = max(
                (e for e in acc.errors if e in RESOURCE_ERRNOS), key=lambda e: acc.errors[e]
            )
            evidence.append(f"accept() failed {acc.errors[worst]}x with {errno_name(worst)}")
            summary = f"never accepted: {who}'s accept() fails with {errno_name(worst)}"
            if worst == errno_mod.EMFILE:
                summary += " (open-files limit reached)"
            return Verdict(Cause.ACCEPT_FAILING, Confidence.CERTAIN, summary, tuple(evidence))
        if acc is not None and acc.ok:
            evidence.append(
                f"last successful accept {_secs(now_ns - acc.last_ok_ns)} ago ({acc.ok} in all)"
            )
        elif acc is None or acc.ok == 0:
            evidence.append("no successful accept() seen since the tracer started")
        confidence = Confidence.CERTAIN if conn.inode == 0 else Confidence.LIKELY
        if conn.inode == 0:
            evidence.append("socket has no inode: no file descriptor ever referred to it")
        return Verdict(
            Cause.NEVER_ACCEPTED,
            confidence,
            f"never accepted: {who} does not drain its accept queue",
            tuple(evidence),
        )

    if conn.accepted is Accepted.YES:
        if conn.accepted_ns is not None:
            evidence.append(f"accepted {_secs(now_ns - conn.accepted_ns)} ago")
            if conn.accepted_after_fin and conn.cw_enter_ns is not None:
                evidence.append(
                    f"accepted {_secs(conn.accepted_ns - conn.cw_enter_ns)} after the peer's FIN"
                )
        else:
            evidence.append(
                "accept() not seen (it may have been blocked in accept() before tracing"
                " started); the socket has an inode, so it was accepted"
            )
        if conn.fd is not None:
            evidence.append(f"still open as fd {conn.fd}")
        return Verdict(
            Cause.NOT_CLOSED,
            Confidence.CERTAIN,
            f"accepted by {who} and never closed after the peer closed",
            tuple(evidence),
        )

    evidence.append("the tracer did not see this socket's creation or accept")
    return Verdict(
        Cause.UNKNOWN,
        Confidence.POSSIBLE,
        f"in CLOSE_WAIT, owned by {who}; how it got there is unknown",
        tuple(evidence),
    )
