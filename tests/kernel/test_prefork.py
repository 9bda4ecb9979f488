"""Multi-process servers, the real tracer: the verdict of a never-accepted socket names the
process that should accept and does not, never a master that only keeps the listener's fd.

- a Python pre-fork server (the master listens, two workers accept from the one listener,
  the master only waits): every worker busy in a slow handler; one worker stopped while the
  other is busy;
- a real nginx with two workers, with and without `reuseport`, workers stopped;
- a listener passed over SCM_RIGHTS to another process; an accepted socket inherited by a
  child that outlives the parent that accepted it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from closewait_trace.facts.holders import read_epoll
from tests.kernel.harness import Tracer

# Real containers, nginx and pre-fork servers: facts read from /proc and sock_diag, on the host.
pytestmark = [pytest.mark.kernel, pytest.mark.host_only]

#: argv: port. The master listens and forks two workers that accept() and then serve each
#: connection forever (a slow handler); the master keeps the listener and never polls it.
PREFORK = r"""
import json, os, socket, sys, time
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(16)
workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        held = []
        while True:
            held.append(ls.accept()[0])
            time.sleep(3600)  # the slow handler
    workers.append(pid)
print(json.dumps({"master": os.getpid(), "workers": workers, "port": ls.getsockname()[1],
                  "listener": os.fstat(ls.fileno()).st_ino}), flush=True)
while True:
    time.sleep(3600)
"""

#: argv: port. Accepts one connection, forks a child that inherits it, closes its copy and
#: exits; the child keeps the socket open and never closes it.
INHERITED = r"""
import json, os, socket, sys, time
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(16)
print("listening", flush=True)
c, _ = ls.accept()
parent = os.getpid()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    ls.close()
    os.close(r)
    os.write(w, json.dumps({"parent": parent, "child": os.getpid(),
                            "inode": os.fstat(c.fileno()).st_ino}).encode() + b"\n")
    os.close(w)
    time.sleep(3600)
    os._exit(0)
os.close(w)
print(os.read(r, 4096).decode().strip(), flush=True)
c.close()
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def python_server(script: str, port: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def connect_and_close(port: int, n: int) -> None:
    for _ in range(n):
        socket.create_connection(("127.0.0.1", port)).close()


def never_accepted_leaks(t: Tracer, port: int, n: int) -> list[dict[str, Any]]:
    def enough(_r: Any) -> bool:
        return len(_mine(t, port)) >= n

    t.wait_for(enough, 60, what=f"{n} never-accepted leaks on :{port}")
    time.sleep(1.5)  # the verdicts are judged again each second: take the settled ones
    return _mine(t, port)


def _mine(t: Tracer, port: int) -> list[dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for rec in t.records:
        conn = rec.get("connection")
        if conn and rec["type"] in ("leak", "update") and conn["local"] == f"127.0.0.1:{port}" \
                and conn["accepted"] == "no" and conn["flagged"]:
            latest[conn["id"]] = conn
    return list(latest.values())


def test_python_prefork_every_worker_busy() -> None:
    port = free_port()
    t = Tracer(["--port", str(port), "--threshold", "1s", "--report-min", "100ms"]).start()
    try:
        with python_server(PREFORK, port) as proc:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            busy = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            time.sleep(0.5)  # each worker took one and is in its handler now
            connect_and_close(port, 3)
            leaks = never_accepted_leaks(t, port, 3)
            for c in leaks:
                v = c["verdict"]
                print(json.dumps(v, indent=1))
                assert v["summary"].startswith("never accepted: every process that accepts")
                for w in info["workers"]:
                    assert f"pid {w} (python" in v["summary"]
                assert f"pid {info['master']} " not in v["summary"]
                assert c["pid"] in info["workers"]
                assert c["listener"]["inode"] == info["listener"]
                assert "accept queue 3/16" in v["evidence"][0]
                assert any(e.startswith(f"holder pid {info['master']} (python") and
                           "waits for it: no" in e for e in v["evidence"])
            for s in busy:
                s.close()
    finally:
        t.stop()


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until /proc says the process is stopped (state T)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not stop within {timeout}s")


def test_python_prefork_one_worker_stopped_the_other_busy() -> None:
    port = free_port()
    t = Tracer(["--port", str(port), "--threshold", "1s", "--report-min", "100ms"]).start()
    try:
        with python_server(PREFORK, port) as proc:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            stopped, other = info["workers"]
            os.kill(stopped, signal.SIGSTOP)
            # A worker woken in accept() by the signal still takes a connection queued before
            # it stops: connect only once it has stopped.
            wait_stopped(stopped)
            busy = socket.create_connection(("127.0.0.1", port))
            time.sleep(0.5)  # the running worker took it
            connect_and_close(port, 2)
            leaks = never_accepted_leaks(t, port, 2)
            for c in leaks:
                v = c["verdict"]
                assert (c["pid"], v["cause"], v["confidence"]) == \
                    (stopped, "never-accepted", "certain")
                assert v["summary"].startswith(f"never accepted: pid {stopped} (python")
                assert "is stopped" in v["summary"]
                assert any(e.startswith(f"holder pid {other} ") and "serving 1" in e
                           for e in v["evidence"])
            os.kill(stopped, signal.SIGCONT)
            busy.close()
    finally:
        t.stop()


NGINX_CONF = """
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{ listen 127.0.0.1:{port}{reuseport}; return 200 "ok"; }}
}}
"""


@contextlib.contextmanager
def nginx(port: int, reuseport: bool) -> Iterator[tuple[int, list[int]]]:
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, port=port,
                                          reuseport=" reuseport" if reuseport else ""))
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", tmp], start_new_session=True)
        try:
            workers = _children(proc.pid, 2)
            yield proc.pid, workers
        finally:
            for pid in _children(proc.pid, 0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _children(pid: int, want: int) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        try:
            kids = [int(k) for k in
                    Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            kids = []
        if len(kids) >= want or time.monotonic() > deadline:
            assert len(kids) >= want, f"nginx started {len(kids)} workers"
            return sorted(kids)
        time.sleep(0.1)


def test_nginx_all_workers_stopped_shared_listener() -> None:
    port = free_port()
    t = Tracer(["--port", str(port), "--threshold", "1s", "--report-min", "100ms"]).start()
    try:
        with nginx(port, reuseport=False) as (master, workers):
            time.sleep(0.5)
            for w in workers:
                os.kill(w, signal.SIGSTOP)
            for w in workers:
                wait_stopped(w)
            connect_and_close(port, 2)
            leaks = never_accepted_leaks(t, port, 2)
            for c in leaks:
                v = c["verdict"]
                print(json.dumps(v, indent=1))
                assert c["pid"] in workers and v["cause"] == "never-accepted"
                for w in workers:
                    assert f"pid {w} (nginx)" in v["summary"]
                assert f"pid {master} " not in v["summary"]
                assert "hold the listener" in v["summary"] and "are stopped" in v["summary"]
    finally:
        t.stop()


def test_nginx_reuseport_one_worker_stopped() -> None:
    port = free_port()
    t = Tracer(["--port", str(port), "--threshold", "1s", "--report-min", "100ms"]).start()
    try:
        with nginx(port, reuseport=True) as (master, workers):
            time.sleep(0.5)
            stopped = workers[0]
            os.kill(stopped, signal.SIGSTOP)
            wait_stopped(stopped)
            connect_and_close(port, 12)  # the kernel spreads them over the two listeners
            leaks = never_accepted_leaks(t, port, 1)
            registered = {e.inode for e in read_epoll(stopped)}
            for c in leaks:
                v = c["verdict"]
                print(json.dumps(c["listener"], indent=1), json.dumps(v, indent=1))
                assert (c["pid"], v["cause"], v["confidence"]) == \
                    (stopped, "never-accepted", "certain")
                assert v["summary"].startswith(f"never accepted: pid {stopped} (nginx)")
                assert f"pid {master} " not in v["summary"]
                assert c["listener"]["inode"] in registered  # the stopped worker's listener
                assert c["listener"]["queue"] >= 1
                assert "SO_REUSEPORT" in c["listener"]["why"]
    finally:
        t.stop()


def test_listener_passed_over_scm_rights() -> None:
    port = free_port()
    t = Tracer(["--port", str(port), "--threshold", "1s", "--report-min", "100ms"]).start()
    try:
        with python_server(PASSED_SCRIPT, port) as proc:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            connect_and_close(port, 2)
            leaks = never_accepted_leaks(t, port, 2)
            for c in leaks:
                v = c["verdict"]
                assert c["pid"] == info["holder"] and c["pid"] != info["maker"]
                assert c["listener"]["inode"] == info["listener"]
                assert v["summary"].startswith(f"never accepted: pid {info['holder']} ")
    finally:
        t.stop()


#: PASSED with the handshake spelled out: the maker sends the fd, closes its copy, prints.
PASSED_SCRIPT = r"""
import json, os, socket, sys, time
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
pid = os.fork()
if pid == 0:
    a.close()
    _msg, fds, _flags, _addr = socket.recv_fds(b, 16, 1)
    kept = socket.socket(fileno=fds[0])
    b.send(b"k")
    time.sleep(3600)
    os._exit(0)
b.close()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(16)
inode = os.fstat(ls.fileno()).st_ino
socket.send_fds(a, [b"l"], [ls.fileno()])
assert a.recv(1) == b"k"
ls.close()
print(json.dumps({"maker": os.getpid(), "holder": pid, "listener": inode}), flush=True)
time.sleep(3600)
"""


def test_accepted_socket_inherited_by_a_child_that_outlives_the_parent() -> None:
    port = free_port()
    t = Tracer(["--port", str(port), "--threshold", "1s", "--report-min", "100ms",
                "--accept-watch", "always"]).start()
    try:
        with python_server(INHERITED, port) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "listening"
            client = socket.create_connection(("127.0.0.1", port))
            info = json.loads(proc.stdout.readline())
            proc.wait(timeout=30)  # the parent has exited; the child holds the socket
            client.close()
            t.wait_for(lambda r: r["type"] == "leak" and
                       r["connection"]["local"] == f"127.0.0.1:{port}", 60, what="leak")
            [leak] = [r["connection"] for r in t.records if r["type"] == "leak"
                      and r["connection"]["local"] == f"127.0.0.1:{port}"]
            assert (leak["pid"], leak["inode"], leak["accepted"]) == \
                (info["child"], info["inode"], "yes")
            assert leak["verdict"]["cause"] == "accepted-not-closed"
            assert leak["acceptor"]["pid"] == info["parent"]
            with contextlib.suppress(ProcessLookupError):
                os.kill(info["child"], signal.SIGKILL)
    finally:
        t.stop()
