"""sock_diag in other network namespaces, against the running kernel: namespaces made by
``ip netns add`` (created and deleted by the test) and real podman containers, each with a
python server holding accepted CLOSE_WAIT sockets."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from closewait_trace.facts.containers import (
    NameResolver,
    Runtime,
    cgroup_v2_id,
    identity_of_pid,
    select_containers,
)
from closewait_trace.facts.enrich import TcpState, diag_sockets
from closewait_trace.errors import EnrichError
from closewait_trace.facts.netns import (
    NetnsDiag,
    list_netns,
    netns_inode,
    open_sock_diag_in,
    own_netns_inode,
    resolve_netns,
    socket_netns_inode,
)
from tests.kernel.podman import CLOSE_WAIT_SERVER, close_wait_server

pytestmark = [pytest.mark.kernel, pytest.mark.host_only]  # /proc and sock_diag from userspace: no BPF program involved

CW = (TcpState.CLOSE_WAIT,)


@contextlib.contextmanager
def ip_netns() -> Iterator[str]:
    """A new named network namespace with loopback up; always deleted."""
    name = f"cwt-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


@contextlib.contextmanager
def server_in(ns: str, port: int, n: int = 2) -> Iterator[dict[str, Any]]:
    """CLOSE_WAIT_SERVER inside ``ns``; yields its JSON line; killed on exit."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CLOSE_WAIT_SERVER,
                             str(port), str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the server in the namespace printed nothing"
        yield json.loads(line)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _cw_of(sockets: list[Any], port: int) -> set[int]:
    return {s.inode for s in sockets if s.lport == port and s.state == TcpState.CLOSE_WAIT}


@pytest.fixture()
def diag() -> Iterator[NetnsDiag]:
    d = NetnsDiag()
    try:
        yield d
    finally:
        d.close()


def test_ip_netns_sockets_seen_only_in_their_namespace(diag: NetnsDiag) -> None:
    with ip_netns() as ns, server_in(ns, 0) as srv:
        inode = srv["netns"]
        assert inode != own_netns_inode()
        assert netns_inode(srv["pid"]) == inode
        info = list_netns()[inode]
        assert info.names == (ns,) and srv["pid"] in info.pids
        found_there = diag.diag_sockets(inode, CW)
        assert _cw_of(found_there, srv["port"]) == set(srv["inodes"])
        assert {s.netns for s in found_there} == {inode}  # each marked where it was found
        assert len(srv["inodes"]) == 2 and 0 not in srv["inodes"]
        assert _cw_of(diag_sockets(CW), srv["port"]) == set()  # the host's own answer
        assert _cw_of(diag.diag_sockets(diag.host_inode, CW), srv["port"]) == set()
        [lst] = [s for s in diag.listeners(inode) if s.lport == srv["port"]]
        assert lst.inode == srv["listener"]
        for sock_inode, peer in zip(srv["inodes"], srv["peers"]):
            found = diag.lookup(inode, socket.AF_INET, "127.0.0.1", srv["port"], "127.0.0.1",
                                peer)
            assert found is not None and (found.inode, found.netns) == (sock_inode, inode)
            assert found.state == TcpState.CLOSE_WAIT
            mapped = diag.lookup(inode, socket.AF_INET6, "::ffff:127.0.0.1", srv["port"],
                                 "127.0.0.1", peer)  # the kernel looks up IPv4 for mapped
            assert mapped == found
            assert diag.lookup(diag.host_inode, socket.AF_INET, "127.0.0.1", srv["port"],
                               "127.0.0.1", peer) is None
        assert diag.lookup(inode, socket.AF_INET, "127.0.0.1", srv["port"], "127.0.0.1",
                           1) is None
        assert diag.cached() == {inode, diag.host_inode}
        assert diag.opened == 2
        diag.diag_sockets(inode, CW)
        assert diag.opened == 2  # the namespace's socket is reused


def test_same_port_in_two_namespaces_answers_each_its_own(diag: NetnsDiag) -> None:
    port = random.randint(20000, 60000)
    with ip_netns() as ns_a, ip_netns() as ns_b, server_in(ns_a, port) as a, \
            server_in(ns_b, port, n=3) as b:
        assert a["port"] == b["port"] == port and a["netns"] != b["netns"]
        answers = diag.each(CW, [a["netns"], b["netns"]])
        assert _cw_of(answers[a["netns"]], port) == set(a["inodes"])
        assert _cw_of(answers[b["netns"]], port) == set(b["inodes"])
        assert len(b["inodes"]) == 3


def test_socket_is_bound_to_the_namespace_it_was_opened_in() -> None:
    with ip_netns() as ns:
        inode = list_netns()  # the bind mount, with no process in it
        [info] = [i for i in inode.values() if ns in i.names]
        assert info.pids == ()
        with open_sock_diag_in(f"/run/netns/{ns}") as sock:
            assert socket_netns_inode(sock) == info.inode
        assert own_netns_inode() != info.inode  # the caller's thread never moved
        assert resolve_netns(ns) == resolve_netns(f"/run/netns/{ns}") == info.inode
        with pytest.raises(EnrichError, match="not 1$"):
            open_sock_diag_in(f"/run/netns/{ns}", expect_inode=1)


def test_socket_of_a_deleted_namespace_is_dropped(diag: NetnsDiag) -> None:
    with ip_netns() as ns:
        [inode] = [i for i, info in diag.namespaces().items() if ns in info.names]
        assert diag.diag_sockets(inode, CW) == []
        assert inode in diag.cached()
    diag.namespaces()
    assert inode not in diag.cached()
    with pytest.raises(EnrichError, match="does not exist"):
        diag.diag_sockets(inode, CW)


def test_podman_container_identity_and_sockets(diag: NetnsDiag) -> None:
    with close_wait_server(n=2) as ctr:
        srv = ctr.first_json_line()
        ident = identity_of_pid(ctr.pid)
        assert ident is not None
        assert (ident.runtime, ident.container_id) == (Runtime.PODMAN, ctr.id)
        assert ident.cgroup == f"/libpod_parent/libpod-{ctr.id}"
        assert NameResolver().resolve(ident).container_name == ctr.name
        inode = netns_inode(ctr.pid)
        assert inode is not None and inode != diag.host_inode
        assert srv["netns"] == inode == resolve_netns(f"/proc/{ctr.pid}/ns/net")
        assert _cw_of(diag.diag_sockets(inode, CW), srv["port"]) == set(srv["inodes"])
        assert _cw_of(diag_sockets(CW), srv["port"]) == set()


def test_podman_container_selected_by_name_and_id() -> None:
    with close_wait_server(n=1) as ctr, close_wait_server(n=1) as other:
        ctr.first_json_line()
        other.first_json_line()
        by_name = select_containers(ctr.name)
        assert ctr.pid in by_name.pids and other.pid not in by_name.pids
        assert by_name.cgroups == {f"/libpod_parent/libpod-{ctr.id}"}
        assert [c.container_id for c in by_name.containers] == [ctr.id]
        assert select_containers(ctr.id[:12]).pids == by_name.pids
        cgroup_id = cgroup_v2_id(f"/libpod_parent/libpod-{ctr.id}")
        assert cgroup_id is not None and cgroup_id > 1


def test_two_podman_containers_same_port(diag: NetnsDiag) -> None:
    with close_wait_server(8080, n=1) as one, close_wait_server(8080, n=2) as two:
        a, b = one.first_json_line(), two.first_json_line()
        assert a["port"] == b["port"] == 8080
        answers = diag.each(CW)
        assert _cw_of(answers[netns_inode(one.pid) or 0], 8080) == set(a["inodes"])
        assert _cw_of(answers[netns_inode(two.pid) or 0], 8080) == set(b["inodes"])


def test_lookup_ipv6_and_dual_stack(diag: NetnsDiag) -> None:
    with socket.socket(socket.AF_INET6) as ls:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind(("::", 0))
        ls.listen(8)
        port = ls.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as c4, \
                socket.create_connection(("::1", port)) as c6:
            a4, a6 = ls.accept()[0], ls.accept()[0]
            peers = {a4.getpeername()[1]: a4, a6.getpeername()[1]: a6}
            p4, p6 = c4.getsockname()[1], c6.getsockname()[1]
        try:
            time.sleep(0.1)  # the clients' FINs
            v6 = diag.lookup(diag.host_inode, socket.AF_INET6, "::1", port, "::1", p6)
            assert v6 is not None and v6.inode == os.fstat(peers[p6].fileno()).st_ino
            assert v6.state == TcpState.CLOSE_WAIT and v6.family == socket.AF_INET6
            v4 = diag.lookup(diag.host_inode, socket.AF_INET, "127.0.0.1", port, "127.0.0.1", p4)
            assert v4 is not None and v4.inode == os.fstat(peers[p4].fileno()).st_ino
            assert v4.family == socket.AF_INET6 and v4.laddr == "127.0.0.1"  # dual-stack
            assert diag.lookup(diag.host_inode, socket.AF_INET6, "::1", port, "::1", 1) is None
            assert diag.lookup(diag.host_inode, socket.AF_INET, "no address", port, "::1",
                               p6) is None
        finally:
            a4.close()
            a6.close()
