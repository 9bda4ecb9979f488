"""The traced processes' lives: a child forked with an inherited socket that it leaks, a
non-root user refused with a reason, a run that leaves no file behind. (A server restarted on
the same port is live/test_restart.py's: it runs under the live package's tracer.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import NEVER_ACCEPT, Record, Tracer, kill_groups, spawn_script

pytestmark = pytest.mark.kernel

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


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    kill_groups(started)


def _leak_on(t: Tracer, port: int) -> Record:
    return t.wait_for(lambda r: r["type"] == "leak" and r["connection"]["local"].endswith(
        f":{port}"), 12, what=f"leak on :{port}")


def test_child_that_inherits_a_socket_and_leaks_it_is_traced_under_the_parents_pid(
        procs: list[subprocess.Popen[str]]) -> None:
    parent = spawn_script(FORK_AND_LEAK)
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
    srv = spawn_script(NEVER_ACCEPT, "0")
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
