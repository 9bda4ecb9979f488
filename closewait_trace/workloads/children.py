"""The parent's side of the roles: each role a child process whose lines are read as they come.

A child runs in its own session (a Ctrl-C on the terminal reaches only the parent, which stops
it) and dies with the parent (CLOSEWAIT_DEMO_PARENT). A thread per child reads its stdout:
LEAK lines are collected, DONE marks the end of a client's work, every other line is queued
for `expect` (so that waiting for a line can time out and no child blocks on a full pipe).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence

from ..errors import CloseWaitError


class DemoError(CloseWaitError):
    """A workload's child process could not start or did not do its part."""


def spawn_role(args: Sequence[str], *, gated: bool = False) -> subprocess.Popen[str]:
    """`python -m closewait_trace.workloads ROLE ARGS...` in its own session, dying with this
    process. A gated role waits for a line on its stdin before it starts."""
    env = dict(os.environ, CLOSEWAIT_DEMO_PARENT=str(os.getpid()))
    if gated:
        env["CLOSEWAIT_DEMO_GATE"] = "1"
    else:
        env.pop("CLOSEWAIT_DEMO_GATE", None)
    return subprocess.Popen([sys.executable, "-m", "closewait_trace.workloads", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


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


class Child:
    """One role in a child process."""

    def __init__(self, name: str, args: Sequence[str], *, gated: bool = False) -> None:
        self.name = name
        self.args = list(args)
        self.proc = spawn_role(args, gated=gated)
        self.port = 0
        self.done: int | None = None
        self._leaks: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._finished = threading.Event()
        threading.Thread(target=self._read, daemon=True, name=f"role-{name}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.strip()
                parts = line.split()
                if parts[:1] == ["LEAK"] and len(parts) == 3:
                    with self._lock:
                        self._leaks.append((parts[1], parts[2]))
                elif parts[:1] == ["DONE"] and len(parts) == 2:
                    self.done = int(parts[1])
                    self._finished.set()
                else:
                    self._lines.put(line)
        except (OSError, ValueError):
            pass  # closed by stop()
        self._lines.put(None)
        self._finished.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, word: str, timeout: float = 60.0) -> str:
        """The next line, which must start with `word`."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise DemoError(f"{self.name} did not say {word} within {timeout:.0f}s") from None
        if line is None or not line.startswith(word):
            rc = self.proc.poll()
            said = "exited" + (f" with status {rc}" if rc is not None else "") \
                if line is None else f"said {line!r}"
            raise DemoError(f"{self.name} did not start ({said}, expected {word})")
        return line

    def expect_port(self, timeout: float = 60.0) -> int:
        """A server's first line: PORT n."""
        self.port = int(self.expect("PORT ", timeout).split()[1])
        return self.port

    def say(self, line: str = "go") -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(line + "\n")
            stdin.flush()
        except OSError as exc:
            raise DemoError(f"{self.name} has gone ({exc.strerror})") from None

    def wait_done(self, timeout: float) -> None:
        """Until a client says DONE; DemoError if it exits first or takes longer."""
        if not self._finished.wait(timeout) or self.done is None:
            what = ' '.join(self.args)
            code = self.proc.poll()
            if code is not None:
                raise DemoError(f"{self.name} ({what}) exited with code {code} before it was"
                                " done (its error is above)")
            raise DemoError(f"{self.name} ({what}) did not finish in {timeout:.0f} s")

    def leaked(self) -> list[tuple[str, str]]:
        """The (local, remote) of every connection it left in CLOSE_WAIT on purpose so far."""
        with self._lock:
            return list(self._leaks)

    def stop(self) -> None:
        stop_processes([self.proc])


class Children:
    """Named children, stopped together."""

    def __init__(self) -> None:
        self.children: dict[str, Child] = {}

    def spawn(self, name: str, args: Sequence[str], *, gated: bool = False) -> Child:
        child = Child(name, args, gated=gated)
        self.children[name] = child
        return child

    def __getitem__(self, name: str) -> Child:
        return self.children[name]

    def pids(self) -> dict[str, int]:
        return {name: c.pid for name, c in self.children.items()}

    def stop(self) -> None:
        stop_processes(c.proc for c in self.children.values())
