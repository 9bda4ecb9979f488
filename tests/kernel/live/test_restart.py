"""A server restarted on the same port: the next leak is the new process's, under a tracer
that was running before either (the package's tracer sees every process)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from ..harness import NEVER_ACCEPT, Record, Tracer, kill_groups, spawn_script

pytestmark = pytest.mark.kernel


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    kill_groups(started)


def _listen(procs: list[subprocess.Popen[str]], port: int) -> tuple[subprocess.Popen[str], int]:
    p = spawn_script(NEVER_ACCEPT, str(port))
    procs.append(p)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def _on(port: int, after: float, kind: str) -> Callable[[Record], bool]:
    """A `kind` record of the server's end on `port`, printed after `after` (a port the kernel
    chose may have been another socket's earlier in the tracer's life)."""
    return lambda r: r["type"] == kind and r["_t"] > after \
        and r["connection"]["local"].endswith(f":{port}")


def test_server_restarted_on_the_same_port_owns_the_next_leak(
        tracer: Tracer, procs: list[subprocess.Popen[str]]) -> None:
    mark = time.monotonic()
    first, port = _listen(procs, 0)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    leak = tracer.wait_for(_on(port, mark, "leak"), 12, what=f"leak on :{port}")
    assert leak["connection"]["pid"] == first.pid
    first.kill()
    first.wait()
    gone = tracer.wait_for(_on(port, mark, "close"), 8,
                           what="the queued socket ends with its listener")
    assert gone["connection"]["exit"] == "listener-closed", gone
    second, again = _listen(procs, port)
    assert again == port
    mark = time.monotonic()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    leak = tracer.wait_for(_on(port, mark, "leak"), 12, what="leak after the restart")
    assert leak["connection"]["pid"] == second.pid
    assert leak["connection"]["verdict"]["cause"] == "never-accepted"
    assert tracer.proc is not None and tracer.proc.poll() is None
