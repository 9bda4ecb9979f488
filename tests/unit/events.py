"""Builders of the records the kernel sends (bpf/closewait.bpf.c), for the join/diagnose/render tests.

Each builder sets the flags and timestamps the BPF programs would set at that point of a
socket's life, so the tests feed the Tracker what a real kernel produces:

- `cw_entry()`: the value of the `cw` map for a socket now in CLOSE_WAIT (what a poll reads):
  IN_CW | REPORTED plus the creation flags (PASSIVE or ACTIVE, OWNER_KNOWN, ...).
- `cw_exit()`: the CW_EV_CW_EXIT ring buffer record of that socket leaving CLOSE_WAIT, as
  on_cw_exit() builds it (IN_CW cleared; APP_CLOSED, ts_close, closer_tgid set for app exits).
- `preexisting_exit()`: the exit of a socket in CLOSE_WAIT since before the tracer started
  (flags PREEXISTING only, every timestamp 0, matched by tuple in userspace).
- `listen_event()` / `unlisten_event()` / `state_event()`.
"""

from __future__ import annotations

import dataclasses
import socket

from closewait_trace.kernel.decode import Event, EventType, ExitHow, SockFlag, SockInfo, TcpState
from closewait_trace.pipeline.join import Connection, Direction

MS = 1_000_000
S = 1_000_000_000

OWNER_PID = 4242
OWNER_COMM = "server"


def cw_entry(
    skaddr: int = 0xFFFF_8880_1234_0000,
    *,
    enter: int,
    lport: int = 8080,
    rport: int = 50_000,
    laddr: str = "10.0.0.1",
    raddr: str = "10.0.0.2",
    family: int = socket.AF_INET,
    passive: bool = True,
    active: bool = False,
    owner: tuple[int, str] | None = (OWNER_PID, OWNER_COMM),
    accepted_at: int | None = None,
    established: int | None = None,
    app_closed_at: int | None = None,
    closer: int = 0,
    preexisting: bool = False,
) -> SockInfo:
    """The cw map value of a socket that entered CLOSE_WAIT at `enter` (ns)."""
    flags = SockFlag.IN_CW | SockFlag.REPORTED
    if passive and not active:
        flags |= SockFlag.PASSIVE
    if active:
        flags |= SockFlag.ACTIVE
    if preexisting:
        flags |= SockFlag.PREEXISTING
    if owner is not None:
        flags |= SockFlag.OWNER_KNOWN
    if accepted_at is not None:
        flags |= SockFlag.ACCEPTED | SockFlag.OWNER_KNOWN
        if accepted_at >= enter:
            flags |= SockFlag.ACCEPT_IN_CW
    if app_closed_at is not None:
        flags |= SockFlag.APP_CLOSED
    if established is None:
        established = 0 if preexisting else max(1, enter - 3 * S)
    return SockInfo(
        skaddr=skaddr,
        ts_first=max(1, established - MS) if established else enter,
        ts_established=established,
        ts_cw_enter=enter,
        ts_accept=accepted_at or 0,
        ts_close=app_closed_at or 0,
        owner_tgid=owner[0] if owner else 0,
        closer_tgid=closer,
        flags=flags,
        family=family,
        laddr=laddr,
        lport=lport,
        raddr=raddr,
        rport=rport,
        owner_comm=owner[1] if owner else "",
    )


def cw_exit(
    sock: SockInfo,
    *,
    ts: int,
    how: ExitHow,
    tgid: int = 0,
    comm: str = "",
    accepted_at: int | None = None,
) -> Event:
    """The CW_EV_CW_EXIT record of `sock` leaving CLOSE_WAIT at `ts` in process `tgid`."""
    flags = SockFlag(sock.flags) & ~SockFlag.IN_CW
    ts_accept = sock.ts_accept
    if accepted_at is not None:
        flags |= SockFlag.ACCEPTED | SockFlag.OWNER_KNOWN
        ts_accept = accepted_at
    ts_close = sock.ts_close
    closer = sock.closer_tgid
    if how in (ExitHow.APP_CLOSE, ExitHow.APP_ABORT):
        flags |= SockFlag.APP_CLOSED
        ts_close = ts_close or ts
        closer = closer or tgid
    final = dataclasses.replace(
        sock, flags=flags, ts_accept=ts_accept, ts_close=ts_close, closer_tgid=closer
    )
    return Event(
        ts=ts,
        type=EventType.CW_EXIT,
        tgid=tgid,
        tid=tgid,
        oldstate=TcpState.CLOSE_WAIT,
        newstate=TcpState.LAST_ACK if how is ExitHow.APP_CLOSE else TcpState.CLOSE,
        exit_how=how,
        comm=comm,
        sock=final,
    )


def preexisting_exit(
    *,
    ts: int,
    how: ExitHow,
    laddr: str,
    lport: int,
    raddr: str,
    rport: int,
    family: int = socket.AF_INET,
    skaddr: int = 0xFFFF_8880_9999_0000,
    tgid: int = 0,
) -> Event:
    """The exit of a socket unknown to the kernel maps (in CLOSE_WAIT before the tracer)."""
    sock = SockInfo(
        skaddr=skaddr,
        ts_first=0,
        ts_established=0,
        ts_cw_enter=0,
        ts_accept=0,
        ts_close=0,
        owner_tgid=0,
        closer_tgid=0,
        flags=SockFlag.PREEXISTING,
        family=family,
        laddr=laddr,
        lport=lport,
        raddr=raddr,
        rport=rport,
        owner_comm="",
    )
    return Event(
        ts=ts,
        type=EventType.CW_EXIT,
        tgid=tgid,
        tid=tgid,
        oldstate=TcpState.CLOSE_WAIT,
        newstate=TcpState.LAST_ACK if how is ExitHow.APP_CLOSE else TcpState.CLOSE,
        exit_how=how,
        comm="",
        sock=sock,
    )


def _listener_sock(port: int, pid: int, comm: str, addr: str, family: int, known: bool) -> SockInfo:
    return SockInfo(
        skaddr=0xFFFF_8880_0000_1000 + port,
        ts_first=0,
        ts_established=0,
        ts_cw_enter=0,
        ts_accept=0,
        ts_close=0,
        owner_tgid=pid if known else 0,
        closer_tgid=0,
        flags=SockFlag.OWNER_KNOWN if known else SockFlag(0),
        family=family,
        laddr=addr,
        lport=port,
        raddr="0.0.0.0" if family == socket.AF_INET else "::",
        rport=0,
        owner_comm=comm if known else "",
    )


def listen_event(
    port: int, pid: int, comm: str, *, ts: int, addr: str = "0.0.0.0", family: int = socket.AF_INET
) -> Event:
    return Event(
        ts=ts, type=EventType.LISTEN, tgid=pid, tid=pid, oldstate=TcpState.CLOSE,
        newstate=TcpState.LISTEN, exit_how=ExitHow.NONE, comm=comm,
        sock=_listener_sock(port, pid, comm, addr, family, True),
    )


def unlisten_event(
    port: int, pid: int, comm: str, *, ts: int, addr: str = "0.0.0.0", family: int = socket.AF_INET
) -> Event:
    return Event(
        ts=ts, type=EventType.UNLISTEN, tgid=pid, tid=pid, oldstate=TcpState.LISTEN,
        newstate=TcpState.CLOSE, exit_how=ExitHow.NONE, comm=comm,
        sock=_listener_sock(port, pid, comm, addr, family, True),
    )


def state_event(sock: SockInfo, *, ts: int, old: TcpState, new: TcpState, tgid: int = 0) -> Event:
    """A timeline STATE record (sockets under a timeline watch only)."""
    return Event(
        ts=ts, type=EventType.STATE, tgid=tgid, tid=tgid, oldstate=old, newstate=new,
        exit_how=ExitHow.NONE, comm="", sock=sock,
    )


def connection(
    *,
    key: tuple[int, int] = (0xFFFF_8880_1234_0000, 1 * S),
    direction: Direction = Direction.INBOUND,
    laddr: str = "10.0.0.1",
    lport: int = 8080,
    raddr: str = "10.0.0.2",
    rport: int = 50_000,
    family: int = socket.AF_INET,
    **kw: object,
) -> Connection:
    """A Connection as the Tracker would hold it, for diagnose/render tests."""
    kw.setdefault("cw_enter_ns", key[1] if key[0] else None)
    kw.setdefault("first_seen_ns", key[1] if key[0] else 1 * S)
    return Connection(
        key=key, family=family, laddr=laddr, lport=lport, raddr=raddr, rport=rport,
        direction=direction, **kw,  # type: ignore[arg-type]
    )
