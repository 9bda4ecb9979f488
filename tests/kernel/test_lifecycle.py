"""Lives around the tracer's: a listener that was there before the tracer started, restarted
on its port; a non-root user refused with a reason; a run that leaves no file behind. (A
server that starts and restarts under a running tracer is live/test_restart.py's, a forked
child that leaks an inherited socket live/test_live.py's -p test's.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import NEVER_ACCEPT, Tracer, listen_never_accepting, restart_owns_the_next_leak, \
    spawn_script

pytestmark = pytest.mark.kernel


@pytest.mark.per_kernel  # the listener map's start-up seeding and its stale entry: no backend's
def test_listener_from_before_the_start_restarted_on_its_port_owns_the_next_leak(
        procs: list[subprocess.Popen[str]]) -> None:
    """The tracer learns a listener that was already there from its start-up seeding, whose
    map entry has no socket address: its end does not delete it, the restarted server's
    listen() replaces it."""
    first, port = listen_never_accepting(procs)
    t = Tracer(["--threshold", "1s", "--report-min", "100ms", "--port", str(port)]).start()
    try:
        restart_owns_the_next_leak(t, procs, started=(first, port))
    finally:
        assert t.stop() == 0
    summary = t.records[-1]
    assert summary["type"] == "summary" and summary["events_lost"] == 0


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
