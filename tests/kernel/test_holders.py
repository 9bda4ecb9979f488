"""Listener holders against the running kernel: a real pre-fork Python server (the master
listens, forks workers that wait for the listener in different ways, and itself waits only on
a pipe), read through /proc by closewait_trace.facts.holders."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from closewait_trace.facts.holders import Holder, ProcState, Waiting, find_holders, listener_holders
from tests.kernel.podman import container

pytestmark = [pytest.mark.kernel, pytest.mark.host_only]  # /proc and sock_diag from userspace: no BPF program involved

PREFORK = r"""
import json, os, select, socket, sys, time
kinds = sys.argv[1].split(",")
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(64)
r, w = os.pipe()
held = []

def serve(kind):
    if kind == "accept":
        while True:
            held.append(ls.accept()[0])
    if kind in ("epoll", "busy"):
        ep = select.epoll()
        ep.register(ls.fileno(), select.EPOLLIN)
        if kind == "busy":
            time.sleep(3600)  # a slow handler: registered, but nobody waits
        while True:
            ep.poll()
            held.append(ls.accept()[0])
    if kind == "poll":
        p = select.poll()
        p.register(r, select.POLLIN)
        p.register(ls.fileno(), select.POLLIN)
        while True:
            p.poll()
            held.append(ls.accept()[0])
    if kind == "select":
        while True:
            select.select([r, ls], [], [])
            held.append(ls.accept()[0])

workers = []
for kind in kinds:
    pid = os.fork()
    if pid == 0:
        serve(kind)
        os._exit(0)
    workers.append(pid)
print(json.dumps({"master": os.getpid(), "workers": workers,
                  "listener": os.fstat(ls.fileno()).st_ino, "fd": ls.fileno()}), flush=True)
master = select.poll()
master.register(r, select.POLLIN)  # the master waits, but never for the listener
master.poll()
"""


@contextlib.contextmanager
def prefork(*kinds: str) -> Iterator[dict[str, Any]]:
    """The pre-fork server with one worker per kind; the whole group killed on exit."""
    proc = subprocess.Popen([sys.executable, "-c", PREFORK, ",".join(kinds)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        info: dict[str, Any] = json.loads(proc.stdout.readline())
        info["kinds"] = dict(zip(info["workers"], kinds))
        yield info
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def settled(inode: int, n: int, read_memory: bool = True, timeout: float = 10.0
            ) -> dict[int, Holder]:
    """The holders once every one of the n processes sits in a syscall (none starting up)."""
    deadline = time.monotonic() + timeout
    while True:
        holders = {h.pid: h for h in listener_holders(inode, read_memory=read_memory)}
        blocked = all(any(t.syscall for t in h.threads) or h.stopped for h in holders.values())
        if len(holders) == n and blocked:
            return holders
        if time.monotonic() > deadline:
            pytest.fail(f"holders did not settle: {holders}")
        time.sleep(0.05)


def test_prefork_stopped_worker_and_master_that_never_polls() -> None:
    with prefork("accept", "accept") as srv:
        stopped, running = srv["workers"]
        settled(srv["listener"], 3)
        os.kill(stopped, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while (h := settled(srv["listener"], 3))[stopped].state != ProcState.STOPPED:
            assert time.monotonic() < deadline, "SIGSTOP not seen"
            time.sleep(0.05)
        assert set(h) == {srv["master"], stopped, running}
        assert all(x.fds == (srv["fd"],) for x in h.values())
        master = h[srv["master"]]
        assert (master.waiting, master.state, master.ready_to_accept) == (
            Waiting.NO, ProcState.SLEEPING, False)
        assert [t.syscall for t in master.threads] == ["poll"]
        assert h[running].waiting == Waiting.ACCEPT and h[running].ready_to_accept
        assert h[running].accepting_tids == (running,)
        assert h[stopped].stopped and not h[stopped].ready_to_accept
        assert h[running].max_open_files == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert h[running].open_files is not None and h[running].open_files >= 3


def test_epoll_poll_select_and_busy_workers() -> None:
    with prefork("epoll", "poll", "select", "busy") as srv:
        h = settled(srv["listener"], 5)
        by_kind = {kind: h[pid] for pid, kind in srv["kinds"].items()}
        assert by_kind["epoll"].waiting == Waiting.POLL
        [entry] = by_kind["epoll"].epoll
        assert entry.inode == srv["listener"] and entry.tfd == srv["fd"]
        assert not entry.edge_triggered
        assert by_kind["poll"].waiting == Waiting.POLL
        assert by_kind["select"].waiting == Waiting.POLL
        assert by_kind["busy"].waiting == Waiting.REGISTERED
        assert [t.syscall for t in by_kind["busy"].threads] == ["clock_nanosleep"]
        assert h[srv["master"]].waiting == Waiting.NO
        assert all(by_kind[k].ready_to_accept for k in ("epoll", "poll", "select"))


def test_without_memory_reads_poll_sets_are_unknown() -> None:
    with prefork("poll", "epoll") as srv:
        h = settled(srv["listener"], 3, read_memory=False)
        poller, epoller = srv["workers"]
        assert h[poller].waiting == Waiting.UNKNOWN
        assert h[srv["master"]].waiting == Waiting.UNKNOWN
        assert h[epoller].waiting == Waiting.POLL  # epoll needs no memory read


def test_find_holders_of_several_inodes() -> None:
    with prefork("accept") as one, prefork("accept", "accept") as two:
        settled(one["listener"], 2)
        settled(two["listener"], 3)
        found = find_holders([one["listener"], two["listener"], 0])
        assert set(found[one["listener"]]) == {one["master"], *one["workers"]}
        assert set(found[two["listener"]]) == {two["master"], *two["workers"]}


def test_prefork_server_in_a_container() -> None:
    with container(["python3", "-c", PREFORK, "accept,poll"]) as ctr:
        srv = ctr.first_json_line()
        h = settled(srv["listener"], 3)
        assert ctr.pid in h  # host pids, whatever the container's own pid namespace says
        assert h[ctr.pid].waiting == Waiting.NO
        workers = sorted(p for p in h if p != ctr.pid)
        assert {h[p].waiting for p in workers} == {Waiting.ACCEPT, Waiting.POLL}
