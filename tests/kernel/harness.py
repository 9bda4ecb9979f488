"""Kernel test harness: the real tracer in a subprocess, real peers in other processes.

Servers run in child processes (closewait_trace.workloads' `server` role) so that the kernel
sees the owner and the peer as different processes, as in production. The tracer driver is
bench/tracer.py's, shared with the benchmarks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.tracer import JsonTracer
from bench.tracer import Record as Record

BACKEND = os.environ.get("CLOSEWAIT_BACKEND", "auto")
#: Seconds to wait for the tracer to compile and attach (slow in emulated VMs).
START_TIMEOUT = float(os.environ.get("CLOSEWAIT_START_TIMEOUT", "240"))


#: PREEMPT_RT: a task can be preempted inside a BPF program, and the kernel then skips the
#: programs that fire meanwhile on that CPU (measured on Debian's 6.1-rt: 5 of 72 accept
#: returns in a burst); the tracer counts what the kernel lets it count (`kernel_skipped`).
PREEMPT_RT = "PREEMPT_RT" in os.uname().version


class Tracer(JsonTracer):
    """`closewait-trace [COMMAND] --json --backend BACKEND ARGS...` in a subprocess (bench's
    JsonTracer); start() returns once it is ready."""

    def __init__(self, args: Sequence[str], command: str | None = None) -> None:
        self.args = list(args)
        self.command = command  # a subcommand (record, demo); None: the live tracer
        sub = [command] if command else []
        super().__init__([sys.executable, "-m", "closewait_trace", *sub, "--json",
                          "--backend", BACKEND, *self.args])

    def start(self, wait: bool = True) -> Tracer:
        """Start it; return once it is ready (at once with wait=False: the caller then
        calls wait_ready and stops it on failure)."""
        super().start()
        if not wait:
            return self
        try:
            self.wait_ready(START_TIMEOUT)
        except BaseException:
            self.stop(timeout=10)  # never leave a tracer behind, its probes still attached
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        return super().stop(sig, timeout)


class StallWatch:
    """The stalls of this machine while the `with` block runs: each time a thread that sleeps
    10 ms at a time woke more than 10 ms late. On a one-CPU guest whose virtual CPU the host
    did not run (the matrix runs two emulated guests on two cores), every process is late by
    that much, the tracer's included; a deadline the tracer must meet is judged on the time it
    was given. The tracer's own work does not stall the thread: a sleeper that wakes runs
    before a busy process."""

    STEP_S = 0.01

    def __init__(self) -> None:
        #: (start, end) of each stall, time.monotonic()
        self.stalls: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc is not None and hasattr(exc, "add_note"):  # Python 3.11 and later
            exc.add_note(f"longest stall of the machine meanwhile: {self.longest_s:.3f} s")

    @property
    def longest_s(self) -> float:
        return max((end - start for start, end in self.stalls), default=0.0)

    def stalled_s(self, start: float, end: float) -> float:
        """How long the machine stalled within [start, end]: the parts of the stalls inside."""
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.stalls)

    def _watch(self) -> None:
        last = time.monotonic()
        while True:
            stopped = self._stop.wait(self.STEP_S)
            now = time.monotonic()
            if now - last > 2 * self.STEP_S:
                self.stalls.append((last + self.STEP_S, now))
            last = now
            if stopped:
                return


@dataclass
class Server:
    """A real server in a child process (closewait_trace.workloads role `server`)."""

    family: int = socket.AF_INET
    accept: bool = True
    close_after: float | None = None
    backlog: int = 16
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    #: time.monotonic() at start: a shared tracer's records about this server come after it
    started: float = 0.0

    @property
    def host(self) -> str:
        return "::1" if self.family == socket.AF_INET6 else "127.0.0.1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "closewait_trace.workloads", "server",
             "6" if self.family == socket.AF_INET6 else "4",
             "yes" if self.accept else "no",
             "never" if self.close_after is None
             else "now" if self.close_after < 0 else str(self.close_after),
             str(self.backlog)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])
        return self

    def since_start(self, pred: Callable[[Record], bool]) -> Callable[[Record], bool]:
        """``pred``, for the records that came after this server started (a port the kernel
        chose may have been another socket's, earlier in a shared tracer's life)."""
        return lambda r: r["_t"] >= self.started and pred(r)

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=5)

    def wait_accepted(self, count: int = 1, timeout: float = 10) -> None:
        """Until the server holds `count` accepted sockets (besides its listener): a test
        that means "accepted before the FIN" must not lean on a sleep."""
        deadline = time.monotonic() + timeout
        while self.socket_fds() < count + 1:
            assert time.monotonic() < deadline, f"server {self.pid} accepted too little"
            time.sleep(0.02)

    def socket_fds(self) -> int:
        fds = Path(f"/proc/{self.pid}/fd")
        return sum(1 for fd in fds.iterdir() if _readlink(fd).startswith("socket:"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def bpftool_perf_list() -> list[dict[str, Any]]:
    """Every BPF program attached through a perf event or raw tracepoint fd, with its holder's
    pid, fd type and tracepoint (bpftool perf list)."""
    out = subprocess.run(["bpftool", "-j", "perf", "list"], check=True, capture_output=True,
                         text=True).stdout
    return list(json.loads(out))


def bpf_prog_ids() -> set[int]:
    """IDs of every BPF program loaded in the kernel (bpftool)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True,
                         text=True).stdout
    return {int(p["id"]) for p in json.loads(out or "[]")}


def prog_ids_of(pid: int) -> set[int]:
    """IDs of the BPF programs a process holds (its fds' /proc fdinfo "prog_id:" lines):
    other processes loading programs meanwhile cannot blur the check."""
    out: set[int] = set()
    fdinfo = f"/proc/{pid}/fdinfo"
    try:
        names = os.listdir(fdinfo)
    except OSError:
        return out
    for name in names:
        try:
            with open(f"{fdinfo}/{name}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        out.add(int(line.split()[1]))
        except (OSError, ValueError):
            continue
    return out


def kprobe_events(name: str = "kprobe_events") -> str:
    """A tracefs kprobe file's text (kprobe_events, kprobe_profile), "" where unreadable."""
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        try:
            with open(f"{base}/{name}") as f:
                return f.read()
        except OSError:
            continue
    return ""


#: A snippet for spawn_script: listens on argv[1] (0: any port), prints the port, never accepts.
NEVER_ACCEPT = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print(s.getsockname()[1], flush=True)
time.sleep(3600)
"""


#: A snippet for spawn_script: accepts one connection and forks; the child keeps the inherited
#: socket open (and prints its pid), the parent closes its copy and waits.
FORK_AND_LEAK = """
import os, socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
pid = os.fork()
if pid == 0:
    s.close()
    print(os.getpid(), flush=True)
    time.sleep(3600)
c.close()
time.sleep(3600)
"""


def spawn_script(code: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """A python snippet in its own process group (so kill_groups ends it and its children),
    stdout piped for what it prints."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin else None, text=True,
                            start_new_session=True)


def listen_never_accepting(procs: list[subprocess.Popen[str]], port: int = 0
                           ) -> tuple[subprocess.Popen[str], int]:
    """A NEVER_ACCEPT server on `port` (0: the kernel picks), kept in `procs`; and its port."""
    p = spawn_script(NEVER_ACCEPT, str(port))
    procs.append(p)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def restart_owns_the_next_leak(t: Tracer, procs: list[subprocess.Popen[str]],
                               started: tuple[subprocess.Popen[str], int] | None) -> None:
    """A never-accepting server (`started`, or one started now) leaks a connection; it is
    killed (its queued socket ends with the listener), another process listens on the same
    port, and the next leak there is the new process's."""
    mark = time.monotonic()
    first, port = started or listen_never_accepting(procs)
    local = f"127.0.0.1:{port}"

    def on_port(kind: str, after: float) -> Callable[[Record], bool]:
        return lambda r: r["type"] == kind and r["_t"] > after \
            and r["connection"]["local"] == local

    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    leak = t.wait_for(on_port("leak", mark), 12, what=f"leak on {local}")
    assert leak["connection"]["pid"] == first.pid
    first.kill()
    first.wait()
    gone = t.wait_for(on_port("close", mark), 8, what="the queued socket ends with its listener")
    assert gone["connection"]["exit"] == "listener-closed", gone
    second, again = listen_never_accepting(procs, port)
    assert again == port
    mark = time.monotonic()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    leak = t.wait_for(on_port("leak", mark), 12, what="leak after the restart")
    assert leak["connection"]["pid"] == second.pid
    assert leak["connection"]["verdict"]["cause"] == "never-accepted"
    assert t.proc is not None and t.proc.poll() is None


def kill_groups(procs: Sequence[subprocess.Popen[str]]) -> None:
    """SIGKILL every process group spawn_script started, and reap the leaders."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


# --- reading the records --------------------------------------------------------------------


def summary_of(records: list[Record]) -> Record:
    return next(r for r in records if r["type"] == "summary")


def stopped_cleanly(t: Tracer, rc: int) -> Record:
    """The summary of a shared tracer that exited with `rc`, after checking it exited 0 and
    lost no event."""
    assert rc == 0, "".join(t.stderr_lines)
    summary = summary_of(t.records)
    assert summary["events_lost"] == 0, {k: v for k, v in summary["lost"].items() if v}
    return summary


def conns(records: list[Record], kind: str,
          pred: Callable[[dict[str, Any]], bool] = lambda c: True) -> list[dict[str, Any]]:
    """The connection of each `kind` record (leak, close...) matching pred, one per socket
    stay (the last record of each)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["type"] == kind and pred(r["connection"]):
            out[r["connection"]["id"]] = r["connection"]
    return list(out.values())


def on_port(port: int | None, side: str = "local") -> Callable[[dict[str, Any]], bool]:
    """Whether a connection's ``side`` address is on ``port``."""
    assert port is not None
    return lambda c: c[side].endswith(f":{port}")


def verdict_text(c: dict[str, Any]) -> str:
    v = c["verdict"]
    return f"{v['cause']} ({v['confidence']}): {v['summary']} {v['evidence']}"
