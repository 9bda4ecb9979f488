"""The traced processes' lives: a server restarted on the same port (a new owner), a child
forked with an inherited socket that it leaks, a non-root user refused with a reason."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Record, Tracer

pytestmark = pytest.mark.kernel

# Listens on PORT (0: any), prints it, never accepts.
NEVER_ACCEPT = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print(s.getsockname()[1], flush=True)
time.sleep(3600)
"""

# Accepts one connection, forks; the child keeps the inherited socket open (and prints its
# pid), the parent closes its copy and waits.
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


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
        p.wait()


def _leak_on(t: Tracer, port: int, after: int = 0) -> Record:
    return t.wait_for(lambda r: r["type"] == "leak" and r["connection"]["local"].endswith(
        f":{port}") and r["_t"] > after, 12, what=f"leak on :{port}")


def test_server_restarted_on_the_same_port_owns_the_next_leak(
        procs: list[subprocess.Popen[str]]) -> None:
    first = _spawn(NEVER_ACCEPT, "0")
    procs.append(first)
    assert first.stdout is not None
    port = int(first.stdout.readline())
    t = Tracer(["--threshold", "1s", "--report-min", "100ms", "--port", str(port)]).start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        leak = _leak_on(t, port)
        assert leak["connection"]["pid"] == first.pid
        first.kill()
        first.wait()
        t.wait_for(lambda r: r["type"] == "close" and r["connection"]["exit"] ==
                   "listener-closed", 8, what="the queued socket ends with its listener")
        second = _spawn(NEVER_ACCEPT, str(port))
        procs.append(second)
        assert second.stdout is not None and int(second.stdout.readline()) == port
        mark = time.monotonic()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        leak = t.wait_for(lambda r: r["type"] == "leak" and r["_t"] > mark, 12,
                          what="leak after the restart")
        assert leak["connection"]["pid"] == second.pid
        assert leak["connection"]["verdict"]["cause"] == "never-accepted"
        assert t.proc is not None and t.proc.poll() is None
    finally:
        assert t.stop() == 0
    summary = t.records[-1]
    assert summary["type"] == "summary" and summary["events_lost"] == 0


def test_child_that_inherits_a_socket_and_leaks_it_is_traced_under_the_parents_pid(
        procs: list[subprocess.Popen[str]]) -> None:
    parent = _spawn(FORK_AND_LEAK)
    procs.append(parent)
    assert parent.stdout is not None
    port = int(parent.stdout.readline())
    t = Tracer(["-p", str(parent.pid), "--threshold", "1s", "--report-min", "100ms"]).start()
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        child = int(parent.stdout.readline())
        c.close()
        leak = _leak_on(t, port)
        conn = leak["connection"]
        # Accepted by the parent, still held (never closed) by the child, which -p follows.
        assert conn["verdict"]["cause"] == "accepted-not-closed"
        assert conn["pid"] == child and conn["fd"] is not None, [
            (r["type"], r.get("connection", {}).get("pid"), r.get("connection", {}).get("fd"), r["_t"])
            for r in t.records]
    finally:
        assert t.stop() == 0


@pytest.mark.per_kernel  # refused before any BPF
def test_non_root_is_refused_with_the_privileges_it_lacks() -> None:
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=-all", sys.executable, "-m", "closewait_trace", "--json"],
                       capture_output=True, text=True, timeout=60,
                       cwd="/", env={**os.environ, "HOME": "/nonexistent"})
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "privileges" in lines[0] and "CAP_BPF" in lines[0], lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.per_kernel  # the default backend, whatever the cell's
def test_writes_no_file_it_was_not_asked_for(tmp_path: Path) -> None:
    """A run, a flagged leak and a clean exit leave the working directory and HOME empty."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    srv = _spawn(NEVER_ACCEPT, "0")
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        r = subprocess.Popen([sys.executable, "-m", "closewait_trace", "--json", "--threshold",
                              "1s", "--report-min", "100ms", "--port", str(port),
                              "--duration", "4"], cwd=work, env={**os.environ, "HOME": str(home)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # compiled and attached by now on the host; the leak may come later
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out, err = r.communicate(timeout=300)
        assert r.returncode == 0, err
    finally:
        os.killpg(srv.pid, 9)
        srv.wait()
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []
    assert '"type": "summary"' in out
