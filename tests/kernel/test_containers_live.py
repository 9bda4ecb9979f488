"""Real containers, the real tracer: two podman containers serving the same port (one never
accepts, one accepts and never closes) and a pooled client in a third whose server closes
idle connections. Each socket must carry its owner's host pid, container id, network
namespace and the right verdict; --container keeps one container's sockets; `snapshot`
lists them all."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.harness import Tracer
from tests.kernel.podman import CLOSE_WAIT_SERVER, Container, container
from tests.kernel.test_netns import ip_netns, server_in

# Real containers, nginx and pre-fork servers: facts read from /proc and sock_diag, on the host.
pytestmark = [pytest.mark.kernel, pytest.mark.host_only]

PORT = 8080
N = 2

#: Listens on 127.0.0.1:PORT, a forked client connects N times and closes: never accepted.
NEVER_ACCEPTS = r"""
import json, os, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(64)
child = os.fork()
if child == 0:
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    peers = [c.getsockname()[1] for c in conns]
    for c in conns:
        c.close()
    print(json.dumps({"peers": peers, "netns": os.stat("/proc/self/ns/net").st_ino,
                      "listener": os.fstat(ls.fileno()).st_ino}), flush=True)
    os._exit(0)
os.waitpid(child, 0)
time.sleep(3600)
"""

#: A client pool (this process) connected to a server (a forked child) that closes idle
#: connections after a moment: the client's sockets stay in CLOSE_WAIT.
POOLED_CLIENT = r"""
import json, os, socket, sys, time
n = int(sys.argv[1])
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(16)
port = ls.getsockname()[1]
if os.fork() == 0:
    conns = [ls.accept()[0] for _ in range(n)]
    time.sleep(0.3)
    for c in conns:
        c.close()
    time.sleep(3600)
ls.close()
pool = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
time.sleep(1.0)
print(json.dumps({"port": port, "locals": [c.getsockname()[1] for c in pool],
                  "netns": os.stat("/proc/self/ns/net").st_ino}), flush=True)
time.sleep(3600)
"""


@contextlib.contextmanager
def three_containers() -> Iterator[dict[str, tuple[Container, dict[str, Any]]]]:
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(container(["python3", "-c", NEVER_ACCEPTS, str(PORT), str(N)]))
        b = stack.enter_context(container(["python3", "-c", CLOSE_WAIT_SERVER, str(PORT),
                                           str(N)]))
        c = stack.enter_context(container(["python3", "-c", POOLED_CLIENT, str(N)]))
        yield {"never": (a, a.first_json_line()), "kept": (b, b.first_json_line()),
               "pooled": (c, c.first_json_line())}


def _leaks(t: Tracer, netns: set[int], n: int) -> list[dict[str, Any]]:
    """The leaks of these namespaces once each has n (other processes of the host may leak
    too: they are not counted)."""
    def of(ns: int) -> list[dict[str, Any]]:
        return [r["connection"] for r in t.records
                if r["type"] == "leak" and r["connection"]["netns"] == ns]

    t.wait_for(lambda _r: all(len(of(ns)) >= n for ns in netns), 60,
               what=f"{n} leaks in each of {sorted(netns)}")
    return [c for ns in sorted(netns) for c in of(ns)]


def _netns_of(found: dict[str, tuple[Container, dict[str, Any]]]) -> set[int]:
    return {info["netns"] for _ctr, info in found.values()}


def _check_never(conns: list[dict[str, Any]], ctr: Container, info: dict[str, Any],
                 netns_source: str = "kernel") -> None:
    """netns_source: "kernel" for sockets that entered CLOSE_WAIT while traced; the ones
    found in CLOSE_WAIT at start are known from sock_diag."""
    mine = [c for c in conns if c["netns"] == info["netns"] and c["local"] == f"127.0.0.1:{PORT}"]
    assert sorted(c["remote"] for c in mine) == sorted(f"127.0.0.1:{p}" for p in info["peers"])
    for c in mine:
        assert (c["pid"], c["container"]["container_id"], c["netns_source"]) == \
            (ctr.pid, ctr.id, netns_source)
        assert (c["accepted"], c["inode"], c["verdict"]["cause"]) == ("no", 0, "never-accepted")
        assert c["listener"]["inode"] == info["listener"]
        assert c["listener"]["netns"] == info["netns"]
        assert c["container"]["container_name"] == ctr.name


def _check_kept(conns: list[dict[str, Any]], ctr: Container, info: dict[str, Any]) -> None:
    mine = [c for c in conns if c["netns"] == info["netns"] and c["local"] == f"127.0.0.1:{PORT}"]
    assert sorted(c["remote"] for c in mine) == sorted(f"127.0.0.1:{p}" for p in info["peers"])
    for c in mine:
        assert (c["pid"], c["container"]["container_id"], c["netns_source"]) == \
            (ctr.pid, ctr.id, "kernel")
        assert c["accepted"] == "yes" and c["inode"] in info["inodes"] and c["fd"] is not None
        assert c["verdict"]["cause"] == "accepted-not-closed"


def _check_pooled(conns: list[dict[str, Any]], ctr: Container, info: dict[str, Any]) -> None:
    mine = [c for c in conns if c["netns"] == info["netns"]]
    assert sorted(c["local"] for c in mine) == sorted(f"127.0.0.1:{p}" for p in info["locals"])
    for c in mine:
        assert (c["pid"], c["container"]["container_id"], c["direction"]) == \
            (ctr.pid, ctr.id, "outbound")
        assert c["verdict"]["cause"] == "outbound-not-closed"


def test_two_containers_on_one_port_and_a_pooled_client() -> None:
    t = Tracer(["--threshold", "2s", "--report-min", "100ms"]).start()
    try:
        with three_containers() as found:
            conns = _leaks(t, _netns_of(found), N)
            for ns in sorted(_netns_of(found)):  # one record of each, for the eye (-s)
                print(json.dumps(next(c for c in conns if c["netns"] == ns), indent=1))
            _check_never(conns, *found["never"])
            _check_kept(conns, *found["kept"])
            _check_pooled(conns, *found["pooled"])
            # a snapshot sees all of them, each in its namespace and container
            snap = json.loads(subprocess.run(
                [sys.executable, "-m", "closewait_trace", "snapshot", "--json"],
                capture_output=True, text=True, check=True, timeout=120).stdout)
            socks = snap["sockets"]
            for key in ("never", "kept", "pooled"):
                ctr, info = found[key]
                of = [s for s in socks if s["netns"] == info["netns"]]
                assert {s["pid"] for s in of} == {ctr.pid}
                assert {s["container"]["container_id"] for s in of} == {ctr.id}
                assert len(of) == N
            causes = {s["netns"]: s["verdict"]["cause"] for s in socks}
            assert causes[found["never"][1]["netns"]] == "never-accepted"
            assert causes[found["kept"][1]["netns"]] == "accepted-not-closed"
            assert causes[found["pooled"][1]["netns"]] == "outbound-not-closed"
    finally:
        t.stop()


def test_container_filter_keeps_one_container() -> None:
    with three_containers() as found:
        kept, kept_info = found["kept"]
        t = Tracer(["--container", kept.name, "--threshold", "1s", "--report-min",
                    "100ms"]).start()
        try:
            _leaks(t, {kept_info["netns"]}, N)
            time.sleep(3)  # the other containers' sockets are as old: they would show by now
            conns = [r["connection"] for r in t.records if "connection" in r]
        finally:
            t.stop()
        assert conns
        assert {c["netns"] for c in conns} == {kept_info["netns"]}
        assert {c["container"]["container_id"] for c in conns} == {kept.id}
        assert {c["pid"] for c in conns} == {kept.pid}



def test_record_then_report_replays_namespaces_containers_and_holders(tmp_path: Path) -> None:
    rec_file = tmp_path / "containers.cwt"
    t = Tracer(["-o", str(rec_file), "--threshold", "2s", "--report-min", "100ms"],
               command="record")
    with three_containers() as found:
        t.start()
        try:
            conns = _leaks(t, _netns_of(found), N)
            _check_never(conns, *found["never"], netns_source="sock_diag")  # from before
        finally:
            assert t.stop() == 0
    live = [{k: v for k, v in r.items() if k not in ("_t", "tracer")} for r in t.records
            if r["type"] != "notice"]
    rep = subprocess.run([sys.executable, "-m", "closewait_trace", "report", "--json",
                          str(rec_file)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    replayed = [r for r in map(json.loads, rep.stdout.splitlines())
                if r["type"] != "notice"]
    for r in replayed:
        r.pop("tracer", None)
    assert replayed == live
    leaks = [r["connection"] for r in replayed if r["type"] == "leak"
             and r["connection"]["netns"] in _netns_of(found)]
    assert {c["container"]["container_id"] for c in leaks} == \
        {ctr.id for ctr, _info in found.values()}
    assert {c["netns"] for c in leaks} == {info["netns"] for _ctr, info in found.values()}


def test_server_in_ip_netns_holding_accepted_sockets() -> None:
    """The issue's first report: a server in `ip netns add X` holding accepted CLOSE_WAIT
    sockets was called never-accepted; its sockets are asked about in its own namespace."""
    t = Tracer(["--threshold", "1s", "--report-min", "100ms"]).start()
    try:
        with ip_netns() as ns, server_in(ns, 0) as srv:
            t.wait_for(lambda r: r["type"] == "leak" and r["connection"]["netns"] ==
                       srv["netns"], 60, what="leak in the namespace")
            time.sleep(1.5)
            mine = [r["connection"] for r in t.records if r["type"] == "leak"
                    and r["connection"]["netns"] == srv["netns"]]
            assert sorted(c["inode"] for c in mine) == sorted(srv["inodes"])
            for c in mine:
                assert (c["pid"], c["accepted"], c["netns_source"]) == \
                    (srv["pid"], "yes", "kernel")
                assert c["fd"] is not None
                assert c["container"] is not None and "runtime" not in c["container"]
                assert c["verdict"]["cause"] == "accepted-not-closed"
    finally:
        t.stop()
