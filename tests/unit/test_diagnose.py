"""diagnose(): each cause, its confidence, and the evidence strings it rests on."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from closewait_trace.kernel.decode import ExitHow
from closewait_trace.pipeline.diagnose import (
    DurationStats,
    AcceptStats,
    Cause,
    Confidence,
    Facts,
    ListenerFacts,
    ProcessFacts,
    Verdict,
    diagnose,
    errno_name,
)
from closewait_trace.pipeline.join import Accepted, Direction

from .events import MS, S, connection

NOW = 100 * S
ENTER = 70 * S
KEY = (0xFFFF_8880_1234_0000, ENTER)


def never_accepted(**kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("owner_pid", 42)
    kw.setdefault("owner_comm", "lazy")
    return connection(key=KEY, accepted=Accepted.NO, **kw)


def acc_stats(ok: int = 0, errors: dict[int, int] | None = None, last_ok_ns: int = 0) -> AcceptStats:
    errors = errors or {}
    return AcceptStats(ok=ok, err=sum(errors.values()), last_ok_ns=last_ok_ns, last_err_ns=0,
                       last_err=next(iter(errors), 0), errors=errors)


# --- never accepted ---------------------------------------------------------------------------


def test_never_accepted_inode_zero_is_certain() -> None:
    conn = never_accepted(inode=0)
    facts = Facts(listener=ListenerFacts(port=8080, queue=129, backlog=128))
    v = diagnose(conn, facts, NOW)
    assert (v.cause, v.confidence) == (Cause.NEVER_ACCEPTED, Confidence.CERTAIN)
    assert v.summary == "never accepted: pid 42 (lazy) does not drain its accept queue"
    assert v.evidence == (
        "listener :8080 accept queue 129/128 (full: capacity is backlog+1)",
        "socket has no inode: no file descriptor ever referred to it",
        "no successful accept() seen since the tracer started",
    )


def test_queue_at_backlog_is_not_yet_full() -> None:
    facts = Facts(listener=ListenerFacts(port=8080, queue=128, backlog=128))
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert "listener :8080 accept queue 128/128" in v.evidence


def test_queued_while_the_process_accepts_is_drained_late() -> None:
    conn = never_accepted()  # enrichment found nothing: inode None
    facts = Facts(
        accept=acc_stats(ok=7, last_ok_ns=NOW - 3 * S),
        listener=ListenerFacts(port=8080, queue=3, backlog=128),
        process=ProcessFacts(pid=42, alive=True, threads={"nanosleep": 1}),
    )
    v = diagnose(conn, facts, NOW)
    assert (v.cause, v.confidence) == (Cause.DRAINED_LATE, Confidence.LIKELY)
    assert v.evidence == (
        "listener :8080 accept queue 3/128",
        "accept() succeeded 7x, the last 3.0s ago",
        "threads of pid 42: 1 in nanosleep",
    )


def test_edge_triggered_listener_with_idle_process_is_et_accept_loop() -> None:
    facts = Facts(
        accept=acc_stats(ok=2, last_ok_ns=NOW - 5 * S),
        listener=ListenerFacts(port=8080, queue=7, backlog=511, fd=6, edge_triggered=True),
        process=ProcessFacts(pid=42, alive=True, threads={"epoll_wait": 1}),
    )
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert (v.cause, v.confidence) == (Cause.ET_ACCEPT_LOOP, Confidence.CERTAIN)
    assert "listener fd 6 is registered with EPOLLET" in v.evidence
    assert "threads of pid 42: 1 in epoll_wait" in v.evidence


def test_idle_in_epoll_without_edge_trigger_is_not_called_et() -> None:
    facts = Facts(
        accept=acc_stats(ok=2, last_ok_ns=NOW - 5 * S),
        listener=ListenerFacts(port=8080, queue=7, backlog=511, fd=6, edge_triggered=False),
        process=ProcessFacts(pid=42, alive=True, threads={"epoll_wait": 1}),
    )
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert (v.cause, v.confidence) == (Cause.NEVER_ACCEPTED, Confidence.LIKELY)


def test_thread_blocked_in_accept_rules_out_et() -> None:
    facts = Facts(
        listener=ListenerFacts(port=8080, queue=7, backlog=511, fd=6, edge_triggered=True),
        process=ProcessFacts(pid=42, alive=True, threads={"epoll_wait": 1, "accept4": 1}),
    )
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert v.cause is not Cause.ET_ACCEPT_LOOP


def test_fd_limit_reached_without_failed_accept_is_likely_accept_failing() -> None:
    facts = Facts(process=ProcessFacts(pid=42, alive=True, open_fds=1023, fd_limit=1024))
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert (v.cause, v.confidence) == (Cause.ACCEPT_FAILING, Confidence.LIKELY)
    assert "open files 1023/1024 (limit reached)" in v.evidence


def test_never_accepted_with_an_inode_is_likely_not_certain() -> None:
    v = diagnose(never_accepted(inode=999), Facts(), NOW)
    assert (v.cause, v.confidence) == (Cause.NEVER_ACCEPTED, Confidence.LIKELY)
    assert not any("no inode" in e for e in v.evidence)


def test_never_accepted_unknown_owner() -> None:
    v = diagnose(never_accepted(owner_pid=None, owner_comm=None, inode=0), Facts(), NOW)
    assert v.summary == "never accepted: an unknown process does not drain its accept queue"


def test_empty_backlog_is_not_called_full() -> None:
    facts = Facts(listener=ListenerFacts(port=80, queue=0, backlog=0))
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert "listener :80 accept queue 0/0" in v.evidence
    assert "accept queue full" not in v.evidence


def test_non_resource_accept_errors_do_not_make_accept_failing() -> None:
    facts = Facts(accept=acc_stats(errors={errno.EINVAL: 4}))
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert v.cause is Cause.NEVER_ACCEPTED
    assert "no successful accept() seen since the tracer started" in v.evidence


# --- accept failing -------------------------------------------------------------------------


def test_accept_failing_with_emfile() -> None:
    facts = Facts(
        accept=acc_stats(ok=100, errors={errno.EMFILE: 12, errno.EINVAL: 50}),
        process=ProcessFacts(pid=42, alive=True, open_fds=1024, fd_limit=1024),
        listener=ListenerFacts(port=8080, queue=129, backlog=128),
    )
    v = diagnose(never_accepted(inode=0), facts, NOW)
    assert (v.cause, v.confidence) == (Cause.ACCEPT_FAILING, Confidence.CERTAIN)
    assert v.summary == (
        "never accepted: pid 42 (lazy)'s accept() fails with EMFILE (open-files limit reached)"
    )
    assert v.evidence == (
        "listener :8080 accept queue 129/128 (full: capacity is backlog+1)",
        "open files 1024/1024 (limit reached)",
        "socket has no inode: no file descriptor ever referred to it",
        "accept() failed 12x with EMFILE",
    )


def test_accept_failing_names_the_most_frequent_resource_errno() -> None:
    facts = Facts(accept=acc_stats(errors={errno.EMFILE: 3, errno.ENFILE: 10}))
    v = diagnose(never_accepted(), facts, NOW)
    assert v.cause is Cause.ACCEPT_FAILING
    assert v.summary == "never accepted: pid 42 (lazy)'s accept() fails with ENFILE"
    assert "accept() failed 10x with ENFILE" in v.evidence
    assert "open-files limit" not in v.summary


def test_errno_name() -> None:
    assert errno_name(errno.EMFILE) == "EMFILE"
    assert errno_name(100_000) == "errno 100000"


# --- accepted and not closed ----------------------------------------------------------------


def test_accepted_not_closed_with_fd() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - 10 * S, fd=7,
                      owner_pid=42, owner_comm="app", inode=555)
    v = diagnose(conn, Facts(), NOW)
    assert (v.cause, v.confidence) == (Cause.NOT_CLOSED, Confidence.CERTAIN)
    assert v.summary == "accepted by pid 42 (app) and never closed after the peer closed"
    assert v.evidence == ("accepted 40.0s ago", "still open as fd 7")


def test_accepted_not_closed_accept_unseen() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, inode=555)  # accepted_ns None
    v = diagnose(conn, Facts(), NOW)
    assert v.cause is Cause.NOT_CLOSED
    assert v.summary == "accepted by an unknown process and never closed after the peer closed"
    assert len(v.evidence) == 1
    assert v.evidence[0].startswith("accept() not seen (it may have been blocked in accept()")
    assert "the socket has an inode, so it was accepted" in v.evidence[0]


def test_accepted_after_fin_and_still_open() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER + 2_500 * MS,
                      accepted_after_fin=True, owner_pid=42, owner_comm="app")
    v = diagnose(conn, Facts(), NOW)
    assert v.cause is Cause.NOT_CLOSED
    assert v.evidence == ("accepted 27.5s ago", "accepted 2.5s after the peer's FIN")


# --- closed after being flagged -------------------------------------------------------------


def test_closed_after_flag_is_closed_late() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - S,
                      flagged_ns=ENTER + 10 * S, cw_exit_ns=ENTER + 12 * S,
                      exit_how=ExitHow.APP_CLOSE, owner_pid=42, owner_comm="app")
    v = diagnose(conn, Facts(process=ProcessFacts(pid=42, alive=True)), NOW)
    assert (v.cause, v.confidence) == (Cause.CLOSED_LATE, Confidence.CERTAIN)
    assert v.summary == ("closed by the application after 12.0s in CLOSE_WAIT: a slow handler,"
                         " or a peer timeout shorter than the service time")
    assert v.evidence == ("accepted 1.0s before the peer's FIN; the handler took the rest",)


@pytest.mark.parametrize("code, how, direction, cause", [
    (9, "killed by signal 9 (SIGKILL)", Direction.INBOUND, Cause.NOT_CLOSED),
    (3 << 8, "exited with status 3", Direction.OUTBOUND, Cause.OUTBOUND_NOT_CLOSED),
])
def test_closed_at_process_exit_is_a_leak_never_a_slow_handler(
        code: int, how: str, direction: Direction, cause: Cause) -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - S,
                      flagged_ns=ENTER + 10 * S, cw_exit_ns=ENTER + 12 * S, direction=direction,
                      exit_how=ExitHow.PROCESS_EXIT, exit_code=code, owner_pid=42,
                      owner_comm="app")
    v = diagnose(conn, Facts(process=ProcessFacts(pid=42, alive=False)), NOW)
    assert (v.cause, v.confidence) == (cause, Confidence.CERTAIN)
    assert v.summary == (f"never closed by pid 42 (app): the kernel closed it at process exit"
                         f" ({how}) after 12.0s in CLOSE_WAIT")
    assert v.evidence == ("owner pid 42 has exited", f"the process {how} while holding it")


def test_closed_late_reports_peer_timing_and_port_durations() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - S,
                      established_ns=ENTER - 3 * S, flagged_ns=ENTER + 10 * S,
                      cw_exit_ns=ENTER + 12 * S, exit_how=ExitHow.APP_CLOSE, lport=8080)
    facts = Facts(durations=DurationStats(count=5, p50_ns=2 * S, p90_ns=11 * S, max_ns=12 * S))
    v = diagnose(conn, facts, NOW)
    assert "the peer closed 3.0s after the connection was established (its timeout?)" in v.evidence
    assert ("CLOSE_WAIT durations on :8080: 5 stays, p50 2.0s, p90 11.0s, max 12.0s"
            in v.evidence)


def test_accepted_and_eof_read_is_a_certain_missing_close() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - S, eof_read=True,
                      owner_pid=42, owner_comm="app", fd=7)
    v = diagnose(conn, Facts(), NOW)
    assert (v.cause, v.confidence) == (Cause.NOT_CLOSED, Confidence.CERTAIN)
    assert "read the EOF and never closed" in v.summary
    assert any("its FIN included (Recv-Q 0)" in e for e in v.evidence)


def test_accepted_with_eof_unread_says_so() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - S, eof_read=False,
                      unread_bytes=45)
    v = diagnose(conn, Facts(process=ProcessFacts(pid=42, alive=True,
                                                  threads={"nanosleep": 1})), NOW)
    assert v.cause is Cause.NOT_CLOSED
    assert "the EOF is not read yet (45 data bytes unread): the handler is slow, blocked, or" \
        " never reads" in v.evidence
    assert "threads of pid 42: 1 in nanosleep" in v.evidence


def test_closed_after_flag_and_accepted_after_fin_is_drained_late() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER + 8 * S,
                      accepted_after_fin=True, flagged_ns=ENTER + 10 * S,
                      cw_exit_ns=ENTER + 11 * S, exit_how=ExitHow.APP_CLOSE)
    v = diagnose(conn, Facts(), NOW)
    assert (v.cause, v.confidence) == (Cause.DRAINED_LATE, Confidence.CERTAIN)
    assert v.summary == (
        "accepted late and closed after 11.0s in CLOSE_WAIT:"
        " the accept queue drains slower than clients give up"
    )
    assert v.evidence == ("waited 8.0s in the accept queue after the peer had closed",)


def test_closed_before_flag_is_a_likely_late_close_never_a_missing_close() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - S,
                      cw_exit_ns=ENTER + 2 * S, exit_how=ExitHow.APP_CLOSE)
    v = diagnose(conn, Facts(), NOW)
    assert (v.cause, v.confidence) == (Cause.CLOSED_LATE, Confidence.LIKELY)
    assert "never closed" not in v.summary


def test_flagged_then_reset_is_not_closed_by_the_application() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER - S,
                      flagged_ns=ENTER + 10 * S, cw_exit_ns=ENTER + 30 * S,
                      exit_how=ExitHow.RESET, owner_pid=42, owner_comm="app", fd=9)
    v = diagnose(conn, Facts(), NOW)
    assert v.cause is not Cause.CLOSED_LATE
    assert "closed by the application" not in v.summary


# --- outbound and unknown -------------------------------------------------------------------


def test_outbound_not_closed() -> None:
    conn = connection(key=KEY, direction=Direction.OUTBOUND, lport=45_000, raddr="10.9.9.9",
                      rport=5432, established_ns=ENTER - 30 * S, owner_pid=77, owner_comm="worker")
    v = diagnose(conn, Facts(), NOW)
    assert (v.cause, v.confidence) == (Cause.OUTBOUND_NOT_CLOSED, Confidence.CERTAIN)
    assert v.summary == (
        "pid 77 (worker) connected out and never closed after the server closed"
        " (idle pooled connection?)"
    )
    assert v.evidence == (
        "connected to 10.9.9.9:5432; the server closed it",
        "open 30.0s before the server's FIN",
    )


def test_outbound_without_established_time() -> None:
    conn = connection(key=KEY, direction=Direction.OUTBOUND, raddr="10.9.9.9", rport=80)
    v = diagnose(conn, Facts(), NOW)
    assert v.cause is Cause.OUTBOUND_NOT_CLOSED
    assert v.evidence == ("connected to 10.9.9.9:80; the server closed it",)


def test_unknown_is_possible() -> None:
    conn = connection(key=(0, 1), direction=Direction.UNKNOWN, owner_pid=5, owner_comm="old")
    assert conn.preexisting
    v = diagnose(conn, Facts(), NOW)
    assert (v.cause, v.confidence) == (Cause.UNKNOWN, Confidence.POSSIBLE)
    assert v.summary == "in CLOSE_WAIT, owned by pid 5 (old); how it got there is unknown"
    assert v.evidence == ("the tracer did not see this socket's creation or accept",)


# --- the owner -------------------------------------------------------------------------------


def test_dead_owner_evidence_comes_first() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_ns=ENTER, fd=3,
                      owner_pid=42, owner_comm="gone")
    v = diagnose(conn, Facts(process=ProcessFacts(pid=42, alive=False)), NOW)
    assert v.cause is Cause.NOT_CLOSED
    assert v.evidence[0] == "owner pid 42 has exited"
    v2 = diagnose(never_accepted(inode=0), Facts(process=ProcessFacts(pid=42, alive=False)), NOW)
    assert v2.evidence[0] == "owner pid 42 has exited"
    alive = diagnose(conn, Facts(process=ProcessFacts(pid=42, alive=True)), NOW)
    assert "owner pid 42 has exited" not in alive.evidence


def test_owner_comm_missing_shows_question_mark() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, owner_pid=42, owner_comm=None)
    assert "pid 42 (?)" in diagnose(conn, Facts(), NOW).summary


def test_verdict_as_dict() -> None:
    v = Verdict(Cause.ACCEPT_FAILING, Confidence.CERTAIN, "s", ("a", "b"))
    assert v.as_dict() == {
        "cause": "accept-failing", "confidence": "certain", "summary": "s", "evidence": ["a", "b"],
    }


def test_group_verdicts_counts_by_process_port_and_cause() -> None:
    from closewait_trace.pipeline.diagnose import Verdict, group_verdicts

    a = connection(key=(1, 1), lport=80, owner_pid=42, owner_comm="web")
    b = connection(key=(2, 1), lport=80, owner_pid=42, owner_comm="web")
    c = connection(key=(3, 1), lport=81, owner_pid=42, owner_comm="web")
    v = Verdict(Cause.NOT_CLOSED, Confidence.CERTAIN, "s", ("e",))
    groups = group_verdicts([a, b, c], {a.key: v, b.key: v})
    assert [(g["port"], g["cause"], g["count"]) for g in groups] == [
        (80, "accepted-not-closed", 2), (81, "unknown", 1)]


def test_a_sampled_accept_watch_is_said_and_recent_means_a_minute_of_watching() -> None:
    unseen = diagnose(never_accepted(inode=0), Facts(accept_coverage=0.1), NOW)
    assert ("no successful accept() seen since the tracer started"
            " (accept() watched 10% of that time)") in unseen.evidence
    listener = ListenerFacts(port=8080, queue=3, backlog=128)
    two_minutes_ago = acc_stats(ok=1, last_ok_ns=NOW - 120 * S)
    full = diagnose(never_accepted(), Facts(accept=two_minutes_ago, listener=listener), NOW)
    assert full.cause is Cause.NEVER_ACCEPTED
    # Two minutes ago, but watched only 12 s since: the process may well accept still.
    sampled = dataclasses.replace(two_minutes_ago, watched_since_ok_ns=12 * S)
    v = diagnose(never_accepted(), Facts(accept=sampled, listener=listener), NOW)
    assert v.cause is Cause.DRAINED_LATE
    assert "accept() succeeded 1x, the last 120.0s ago (watched 12.0s since)" in v.evidence
    # Watched more than a minute since the last success: it stopped accepting.
    stopped = dataclasses.replace(two_minutes_ago, watched_since_ok_ns=61 * S)
    v = diagnose(never_accepted(), Facts(accept=stopped, listener=listener), NOW)
    assert v.cause is Cause.NEVER_ACCEPTED


def test_accepted_after_fin_unseen_and_closed_is_drained_late() -> None:
    conn = connection(key=KEY, accepted=Accepted.YES, accepted_after_fin=True,
                      cw_exit_ns=ENTER + 11 * S, exit_how=ExitHow.APP_CLOSE)
    v = diagnose(conn, Facts(), NOW)
    assert v.cause is Cause.DRAINED_LATE
    assert v.evidence == ("found in the accept queue after the peer had closed, accepted"
                          " later (while accept() was not watched)",)
