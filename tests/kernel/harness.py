"""Kernel test harness: the real tracer in a subprocess, real peers in other processes.

Servers run in child processes (closewait_trace.demo's `server` role) so that the kernel sees
the owner and the peer as different processes, as in production.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

BACKEND = os.environ.get("CLOSEWAIT_BACKEND", "auto")
#: Seconds to wait for the tracer to compile and attach (slow in emulated VMs).
START_TIMEOUT = float(os.environ.get("CLOSEWAIT_START_TIMEOUT", "240"))

Record = dict[str, Any]


@dataclass
class Tracer:
    """`closewait-trace --json` running in a subprocess, its records collected as they come."""

    args: Sequence[str]
    command: str | None = None  # a subcommand (record, demo); None: the live tracer
    proc: subprocess.Popen[str] | None = None
    records: list[Record] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    _q: queue.Queue[Record] = field(default_factory=queue.Queue)

    def start(self) -> Tracer:
        sub = [self.command] if self.command else []
        cmd = [sys.executable, "-m", "closewait_trace", *sub, "--json", "--backend", BACKEND,
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        try:
            self.wait_for(lambda r: r["type"] == "ready", START_TIMEOUT, what="tracer ready")
        except BaseException:
            self.stop(timeout=10)  # never leave a tracer behind, its probes still attached
            raise
        return self

    def _read_out(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = {"type": "garbage", "line": line}
            rec["_t"] = time.monotonic()
            self.records.append(rec)
            self._q.put(rec)

    def _read_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def wait_for(self, pred: Callable[[Record], bool], timeout: float, what: str = "") -> Record:
        for rec in list(self.records):
            if pred(rec):
                return rec
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rec = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc is not None and self.proc.poll() is not None and self._q.empty():
                    break
                continue
            if pred(rec):
                return rec
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; tracer rc="
            f"{self.proc.poll() if self.proc else None}; stderr: {''.join(self.stderr_lines)[-2000:]}"
            f"; last records: {self.records[-5:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        time.sleep(0.2)  # let the reader threads drain
        return rc

    def of_port(self, port: int, kind: str | None = None) -> list[Record]:
        out = []
        for rec in self.records:
            conn = rec.get("connection")
            if conn is None or (kind is not None and rec["type"] != kind):
                continue
            if conn["local"].endswith(f":{port}") or conn["remote"].endswith(f":{port}"):
                out.append(rec)
        return out


@dataclass
class Server:
    """A real server in a child process (closewait_trace.demo role `server`)."""

    family: int = socket.AF_INET
    accept: bool = True
    close_after: float | None = None
    backlog: int = 16
    proc: subprocess.Popen[str] | None = None
    port: int = 0

    @property
    def host(self) -> str:
        return "::1" if self.family == socket.AF_INET6 else "127.0.0.1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "closewait_trace.demo", "server",
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

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


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


def kprobe_events() -> str:
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        try:
            with open(f"{base}/kprobe_events") as f:
                return f.read()
        except OSError:
            continue
    return ""


def spawn_script(code: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """A python snippet in its own process group (so kill_groups ends it and its children),
    stdout piped for what it prints."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin else None, text=True,
                            start_new_session=True)


def kill_groups(procs: Sequence[subprocess.Popen[str]]) -> None:
    """SIGKILL every process group spawn_script started, and reap the leaders."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
