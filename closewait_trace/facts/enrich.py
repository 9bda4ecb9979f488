"""Userspace enrichment: the socket facts that live in kernel structs, read without BPF.

The kernel side of the tracer reports sockets by their 4-tuple (and state).  This module
answers the questions that need the kernel's socket tables and the process table:

* ``sock_diag`` (NETLINK_SOCK_DIAG / inet_diag, over a raw netlink socket) gives, per TCP socket,
  its state, 4-tuple, inode, uid, queue lengths and cookie.  An inode of 0 means the socket
  has no ``struct socket``: it was never accepted (it still sits in a listener's accept
  queue) or it is an orphan.  For a LISTEN socket ``rqueue`` is the current accept-queue
  length and ``wqueue`` the backlog; for other states ``rqueue`` is the number of received
  sequence numbers the application has not consumed (unread bytes, plus 1 for a FIN not yet
  read: a CLOSE_WAIT socket whose owner never read the EOF shows ``rqueue >= 1``).
* ``/proc/PID/fd/*`` symlinks ``socket:[INODE]`` name the processes and fds that hold an
  accepted socket (:class:`ProcessIndex`).

Everything here is read-only and needs no BPF; nothing is attached to the kernel.
Processes that vanish while being scanned and ``/proc`` entries that cannot be read (other
users' processes without privilege) are skipped silently.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from closewait_trace.kernel.decode import TcpState  # one definition, shared with the decoder
from closewait_trace.errors import EnrichError, UsageError
from ..outputs import textsafe

if TYPE_CHECKING:
    from . import facts

__all__ = [
    "DiagSocket",
    "ProcessIndex",
    "SocketOwner",
    "TcpState",
    "comm_of",
    "diag_sockets",
    "find_by_tuple",
    "format_addr",
    "listeners",
    "listeners_with_owners",
    "normalize_addr",
    "open_sock_diag",
    "open_files",
    "parse_limits_nofile",
    "parse_socket_link",
    "pid_alive",
    "resolve_target",
]

PROC = Path("/proc")

_SUPPORTED_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_SOCKET_LINK_PREFIX = "socket:["


# --------------------------------------------------------------------------- addresses


@functools.lru_cache(maxsize=8192)
def normalize_addr(text: str) -> str:
    """Canonical text of an IP address; an IPv4-mapped IPv6 address becomes its IPv4 text.

    ``"::ffff:127.0.0.1"`` -> ``"127.0.0.1"``, ``"0:0::1"`` -> ``"::1"``.  Text that is
    not an IP address is returned unchanged (so it compares only with itself).
    """
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        # Drop any zone id ("fe80::1%eth0"): sock_diag reports none.
        return str(ipaddress.IPv6Address(int(addr)))
    return str(addr)


def format_addr(family: int, packed: bytes) -> str:
    """Text of a raw network-order address (4 bytes for AF_INET, 16 for AF_INET6).

    An AF_INET6 address that is IPv4-mapped is written as the IPv4 text, like the addresses
    of :class:`DiagSocket`.  Longer buffers are accepted (kernel events often carry a 16-byte
    field for both families); only the leading 4 or 16 bytes are used.
    """
    if family == socket.AF_INET:
        if len(packed) < 4:
            raise UsageError(f"an IPv4 address needs 4 bytes, got {len(packed)}")
        return str(ipaddress.IPv4Address(bytes(packed[:4])))
    if family == socket.AF_INET6:
        if len(packed) < 16:
            raise UsageError(f"an IPv6 address needs 16 bytes, got {len(packed)}")
        return normalize_addr(str(ipaddress.IPv6Address(bytes(packed[:16]))))
    raise UsageError(f"unsupported address family {family}")


# --------------------------------------------------------------------------- sock_diag


@dataclass(frozen=True)
class DiagSocket:
    """One TCP socket as sock_diag reports it.

    ``family`` is the socket's own family: a dual-stack AF_INET6 socket talking IPv4 keeps
    AF_INET6, but its addresses are written as IPv4 text (``"127.0.0.1"``, never
    ``"::ffff:127.0.0.1"``).
    """

    family: int
    state: TcpState
    laddr: str
    lport: int
    raddr: str
    rport: int
    inode: int
    uid: int
    rqueue: int
    wqueue: int
    cookie: int
    #: the network namespace (inode) it was found in; None where unknown (one namespace)
    netns: int | None = None

    @property
    def accepted(self) -> bool:
        """Whether the socket has a ``struct socket`` (non-zero inode)."""
        return self.inode != 0

    @property
    def eof_unread(self) -> bool | None:
        """For CLOSE_WAIT: True while the peer's FIN (and maybe data) is still unread.

        The kernel reports ``rcv_nxt - copied_seq`` as ``rqueue``; the FIN occupies one
        sequence number that is consumed only when the application reads the EOF.  None for
        other states.
        """
        if self.state != TcpState.CLOSE_WAIT:
            return None
        return self.rqueue > 0


def _kernel_addr_text(text: str) -> str:
    """Fast :func:`normalize_addr` for ``inet_ntop`` output (already canonical)."""
    if "." in text and ":" in text:
        if text.startswith("::ffff:"):
            return text[7:]  # IPv4-mapped
        return normalize_addr(text)  # IPv4-compatible "::1.2.3.4" (deprecated form)
    return text


def _state_mask(states: Iterable[TcpState]) -> int:
    mask = 0
    for state in states:
        mask |= 1 << int(state)
    return mask


# sock_diag over a raw netlink socket (include/uapi/linux/sock_diag.h, inet_diag.h).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLMSGHDR = struct.Struct("=IHHII")
#: struct inet_diag_req_v2: family, protocol, ext, pad, states; then struct inet_diag_sockid:
#: sport, dport (network order), src[16], dst[16], if, cookie[2]
_REQ_V2 = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
#: struct inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big-endian),
#: src[16], dst[16], if, cookie (2 x u32); expires, rqueue, wqueue, uid, inode
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
_PORTS = struct.Struct("!H")


def _addr_text(family: int, raw: bytes, cache: dict[bytes, str]) -> str:
    text = cache.get(raw)
    if text is None:
        if family == socket.AF_INET:
            text = socket.inet_ntop(socket.AF_INET, raw[:4])
        else:
            text = _kernel_addr_text(socket.inet_ntop(socket.AF_INET6, raw))
        cache[raw] = text
    return text


def parse_diag_messages(buf: bytes, requested: frozenset[int], out: list[DiagSocket],
                        cache: dict[bytes, str], netns: int | None = None) -> bool:
    """Parse the netlink messages of one recv() of a sock_diag dump into ``out``, each
    socket marked as found in ``netns``. Returns True when the dump is done. Raises
    EnrichError on a netlink error."""
    off, end = 0, len(buf)
    while off + _NLMSGHDR.size <= end:
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or off + length > end:
            raise EnrichError(f"sock_diag: malformed netlink message (length {length})")
        body = off + _NLMSGHDR.size
        if mtype == NLMSG_DONE:
            return True
        if mtype == NLMSG_ERROR:
            if length - _NLMSGHDR.size < 4:
                raise EnrichError("sock_diag: malformed netlink error message")
            (err,) = struct.unpack_from("=i", buf, body)
            if err:
                raise EnrichError(f"sock_diag (inet_diag) query failed: "
                                  f"{os.strerror(-err)} (errno {-err})")
            return True
        if mtype == SOCK_DIAG_BY_FAMILY and length - _NLMSGHDR.size >= _DIAG_MSG.size:
            (fam, state, _timer, _retrans, sport, dport, src, dst, _ifindex, c0, c1,
             _expires, rqueue, wqueue, uid, inode) = _DIAG_MSG.unpack_from(buf, body)
            if state in requested:
                # The kernel adds NEW_SYN_RECV/SYN_RECV by itself; states unknown to us
                # (e.g. BOUND_INACTIVE) are dropped too.
                out.append(DiagSocket(
                    family=fam, state=TcpState(state),
                    laddr=_addr_text(fam, src, cache), lport=_PORTS.unpack(sport)[0],
                    raddr=_addr_text(fam, dst, cache), rport=_PORTS.unpack(dport)[0],
                    inode=inode, uid=uid, rqueue=rqueue, wqueue=wqueue,
                    cookie=c0 | (c1 << 32), netns=netns))
        off += (length + 3) & ~3
    return False


def diag_request(family: int, mask: int, sport: int = 0, dport: int = 0,
                 src: bytes = bytes(16), dst: bytes = bytes(16),
                 cookie: tuple[int, int] = (0, 0)) -> bytes:
    """A TCP inet_diag_req_v2 for the states in ``mask``. A dump honours ports that are not 0
    (with ``sport``, the kernel reports only the sockets of that local port; every kernel's
    TCP dump compares it; a ``dport`` would leave the listeners out) and ignores the rest
    of the id; a lookup (no NLM_F_DUMP) finds the one socket with the whole id."""
    return (_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, mask)
            + _SOCKID.pack(sport, dport, src, dst) + _SOCKID_TAIL.pack(0, *cookie))


def _dump(nl: socket.socket, family: int, mask: int, requested: frozenset[int],
          out: list[DiagSocket], seq: int, netns: int | None, sport: int) -> None:
    req = diag_request(family, mask, sport)
    nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY,
                           NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req)
    cache: dict[bytes, str] = {}
    while True:
        buf = nl.recv(1 << 20)
        if not buf:
            raise EnrichError("sock_diag: netlink socket closed during a dump")
        if parse_diag_messages(buf, requested, out, cache, netns):
            return


def open_sock_diag() -> socket.socket:
    """A bound NETLINK_SOCK_DIAG socket.  It answers for the network namespace of the thread
    that creates it, for as long as it lives (closewait_trace.facts.netns opens one per namespace)."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    try:
        nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        nl.bind((0, 0))
    except OSError:
        nl.close()
        raise
    return nl


def diag_sockets(
    states: Collection[TcpState],
    families: Collection[int] = (socket.AF_INET, socket.AF_INET6),
    *,
    nl: socket.socket | None = None,
    netns: int | None = None,
    sport: int = 0,
) -> list[DiagSocket]:
    """Dump the TCP sockets in ``states`` of the given families through sock_diag.

    Query both families: an AF_INET6 socket that accepted an IPv4 connection is reported
    only in the AF_INET6 dump.  Request sockets (NEW_SYN_RECV inside the kernel) are
    reported by the kernel as SYN_RECV, so asking for either state returns them as
    SYN_RECV.  ``nl`` is a socket from :func:`open_sock_diag` (made in the namespace to ask
    about; the caller serialises its use and drops it after an error); without it, a socket
    is opened in the caller's namespace for this dump.  Each socket is marked as found in
    ``netns``.  With ``sport`` (not 0), the kernel reports only the sockets of that local port.
    Raises :class:`EnrichError` when netlink fails.
    """
    wanted = frozenset(int(TcpState(s)) for s in states)
    if not wanted:
        return []
    if wanted & {TcpState.SYN_RECV, TcpState.NEW_SYN_RECV}:
        wanted = wanted | {int(TcpState.SYN_RECV), int(TcpState.NEW_SYN_RECV)}
    for family in families:
        if family not in _SUPPORTED_FAMILIES:
            raise UsageError(f"unsupported address family {family} (AF_INET or AF_INET6)")
    mask = _state_mask(TcpState(s) for s in wanted)
    result: list[DiagSocket] = []
    try:
        with contextlib.nullcontext(nl) if nl is not None else open_sock_diag() as sock:
            for seq, family in enumerate(dict.fromkeys(families), start=1):
                _dump(sock, family, mask, wanted, result, seq, netns, sport)
    except OSError as exc:
        raise EnrichError(f"sock_diag (inet_diag) query failed: {exc}") from exc
    return result


def listeners(families: Collection[int] = (socket.AF_INET, socket.AF_INET6), *,
              nl: socket.socket | None = None) -> list[DiagSocket]:
    """TCP sockets in LISTEN: ``rqueue`` is the accept-queue length, ``wqueue`` the backlog."""
    return diag_sockets((TcpState.LISTEN,), families, nl=nl)


@functools.lru_cache(maxsize=8192)
def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def find_by_tuple(
    sockets: Iterable[DiagSocket],
    family: int,
    laddr: str,
    lport: int,
    raddr: str,
    rport: int,
) -> DiagSocket | None:
    """The socket with this 4-tuple, or None.

    Addresses compare after :func:`normalize_addr`, so ``"::ffff:10.0.0.1"`` matches
    ``"10.0.0.1"``; an AF_INET query then also matches an AF_INET6 (dual-stack) socket and
    the reverse.  A socket of exactly ``family`` is preferred when both exist.
    """
    want_l = normalize_addr(laddr)
    want_r = normalize_addr(raddr)
    fallback: DiagSocket | None = None
    for sock in sockets:
        if sock.lport != lport or sock.rport != rport:
            continue
        if normalize_addr(sock.laddr) != want_l or normalize_addr(sock.raddr) != want_r:
            continue
        if sock.family == family:
            return sock
        # AF_INET vs AF_INET6 (dual-stack socket): the same connection only when both
        # addresses are IPv4 once mapped addresses are unwrapped.
        if fallback is None and _is_ipv4(want_l) and _is_ipv4(want_r):
            fallback = sock
    return fallback


class TupleIndex:
    """find_by_tuple over many sockets at once: buckets by port pair, so that matching n
    connections against n sockets costs n lookups, not n * n comparisons."""

    def __init__(self, sockets: Iterable[DiagSocket]) -> None:
        self._by_ports: dict[tuple[int, int], list[DiagSocket]] = {}
        for sock in sockets:
            self._by_ports.setdefault((sock.lport, sock.rport), []).append(sock)

    def find(self, family: int, laddr: str, lport: int, raddr: str, rport: int
             ) -> DiagSocket | None:
        bucket = self._by_ports.get((lport, rport))
        if not bucket:
            return None
        return find_by_tuple(bucket, family, laddr, lport, raddr, rport)


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class SocketOwner:
    """A process holding a socket: its pid, the fd number and its command name."""

    pid: int
    fd: int
    comm: str


def parse_socket_link(target: str) -> int | None:
    """The inode of an fd symlink target ``"socket:[12345]"``, or None for anything else."""
    if not target.startswith(_SOCKET_LINK_PREFIX) or not target.endswith("]"):
        return None
    digits = target[len(_SOCKET_LINK_PREFIX) : -1]
    if not digits.isdigit():
        return None
    return int(digits)


def _read_comm(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)
    return textsafe.decode(raw.rstrip(b"\n"))


def comm_of(pid: int, proc_root: Path = PROC) -> str | None:
    """The command name (``/proc/PID/comm``) of a process, or None if it cannot be read."""
    if pid <= 0:
        return None
    return _read_comm(f"{os.fspath(proc_root)}/{pid}/comm")


def pid_alive(pid: int, proc_root: Path = PROC) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if pid <= 0:
        return False  # kill(0, ...) and kill(-1, ...) address groups, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    try:
        with open(proc_root / str(pid) / "stat", "rb") as fh:
            stat = fh.read(512)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # "PID (comm) S ...": the comm may hold spaces or ')', so split at the last ')'.
    end = stat.rfind(b")")
    if end < 0:
        return True
    fields = stat[end + 1 :].split()
    return not (fields and fields[0] in (b"Z", b"X"))


PF_KTHREAD = 0x00200000  # include/linux/sched.h


def parse_stat_target(stat: bytes) -> tuple[str, int]:
    """(state letter, flags) from ``/proc/PID/stat`` text; the comm may hold spaces or ')'."""
    end = stat.rfind(b")")
    fields = stat[end + 1 :].split() if end >= 0 else []
    if len(fields) < 7 or not fields[6].isdigit():
        raise ValueError("unreadable /proc/PID/stat")
    return fields[0].decode("ascii", "replace"), int(fields[6])


def parse_status_tgid(status: str) -> int | None:
    """The Tgid (the process id of a thread) from ``/proc/PID/status`` text."""
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            value = line[5:].strip()
            return int(value) if value.isdigit() else None
    return None


def resolve_target(pid: int, proc_root: Path = PROC) -> tuple[int, str | None]:
    """A PID given with -p, checked: (the process to trace, a notice or None).

    A thread id stands for its process (with a notice); a process that does not exist, a
    zombie and a kernel thread (it owns no sockets) raise UsageError."""
    base = proc_root / str(pid)
    try:
        state, flags = parse_stat_target((base / "stat").read_bytes())
        tgid = parse_status_tgid((base / "status").read_text(errors="replace"))
    except FileNotFoundError:
        raise UsageError(f"no process with PID {pid}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read process {pid}: {exc}") from None
    if flags & PF_KTHREAD:
        raise UsageError(f"PID {pid} is a kernel thread: it owns no sockets to trace")
    if state in ("Z", "X"):
        raise UsageError(f"PID {pid} is a zombie (it has exited): nothing left to trace")
    if tgid is not None and tgid != pid:
        return tgid, f"PID {pid} is a thread of process {tgid}: tracing process {tgid}"
    return pid, None


def parse_limits_nofile(text: str) -> int | None:
    """The soft "Max open files" limit from ``/proc/PID/limits`` text.

    ``"unlimited"`` gives ``resource.RLIM_INFINITY``; None when the line is missing.
    """
    for line in text.splitlines():
        if not line.startswith("Max open files"):
            continue
        fields = line[len("Max open files") :].split()
        if not fields:
            return None
        soft = fields[0]
        if soft == "unlimited":
            return resource.RLIM_INFINITY
        try:
            return int(soft)
        except ValueError:
            return None
    return None


def _count_fds(fd_dir: Path, *, procfs: bool) -> int:
    if procfs:
        # Linux >= 6.2 reports the number of open fds as the size of /proc/PID/fd: O(1)
        # even for a process that leaked a million descriptors.  Older kernels say 0.
        size = os.stat(fd_dir).st_size
        if size > 0:
            return size
    count = 0
    with os.scandir(fd_dir) as it:
        for _entry in it:
            count += 1
    return count


def open_files(pid: int, proc_root: Path = PROC) -> tuple[int, int]:
    """``(open fd count, soft RLIMIT_NOFILE)`` of a process, from ``/proc/PID``.

    Raises :class:`EnrichError` when the process is gone or its entries cannot be read
    (another user's process without privilege).  The count is a snapshot; on kernels
    before 6.2 it is counted by listing ``/proc/PID/fd`` (for the calling process that
    includes the descriptor used for the listing).
    """
    if pid <= 0:
        raise UsageError(f"invalid pid {pid}")
    base = proc_root / str(pid)
    try:
        limits = (base / "limits").read_text(encoding="utf-8", errors="replace")
        count = _count_fds(base / "fd", procfs=Path(proc_root) == PROC)
    except FileNotFoundError as exc:
        raise EnrichError(f"process {pid} does not exist") from exc
    except PermissionError as exc:
        raise EnrichError(f"no permission to read /proc/{pid} ({exc.strerror})") from exc
    except OSError as exc:
        raise EnrichError(f"cannot read /proc/{pid}: {exc}") from exc
    soft = parse_limits_nofile(limits)
    if soft is None:
        raise EnrichError(f"/proc/{pid}/limits has no 'Max open files' line")
    return count, soft


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _scan_socket_fds(fd_dir_path: str) -> list[tuple[int, int]]:
    """``[(fd, inode)]`` of the socket fds under one ``/proc/PID/fd`` directory.

    [] when the process vanished or its table cannot be read (another user's process).
    Only ``readlink`` is done per fd entry, relative to the open directory: nothing is
    stat'ed or opened through the links, and no path is rebuilt per entry.
    """
    try:
        fd_dir = os.open(fd_dir_path, _DIR_FLAGS)
    except OSError:
        return []
    found: list[tuple[int, int]] = []
    try:
        names = os.listdir(fd_dir)
        readlink = os.readlink
        for name in names:
            try:
                target = readlink(name, dir_fd=fd_dir)
            except OSError:
                continue  # fd closed meanwhile
            # Inlined parse_socket_link: this loop runs once per fd on the machine.
            if target[:8] == _SOCKET_LINK_PREFIX and target[-1:] == "]":
                try:
                    found.append((int(name), int(target[8:-1])))
                except ValueError:
                    continue
    except OSError:
        return []  # the process exited while its table was listed
    finally:
        os.close(fd_dir)
    return found


def _pids(proc_root: Path) -> list[int]:
    try:
        with os.scandir(proc_root) as it:
            return [int(e.name) for e in it if e.name.isdigit()]
    except OSError as exc:
        raise EnrichError(f"cannot list {proc_root}: {exc}") from exc


class ProcessIndex:
    """inode -> owners, from ``/proc/*/fd`` symlinks ``socket:[N]``.

    Rebuilt lazily: a lookup that misses triggers :meth:`refresh`, at most once every
    ``min_interval`` seconds (the first lookup always scans).  Hits are re-checked with
    one ``readlink`` per owner, so an owner that closed the fd (or exited) since the last
    scan is not returned; a hit with no owner left counts as a miss.  Inode 0 (a socket
    that was never accepted) never has owners and never triggers a scan.  Thread-safe.

    Processes that vanish during a scan, and fd tables that cannot be read (other users'
    processes without privilege), are skipped silently.
    """

    def __init__(
        self,
        proc_root: Path = PROC,
        min_interval: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = Path(proc_root)
        self.min_interval = min_interval
        self._root = os.fspath(self.proc_root)
        self._clock = clock
        self._lock = threading.Lock()
        # Compact form, cheap to build: most sockets have exactly one owner.
        self._first: dict[int, tuple[int, int]] = {}  # inode -> (pid, fd)
        self._more: dict[int, list[tuple[int, int]]] = {}  # inode -> further (pid, fd)
        self._fds: dict[int, list[tuple[int, int]]] = {}  # pid -> [(fd, inode)]
        self._comm: dict[int, str] = {}
        self._last_refresh: float | None = None
        self.refresh_count = 0
        self.last_refresh_seconds = 0.0

    # -- building -----------------------------------------------------------------

    def refresh(self) -> None:
        """Rescan every process's fd table now (regardless of ``min_interval``)."""
        with self._lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        started = time.perf_counter()
        first: dict[int, tuple[int, int]] = {}
        more: dict[int, list[tuple[int, int]]] = {}
        fds_by_pid: dict[int, list[tuple[int, int]]] = {}
        comms: dict[int, str] = {}
        claim = first.setdefault
        root = self._root
        for pid in _pids(self.proc_root):
            fds = _scan_socket_fds(f"{root}/{pid}/fd")
            if not fds:
                continue
            comm = _read_comm(f"{root}/{pid}/comm")
            if comm is None:
                continue  # exited during the scan
            comms[pid] = comm
            fds_by_pid[pid] = fds
            for fd, inode in fds:
                pair = (pid, fd)
                if claim(inode, pair) is not pair:
                    more.setdefault(inode, []).append(pair)
        self._first, self._more, self._fds, self._comm = first, more, fds_by_pid, comms
        self._last_refresh = self._clock()
        self.refresh_count += 1
        self.last_refresh_seconds = time.perf_counter() - started

    def _may_refresh(self) -> bool:
        if self._last_refresh is None:
            return True
        return self._clock() - self._last_refresh >= self.min_interval

    def _lookup_locked(self, inode: int) -> list[SocketOwner] | None:
        """Verified owners from the current map, or None on a miss."""
        head = self._first.get(inode)
        if head is None:
            return None
        pairs = [head, *self._more.get(inode, ())]
        live: list[SocketOwner] = []
        for pid, fd in pairs:
            try:
                target = os.readlink(f"{self._root}/{pid}/fd/{fd}")
            except OSError:
                continue
            if parse_socket_link(target) == inode:
                live.append(SocketOwner(pid, fd, self._comm.get(pid, "")))
        return live or None

    def _forget_pid_locked(self, pid: int) -> None:
        for fd, inode in self._fds.pop(pid, ()):
            pair = (pid, fd)
            rest = [p for p in self._more.get(inode, ()) if p != pair]
            if self._first.get(inode) == pair:
                if rest:
                    self._first[inode] = rest.pop(0)
                else:
                    self._first.pop(inode, None)
            if rest:
                self._more[inode] = rest
            else:
                self._more.pop(inode, None)
        self._comm.pop(pid, None)

    # -- queries ------------------------------------------------------------------

    def owners(self, inode: int) -> list[SocketOwner]:
        """Processes and fds holding the socket with this inode ([] for inode 0 / unknown)."""
        return self.pids_of_inodes((inode,)).get(inode, [])

    def pids_of_inodes(self, inodes: Iterable[int]) -> dict[int, list[SocketOwner]]:
        """Owners of several inodes with at most one rescan; inodes without owners are absent."""
        wanted = [i for i in dict.fromkeys(inodes) if i > 0]
        out: dict[int, list[SocketOwner]] = {}
        if not wanted:
            return out
        with self._lock:
            missing: list[int] = []
            for inode in wanted:
                found = self._lookup_locked(inode)
                if found is None:
                    missing.append(inode)
                else:
                    out[inode] = found
            if missing and self._may_refresh():
                self._refresh_locked()
                for inode in missing:
                    found = self._lookup_locked(inode)
                    if found is not None:
                        out[inode] = found
        return out

    def inodes_of(self, pid: int) -> frozenset[int]:
        """Socket inodes in ``pid``'s fd table, read now from ``/proc/PID/fd``.

        Reading one process is cheap, so this never waits for ``min_interval``; the index
        entries of that pid are replaced by what was read.
        """
        if pid <= 0:
            return frozenset()
        fds = _scan_socket_fds(f"{self._root}/{pid}/fd")
        comm = comm_of(pid, self.proc_root) if fds else None
        with self._lock:
            self._forget_pid_locked(pid)
            if not fds or comm is None:
                return frozenset()  # no sockets, or exited while being read
            self._fds[pid] = fds
            self._comm[pid] = comm
            for fd, inode in fds:
                pair = (pid, fd)
                if self._first.setdefault(inode, pair) is not pair:
                    self._more.setdefault(inode, []).append(pair)
        return frozenset(inode for _fd, inode in fds)

    def known_pids(self) -> frozenset[int]:
        """Pids that held at least one socket when last read."""
        with self._lock:
            return frozenset(self._fds)


def listeners_with_owners(index: ProcessIndex, *, nl: socket.socket | None = None,
                          netns: int | None = None) -> list[facts.Listener]:
    """Every TCP listener with its accept-queue length, backlog and owners: of the caller's
    network namespace, or of the one ``nl`` (a sock_diag socket opened there) answers for,
    named ``netns``. Socket inodes are unique host-wide, so owners are found by inode."""
    from . import facts as facts_  # facts names SocketOwner, defined here

    socks = listeners(nl=nl)
    owners = index.pids_of_inodes(s.inode for s in socks if s.inode)
    return [
        facts_.Listener(
            family=s.family, laddr=s.laddr, lport=s.lport, queue=s.rqueue, backlog=s.wqueue,
            owners=tuple(owners.get(s.inode, ())), netns=netns, inode=s.inode,
        )
        for s in socks
    ]


# --------------------------------------------------------------------------------------------
# What a process is doing: the syscall each thread is blocked in, and its epoll sets.
# --------------------------------------------------------------------------------------------

#: x86_64 syscall numbers worth naming in a diagnosis (others are shown as numbers).
_X86_64_SYSCALLS = {
    0: "read", 7: "poll", 23: "select", 35: "nanosleep", 43: "accept", 45: "recvfrom",
    47: "recvmsg", 202: "futex", 230: "clock_nanosleep", 232: "epoll_wait", 270: "pselect6",
    271: "ppoll", 281: "epoll_pwait", 288: "accept4", 441: "epoll_pwait2",
    34: "pause", 61: "wait4", 128: "rt_sigtimedwait", 130: "rt_sigsuspend", 247: "waitid",
}
_ARM64_SYSCALLS = {
    22: "epoll_pwait", 63: "read", 73: "ppoll", 98: "futex", 101: "nanosleep",
    115: "clock_nanosleep", 202: "accept", 207: "recvfrom", 212: "recvmsg", 242: "accept4",
    441: "epoll_pwait2", 95: "waitid", 133: "rt_sigsuspend", 137: "rt_sigtimedwait",
    260: "wait4",
}

#: Syscalls in which a thread waits for events rather than works.
EPOLLET = 1 << 31


def syscall_name(nr: int, machine: str | None = None) -> str:
    table = _ARM64_SYSCALLS if (machine or os.uname().machine) == "aarch64" else _X86_64_SYSCALLS
    return table.get(nr, f"syscall {nr}")


def thread_syscalls(pid: int, proc_root: Path = PROC) -> dict[str, int]:
    """How many of pid's threads are blocked in each syscall now ("running" for threads on a
    CPU or in user space), from /proc/PID/task/*/syscall (needs root for other users)."""
    out: dict[str, int] = {}
    try:
        tids = os.listdir(proc_root / str(pid) / "task")
    except OSError:
        return out
    for tid in tids:
        try:
            text = (proc_root / str(pid) / "task" / tid / "syscall").read_text().split()
        except OSError:
            continue
        name = parse_syscall_line(text)
        if name is not None:
            out[name] = out.get(name, 0) + 1
    return out


def parse_syscall_line(fields: list[str]) -> str | None:
    """What a thread is doing, from the fields of its /proc/PID/task/TID/syscall: the syscall
    it is blocked in, "running", or None for text that says neither."""
    if not fields:
        return None
    if fields[0] in ("running", "-1"):
        return "running"
    try:
        return syscall_name(int(fields[0]))
    except ValueError:
        return None


def parse_epoll_fdinfo(text: str) -> dict[int, int]:
    """{target fd: event mask} from an epoll fd's /proc/PID/fdinfo text ("tfd: N events: X")."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "tfd:" and parts[2] == "events:":
            try:
                out[int(parts[1])] = int(parts[3], 16)
            except ValueError:
                continue
    return out


def edge_triggered_fds(pid: int, proc_root: Path = PROC) -> set[int]:
    """File descriptors of pid registered with EPOLLET in any of its epoll sets."""
    fd_dir = proc_root / str(pid) / "fd"
    out: set[int] = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return out
    for name in names:
        try:
            if os.readlink(fd_dir / name) != "anon_inode:[eventpoll]":
                continue
            text = (proc_root / str(pid) / "fdinfo" / name).read_text()
        except OSError:
            continue
        out.update(fd for fd, ev in parse_epoll_fdinfo(text).items() if ev & EPOLLET)
    return out
