"""Socket workloads for the scale test, the churn test and the soak: real servers and clients
on loopback, each in its own process (the tracer sees owners and peers as different processes,
as in production).

Every role prints `PORT n` (servers) or `READY` once it is set up, `LEAK local remote` for each
connection it leaves in CLOSE_WAIT on purpose (a leak the tracer must flag), and `DONE n` when
a client finished its `n` connections. The parent (Role) reads those lines.

    python -m bench.load server --mode echo-close
    python -m bench.load churn --port P --count 50000 --mode client-first --leak-every 10000
    python -m bench.load listen --backlog 10000            (never accepts)
    python -m bench.load connect-close --port P --count 10000
    python -m bench.load hold --port P --count 10000       (keeps what the server closes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


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


# --- roles ----------------------------------------------------------------------------------


def role_server(mode: str, backlog: int) -> None:
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


def role_hold(port: int, count: int) -> None:
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


# --- the parent's side ----------------------------------------------------------------------


@dataclass
class Role:
    """One role in a child process; its LEAK lines are collected as they come."""

    args: Sequence[str]
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    leaks: list[tuple[str, str]] = field(default_factory=list)
    done: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done_event: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Role:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.load", *self.args],
                                     stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        if self.args[0] in ("server", "listen"):
            line = self.proc.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"bench.load {self.args[0]} did not start: {line!r}")
            self.port = int(line.split()[1])
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts[:1] == ["LEAK"] and len(parts) == 3:
                with self._lock:
                    self.leaks.append((parts[1], parts[2]))
            elif parts[:1] == ["DONE"]:
                self.done = int(parts[1])
                self._done_event.set()
        self._done_event.set()

    def wait_done(self, timeout: float) -> None:
        if not self._done_event.wait(timeout) or self.done is None:
            code = self.proc.poll() if self.proc else None
            raise RuntimeError(f"bench.load {' '.join(self.args)} did not finish "
                               f"in {timeout:.0f} s (exit code {code})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def leaked(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.leaks)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class JsonTracer:
    """`closewait-trace --json` in a subprocess, its records tallied as they arrive: leaks
    by 4-tuple (and when `want` of them had come), exits by 4-tuple, the summary."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.ready = threading.Event()
        self.leaks: Counter[tuple[str, str]] = Counter()
        self.closes = 0
        #: close records by 4-tuple (for the report on a leak that was not flagged)
        self.closed: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.summary: dict[str, Any] | None = None
        self.leak_count = 0
        self.want = 0
        self.first_all_at: float | None = None
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            kind = rec.get("type")
            if kind == "ready":
                self.ready.set()
            elif kind == "leak":
                c = rec["connection"]
                with self.lock:
                    self.leaks[(c["local"], c["remote"])] += 1
                self.leak_count += 1
                if self.want and self.leak_count >= self.want and self.first_all_at is None:
                    self.first_all_at = time.monotonic()
            elif kind in ("close", "lost"):
                self.closes += 1
                c = rec["connection"]
                with self.lock:
                    self.closed.setdefault((c["local"], c["remote"]), []).append(
                        {"type": kind, "exit": c.get("exit"), "cw_age_s": c.get("cw_age_s"),
                         "pid": c.get("pid"), "accepted": c.get("accepted")})
            elif kind == "summary":
                self.summary = rec

    def cpu_s(self) -> float:
        try:
            f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        time.sleep(0.5)


class Sysctls:
    """Set sysctls for the duration of a `with` block, restoring the old values after."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.old: dict[str, str] = {}

    @staticmethod
    def _path(name: str) -> Path:
        return Path("/proc/sys") / name.replace(".", "/")

    def __enter__(self) -> Sysctls:
        for name, value in self.values.items():
            p = self._path(name)
            self.old[name] = p.read_text().strip()
            p.write_text(value)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.old.items():
            self._path(name).write_text(value)


#: What 10,000+ sockets queued on one listener need (6.18's default somaxconn is 4096).
SCALE_SYSCTLS = {"net.core.somaxconn": "65535", "net.ipv4.tcp_max_syn_backlog": "65535"}


Result = tuple[dict[str, Any], list[str]]


def run_command(name: str, ap: argparse.ArgumentParser, argv: Sequence[str] | None,
                run: Callable[[argparse.Namespace], Result],
                report: Callable[[dict[str, Any], list[str], Sequence[str]], str]) -> int:
    """main() of bench.scale and bench.soak: parse, check root, run, write and print the
    report. Exit codes: 0 every target met, 1 one missed, 2 set-up error."""
    ap.add_argument("--closewait-trace", metavar="PATH",
                    help="the tracer to run (default .venv/bin/closewait-trace)")
    ap.add_argument("-o", "--output", type=Path,
                    help=f"the report (default bench/results/{name}-<date>.md)")
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(args_list)
    if os.geteuid() != 0:
        print(f"bench.{name}: needs root (BPF)", file=sys.stderr)
        return 2
    try:
        res, misses = run(args)
    except (RuntimeError, OSError) as exc:
        print(f"bench.{name}: error: {exc}", file=sys.stderr)
        return 2
    text = report(res, misses, args_list)
    out = args.output or (REPO / "bench" / "results" / f"{name}-{dt.date.today().isoformat()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"report written to {out}", file=sys.stderr)
    return 1 if misses else 0


def find_closewait() -> str:
    venv = REPO / ".venv" / "bin" / "closewait-trace"
    return str(venv) if venv.exists() else "closewait-trace"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("server")
    p.add_argument("--mode", choices=("echo-close", "close-now"), default="echo-close")
    p.add_argument("--backlog", type=int, default=4096)
    p = sub.add_parser("listen")
    p.add_argument("--backlog", type=int, default=4096)
    p = sub.add_parser("churn")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mode", choices=("client-first", "server-first"), default="client-first")
    p.add_argument("--leak-every", type=int, default=0)
    for name in ("connect-close", "hold"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--count", type=int, required=True)
    a = ap.parse_args(argv)
    if a.role == "server":
        role_server(a.mode, a.backlog)
    elif a.role == "listen":
        role_listen(a.backlog)
    elif a.role == "churn":
        role_churn(a.port, a.count, a.mode, a.leak_every)
    elif a.role == "connect-close":
        role_connect_close(a.port, a.count)
    elif a.role == "hold":
        role_hold(a.port, a.count)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
