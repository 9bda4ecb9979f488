"""Network namespaces: which exist, which one a process is in, and sock_diag inside each.

sock_diag answers only about the network namespace its netlink socket was created in.  To
ask about another namespace, a short-lived helper thread enters it (``setns(CLONE_NEWNET)``
changes the calling thread only), opens the netlink socket there and exits; the socket stays
bound to that namespace.  :class:`NetnsDiag` keeps one such socket per namespace inode and
drops it when the namespace is gone (a cached socket holds a reference to its namespace, so
keeping it would keep a deleted namespace alive).

A namespace is named by its inode, the number ``readlink /proc/PID/ns/net`` prints as
``net:[INODE]`` and ``lsns -t net`` lists.  The namespaces of a host are those of its
processes (``/proc/*/ns/net``) and those bind-mounted by ``ip netns add`` (``/run/netns/*``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from closewait_trace.facts.enrich import (
    _NLMSGHDR,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    PROC,
    SOCK_DIAG_BY_FAMILY,
    DiagSocket,
    TcpState,
    _pids,
    diag_request,
    diag_sockets,
    find_by_tuple,
    normalize_addr,
    open_sock_diag,
    parse_diag_messages,
)
from closewait_trace.errors import EnrichError, UsageError

__all__ = [
    "NetnsDiag",
    "NetnsInfo",
    "list_netns",
    "netns_inode",
    "open_sock_diag_in",
    "own_netns_inode",
    "parse_ns_link",
    "resolve_netns",
    "diag_lookup",
    "socket_netns_inode",
]

CLONE_NEWNET = 0x40000000
#: ioctl on a socket: a new fd referring to the socket's network namespace (Linux 4.9+).
SIOCGSKNS = 0x894C
RUN_NETNS = Path("/run/netns")
_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True)
class NetnsInfo:
    """A network namespace of the host: a path that opens it, its ``ip netns`` names and the
    processes in it (sorted)."""

    inode: int
    path: str
    names: tuple[str, ...] = ()
    pids: tuple[int, ...] = field(default=(), repr=False)


def parse_ns_link(text: str) -> int | None:
    """The inode of a namespace link target ``"net:[4026531833]"``, or None."""
    kind, sep, rest = text.partition(":[")
    if not sep or not kind or not rest.endswith("]") or not rest[:-1].isdigit():
        return None
    return int(rest[:-1])


def netns_inode(pid: int, proc_root: Path = PROC) -> int | None:
    """The network namespace inode of a process, or None if it is gone or unreadable."""
    try:
        return os.stat(f"{os.fspath(proc_root)}/{pid}/ns/net").st_ino
    except OSError:
        return None


def own_netns_inode() -> int:
    """The network namespace inode of this process."""
    return os.stat("/proc/self/ns/net").st_ino


def socket_netns_inode(sock: socket.socket) -> int:
    """The namespace a socket belongs to (SIOCGSKNS), whatever thread made it."""
    ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(ns_fd).st_ino
    finally:
        os.close(ns_fd)


def _bound_netns(run_netns: Path, nsfs_dev: int) -> dict[int, list[tuple[str, str]]]:
    """inode -> [(name, path)] of ``ip netns`` bind mounts (files that are not nsfs mounts,
    left behind by a failed ``ip netns``, are skipped)."""
    out: dict[int, list[tuple[str, str]]] = {}
    try:
        names = sorted(os.listdir(run_netns))
    except OSError:
        return out
    for name in names:
        path = os.fspath(run_netns / name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_dev == nsfs_dev:
            out.setdefault(st.st_ino, []).append((name, path))
    return out


def list_netns(proc_root: Path = PROC, run_netns: Path = RUN_NETNS) -> dict[int, NetnsInfo]:
    """Every network namespace a process is in or ``ip netns`` holds, by inode."""
    nsfs_dev = os.stat(f"{os.fspath(proc_root)}/self/ns/net").st_dev
    pids_of: dict[int, list[int]] = {}
    for pid in _pids(proc_root):
        inode = netns_inode(pid, proc_root)
        if inode is not None:
            pids_of.setdefault(inode, []).append(pid)
    bound = _bound_netns(run_netns, nsfs_dev)
    out: dict[int, NetnsInfo] = {}
    for inode in pids_of.keys() | bound.keys():
        pids = tuple(sorted(pids_of.get(inode, ())))
        mounts = bound.get(inode, [])
        path = mounts[0][1] if mounts else f"{os.fspath(proc_root)}/{pids[0]}/ns/net"
        out[inode] = NetnsInfo(inode=inode, path=path, names=tuple(n for n, _ in mounts),
                               pids=pids)
    return out


def resolve_netns(text: str, run_netns: Path = RUN_NETNS) -> int:
    """The namespace inode a user's ``--netns`` value names: an inode (``4026532179``),
    ``net:[INODE]``, a path (``/proc/PID/ns/net``, ``/run/netns/NAME``) or an ``ip netns``
    name.  Raises :class:`UsageError` for anything else or a path that is no namespace."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    inode = parse_ns_link(text)
    if inode is not None and text.startswith("net:"):
        return inode
    if not text:
        raise UsageError(f"--netns {text!r}: not a namespace inode, path or name")
    path = Path(text) if os.sep in text else run_netns / text
    nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"--netns {text!r}: {exc.strerror or exc}") from exc
    if st.st_dev != nsfs_dev:
        raise UsageError(f"--netns {text!r}: {path} is not a namespace")
    return st.st_ino


# --------------------------------------------------------------------------- entering a namespace

_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, nstype)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_in(path: str, expect_inode: int | None) -> socket.socket:
    """Runs in a throw-away thread: enter the namespace at ``path``, open the socket there."""
    ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        inode = os.fstat(ns_fd).st_ino
        if expect_inode is not None and inode != expect_inode:
            raise EnrichError(f"{path} is network namespace {inode} now, not {expect_inode}")
        _setns(ns_fd, CLONE_NEWNET)
    finally:
        os.close(ns_fd)
    sock = open_sock_diag()
    if socket_netns_inode(sock) != inode:  # cannot happen unless setns lied
        sock.close()
        raise EnrichError(f"sock_diag socket for {path} is not in network namespace {inode}")
    return sock


def open_sock_diag_in(path: str, expect_inode: int | None = None) -> socket.socket:
    """A sock_diag netlink socket bound to the network namespace at ``path``
    (``/proc/PID/ns/net`` or ``/run/netns/NAME``); with ``expect_inode``, refused unless the
    path still is that namespace (a pid can be reused).  The calling thread's own namespace
    never changes.  Needs CAP_SYS_ADMIN.  Raises :class:`EnrichError`."""
    box: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            box.append(_open_in(path, expect_inode))
        except BaseException as exc:  # handed to the caller's thread
            box.append(exc)

    helper = threading.Thread(target=run, name="closewait-netns", daemon=True)
    helper.start()
    helper.join()
    result = box[0]
    if isinstance(result, EnrichError):
        raise result
    if isinstance(result, OSError):
        raise EnrichError(f"cannot open sock_diag in network namespace {path}: "
                          f"{result.strerror or result}") from result
    if isinstance(result, BaseException):
        raise result
    return result


# --------------------------------------------------------------------------- one socket, no dump

_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = frozenset(int(s) for s in TcpState)


def _packed(family: int, text: str) -> bytes:
    addr = ipaddress.ip_address(normalize_addr(text))
    if family == socket.AF_INET6 and addr.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{addr}").packed
    return addr.packed.ljust(16, b"\0")


def diag_lookup(nl: socket.socket, family: int, laddr: str, lport: int, raddr: str,
                rport: int, netns: int | None = None) -> DiagSocket | None:
    """The connection with this 4-tuple in ``nl``'s namespace (marked as found in ``netns``),
    by the kernel's hash lookup
    (a request without NLM_F_DUMP: the kernel finds the one socket, it walks no table), or
    None.  An IPv4 connection is found asked either way (AF_INET, or AF_INET6 with mapped
    addresses), whichever family its socket has.  Not for
    listeners (the kernel would answer with a listener of the local port).  Raises
    :class:`EnrichError` when netlink fails; the caller serialises use of ``nl``."""
    try:
        src, dst = _packed(family, laddr), _packed(family, raddr)
    except ValueError:
        return None  # not an address: no such socket
    req = diag_request(family, 0xFFFFFFFF, lport, rport, src, dst, (_NOCOOKIE, _NOCOOKIE))
    try:
        nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                               0, 0) + req)
        buf = nl.recv(1 << 16)
    except OSError as exc:
        raise EnrichError(f"sock_diag lookup failed: {exc}") from exc
    if len(buf) >= _NLMSGHDR.size + 4 and _NLMSGHDR.unpack_from(buf)[1] == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", buf, _NLMSGHDR.size)
        if err == -errno.ENOENT:
            return None
    found: list[DiagSocket] = []
    parse_diag_messages(buf, _ALL_STATES, found, {}, netns)
    return find_by_tuple(found, family, laddr, lport, raddr, rport)


# --------------------------------------------------------------------------- per-namespace queries


class NetnsDiag:
    """sock_diag in any network namespace of the host, one cached netlink socket per
    namespace inode.

    The socket of a namespace is opened on its first query from a path that
    :meth:`namespaces` found (re-enumerating once when the inode is unknown or its path has
    gone), and dropped by :meth:`namespaces`/:meth:`prune` once no process or bind mount
    holds the namespace any more, or after a failed dump (its buffer may hold the rest of the
    failed answer).  Queries of one namespace are serialised; thread-safe.
    """

    def __init__(self, *, proc_root: Path = PROC, run_netns: Path = RUN_NETNS,
                 opener: Callable[[str, int | None], socket.socket] = open_sock_diag_in
                 ) -> None:
        self.proc_root = proc_root
        self.run_netns = run_netns
        self._opener = opener
        self.host_inode = os.stat(f"{os.fspath(proc_root)}/self/ns/net").st_ino
        self._lock = threading.Lock()
        self._known: dict[int, NetnsInfo] = {}
        self._socks: dict[int, tuple[socket.socket, threading.Lock]] = {}
        self.opened = 0  # sockets opened so far (for tests and metrics)

    # -- namespaces ----------------------------------------------------------------

    def namespaces(self) -> dict[int, NetnsInfo]:
        """Enumerate the host's namespaces now; sockets of vanished ones are closed."""
        found = list_netns(self.proc_root, self.run_netns)
        with self._lock:
            self._known = found
        self.prune(found)
        return found

    def prune(self, live: Collection[int]) -> None:
        """Close the cached sockets of namespaces not in ``live``."""
        with self._lock:
            gone = [inode for inode in self._socks if inode not in live]
            dropped = [self._socks.pop(inode) for inode in gone]
        for sock, _lock in dropped:
            sock.close()

    def cached(self) -> frozenset[int]:
        """Inodes of the namespaces that have an open socket."""
        with self._lock:
            return frozenset(self._socks)

    def close(self) -> None:
        self.prune(())

    # -- queries -------------------------------------------------------------------

    def diag_sockets(self, netns: int, states: Collection[TcpState],
                     families: Collection[int] = _FAMILIES, *, sport: int = 0
                     ) -> list[DiagSocket]:
        """:func:`closewait_trace.facts.enrich.diag_sockets` asked in namespace ``netns``
        (each socket marked as found there). Raises :class:`EnrichError` (also when the
        namespace no longer exists)."""
        sock, lock = self._socket(netns)
        with lock:
            try:
                return diag_sockets(states, families, nl=sock, netns=netns, sport=sport)
            except EnrichError:
                self._drop(netns, sock)
                raise

    def lookup(self, netns: int, family: int, laddr: str, lport: int, raddr: str,
               rport: int) -> DiagSocket | None:
        """One connection of namespace ``netns`` by its 4-tuple (:func:`diag_lookup`)."""
        sock, lock = self._socket(netns)
        with lock:
            try:
                return diag_lookup(sock, family, laddr, lport, raddr, rport, netns)
            except EnrichError:
                self._drop(netns, sock)
                raise

    def listeners(self, netns: int, families: Collection[int] = _FAMILIES) -> list[DiagSocket]:
        """The LISTEN sockets of namespace ``netns`` (``rqueue`` = accept queue)."""
        return self.diag_sockets(netns, (TcpState.LISTEN,), families)

    def each(self, states: Collection[TcpState], netns: Iterable[int] | None = None,
             families: Collection[int] = _FAMILIES) -> dict[int, list[DiagSocket]]:
        """Dumps of several namespaces (all of the host's when ``netns`` is None); a
        namespace that vanished meanwhile is left out."""
        wanted = list(self.namespaces()) if netns is None else list(netns)
        out: dict[int, list[DiagSocket]] = {}
        for inode in wanted:
            try:
                out[inode] = self.diag_sockets(inode, states, families)
            except EnrichError:
                if self._path_of(inode, rescan=False) is not None:
                    raise
        return out

    # -- sockets -------------------------------------------------------------------

    def _socket(self, netns: int) -> tuple[socket.socket, threading.Lock]:
        with self._lock:
            entry = self._socks.get(netns)
        if entry is not None:
            return entry
        if netns == self.host_inode:
            sock = open_sock_diag()
        else:
            sock = self._open_elsewhere(netns)
        with self._lock:
            entry = self._socks.get(netns)
            if entry is None:  # another thread may have opened one meanwhile
                entry = self._socks[netns] = (sock, threading.Lock())
                self.opened += 1
        if entry[0] is not sock:
            sock.close()
        return entry

    def _open_elsewhere(self, netns: int) -> socket.socket:
        for rescan in (False, True):
            path = self._path_of(netns, rescan)
            if path is None:
                continue
            try:
                return self._opener(path, netns)
            except EnrichError:
                if rescan:
                    raise
        raise EnrichError(f"network namespace {netns} does not exist (any more)")

    def _path_of(self, netns: int, rescan: bool) -> str | None:
        if rescan:
            self.namespaces()
        with self._lock:
            info = self._known.get(netns)
        return info.path if info is not None else None

    def _drop(self, netns: int, sock: socket.socket) -> None:
        with self._lock:
            entry = self._socks.get(netns)
            if entry is not None and entry[0] is sock:
                del self._socks[netns]
        sock.close()
