"""The tracer's own life: a non-root user refused with a reason, a run that leaves no file
behind. (The traced processes' lives are the live package's: a server restarted on the same
port in live/test_restart.py, a forked child that leaks an inherited socket in
live/test_live.py's -p test.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import NEVER_ACCEPT, spawn_script

pytestmark = pytest.mark.kernel


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
