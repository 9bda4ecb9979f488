"""Kernel-free parsing of the /proc text closewait_trace.facts.holders reads."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from closewait_trace.facts.holders import (
    EpollEntry,
    ProcState,
    parse_epoll_entries,
    parse_fd_set,
    parse_pollfds,
    parse_stat_state,
    parse_syscall,
)


@pytest.mark.parametrize(("text", "state"), [
    ("22217 (python3) S 22214 22214 22214 0 -1", ProcState.SLEEPING),
    ("5 (a) b) T 1 1", ProcState.STOPPED),  # a comm with ") " inside
    ("5 (gdb target) t 1", ProcState.TRACED),
    ("7 (w) R 1", ProcState.RUNNING),
    ("7 (w) D 1", ProcState.DISK),
    ("7 (w) Z 1", ProcState.ZOMBIE),
    ("7 (kworker/0:1) I 2", ProcState.IDLE),
    ("7 (w) W 1", ProcState.OTHER),
    ("7 (w)", None),
    ("garbage", None),
])
def test_parse_stat_state(text: str, state: ProcState | None) -> None:
    assert parse_stat_state(text) == state


def test_parse_syscall_lines_as_the_kernel_writes_them() -> None:
    line = "288 0x3 0x7ffc0abdd100 0x7ffc0abdd0f4 0x80000 0x0 0x0 0x7ffc0abdd0c8 0x7fcd02328f63\n"
    assert parse_syscall(line) == (288, (3, 0x7FFC0ABDD100, 0x7FFC0ABDD0F4, 0x80000, 0, 0))
    assert parse_syscall("running\n") == (None, ())
    assert parse_syscall("-1 0x7ffc0abdd0c8 0x7fcd02328f63\n") == (None, ())
    assert parse_syscall("") == (None, ())
    assert parse_syscall("7 0xzz") == (None, ())


EPOLL_FDINFO = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t1038
tfd:        3 events: 80000019 data:                3  pos:0 ino:166057 sdev:9
tfd:        9 events:       19 data:                9  pos:0 ino:2a sdev:9
tfd:       11 events:       zz data:                9
"""


def test_parse_epoll_entries_with_target_inodes() -> None:
    first, second = parse_epoll_entries(4, EPOLL_FDINFO)
    assert first == EpollEntry(epfd=4, tfd=3, events=0x80000019, inode=0x166057)
    assert first.edge_triggered and not first.exclusive
    assert second == EpollEntry(epfd=4, tfd=9, events=0x19, inode=0x2A)
    assert not second.edge_triggered


def test_parse_epoll_entries_of_older_kernels_without_inode() -> None:
    [entry] = parse_epoll_entries(5, "tfd:        3 events:       19 data: 3\n")
    assert entry.inode is None and entry.tfd == 3


def test_parse_pollfds_and_fd_set() -> None:
    raw = struct.pack("=ihh", 5, 1, 0) + struct.pack("=ihh", -1, 1, 0) + \
        struct.pack("=ihh", 3, 1, 0) + b"\x01\x02"  # a truncated tail is ignored
    assert parse_pollfds(raw) == [5, 3]
    bitmap = (1 << 3 | 1 << 64 | 1 << 70).to_bytes(16, "little")
    assert parse_fd_set(bitmap, 71) == [3, 64, 70]
    assert parse_fd_set(bitmap, 65) == [3, 64]


@given(st.text())
def test_parsers_never_raise_on_arbitrary_text(text: str) -> None:
    parse_stat_state(text)
    parse_syscall(text)
    parse_epoll_entries(3, text)


@given(st.binary(), st.integers(min_value=0, max_value=4096))
def test_binary_parsers_never_raise(raw: bytes, nfds: int) -> None:
    assert all(fd >= 0 for fd in parse_pollfds(raw))
    assert all(fd < nfds for fd in parse_fd_set(raw, nfds))
