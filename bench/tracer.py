"""The one driver of closewait-trace in a subprocess, for the benchmarks and the kernel tests.

`JsonTracer` runs it with --json and reads its records as they come: every record is kept and
queued (`wait_for` a record by predicate), its stderr is kept, leaks and exits are tallied by
4-tuple (the soak and the scale run compare them with what they made), and the summary is
kept. `LiveTracer` runs its live view in a pseudo-terminal (120 x 40) and reads the screen
and its Prometheus metrics. Both stop with SIGTERM (SIGKILL after a timeout) and give the
tracer's CPU time. The overhead benchmark starts its tracers its own way (stdout to a file,
read only before and after a run: reading a pipe during the load would cost the measurement).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import queue
import re
import signal
import struct
import subprocess
import termios
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class TracerProcess:
    """The process itself: started by start(), stopped by stop()."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._proc: subprocess.Popen[Any] | None = None
        self._readers: list[threading.Thread] = []

    def _read_in_background(self, *targets: Callable[[], None]) -> None:
        """Threads that read its output to the end; stop() waits for them."""
        for target in targets:
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._readers.append(thread)

    @property
    def proc(self) -> subprocess.Popen[Any]:
        assert self._proc is not None, "the tracer was not started"
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU time of the tracer process so far, in seconds."""
        try:
            f = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Signal it, wait up to `timeout` (then SIGKILL); its exit code."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
        try:
            rc = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            rc = self._proc.wait()
        # Its last lines (the summary) may still be in the pipe: read them before returning.
        # A grandchild holding the pipe open cannot keep the caller for more than 30 s.
        deadline = time.monotonic() + 30
        for thread in self._readers:
            thread.join(max(0.0, deadline - time.monotonic()))
        return rc


class JsonTracer(TracerProcess):
    """`closewait-trace --json ...` (argv is the whole command line)."""

    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv)
        self.records: list[Record] = []
        self.stderr_lines: list[str] = []
        self.summary: Record | None = None
        self.leaks: Counter[tuple[str, str]] = Counter()  # leak records by (local, remote)
        self.leak_count = 0
        self.closes = 0
        #: close and lost records by (local, remote), for the report on a leak not flagged
        self.closed: dict[tuple[str, str], list[Record]] = {}
        self.want = 0  # first_all_at: when `want` leaks had come
        self.first_all_at: float | None = None
        self._q: queue.Queue[Record] = queue.Queue()
        self._lock = threading.Lock()

    def start(self) -> JsonTracer:
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self._read_in_background(self._read_out, self._read_err)
        return self

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"type": "garbage", "line": line}
            rec["_t"] = time.monotonic()
            self._tally(rec)
            self.records.append(rec)
            self._q.put(rec)

    def _tally(self, rec: Record) -> None:
        kind = rec.get("type")
        if kind == "leak":
            c = rec["connection"]
            with self._lock:
                self.leaks[(c["local"], c["remote"])] += 1
            self.leak_count += 1
            if self.want and self.leak_count >= self.want and self.first_all_at is None:
                self.first_all_at = time.monotonic()
        elif kind in ("close", "lost"):
            self.closes += 1
            c = rec["connection"]
            with self._lock:
                self.closed.setdefault((c["local"], c["remote"]), []).append(
                    {"type": kind, "exit": c.get("exit"), "cw_age_s": c.get("cw_age_s"),
                     "pid": c.get("pid"), "accepted": c.get("accepted")})
        elif kind == "summary":
            self.summary = rec

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def wait_for(self, pred: Callable[[Record], bool], timeout: float, what: str = "") -> Record:
        """The first record (already come or to come) that `pred` accepts; AssertionError
        after `timeout` seconds or once the tracer has exited."""
        for rec in list(self.records):
            if pred(rec):
                return rec
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                rec = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self._q.empty():
                    break
                continue
            if pred(rec):
                return rec
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; tracer rc={self.proc.poll()}; "
            f"stderr: {''.join(self.stderr_lines)[-2000:]}; last records: {self.records[-5:]}")

    def wait_ready(self, timeout: float) -> Record:
        return self.wait_for(lambda r: r.get("type") == "ready", timeout, what="tracer ready")

    def of_port(self, port: int, kind: str | None = None, since: float = 0.0) -> list[Record]:
        """The connection records with `port` at either end (of one type if given) that came
        at or after `since` (time.monotonic(): a port the kernel chose may have been another
        socket's earlier in the tracer's life)."""
        out = []
        for rec in self.records:
            conn = rec.get("connection")
            if conn is None or (kind is not None and rec["type"] != kind) or rec["_t"] < since:
                continue
            if conn["local"].endswith(f":{port}") or conn["remote"].endswith(f":{port}"):
                out.append(rec)
        return out


class LiveTracer(TracerProcess):
    """closewait-trace's live view in a pseudo-terminal (120 x 40), with --metrics PORT."""

    def __init__(self, argv: Sequence[str], metrics_port: int) -> None:
        super().__init__(argv)
        self.metrics_port = metrics_port
        self.out = bytearray()
        self._lock = threading.Lock()
        self._master = -1

    def start(self) -> LiveTracer:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
        self._proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave,
                                      env=env, start_new_session=True)
        os.close(slave)
        self._master = master
        self._read_in_background(self._read)
        return self

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.out += data
                if len(self.out) > 4_000_000:  # keep the end: the last frames and the summary
                    del self.out[:-2_000_000]

    def text(self) -> str:
        """The screen output so far, without escape sequences."""
        with self._lock:
            raw = bytes(self.out)
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))

    def ready(self) -> bool:
        """Whether its /readyz says ready (programs attached and acting); its /metrics
        answers from before the compile."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz",
                                        timeout=2) as r:
                return bool(r.status == 200)
        except OSError:  # urllib's HTTPError (503: not ready) is an OSError too
            return False

    def metrics(self) -> dict[str, float] | None:
        """Open sockets, leaking sockets and the longest tick from its /metrics; None while
        it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        vals = {"sockets": 0.0, "leaking": 0.0}
        for line in text.splitlines():
            if line.startswith("closewait_sockets{"):
                vals["sockets"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("closewait_leaking_sockets{"):
                vals["leaking"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("closewait_tracer_tick_max_seconds "):
                vals["tick_max"] = float(line.rsplit(" ", 1)[1])
        return vals
