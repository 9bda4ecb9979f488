"""The choice of the event output (ring buffer or perf buffer) and how the perf buffer's lost
callback is counted: pure logic, no kernel."""

from __future__ import annotations

import ctypes as ct
import mmap
from pathlib import Path

import pytest

from closewait_trace.kernel import decode, features as F
from closewait_trace.kernel.attach import (
    RINGBUF_MAX_BYTES,
    ProbeSettings,
    merge_event_losses,
    ringbuf_pages_for,
)
from closewait_trace.kernel.decode import Stat
from closewait_trace.errors import UsageError
from closewait_trace.kernel.features import Backend, EventPath

HAVE = (True, "a ring buffer map was created")
REFUSED = (False, "BPF_MAP_TYPE_RINGBUF refused: EINVAL")
UNKNOWN = (None, "could not tell: creating a ring buffer map failed with EPERM")


def test_ring_buffer_where_the_kernel_has_one() -> None:
    c = F.choose_event_path(HAVE, {})
    assert c.path is EventPath.RING_BUFFER and c.notice is None


def test_perf_buffer_where_the_kernel_refuses_a_ring_buffer_map() -> None:
    c = F.choose_event_path(REFUSED, {})
    assert c.path is EventPath.PERF_BUFFER
    assert c.notice is not None and "EINVAL" in c.notice and "perf buffer (64 pages per CPU)" in c.notice


def test_unknown_keeps_the_ring_buffer() -> None:
    """EPERM and the like say nothing of the map type: loading says what is wrong."""
    assert F.choose_event_path(UNKNOWN, {}).path is EventPath.RING_BUFFER


@pytest.mark.parametrize("value", ["1", "yes"])
def test_forced_perf_buffer(value: str) -> None:
    c = F.choose_event_path(HAVE, {F.FORCE_PERF_ENV: value})
    assert c.path is EventPath.PERF_BUFFER
    assert c.notice is not None and c.notice.startswith(f"CLOSEWAIT_FORCE_PERF_BUFFER={value}:")


@pytest.mark.parametrize("value", ["", "0"])
def test_not_forced(value: str) -> None:
    assert F.choose_event_path(HAVE, {F.FORCE_PERF_ENV: value}).path is EventPath.RING_BUFFER


def test_perf_pages() -> None:
    c = F.choose_event_path(REFUSED, {F.PERF_PAGES_ENV: "8"})
    assert c.perf_pages == 8 and "8 pages per CPU" in (c.notice or "")
    for bad in ("3", "0", "-4", "many"):
        with pytest.raises(UsageError, match="power of two"):
            F.choose_event_path(REFUSED, {F.PERF_PAGES_ENV: bad})


def test_perf_buffer_is_a_compile_time_choice() -> None:
    src = Path("/nonexistent")
    ring = ProbeSettings(backend=Backend.TRACEPOINT, events=EventPath.RING_BUFFER).cflags(src)
    perf = ProbeSettings(backend=Backend.TRACEPOINT, events=EventPath.PERF_BUFFER).cflags(src)
    assert "-DCW_EVENTS_PERF" not in ring
    assert "-DCW_EVENTS_PERF" in perf


def test_losses_seen_twice_are_counted_once() -> None:
    """The kernel counts a failed bpf_perf_event_output at once; the lost callback reports the
    same losses later (or not at all at the end of a run): the larger count stands."""
    stats = {Stat.RINGBUF_LOST: 5, Stat.SOCKS_FULL: 2}
    assert merge_event_losses(stats, 0) == stats
    assert merge_event_losses(stats, 3)[Stat.RINGBUF_LOST] == 5
    merged = merge_event_losses(stats, 9)
    assert merged[Stat.RINGBUF_LOST] == 9 and merged[Stat.SOCKS_FULL] == 2
    assert stats[Stat.RINGBUF_LOST] == 5  # not changed in place
    assert merge_event_losses({}, 4)[Stat.RINGBUF_LOST] == 4


def test_no_ring_buffer_helper_in_the_perf_path() -> None:
    """The perf path must run before 5.8: no bpf_ringbuf_* helper outside the ring buffer's
    branch of the event output."""
    bpf = Path(__file__).resolve().parents[2] / "bpf"
    text = "\n".join(p.read_text() for p in sorted(bpf.glob("*.[ch]")))
    perf_only = _strip_branch(text, "#ifdef CW_EVENTS_PERF", "#else", "#endif")
    assert "ringbuf" in text
    assert "ringbuf_" not in perf_only.replace("RINGBUF_", "")
    assert "perf_submit" in perf_only


def _strip_branch(text: str, start: str, other: str, end: str) -> str:
    """``text`` as compiled with CW_EVENTS_PERF (only the simple #ifdef/#else/#endif used)."""
    out, skip, inside = [], False, False
    for line in text.splitlines():
        s = line.strip()
        if s == start:
            inside = True
        elif inside and s == other:
            skip = True
        elif inside and s == end:
            inside = skip = False
        elif not skip:
            out.append(line)
    return "\n".join(out)


def test_the_ring_buffer_holds_an_exit_of_every_close_wait_socket() -> None:
    """A process dying with every socket of the cw map open sends that many exits at once."""
    record = ct.sizeof(decode.CEvent) + 8
    for max_cw in (256, 1024, 32768, 100_000):
        pages = ringbuf_pages_for(max_cw)
        assert pages >= 64 and pages & (pages - 1) == 0, pages  # a power of two
        assert pages * mmap.PAGESIZE >= max_cw * record
        assert pages == 64 or (pages // 2) * mmap.PAGESIZE < max_cw * record  # no larger
    assert ringbuf_pages_for(1 << 22) * mmap.PAGESIZE == RINGBUF_MAX_BYTES  # capped
