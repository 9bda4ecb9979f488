"""A built-in workload for `closewait-trace demo`: real servers and clients in child processes.

Scenarios, each a small real server with its client on loopback:
- never-accept: a listener whose process never calls accept(); clients connect and close.
- no-close: a server that accepts and never closes; clients connect and close.
- healthy: a server that accepts, reads to EOF and closes; clients connect and close.
- pool: a client that keeps idle connections to a server that closes idle ones (outbound).

Run a role by hand with `python -m closewait_trace.demo ROLE [ARGS]`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import CloseWaitError

LOOPBACK = "127.0.0.1"


class DemoError(CloseWaitError):
    """The demo workload could not start."""


# --- roles (run in child processes) ---------------------------------------------------------


def _listen(backlog: int) -> socket.socket:
    """Bind, say the port, and listen once the parent says "go" on stdin (after the tracer
    attached, so that it sees listen() and every accept())."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOOPBACK, 0))
    print(f"PORT {srv.getsockname()[1]}", flush=True)
    sys.stdin.readline()
    srv.listen(backlog)
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


# --- the workload as seen from the parent ---------------------------------------------------


@dataclass
class Workload:
    """The demo's child processes; start() returns once every server listens."""

    leaks: int = 2
    period: float = 0.5
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "closewait_trace.demo", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
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
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    role, args = argv[0], list(argv[1:])
    if role == "never-accept":
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
