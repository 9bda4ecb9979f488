"""`closewait-trace snapshot` on real sockets: no BPF, sock_diag and /proc only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from .harness import Server

pytestmark = [pytest.mark.kernel, pytest.mark.per_kernel]  # no BPF


def _snapshot(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", "--json", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_snapshot_tells_never_accepted_accepted_and_outbound_apart() -> None:
    never = Server(accept=False, backlog=4).start()
    hold = Server(accept=True, close_after=None).start()
    closer = Server(accept=True, close_after=-1).start()  # closes first: our side waits
    try:
        for _ in range(2):
            c = never.connect()
            c.close()
        h = hold.connect()
        time.sleep(0.3)
        h.close()
        keep = closer.connect()
        time.sleep(0.5)
        snap = _snapshot("--port", str(never.port), "--port", str(hold.port),
                         "--port", str(closer.port))
        by_local = {s["local"]: s for s in snap["sockets"]}
        n = [s for s in snap["sockets"] if s["local"].endswith(f":{never.port}")]
        assert len(n) == 2
        assert all(s["accepted"] == "no" and s["inode"] == 0 and s["pid"] == never.pid
                   for s in n)
        assert {s["verdict"]["cause"] for s in n} == {"never-accepted"}
        h_s = [s for s in snap["sockets"] if s["local"].endswith(f":{hold.port}")]
        assert len(h_s) == 1 and h_s[0]["accepted"] == "yes" and h_s[0]["pid"] == hold.pid
        assert h_s[0]["fd"] is not None and h_s[0]["eof_read"] is False
        assert h_s[0]["verdict"]["cause"] == "accepted-not-closed"
        out = by_local[f"127.0.0.1:{keep.getsockname()[1]}"]
        assert out["direction"] == "outbound" and out["pid"] == os.getpid()
        assert out["verdict"]["cause"] == "outbound-not-closed"
        lst = [x for x in snap["listeners"] if x["local"].endswith(f":{never.port}")]
        assert lst and lst[0]["queue"] == 2 and lst[0]["backlog"] == 4
        groups = {(g["port"], g["cause"]): g["count"] for g in snap["groups"]}
        assert groups[(never.port, "never-accepted")] == 2
        keep.close()
    finally:
        for s in (never, hold, closer):
            s.stop()


def test_snapshot_sees_an_eof_read_but_not_closed(tmp_path: object) -> None:
    """A server that read the EOF (recv returned 0) and kept the socket: a certain bug."""
    code = (
        "import socket,sys,time\n"
        "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(4)\n"
        "print(s.getsockname()[1], flush=True)\n"
        "c,_=s.accept()\n"
        "while c.recv(100): pass\n"
        "print('eof', flush=True)\n"
        "time.sleep(60)\n"
    )
    srv = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"hello")
        c.close()
        assert srv.stdout.readline().strip() == "eof"
        snap = _snapshot("--port", str(port))
        (s,) = snap["sockets"]
        assert s["eof_read"] is True and s["pid"] == srv.pid
        assert s["verdict"]["cause"] == "accepted-not-closed"
        assert s["verdict"]["confidence"] == "certain"
        assert "read the EOF and never closed" in s["verdict"]["summary"]
    finally:
        srv.kill()
        srv.wait()


def test_snapshot_plain_output_groups_by_cause() -> None:
    never = Server(accept=False).start()
    try:
        c = never.connect()
        c.close()
        time.sleep(0.2)
        out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", "--port",
                              str(never.port)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0
        assert "1 socket(s) in CLOSE_WAIT now" in out.stdout
        assert f"pid {never.pid}/python" in out.stdout and "never-accepted" in out.stdout
        assert "accept queue 1/16" in out.stdout
    finally:
        never.stop()
