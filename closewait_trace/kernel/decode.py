"""Decode stage: the C layouts of bpf/closewait.h as ctypes structs, and plain Python records.

The header is the one source: at import, the shipped bpf/closewait.h is parsed
(closewait_trace/kernel/cheader.py) and the ctypes structs below get their fields from it, the
length constants are read from it, and the enums are checked against its constants. A header
that cannot be read that way raises BpfHeaderError.
"""

from __future__ import annotations

import ctypes as ct
import enum
import functools
import ipaddress
import signal
import socket
from dataclasses import dataclass

from . import cheader
from ..outputs import textsafe
from .bpfdir import bpf_source_dir
from ..errors import BpfHeaderError

#: bpf/closewait.h as shipped with the package, parsed: the one source of the layouts below.
HEADER = cheader.read_header(bpf_source_dir() / "closewait.h")

COMM_LEN = HEADER.value("CW_COMM_LEN")
ADDR_LEN = HEADER.value("CW_ADDR_LEN")
HIST_BUCKETS = HEADER.value("CW_HIST_BUCKETS")
STAT_MAX = HEADER.value("CW_STAT_MAX")


class TcpState(enum.IntEnum):
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


class SockFlag(enum.IntFlag):
    PASSIVE = 1 << 0
    ACTIVE = 1 << 1
    ACCEPTED = 1 << 2
    APP_CLOSED = 1 << 3
    OWNER_KNOWN = 1 << 4
    PREEXISTING = 1 << 5
    IN_CW = 1 << 6
    ACCEPT_IN_CW = 1 << 7
    TIMELINE = 1 << 8
    REPORTED = 1 << 9
    PENDING = 1 << 10


class PidMark(enum.IntEnum):
    """pid_filter values: who put the PID there."""

    USER = 1  # userspace: a -p PID or a descendant it found
    FOLLOWED = 2  # the kernel: a process created by a traced one


class EventType(enum.IntEnum):
    CW_EXIT = 1
    LISTEN = 2
    UNLISTEN = 3
    STATE = 4
    ACCEPT = 5
    APP_CLOSE = 6


class ExitHow(enum.IntEnum):
    NONE = 0
    APP_CLOSE = 1
    APP_ABORT = 2
    RESET = 3
    LISTENER_CLOSED = 4
    PROCESS_EXIT = 5


def exit_code_text(code: int) -> str:
    """A task's exit code as people say it: "killed by signal 9 (SIGKILL)", "exited with
    status 3" (the wait(2) encoding: signal in the low 7 bits, status in the next byte)."""
    sig = code & 0x7F
    if sig:
        try:
            name = f" ({signal.Signals(sig).name})"
        except ValueError:
            name = ""
        return f"killed by signal {sig}{name}" + (", core dumped" if code & 0x80 else "")
    return f"exited with status {(code >> 8) & 0xFF}"


class Stat(enum.IntEnum):
    RINGBUF_LOST = 0
    SOCKS_FULL = 1
    CW_FULL = 2
    LISTEN_FULL = 3
    CW_ENTERED = 4
    CW_REPORTED = 5
    CW_SHORT = 6
    ACCEPTS = 7
    ACCEPT_UNMATCHED = 8
    PENDING_FULL = 9
    CW_NS_SUM = 10
    CW_LEFT = 11
    CW_UNDECIDED = 12
    PIDS_FULL = 13
    OWNER_FULL = 14
    ACCEPT_RET_RUNS = 15
    ACCEPT_SYS_RUNS = 16
    KERNEL_SKIPPED = 17


#: Stats whose non-zero value means something was missed, by the name outputs give the source
#: (the summary's "lost", the metrics' `source` label).
LOSS_SOURCES = (("ringbuf", Stat.RINGBUF_LOST), ("socks_map_full", Stat.SOCKS_FULL),
                ("cw_map_full", Stat.CW_FULL), ("listener_map_full", Stat.LISTEN_FULL),
                ("accept_map_full", Stat.PENDING_FULL), ("pid_map_full", Stat.PIDS_FULL),
                ("owner_room_full", Stat.OWNER_FULL))
LOSS_STATS = tuple(stat for _name, stat in LOSS_SOURCES)


# The ctypes structs of bpf/closewait.h, one class per struct (C_STRUCTS says which). Their
# fields come from the header itself (_bind_header, below), so each field is named in one place
# only; the classes are declared here so that callers and mypy know them by name. With
# __slots__ = (), a field name the header does not have fails on write as it does on read.
class CConfig(ct.Structure): __slots__ = ()
class CSock(ct.Structure): __slots__ = ()
class CEvent(ct.Structure): __slots__ = ()
class CListenerKey(ct.Structure): __slots__ = ()
class CListener(ct.Structure): __slots__ = ()
class CPeer(ct.Structure): __slots__ = ()
class CAcceptStat(ct.Structure): __slots__ = ()
class CAcceptErr(ct.Structure): __slots__ = ()


#: Struct name in the C header -> its ctypes class.
C_STRUCTS: dict[str, type[ct.Structure]] = {
    "cw_config": CConfig,
    "cw_sock": CSock,
    "cw_event": CEvent,
    "cw_lkey": CListenerKey,
    "cw_listener": CListener,
    "cw_peer": CPeer,
    "cw_accept_stat": CAcceptStat,
    "cw_accept_err": CAcceptErr,
}

#: Which Python enum mirrors which constants of the header (prefix, enum, constants left out).
C_ENUMS: tuple[tuple[str, type[enum.IntEnum] | type[enum.IntFlag], tuple[str, ...]], ...] = (
    ("CW_F_", SockFlag, ()),
    ("CW_EV_", EventType, ()),
    ("CW_EXIT_", ExitHow, ()),
    ("CW_STAT_", Stat, ("CW_STAT_MAX",)),
    ("CW_TCP_", TcpState, ()),
    ("CW_PID_", PidMark, ()),
)


def _bind_header(header: cheader.Header) -> None:
    """Lay out C_STRUCTS from the header and check the enums against its constants;
    BpfHeaderError if either cannot be done."""
    cheader.fill_structs(header, C_STRUCTS)
    problems = [p for prefix, members, exclude in C_ENUMS
                for p in cheader.enum_problems(header, prefix, members, exclude)]
    if problems:
        raise BpfHeaderError("the enums of decode.py and the header differ: " + "; ".join(problems))


_bind_header(HEADER)


@functools.lru_cache(maxsize=8192)
def format_addr(family: int, raw: bytes) -> str:
    """Text of an address the kernel stored as IPv6 or IPv4-mapped IPv6 (cached: a busy
    host has few addresses and many sockets)."""
    addr = ipaddress.IPv6Address(bytes(raw))
    mapped = addr.ipv4_mapped
    if family == socket.AF_INET or mapped is not None:
        return str(mapped) if mapped is not None else str(ipaddress.IPv4Address(bytes(raw)[12:]))
    return str(addr)


def _comm(raw: bytes) -> str:
    return textsafe.decode(raw.split(b"\0", 1)[0])


@dataclass(frozen=True)
class SockInfo:
    """What the kernel knows of one socket (struct cw_sock), in Python types."""

    skaddr: int
    ts_first: int
    ts_established: int
    ts_cw_enter: int
    ts_accept: int
    ts_close: int
    owner_tgid: int
    closer_tgid: int
    flags: SockFlag
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    owner_comm: str
    #: network namespace inode; 0 where the kernel side could not read it (or an old record)
    netns: int = 0
    #: inode of the listener the kernel queued it on (kprobe/fentry); 0 where not seen
    listener_ino: int = 0

    @functools.cached_property
    def key(self) -> tuple[int, int]:
        """Identity of one stay in CLOSE_WAIT: the address is reused, the entry time is not."""
        return (self.skaddr, self.ts_cw_enter)


@dataclass(frozen=True)
class Event:
    """One ring buffer record (struct cw_event)."""

    ts: int
    type: EventType
    tgid: int
    tid: int
    oldstate: int
    newstate: int
    exit_how: ExitHow
    comm: str
    sock: SockInfo
    #: ExitHow.PROCESS_EXIT: the holder's exit code (see exit_code_text), else 0
    exit_code: int = 0


#: SockInfo fields copied from the C struct as they are.
_SOCK_PLAIN = ("skaddr", "ts_first", "ts_established", "ts_cw_enter", "ts_accept", "ts_close",
               "owner_tgid", "closer_tgid", "family", "lport", "rport", "netns",
               "listener_ino")


def sock_from_c(c: CSock) -> SockInfo:
    """The plain record of a C socket: numbers as they are, addresses as text."""
    return SockInfo(
        **{name: getattr(c, name) for name in _SOCK_PLAIN},
        flags=SockFlag(c.flags),
        laddr=format_addr(c.family, bytes(c.laddr)),
        raddr=format_addr(c.family, bytes(c.raddr)),
        owner_comm=_comm(c.owner_comm),
    )


#: Event fields copied from the C struct as they are.
_EVENT_PLAIN = ("ts", "tgid", "tid", "oldstate", "newstate", "exit_code")


def decode_event(data: bytes | bytearray | memoryview) -> Event:
    """Decode one ring buffer record; raises ValueError on a short record."""
    if len(data) < ct.sizeof(CEvent):
        raise ValueError(f"ring buffer record of {len(data)} bytes, expected {ct.sizeof(CEvent)}")
    c = CEvent.from_buffer_copy(bytes(data[: ct.sizeof(CEvent)]))
    return Event(
        **{name: getattr(c, name) for name in _EVENT_PLAIN},
        type=EventType(c.type),
        exit_how=ExitHow(c.exit_how),
        comm=_comm(c.comm),
        sock=sock_from_c(c.sock),
    )


def _copy_plain(c: ct.Structure, record: SockInfo | Event, names: tuple[str, ...]) -> None:
    for name in names:
        setattr(c, name, getattr(record, name))


def encode_sock(s: SockInfo) -> CSock:
    """The inverse of sock_from_c, for tests and recorded traces."""
    c = CSock()
    _copy_plain(c, s, _SOCK_PLAIN)
    c.flags = int(s.flags)
    for name, text in (("laddr", s.laddr), ("raddr", s.raddr)):
        ip = ipaddress.ip_address(text)
        raw = (
            ipaddress.IPv6Address("::ffff:" + str(ip)).packed
            if isinstance(ip, ipaddress.IPv4Address)
            else ip.packed
        )
        getattr(c, name)[:] = list(raw)
    c.owner_comm = s.owner_comm.encode()[: COMM_LEN - 1]
    return c


def encode_event(e: Event) -> bytes:
    """The inverse of decode_event."""
    c = CEvent()
    _copy_plain(c, e, _EVENT_PLAIN)
    c.type = int(e.type)
    c.exit_how = int(e.exit_how)
    c.comm = e.comm.encode()[: COMM_LEN - 1]
    c.sock = encode_sock(e.sock)
    return bytes(c)
