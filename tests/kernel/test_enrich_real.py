"""closewait_trace.facts.enrich against the running kernel: real loopback sockets, no BPF.

These need root only for reading every process's /proc entries; sock_diag itself works
unprivileged.  Each test binds its own ephemeral port (port 0) and filters on it, so
other loopback traffic on the machine does not matter.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from closewait_trace.facts.enrich import (
    DiagSocket,
    ProcessIndex,
    SocketOwner,
    TcpState,
    diag_sockets,
    find_by_tuple,
    listeners,
    listeners_with_owners,
    open_files,
    pid_alive,
)

#: /proc and sock_diag of the running kernel, no BPF: the VM matrix runs it once per kernel.
pytestmark = pytest.mark.per_kernel

T = TypeVar("T")

FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"),
    pytest.param(socket.AF_INET6, "::1", id="ipv6"),
]


def _need(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("CLOSEWAIT_REQUIRE_KERNEL") == "1":
        pytest.fail(f"required kernel test cannot run: {why}")
    pytest.skip(why)


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
def _privileges() -> None:
    _need(os.geteuid() == 0, "needs root (to read every process's /proc/PID/fd)")


@pytest.fixture()
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as es:
        yield es


def wait_until(fetch: Callable[[], T], ok: Callable[[T], bool], timeout: float = 3.0) -> T:
    """Poll ``fetch`` until ``ok`` accepts its value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout}s (last value {value!r})")
        time.sleep(0.01)


def queue_is(n: int) -> Callable[[DiagSocket | None], bool]:
    return lambda s: s is not None and s.rqueue == n


def count_is(n: int) -> Callable[[list[DiagSocket]], bool]:
    return lambda found: len(found) == n


def make_listener(
    stack: contextlib.ExitStack, family: int, addr: str, backlog: int = 5
) -> tuple[socket.socket, int]:
    if family == socket.AF_INET6:
        _need(_ipv6_loopback_works(), "no IPv6 loopback (::1) on this machine")
    lsock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    lsock.bind((addr, 0))
    lsock.listen(backlog)
    port: int = lsock.getsockname()[1]
    return lsock, port


def connect(stack: contextlib.ExitStack, family: int, addr: str, port: int) -> socket.socket:
    client = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    client.connect((addr, port))
    return client


def local_port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def my_listener(port: int) -> DiagSocket | None:
    found = [s for s in listeners() if s.lport == port]
    assert len(found) <= 1
    return found[0] if found else None


def close_waits(port: int) -> list[DiagSocket]:
    return [s for s in diag_sockets({TcpState.CLOSE_WAIT}) if s.lport == port]


def my_comm() -> str:
    with open("/proc/self/comm") as fh:
        return fh.read().rstrip("\n")


@pytest.mark.kernel
@pytest.mark.parametrize(("family", "addr"), FAMILIES)
def test_listener_shows_accept_queue_and_backlog(
    stack: contextlib.ExitStack, family: int, addr: str
) -> None:
    lsock, port = make_listener(stack, family, addr, backlog=5)
    for _ in range(3):
        connect(stack, family, addr, port)

    listener = wait_until(lambda: my_listener(port), queue_is(3))
    assert listener is not None
    assert listener.state == TcpState.LISTEN
    assert listener.family == family
    assert listener.laddr == addr
    assert (listener.rqueue, listener.wqueue) == (3, 5)
    assert listener.inode == os.fstat(lsock.fileno()).st_ino
    assert listener.uid == os.geteuid()
    assert listener.cookie != 0

    index = ProcessIndex()
    mine = [entry for entry in listeners_with_owners(index) if entry.lport == port]
    assert len(mine) == 1
    assert (mine[0].queue, mine[0].backlog) == (3, 5)
    assert SocketOwner(os.getpid(), lsock.fileno(), my_comm()) in mine[0].owners


@pytest.mark.kernel
@pytest.mark.parametrize(("family", "addr"), FAMILIES)
def test_unaccepted_close_wait_sockets_have_no_inode(
    stack: contextlib.ExitStack, family: int, addr: str
) -> None:
    _lsock, port = make_listener(stack, family, addr, backlog=5)
    clients = [connect(stack, family, addr, port) for _ in range(3)]
    client_ports = {local_port(c) for c in clients}
    wait_until(lambda: my_listener(port), queue_is(3))
    for client in clients:
        client.close()

    stuck = wait_until(lambda: close_waits(port), count_is(3))
    assert {s.rport for s in stuck} == client_ports
    for sock in stuck:
        assert sock.family == family
        assert sock.state == TcpState.CLOSE_WAIT
        assert (sock.laddr, sock.raddr) == (addr, addr)
        assert sock.inode == 0, "a never-accepted socket has no struct socket"
        assert not sock.accepted
        assert sock.rqueue == 1, "the unread FIN counts as one byte in the receive queue"
        assert sock.eof_unread is True
        assert sock.wqueue == 0
    assert len({s.cookie for s in stuck}) == 3

    # They stay in the accept queue: the listener still counts them.
    listener = my_listener(port)
    assert listener is not None and (listener.rqueue, listener.wqueue) == (3, 5)

    # The tuple a tracer reports finds the socket (server side: local = listener port).
    some = next(iter(client_ports))
    hit = find_by_tuple(stuck, family, addr, port, addr, some)
    assert hit is not None and hit.rport == some

    # Nothing in /proc can own them.
    assert ProcessIndex().owners(0) == []


@pytest.mark.kernel
@pytest.mark.parametrize(("family", "addr"), FAMILIES)
def test_accepted_close_wait_socket_has_inode_and_owner(
    stack: contextlib.ExitStack, family: int, addr: str
) -> None:
    lsock, port = make_listener(stack, family, addr, backlog=5)
    client = connect(stack, family, addr, port)
    client.sendall(b"hello")
    conn, _peer = lsock.accept()
    stack.enter_context(conn)
    client_port = local_port(client)
    client.close()

    (stuck,) = wait_until(lambda: close_waits(port), count_is(1))
    assert stuck.rport == client_port
    assert stuck.inode != 0 and stuck.accepted
    assert stuck.inode == os.fstat(conn.fileno()).st_ino
    assert stuck.uid == os.geteuid()
    assert stuck.rqueue == len(b"hello") + 1  # unread data plus the FIN

    index = ProcessIndex()
    assert SocketOwner(os.getpid(), conn.fileno(), my_comm()) in index.owners(stuck.inode)
    assert pid_alive(os.getpid())

    # Reading the EOF consumes the FIN: still CLOSE_WAIT, but nothing left to read.
    assert conn.recv(100) == b"hello"
    assert conn.recv(100) == b""
    (after_eof,) = close_waits(port)
    assert after_eof.inode == stuck.inode
    assert after_eof.rqueue == 0 and after_eof.eof_unread is False

    # Closing the fd ends CLOSE_WAIT and the index stops naming us (hits are re-checked).
    fd = conn.fileno()
    conn.close()
    wait_until(lambda: close_waits(port), count_is(0))
    assert all(o.fd != fd or o.pid != os.getpid() for o in index.owners(stuck.inode))


@pytest.mark.kernel
def test_dual_stack_socket_reports_ipv4_text(stack: contextlib.ExitStack) -> None:
    _need(_ipv6_loopback_works(), "no IPv6 on this machine")
    lsock = stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lsock.bind(("::ffff:127.0.0.1", 0))  # loopback only, reachable over IPv4
    lsock.listen(5)
    port: int = lsock.getsockname()[1]
    client = connect(stack, socket.AF_INET, "127.0.0.1", port)
    client_port = local_port(client)
    client.close()

    (stuck,) = wait_until(lambda: close_waits(port), count_is(1))
    assert stuck.family == socket.AF_INET6
    assert (stuck.laddr, stuck.raddr) == ("127.0.0.1", "127.0.0.1")
    # Only the AF_INET6 dump has it.
    v4_only = diag_sockets({TcpState.CLOSE_WAIT}, (socket.AF_INET,))
    assert not [s for s in v4_only if s.lport == port]
    for fam, text in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::ffff:127.0.0.1")):
        hit = find_by_tuple([stuck], fam, text, port, text, client_port)
        assert hit == stuck


@pytest.mark.kernel
@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_the_kernel_reports_only_the_sockets_of_the_local_port_asked_for(
        stack: contextlib.ExitStack, family: int, addr: str) -> None:
    """sport: the dump request's source port keeps the listener and its connections, and
    leaves out the clients' ends (their local ports are others) and every other socket."""
    lsock, port = make_listener(stack, family, addr)
    clients = [connect(stack, family, addr, port) for _ in range(3)]
    served = [stack.enter_context(lsock.accept()[0]) for _ in clients]
    states = set(TcpState)
    mine = diag_sockets(states, sport=port)
    assert mine and {s.lport for s in mine} == {port}
    assert {s.inode for s in mine} == {os.fstat(x.fileno()).st_ino for x in [lsock, *served]}
    everything = diag_sockets(states)
    assert {local_port(c) for c in clients} <= {s.lport for s in everything}  # there, unasked
    theirs = diag_sockets(states, sport=local_port(clients[0]))  # (the port may be reused
    assert {s.lport for s in theirs} == {local_port(clients[0])}  # toward other peers too)
    assert port in {s.rport for s in theirs}
    assert len(everything) > len(mine)


@pytest.mark.kernel
def test_open_files_of_own_process() -> None:
    count, limit = open_files(os.getpid())
    listed = len(os.listdir("/proc/self/fd"))  # includes the fd used for the listing
    assert abs(count - listed) <= 2
    assert limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.mark.kernel
def test_open_files_counts_new_descriptors(stack: contextlib.ExitStack) -> None:
    before, _ = open_files(os.getpid())
    for _ in range(10):
        stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    after, _ = open_files(os.getpid())
    assert after - before == 10


@pytest.mark.kernel
def test_process_index_refresh_is_fast() -> None:
    index = ProcessIndex()
    index.refresh()
    best = min(_timed(index.refresh) for _ in range(5))
    # Generous bound for a loaded CI box; the brief's budget is 50 ms for a few hundred
    # processes.
    assert best < 0.5, f"ProcessIndex.refresh took {best * 1000:.1f} ms"


def _timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
