"""Kernel-free parts of closewait_trace.facts.enrich: addresses, tuple lookup, /proc parsing."""

from __future__ import annotations

import os
import resource
import socket
import sys
import time
from pathlib import Path

import pytest

from closewait_trace.facts.enrich import (
    DiagSocket,
    ProcessIndex,
    SocketOwner,
    TcpState,
    comm_of,
    find_by_tuple,
    format_addr,
    normalize_addr,
    open_files,
    parse_limits_nofile,
    parse_socket_link,
    pid_alive,
)
from closewait_trace.errors import CloseWaitError, EnrichError, UsageError

# --------------------------------------------------------------------------- states


def test_tcp_state_uses_kernel_numbering() -> None:
    assert TcpState.ESTABLISHED.value == 1
    assert TcpState.TIME_WAIT.value == 6
    assert TcpState.CLOSE_WAIT.value == 8
    assert TcpState.LISTEN.value == 10
    assert TcpState.NEW_SYN_RECV.value == 12
    assert [s.value for s in TcpState] == list(range(1, 13))


def test_enrich_error_is_a_closewait_error() -> None:
    assert issubclass(EnrichError, CloseWaitError)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::FFFF:10.1.2.3", "10.1.2.3"),
        ("0:0:0:0:0:ffff:a01:203", "10.1.2.3"),
        ("0:0::1", "::1"),
        ("::", "::"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_normalize_addr(text: str, expected: str) -> None:
    assert normalize_addr(text) == expected


def test_format_addr_ipv4_and_ipv6() -> None:
    assert format_addr(socket.AF_INET, socket.inet_pton(socket.AF_INET, "192.0.2.7")) == "192.0.2.7"
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::42")
    assert format_addr(socket.AF_INET6, v6) == "2001:db8::42"
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
    assert format_addr(socket.AF_INET6, mapped) == "127.0.0.1"
    # A 16-byte kernel field holding an IPv4 address in its first 4 bytes.
    assert format_addr(socket.AF_INET, bytes([10, 0, 0, 9]) + bytes(12)) == "10.0.0.9"


def test_format_addr_rejects_short_buffers_and_other_families() -> None:
    with pytest.raises(UsageError):
        format_addr(socket.AF_INET, b"\x01\x02")
    with pytest.raises(UsageError):
        format_addr(socket.AF_INET6, bytes(4))
    with pytest.raises(UsageError):
        format_addr(socket.AF_UNIX, bytes(16))


# --------------------------------------------------------------------------- find_by_tuple


def _sock(
    family: int,
    laddr: str,
    lport: int,
    raddr: str,
    rport: int,
    *,
    state: TcpState = TcpState.CLOSE_WAIT,
    inode: int = 0,
) -> DiagSocket:
    return DiagSocket(
        family=family,
        state=state,
        laddr=laddr,
        lport=lport,
        raddr=raddr,
        rport=rport,
        inode=inode,
        uid=0,
        rqueue=1,
        wqueue=0,
        cookie=inode + 1000,
    )


SOCKETS = [
    _sock(socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 40000, inode=11),
    _sock(socket.AF_INET6, "10.0.0.1", 8443, "10.0.0.2", 50000, inode=12),  # dual-stack
    _sock(socket.AF_INET6, "::1", 8080, "::1", 40000, inode=13),
    _sock(socket.AF_INET6, "2001:db8::1", 443, "2001:db8::2", 1234, inode=14),
]


def test_find_by_tuple_exact() -> None:
    found = find_by_tuple(SOCKETS, socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 40000)
    assert found is not None and found.inode == 11
    found6 = find_by_tuple(SOCKETS, socket.AF_INET6, "::1", 8080, "::1", 40000)
    assert found6 is not None and found6.inode == 13


def test_find_by_tuple_mapped_query_matches_plain_ipv4() -> None:
    found = find_by_tuple(
        SOCKETS, socket.AF_INET6, "::ffff:127.0.0.1", 8080, "::ffff:127.0.0.1", 40000
    )
    assert found is not None and found.inode == 11


def test_find_by_tuple_plain_query_matches_dual_stack_socket() -> None:
    found = find_by_tuple(SOCKETS, socket.AF_INET, "10.0.0.1", 8443, "10.0.0.2", 50000)
    assert found is not None and found.inode == 12
    assert found.family == socket.AF_INET6


def test_find_by_tuple_mapped_text_in_socket_list() -> None:
    socks = [_sock(socket.AF_INET6, "::ffff:10.0.0.1", 80, "::ffff:10.0.0.2", 9, inode=21)]
    found = find_by_tuple(socks, socket.AF_INET, "10.0.0.1", 80, "10.0.0.2", 9)
    assert found is not None and found.inode == 21


def test_find_by_tuple_prefers_exact_family() -> None:
    socks = [
        _sock(socket.AF_INET6, "10.0.0.1", 80, "10.0.0.2", 9, inode=31),
        _sock(socket.AF_INET, "10.0.0.1", 80, "10.0.0.2", 9, inode=32),
    ]
    found = find_by_tuple(socks, socket.AF_INET, "10.0.0.1", 80, "10.0.0.2", 9)
    assert found is not None and found.inode == 32
    found6 = find_by_tuple(socks, socket.AF_INET6, "10.0.0.1", 80, "10.0.0.2", 9)
    assert found6 is not None and found6.inode == 31


def test_find_by_tuple_misses() -> None:
    assert find_by_tuple(SOCKETS, socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 40001) is None
    assert find_by_tuple(SOCKETS, socket.AF_INET, "127.0.0.1", 8081, "127.0.0.1", 40000) is None
    # Real IPv6 never matches an AF_INET query, even with equal ports.
    assert find_by_tuple(SOCKETS, socket.AF_INET, "::1", 8080, "::1", 40000) is None
    assert find_by_tuple([], socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 40000) is None


def test_diag_socket_helpers() -> None:
    unread = _sock(socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2)
    assert unread.eof_unread is True and not unread.accepted
    read = DiagSocket(socket.AF_INET, TcpState.CLOSE_WAIT, "a", 1, "b", 2, 7, 0, 0, 0, 1)
    assert read.eof_unread is False and read.accepted
    listen = DiagSocket(socket.AF_INET, TcpState.LISTEN, "a", 1, "0.0.0.0", 0, 7, 0, 3, 5, 1)
    assert listen.eof_unread is None


# --------------------------------------------------------------------------- /proc parsing

LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max file size             unlimited            unlimited            bytes
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
"""


def test_parse_limits_nofile() -> None:
    assert parse_limits_nofile(LIMITS) == 1024
    assert parse_limits_nofile(LIMITS.replace("1024 ", "unlimited ")) == resource.RLIM_INFINITY
    assert parse_limits_nofile("Limit Soft Hard Units\n") is None
    assert parse_limits_nofile("Max open files\n") is None


def test_parse_limits_of_real_self() -> None:
    text = Path("/proc/self/limits").read_text()
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert parse_limits_nofile(text) == soft


@pytest.mark.parametrize(
    ("target", "inode"),
    [
        ("socket:[12345]", 12345),
        ("socket:[0]", 0),
        ("socket:[]", None),
        ("socket:[12a]", None),
        ("pipe:[12345]", None),
        ("/dev/null", None),
        ("anon_inode:[eventpoll]", None),
        ("socket:[123", None),
    ],
)
def test_parse_socket_link(target: str, inode: int | None) -> None:
    assert parse_socket_link(target) == inode


def _fake_process(
    root: Path,
    pid: int,
    comm: str | None,
    fds: dict[int, str],
    limits: str | None = None,
) -> None:
    """A /proc/PID directory: comm, limits, and fd/N symlinks to the given targets."""
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    if comm is not None:
        (base / "comm").write_text(comm + "\n")
    if limits is not None:
        (base / "limits").write_text(limits)
    for fd, target in fds.items():
        os.symlink(target, base / "fd" / str(fd))


@pytest.fixture()
def fake_proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    _fake_process(
        root,
        100,
        "nginx",
        {0: "/dev/null", 1: "pipe:[77]", 6: "socket:[5001]", 7: "socket:[5002]"},
        LIMITS,
    )
    # A forked worker sharing the listening socket 5001.
    _fake_process(root, 101, "nginx", {3: "socket:[5001]", 9: "socket:[5003]"})
    _fake_process(root, 200, "bash", {0: "/dev/pts/0", 1: "/dev/pts/0"})
    # Vanished mid-scan: the directory is there but not its fd table.
    (root / "300").mkdir()
    # Gone between the fd scan and reading comm.
    _fake_process(root, 301, None, {4: "socket:[5999]"})
    # Entries that are not processes.
    (root / "self").symlink_to("100")
    (root / "net").mkdir()
    (root / "uptime").write_text("1.0 1.0\n")
    return root


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_process_index_maps_inodes_to_owners(fake_proc: Path) -> None:
    index = ProcessIndex(proc_root=fake_proc, min_interval=1.0)
    assert index.owners(5002) == [SocketOwner(pid=100, fd=7, comm="nginx")]
    assert sorted(index.owners(5001), key=lambda o: o.pid) == [
        SocketOwner(pid=100, fd=6, comm="nginx"),
        SocketOwner(pid=101, fd=3, comm="nginx"),
    ]
    assert index.owners(5003) == [SocketOwner(pid=101, fd=9, comm="nginx")]
    assert index.owners(5999) == []  # its process vanished before comm could be read
    assert index.owners(0) == []
    assert index.known_pids() == frozenset({100, 101})
    assert index.refresh_count == 1


def test_process_index_refreshes_lazily_and_rate_limited(fake_proc: Path) -> None:
    clock = FakeClock()
    index = ProcessIndex(proc_root=fake_proc, min_interval=1.0, clock=clock)
    assert index.refresh_count == 0  # nothing is scanned before the first lookup
    assert index.owners(5002) != []
    assert index.refresh_count == 1

    # Hits never rescan.
    index.owners(5002)
    index.owners(5001)
    assert index.refresh_count == 1

    # A socket accepted after the scan: a miss within min_interval does not rescan ...
    os.symlink("socket:[6000]", fake_proc / "200" / "fd" / "5")
    clock.now += 0.5
    assert index.owners(6000) == []
    assert index.refresh_count == 1
    # ... once min_interval has passed, the next miss does.
    clock.now += 0.6
    assert index.owners(6000) == [SocketOwner(pid=200, fd=5, comm="bash")]
    assert index.refresh_count == 2

    # inode 0 (never accepted) is never looked up in /proc.
    clock.now += 10
    assert index.owners(0) == []
    assert index.refresh_count == 2


def test_process_index_drops_stale_hits(fake_proc: Path) -> None:
    clock = FakeClock()
    index = ProcessIndex(proc_root=fake_proc, min_interval=1.0, clock=clock)
    assert len(index.owners(5001)) == 2
    # The worker closes its copy of the listener: the hit is re-checked, not trusted.
    os.unlink(fake_proc / "101" / "fd" / "3")
    assert index.owners(5001) == [SocketOwner(pid=100, fd=6, comm="nginx")]
    # The fd number is reused for something else: no owner is left -> miss -> rescan.
    os.unlink(fake_proc / "100" / "fd" / "7")
    os.symlink("socket:[7777]", fake_proc / "100" / "fd" / "7")
    clock.now += 2
    assert index.owners(5002) == []
    assert index.refresh_count == 2
    assert index.owners(7777) == [SocketOwner(pid=100, fd=7, comm="nginx")]


def test_process_index_batch_lookup_scans_once(fake_proc: Path) -> None:
    index = ProcessIndex(proc_root=fake_proc, min_interval=0.0)
    found = index.pids_of_inodes([5001, 5002, 5003, 424242, 0, 5001])
    assert set(found) == {5001, 5002, 5003}
    assert index.refresh_count == 1


def test_process_index_inodes_of_reads_one_process_now(fake_proc: Path) -> None:
    clock = FakeClock()
    index = ProcessIndex(proc_root=fake_proc, min_interval=100.0, clock=clock)
    index.refresh()
    os.symlink("socket:[8000]", fake_proc / "101" / "fd" / "10")
    assert index.inodes_of(101) == frozenset({5001, 5003, 8000})
    # The per-process read updated the index without a full rescan.
    assert index.owners(8000) == [SocketOwner(pid=101, fd=10, comm="nginx")]
    assert index.refresh_count == 1
    assert index.inodes_of(200) == frozenset()
    assert index.inodes_of(300) == frozenset()
    assert index.inodes_of(999) == frozenset()
    assert index.inodes_of(0) == frozenset()


def test_process_index_missing_root_is_a_typed_error(tmp_path: Path) -> None:
    index = ProcessIndex(proc_root=tmp_path / "nope")
    with pytest.raises(EnrichError):
        index.refresh()


def test_open_files_on_fake_proc(fake_proc: Path) -> None:
    assert open_files(100, proc_root=fake_proc) == (4, 1024)


def test_open_files_errors(fake_proc: Path) -> None:
    with pytest.raises(EnrichError):
        open_files(4242, proc_root=fake_proc)  # no such process
    with pytest.raises(EnrichError):
        open_files(101, proc_root=fake_proc)  # no limits file
    with pytest.raises(UsageError):
        open_files(0, proc_root=fake_proc)


def test_comm_of(fake_proc: Path) -> None:
    assert comm_of(100, proc_root=fake_proc) == "nginx"
    assert comm_of(300, proc_root=fake_proc) is None
    assert comm_of(0, proc_root=fake_proc) is None
    assert comm_of(os.getpid()) == Path("/proc/self/comm").read_text().rstrip("\n")


def _exited_child() -> int:
    """Fork a child that exits at once; returns its pid, not yet reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return pid


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    assert not pid_alive(-1)
    child = _exited_child()
    os.waitpid(child, 0)
    assert not pid_alive(child)  # reaped (pid reuse within the test is improbable)


def test_pid_alive_zombie_is_not_alive() -> None:
    child = _exited_child()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stat = Path(f"/proc/{child}/stat").read_text()
            if stat[stat.rfind(")") + 2] == "Z":
                break
            time.sleep(0.01)
        else:
            pytest.fail("child did not become a zombie")
        assert not pid_alive(child)
    finally:
        os.waitpid(child, 0)


def test_diag_sockets_argument_checks_need_no_kernel() -> None:
    from closewait_trace.facts.enrich import diag_sockets

    assert diag_sockets(()) == []
    with pytest.raises(UsageError):
        diag_sockets({TcpState.CLOSE_WAIT}, (socket.AF_UNIX,))


def test_diag_request_layout_ports_in_network_order() -> None:
    """inet_diag_req_v2 (56 bytes): family, protocol, ext, pad, states, then the socket id:
    ports (network order), addresses, interface, cookie; a dump honours the source port
    when it is not 0."""
    from closewait_trace.facts.enrich import diag_request

    req = diag_request(socket.AF_INET6, 0x180, 8080)
    assert len(req) == 56
    assert req[:8] == bytes([socket.AF_INET6, socket.IPPROTO_TCP, 0, 0]) + (0x180).to_bytes(4, sys.byteorder)
    assert req[8:10] == b"\x1f\x90" and req[10:] == bytes(46)
    assert diag_request(socket.AF_INET6, 0x180)[8:] == bytes(48)  # every port
    one = diag_request(socket.AF_INET, 0xFFF, 80, 443, b"a" * 16, b"b" * 16, (1, 2))
    assert one[8:12] == b"\x00\x50\x01\xbb" and one[12:44] == b"a" * 16 + b"b" * 16
    assert one[44:] == (0).to_bytes(4, sys.byteorder) + (1).to_bytes(4, sys.byteorder) \
        + (2).to_bytes(4, sys.byteorder)


def test_netlink_failure_becomes_enrich_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the netlink socket raises (here: it cannot be created) surfaces typed."""
    from closewait_trace.facts import enrich

    def unavailable(*args: object, **kwargs: object) -> None:
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(enrich.socket, "socket", unavailable)
    with pytest.raises(EnrichError, match="sock_diag"):
        enrich.diag_sockets({TcpState.CLOSE_WAIT})


def _diag_msg(family: int, state: int, src: bytes, sport: int, dst: bytes, dport: int,
              inode: int, rqueue: int = 1, cookie: int = 0x1_0000_0002) -> bytes:
    import struct

    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", sport, dport) \
        + src.ljust(16, b"\0") + dst.ljust(16, b"\0") \
        + struct.pack("=IIIIIIII", 0, cookie & 0xFFFFFFFF, cookie >> 32, 0, rqueue, 0, 1000,
                      inode)
    body += b"\x08\x00\x01\x00\x00\x00\x00\x00"  # an attribute after the fixed part
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def test_parse_diag_messages_reads_the_fixed_inet_diag_msg() -> None:
    import struct

    from closewait_trace.facts.enrich import parse_diag_messages

    v4 = _diag_msg(socket.AF_INET, 8, bytes([127, 0, 0, 1]), 8080, bytes([10, 0, 0, 7]),
                   51000, inode=0)
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1")
    v6 = _diag_msg(socket.AF_INET6, 8, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 443,
                   mapped, 40000, inode=4242, rqueue=0)
    other_state = _diag_msg(socket.AF_INET, 1, bytes(4), 1, bytes(4), 2, inode=1)
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0\0\0\0"
    out: list = []
    assert parse_diag_messages(v4 + v6 + other_state + done, frozenset({8}), out, {}) is True
    a, b = out
    assert (a.family, a.state, a.laddr, a.lport, a.raddr, a.rport) == \
        (socket.AF_INET, TcpState.CLOSE_WAIT, "127.0.0.1", 8080, "10.0.0.7", 51000)
    assert (a.inode, a.uid, a.rqueue, a.cookie, a.accepted) == (0, 1000, 1, 0x1_0000_0002, False)
    assert (b.laddr, b.lport, b.raddr, b.rport, b.inode) == \
        ("2001:db8::1", 443, "192.0.2.1", 40000, 4242)
    assert b.eof_unread is False and a.eof_unread is True
    # Without NLMSG_DONE the dump goes on.
    assert parse_diag_messages(v4, frozenset({8}), [], {}) is False


def test_parse_diag_messages_netlink_error_is_typed() -> None:
    import struct

    from closewait_trace.facts.enrich import parse_diag_messages

    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -13) + bytes(16)
    with pytest.raises(EnrichError, match="Permission denied"):
        parse_diag_messages(err, frozenset({8}), [], {})
    with pytest.raises(EnrichError, match="malformed"):
        parse_diag_messages(struct.pack("=IHHII", 4, 20, 0, 1, 0), frozenset({8}), [], {})


# --- thread states and epoll sets (fake /proc trees) ----------------------------------------

def test_parse_epoll_fdinfo_reads_targets_and_masks() -> None:
    from closewait_trace.facts.enrich import EPOLLET, parse_epoll_fdinfo

    text = ("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n"
            "tfd:        6 events: 80000019 data:                6  pos:0 ino:1234 sdev:8\n"
            "tfd:        7 events:       19 data:                7  pos:0 ino:1235 sdev:8\n")
    got = parse_epoll_fdinfo(text)
    assert got == {6: 0x80000019, 7: 0x19}
    assert got[6] & EPOLLET and not got[7] & EPOLLET


def test_edge_triggered_fds_and_thread_syscalls_on_a_fake_proc(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from closewait_trace.facts.enrich import edge_triggered_fds, syscall_name, thread_syscalls

    pid = tmp_path / "77"
    (pid / "fd").mkdir(parents=True)
    (pid / "fdinfo").mkdir()
    os.symlink("anon_inode:[eventpoll]", pid / "fd" / "4")
    os.symlink("socket:[1234]", pid / "fd" / "6")
    (pid / "fdinfo" / "4").write_text("tfd:        6 events: 80000001 data: 6\n")
    for tid, text in (("77", "232 0x4 0x7ffc 0x40 0x0 0x0 0x0 0x7ffc 0x7f00"),
                      ("78", "running"), ("79", "288 0x6 0x0 0x0 0x80800 0x0 0x0 0x7ffc 0x7f")):
        (pid / "task" / tid).mkdir(parents=True)
        (pid / "task" / tid / "syscall").write_text(text + "\n")
    assert edge_triggered_fds(77, proc_root=tmp_path) == {6}
    assert thread_syscalls(77, proc_root=tmp_path) == {
        syscall_name(232): 1, "running": 1, syscall_name(288): 1}
    assert thread_syscalls(78, proc_root=tmp_path) == {}
