"""A built-in workload for `closewait-trace demo`: real servers and clients in child processes.

The mixed demo (`demo`, `demo --scenario mixed`), each part a small real server with its
client on loopback:
- never-accept: a listener whose process never calls accept(); clients connect and close.
- no-close: a server that accepts and never closes; clients connect and close.
- healthy: a server that accepts, reads to EOF and closes; clients connect and close.
- pool: a client that keeps idle connections to a server that closes idle ones (outbound).

The scenarios of `demo --scenario NAME` (closewait_trace/scenarios.py) run the roles under
"scenario roles" below, one small server and its clients per real-world case.

Run a role by hand with `python -m closewait_trace.demo ROLE [ARGS]`. Servers print
"PORT n"; those built on `_listen` then wait for a line on stdin before they listen, and print
"LISTENING" once they do. With CLOSEWAIT_DEMO_GATE=1 in the environment, any role first waits
for a line on stdin (the parent starts clients once the tracer is attached); with
CLOSEWAIT_DEMO_PARENT=PID, a role dies with that parent.
"""

from __future__ import annotations

import os
import queue
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .errors import CloseWaitError

LOOPBACK = "127.0.0.1"


class DemoError(CloseWaitError):
    """The demo workload could not start."""


# --- roles (run in child processes) ---------------------------------------------------------


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
    while True:
        time.sleep(3600)
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
    while True:
        time.sleep(3600)
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


# --- scenario roles (closewait_trace/scenarios.py) ------------------------------------------

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


def role_et_server(limit: int, first_poll_delay: float) -> None:
    """Seed 003: a non-blocking listener in an edge-triggered epoll set. Over the connection
    limit, the accept loop closes the new connection and breaks out without draining the
    queue to EAGAIN, so the connections behind it get no new edge and are never accepted.
    The first poll comes `first_poll_delay` after listen(), so a burst coalesces into one
    edge."""
    srv = _listen(511)
    srv.setblocking(False)
    ep = select.epoll()
    ep.register(srv.fileno(), select.EPOLLIN | select.EPOLLET)
    conns: dict[int, socket.socket] = {}
    time.sleep(first_poll_delay)
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
    while True:
        time.sleep(3600)


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
    while True:
        time.sleep(3600)


# --- the workload as seen from the parent ---------------------------------------------------


def spawn_role(args: Sequence[str], *, gated: bool = False) -> subprocess.Popen[str]:
    """`python -m closewait_trace.demo ROLE ARGS...` in its own session (so that a Ctrl-C on
    the terminal reaches only the tracer, which stops it), dying with this process. A gated
    role waits for a line on its stdin before it starts."""
    env = dict(os.environ, CLOSEWAIT_DEMO_PARENT=str(os.getpid()))
    if gated:
        env["CLOSEWAIT_DEMO_GATE"] = "1"
    else:
        env.pop("CLOSEWAIT_DEMO_GATE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "closewait_trace.demo", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )


def stop_processes(procs: Iterable[subprocess.Popen[str]]) -> None:
    """SIGTERM each child's process group, then SIGKILL what is left after 5 s; reap all."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class Children:
    """Named child processes running demo roles. A thread per child reads its stdout into a
    queue of lines, so that waiting for a line can time out and no child blocks on a full
    pipe."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self._lines: dict[str, queue.Queue[str | None]] = {}

    def spawn(self, name: str, args: Sequence[str], *, gated: bool = False) -> subprocess.Popen[str]:
        proc = spawn_role(args, gated=gated)
        self.procs[name] = proc
        lines: queue.Queue[str | None] = queue.Queue()
        self._lines[name] = lines
        threading.Thread(target=self._read, args=(proc, lines), daemon=True,
                         name=f"demo-{name}").start()
        return proc

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.put(line.strip())
        except (OSError, ValueError):
            pass  # closed by stop()
        lines.put(None)

    def expect(self, name: str, word: str, timeout: float = 60.0) -> str:
        """The next line of child `name`, which must start with `word`.

        Returns as soon as the line comes; the limit only bounds a child that never starts (a
        Python child took more than 10 s to start in a software-emulated guest under load)."""
        try:
            line = self._lines[name].get(timeout=timeout)
        except queue.Empty:
            raise DemoError(f"demo {name} did not say {word} within {timeout:.0f}s") from None
        if line is None or not line.startswith(word):
            rc = self.procs[name].poll()
            said = "exited" + (f" with status {rc}" if rc is not None else "") \
                if line is None else f"said {line!r}"
            raise DemoError(f"demo {name} did not start ({said}, expected {word})")
        return line

    def say(self, name: str, line: str = "go") -> None:
        stdin = self.procs[name].stdin
        assert stdin is not None
        try:
            stdin.write(line + "\n")
            stdin.flush()
        except OSError as exc:
            raise DemoError(f"demo {name} has gone ({exc.strerror})") from None

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self) -> None:
        stop_processes(self.procs.values())


@dataclass
class Workload:
    """The demo's child processes; start() returns once every server listens."""

    leaks: int = 2
    period: float = 0.5
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[str]:
        proc = spawn_role(args)
        self.procs[name] = proc
        return proc

    def _port_of(self, name: str, proc: subprocess.Popen[str]) -> int:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("PORT "):
            self.stop()
            raise DemoError(f"demo {name} server did not start (said {line!r})")
        port = int(line.split()[1])
        self.ports[name] = port
        return port

    def start_servers(self) -> None:
        for name in ("never-accept", "no-close", "healthy"):
            self._port_of(name, self._spawn(name, name))
        self._port_of("idle-closer", self._spawn("idle-closer", "idle-closer", "1.0"))

    def start_clients(self) -> None:
        for name in ("never-accept", "no-close", "healthy", "idle-closer"):
            stdin = self.procs[name].stdin
            assert stdin is not None
            stdin.write("go\n")
            stdin.flush()
        time.sleep(0.2)
        ports = [self.ports[n] for n in ("never-accept", "no-close", "healthy")]
        leaky = [self.ports["never-accept"], self.ports["no-close"]]
        self._spawn(
            "clients",
            "clients",
            ",".join(map(str, ports)),
            ",".join(map(str, leaky)),
            str(self.leaks),
            str(self.period),
        )
        pool = self._spawn("pool", "pool-client", str(self.ports["idle-closer"]), str(self.leaks))
        assert pool.stdout is not None
        pool.stdout.readline()

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self) -> None:
        stop_processes(self.procs.values())


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


#: Scenario roles: name -> (function, argument converters).
SCENARIO_ROLES: dict[str, tuple[Callable[..., None], tuple[Callable[[str], object], ...]]] = {
    "fd-limit-server": (role_fd_limit_server, (int, int)),
    "forgetful-server": (role_forgetful_server, ()),
    "et-server": (role_et_server, (int, float)),
    "slow-server": (role_slow_server, (float,)),
    "sequential-server": (role_sequential_server, (int, float)),
    "burst": (role_burst, (int, int, int, float, float, int, float)),
    "hold": (role_hold, (int,)),
}


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _die_with_parent()
    if os.environ.get("CLOSEWAIT_DEMO_GATE") == "1" and not sys.stdin.readline():
        return 0  # the parent went away before saying go
    if not argv:
        print("usage: python -m closewait_trace.demo ROLE [ARGS]", file=sys.stderr)
        return 2
    role, args = argv[0], list(argv[1:])
    if role in SCENARIO_ROLES:
        fn, kinds = SCENARIO_ROLES[role]
        if len(args) != len(kinds):
            print(f"demo role {role} takes {len(kinds)} arguments", file=sys.stderr)
            return 2
        fn(*(kind(a) for kind, a in zip(kinds, args)))
    elif role == "never-accept":
        role_never_accept()
    elif role == "no-close":
        role_no_close()
    elif role == "healthy":
        role_healthy()
    elif role == "server":
        # server FAMILY(4|6) ACCEPT(yes|no) CLOSE_AFTER(seconds|never|now) BACKLOG
        role_server(
            socket.AF_INET6 if args[0] == "6" else socket.AF_INET,
            args[1] == "yes",
            None if args[2] == "never" else -1.0 if args[2] == "now" else float(args[2]),
            int(args[3]),
        )
    elif role == "idle-closer":
        role_idle_closer(float(args[0]))
    elif role == "pool-client":
        role_pool_client(int(args[0]), int(args[1]))
    elif role == "clients":
        ports = [int(p) for p in args[0].split(",")]
        leaky = [int(p) for p in args[1].split(",") if p]
        role_clients(ports, leaky, int(args[2]), float(args[3]))
    else:
        print(f"unknown demo role {role}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
