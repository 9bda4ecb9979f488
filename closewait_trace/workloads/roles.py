"""The roles: small real servers and clients, each run in a child process.

    python -m closewait_trace.workloads ROLE [ARGS...]

Servers print "PORT n"; those built on `_listen` then wait for a line on stdin before they
listen, and print "LISTENING" once they do. A client marked ready prints "READY" once set up.
The load roles print "LEAK local remote" for each connection they leave in CLOSE_WAIT on
purpose and "DONE n" once a client has made its n connections. With CLOSEWAIT_DEMO_GATE=1 in
the environment, any role first prints "WAITING" and waits for a line on stdin (the parent
starts clients once the tracer is attached: then they are started up, and a burst is one); with CLOSEWAIT_DEMO_PARENT=PID, a role dies with that parent.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

LOOPBACK = "127.0.0.1"


def _say(line: str) -> None:
    print(line, flush=True)


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, n)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def _ep(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


# --- the mixed demo's roles and the test servers -------------------------------------------


def _listen(backlog: int, prepare: Callable[[], None] | None = None) -> socket.socket:
    """Bind, say the port, and listen once the parent says "go" on stdin (after the tracer
    attached, so that it sees listen() and every accept()); `prepare` runs just before
    listen(). Says "LISTENING" once listening."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOOPBACK, 0))
    print(f"PORT {srv.getsockname()[1]}", flush=True)
    if not sys.stdin.readline():
        sys.exit(0)  # the parent went away before saying go
    if prepare is not None:
        prepare()
    srv.listen(backlog)
    print("LISTENING", flush=True)
    return srv


def role_never_accept() -> None:
    """Listen and never accept: connections finish the handshake and wait in the queue."""
    srv = _listen(64)
    _sleep_forever()
    srv.close()


def role_no_close() -> None:
    """Accept and keep every connection, never reading or closing it (a forgotten close)."""
    srv = _listen(64)
    kept = []
    while True:
        conn, _ = srv.accept()
        kept.append(conn)


def role_healthy() -> None:
    """Accept, read to EOF, close."""
    srv = _listen(64)
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv(4096):
                pass


def role_server(family: int, accept: bool, close_after: float | None, backlog: int) -> None:
    """A configurable server: accept or not; after reading EOF, close after `close_after`
    seconds, or never (None); a negative close_after closes right after accept, without
    reading (the server closes first). One connection at a time, like a blocking handler."""
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::1" if family == socket.AF_INET6 else LOOPBACK, 0))
    srv.listen(backlog)
    print(f"PORT {srv.getsockname()[1]}", flush=True)
    kept = []
    while True:
        if not accept:
            time.sleep(3600)
            continue
        conn, _ = srv.accept()
        if close_after is None:
            kept.append(conn)
            continue
        if close_after < 0:
            conn.close()
            continue
        while conn.recv(4096):
            pass
        time.sleep(close_after)
        conn.close()


def role_idle_closer(idle_s: float) -> None:
    """A server that closes connections idle for idle_s (like a keep-alive timeout)."""
    srv = _listen(64)
    srv.settimeout(0.05)
    conns: list[tuple[socket.socket, float]] = []
    while True:
        try:
            conn, _ = srv.accept()
            conns.append((conn, time.monotonic()))
        except TimeoutError:
            pass
        now = time.monotonic()
        for c, t in list(conns):
            if now - t >= idle_s:
                c.close()
                conns.remove((c, t))


def role_pool_client(port: int, count: int) -> None:
    """Open `count` pooled connections and never notice the server closing them."""
    pool = [socket.create_connection((LOOPBACK, port)) for _ in range(count)]
    print("READY", flush=True)
    _sleep_forever()
    del pool


def role_clients(ports: Sequence[int], leaky: Sequence[int], leaks: int, period: float) -> None:
    """Connect, send a line and close, round robin; at most `leaks` connections to each
    port in `leaky`, healthy ports forever."""
    sent = {p: 0 for p in ports}
    while True:
        for port in ports:
            if port in leaky and sent[port] >= leaks:
                continue
            try:
                with socket.create_connection((LOOPBACK, port), timeout=2) as c:
                    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    time.sleep(0.1)
                sent[port] += 1
            except OSError:
                pass
        time.sleep(period)


# --- scenario roles (scenarios.py) -------------------------------------------------------

#: Objects a role keeps only so that they stay open (CPython closes a socket or file when
#: its last reference goes).
_kept: list[object] = []


def _request(size: int) -> bytes:
    """A request of exactly `size` bytes."""
    head = b"GET / HTTP/1.0\r\n"
    return (head + b"x" * max(0, size - len(head)))[:size]


def _serve_in_thread(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    threading.Thread(target=handler, args=(conn,), daemon=True).start()


def role_fd_limit_server(nofile: int, backlog: int) -> None:
    """Seed 000: a process at its open-files limit. Fill the fd table up to RLIMIT_NOFILE
    (/dev/null until EMFILE, kept open), then listen and retry accept() on EMFILE: every
    connection completes in the kernel and waits in the accept queue, which fills up."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    def fill_fd_table() -> None:
        while True:
            try:
                _kept.append(open(os.devnull, "rb"))
            except OSError:
                return

    srv = _listen(backlog, prepare=fill_fd_table)
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:  # EMFILE: retry a little later, as servers' accept loops do
            time.sleep(0.1)
            continue
        _kept.append(conn)


def role_forgetful_server() -> None:
    """Seed 004/000: thread per connection; the handler reads until EOF and returns
    without close(), the socket still referenced (kept in a list)."""

    def handler(conn: socket.socket) -> None:
        _kept.append(conn)
        while conn.recv(4096):
            pass
        return  # the bug: no conn.close()

    srv = _listen(64)
    while True:
        conn, _ = srv.accept()
        _serve_in_thread(handler, conn)


def _accept_queue(listener: socket.socket) -> int:
    """Connections waiting in a listener's accept queue: Linux reports it for a listening
    socket as TCP_INFO's tcpi_unacked (after 8 bytes of u8 fields and 4 u32s)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], sys.byteorder)


def role_et_server(limit: int, burst: int, max_wait: float) -> None:
    """Seed 003: a non-blocking listener in an edge-triggered epoll set. Over the connection
    limit, the accept loop closes the new connection and breaks out without draining the
    queue to EAGAIN, so the connections behind it get no new edge and are never accepted.
    The first poll waits until the `limit` allowed connections and the `burst` are all queued
    (at most `max_wait` s), so that the burst is one edge however slowly its clients come (one
    at a time, each would be its own edge, accepted and closed)."""
    srv = _listen(511)
    srv.setblocking(False)
    ep = select.epoll()
    ep.register(srv.fileno(), select.EPOLLIN | select.EPOLLET)
    conns: dict[int, socket.socket] = {}
    deadline = time.monotonic() + max_wait
    while _accept_queue(srv) < limit + burst and time.monotonic() < deadline:
        time.sleep(0.02)
    while True:
        for fd, _events in ep.poll():
            if fd == srv.fileno():
                while True:
                    try:
                        conn, _ = srv.accept()
                    except BlockingIOError:
                        break  # drained: the right way out
                    if len(conns) >= limit:
                        conn.close()
                        break  # the bug: `return` before EAGAIN (should be `continue`)
                    conn.setblocking(False)
                    conns[conn.fileno()] = conn
                    ep.register(conn.fileno(), select.EPOLLIN | select.EPOLLET)
                continue
            conn = conns[fd]
            while True:
                try:
                    data = conn.recv(4096)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    ep.unregister(fd)
                    del conns[fd]
                    conn.close()
                    break


def role_slow_server(delay: float) -> None:
    """Seed 001 (C3): thread per connection; the handler takes `delay` seconds before it
    reads the request, and by then the client has given up and closed."""

    def handler(conn: socket.socket) -> None:
        with conn:
            time.sleep(delay)
            while conn.recv(4096):
                pass

    srv = _listen(64)
    while True:
        conn, _ = srv.accept()
        _serve_in_thread(handler, conn)


def role_sequential_server(backlog: int, service: float) -> None:
    """Seed 001 (C4): one connection at a time, `service` seconds each, behind a large
    backlog: connections wait in the accept queue longer than their clients do."""
    srv = _listen(backlog)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)  # the request (it is there even if the client has gone)
            time.sleep(service)


def _await_replies(socks: list[socket.socket], patience: float) -> None:
    """Wait up to `patience` for the server; close a connection as soon as the server closes
    or resets it (a client that reads), and every other one at the end."""
    deadline = time.monotonic() + patience
    live = list(socks)
    while live:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select(live, [], [], left)
        for c in readable:
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            if not data:
                c.close()
                live.remove(c)
    for c in live:
        c.close()


def role_burst(port: int, count: int, size: int, patience: float, period: float, rounds: int,
               connect_timeout: float) -> None:
    """Clients: each round opens `count` connections one after the other (each connect waits
    up to `connect_timeout`), sends `size` bytes on each, waits up to `patience` for the
    server, then closes them; a round starts every `period` seconds, `rounds` times (0: for
    ever)."""
    done = 0
    while rounds == 0 or done < rounds:
        started = time.monotonic()
        socks = []
        for _ in range(count):
            try:
                c = socket.create_connection((LOOPBACK, port), timeout=connect_timeout)
            except OSError:
                continue  # the server's queue is full: the SYN was dropped
            try:
                c.sendall(_request(size))
            except OSError:
                c.close()
                continue
            socks.append(c)
        _await_replies(socks, patience)
        done += 1
        if rounds == 0 or done < rounds:
            time.sleep(max(0.0, period - (time.monotonic() - started)))
    _sleep_forever()


def role_hold(port: int) -> None:
    """A long-lived client: one connection, kept open until the server closes it."""
    c = socket.create_connection((LOOPBACK, port), timeout=5)
    c.settimeout(None)
    print("READY", flush=True)
    try:
        while c.recv(4096):
            pass
    except OSError:
        pass
    c.close()
    _sleep_forever()


# --- load roles (bench.scale, bench.soak, bench.overhead --incident) ----------------------


def role_load_server(mode: str, backlog: int) -> None:
    """Accept forever. echo-close: read one byte, answer one byte, read to EOF, close (the
    client closes first: this side passes through CLOSE_WAIT for as long as the read takes);
    a connection whose byte is L is kept open instead (in CLOSE_WAIT once the client shuts it
    down: an accepted socket never closed). close-now: close right after accept (the server
    closes first: the client passes through CLOSE_WAIT)."""
    _raise_nofile(65536)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOOPBACK, 0))
    srv.listen(backlog)
    _say(f"PORT {srv.getsockname()[1]}")
    kept: list[socket.socket] = []
    while True:
        conn, _peer = srv.accept()
        if mode == "close-now":
            conn.close()
            continue
        try:
            first = conn.recv(1)
            if not first:
                conn.close()
                continue
            conn.sendall(b"y")
            if first == b"L":
                kept.append(conn)
                continue
            while conn.recv(4096):
                pass
        except OSError:
            pass
        conn.close()


def role_listen(backlog: int) -> None:
    """A listener that never accepts: whatever connects stays in its accept queue."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((LOOPBACK, 0))
    srv.listen(backlog)
    _say(f"PORT {srv.getsockname()[1]}")
    _sleep_forever()


def role_churn(port: int, count: int, mode: str, leak_every: int) -> None:
    """count connections one after another, every leak_every-th one left in CLOSE_WAIT.
    client-first (with an echo-close server): send a byte, wait for the answer, close; a leak
    sends L instead, and is shut down rather than closed: the server keeps it, in CLOSE_WAIT.
    (Were it closed, its orphan would soon turn into a TIME_WAIT socket whose port a later
    connect() may reuse on loopback: the server's socket would then be reset, not leak.)
    server-first (with a close-now server): wait for the server's FIN, then close; a leak is
    kept open instead, in CLOSE_WAIT on this side: an outbound leak of this process."""
    _raise_nofile(65536)
    kept: list[socket.socket] = []
    for i in range(1, count + 1):
        leak = bool(leak_every) and i % leak_every == 0
        c = _connect(port)
        try:
            if mode == "client-first":
                c.sendall(b"L" if leak else b"x")
                c.recv(1)
                if leak:
                    c.shutdown(socket.SHUT_WR)
                    kept.append(c)
                    _say(f"LEAK {_ep(c.getpeername())} {_ep(c.getsockname())}")
                    continue
            else:
                while c.recv(4096):
                    pass
                if leak:
                    kept.append(c)
                    _say(f"LEAK {_ep(c.getsockname())} {_ep(c.getpeername())}")
                    continue
        except OSError:
            pass
        c.close()
    _say(f"DONE {count}")
    _sleep_forever()


def role_connect_close(port: int, count: int) -> None:
    """count connections to a listener that never accepts, each closed at once: every one
    ends in CLOSE_WAIT in the listener's accept queue (a never-accepted leak)."""
    for _ in range(count):
        c = _connect(port)
        _say(f"LEAK {LOOPBACK}:{port} {_ep(c.getsockname())}")
        c.close()
    _say(f"DONE {count}")
    _sleep_forever()


def role_hold_all(port: int, count: int) -> None:
    """count connections to a close-now server, all kept open: every one ends in CLOSE_WAIT
    on this side (an outbound leak, like a pool whose server closed idle connections)."""
    _raise_nofile(count + 1024)
    kept = []
    for _ in range(count):
        c = _connect(port)
        kept.append(c)
        _say(f"LEAK {_ep(c.getsockname())} {LOOPBACK}:{port}")
    _say(f"DONE {count}")
    _sleep_forever()


def _connect(port: int) -> socket.socket:
    for attempt in range(50):
        try:
            return socket.create_connection((LOOPBACK, port), timeout=10)
        except OSError:
            if attempt == 49:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")



def _die_with_parent() -> None:
    """With CLOSEWAIT_DEMO_PARENT set, get SIGTERM when that parent dies (even by SIGKILL)."""
    parent = os.environ.get("CLOSEWAIT_DEMO_PARENT")
    if not parent:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(parent):
        sys.exit(0)  # it died before the prctl




def _family(text: str) -> int:
    return socket.AF_INET6 if text == "6" else socket.AF_INET


def _yes(text: str) -> bool:
    return text == "yes"


def _close_after(text: str) -> float | None:
    return None if text == "never" else -1.0 if text == "now" else float(text)


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


#: Every role: name -> (function, one converter per argument).
ROLES: dict[str, tuple[Callable[..., None], tuple[Callable[[str], object], ...]]] = {
    # the mixed demo
    "never-accept": (role_never_accept, ()),
    "no-close": (role_no_close, ()),
    "healthy": (role_healthy, ()),
    "idle-closer": (role_idle_closer, (float,)),
    "pool-client": (role_pool_client, (int, int)),
    "clients": (role_clients, (_ports, _ports, int, float)),
    # the kernel tests' server: FAMILY(4|6) ACCEPT(yes|no) CLOSE_AFTER(seconds|never|now) BACKLOG
    "server": (role_server, (_family, _yes, _close_after, int)),
    # the scenarios
    "fd-limit-server": (role_fd_limit_server, (int, int)),
    "forgetful-server": (role_forgetful_server, ()),
    "et-server": (role_et_server, (int, int, float)),
    "slow-server": (role_slow_server, (float,)),
    "sequential-server": (role_sequential_server, (int, float)),
    "burst": (role_burst, (int, int, int, float, float, int, float)),
    "hold": (role_hold, (int,)),
    # the benchmarks' load: MODE is echo-close or close-now (server), client-first or
    # server-first (churn)
    "load-server": (role_load_server, (str, int)),
    "listen": (role_listen, (int,)),
    "churn": (role_churn, (int, int, str, int)),
    "connect-close": (role_connect_close, (int, int)),
    "hold-all": (role_hold_all, (int, int)),
}


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _die_with_parent()
    if os.environ.get("CLOSEWAIT_DEMO_GATE") == "1":
        print("WAITING", flush=True)
        if not sys.stdin.readline():
            return 0  # the parent went away before saying go
    if not argv or argv[0] not in ROLES:
        print(f"usage: python -m closewait_trace.workloads ROLE [ARGS]; roles: "
              f"{', '.join(ROLES)}", file=sys.stderr)
        return 2
    fn, kinds = ROLES[argv[0]]
    args = list(argv[1:])
    if len(args) != len(kinds):
        print(f"role {argv[0]} takes {len(kinds)} arguments", file=sys.stderr)
        return 2
    fn(*(kind(a) for kind, a in zip(kinds, args)))
    return 0
