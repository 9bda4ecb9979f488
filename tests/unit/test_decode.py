"""bpf/closewait.h and closewait_trace/kernel/decode.py must agree: struct layouts, constants, codec.

decode.py builds its ctypes structs from the header (closewait_trace/kernel/cheader.py parses it and
lays it out with the C rules for natural alignment). These tests pin the parser to layouts
computed by hand, check that ctypes lays the built classes out as the parser computes, and
that a changed header changes the Python side with it, or is refused with BpfHeaderError.
"""

from __future__ import annotations

import ctypes as ct
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from closewait_trace.kernel import cheader
from closewait_trace.kernel import decode as D
from closewait_trace.kernel.cheader import parse_defines, parse_structs
from closewait_trace.kernel.decode import (
    CEvent,
    Event,
    EventType,
    ExitHow,
    SockFlag,
    SockInfo,
    Stat,
    TcpState,
    decode_event,
    encode_event,
)
from closewait_trace.errors import BpfHeaderError, BpfLoadError

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "closewait.h"


@pytest.fixture(scope="module")
def header_text() -> str:
    return HEADER.read_text()


def fresh_structs(text: str) -> dict[str, type[ct.Structure]]:
    """New ctypes classes (one per struct of TEXT) filled from TEXT as decode.py fills its own."""
    header = cheader.parse_header(text)
    classes: dict[str, type[ct.Structure]] = {
        name: type(name, (ct.Structure,), {"__slots__": ()}) for name in header.structs
    }
    cheader.fill_structs(header, classes)
    return classes


# --- the parser itself --------------------------------------------------------------------------


def test_parser_computes_natural_alignment_and_padding() -> None:
    text = """
    #define N 3
    struct inner { __u8 a; __u32 b; };            /* 1 + 3 pad + 4 = 8, align 4 */
    struct outer {
        char c;            // 0
        __u64 x;           /* 8 */
        __u16 arr[N];      /* 16..22 */
        struct inner in;   /* 24..32 */
        __s32 tail;        /* 32 */
    };                     /* 36 -> 40 (align 8) */
    """
    s = parse_structs(text)
    assert (s["inner"].size, s["inner"].align) == (8, 4)
    assert [(f.name, f.offset, f.size) for f in s["inner"].fields] == [("a", 0, 1), ("b", 4, 4)]
    out = s["outer"]
    assert [(f.name, f.offset, f.size, f.count) for f in out.fields] == [
        ("c", 0, 1, None),
        ("x", 8, 8, None),
        ("arr", 16, 6, 3),
        ("in", 24, 8, None),
        ("tail", 32, 4, None),
    ]
    assert (out.size, out.align) == (40, 8)
    built = fresh_structs(text)
    assert ct.sizeof(built["outer"]) == 40
    assert [getattr(built["outer"], n).offset for n in ("c", "x", "arr", "in", "tail")] == [
        0, 8, 16, 24, 32]
    assert dict(built["outer"]._fields_)["in"] is built["inner"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("struct bad { int x; };", "struct bad: unknown type 'int'"),
        ("struct bad { __u32 *p; };", "struct bad: cannot parse '__u32 *p'"),
        ("struct bad { __u32 a, b; };", "cannot parse '__u32 a, b'"),
        ("struct bad { __u32 a : 3; };", "cannot parse '__u32 a : 3'"),
        ("struct bad { __u8 a[NOPE]; };", "array length 'NOPE' is not a number or a #define"),
        ("struct bad { struct later l; };\nstruct later { __u8 x; };",
         "struct later is not defined before it"),
        ("struct a { __u8 x; };\nstruct a { __u8 y; };", "struct a is defined twice"),
        ("struct bad { };", "struct bad has no members"),
        ("struct bad { __u8 x;\n", "a struct block is not closed"),
        ("struct bad { union { __u8 x; } u; };", "cannot parse"),
    ],
)
def test_parser_refuses_what_it_does_not_read(text: str, message: str) -> None:
    with pytest.raises(BpfHeaderError, match=re.escape(message)):
        cheader.parse_header(text)


def test_header_errors_are_load_errors_with_the_path(tmp_path: Path) -> None:
    assert issubclass(BpfHeaderError, BpfLoadError)
    with pytest.raises(BpfHeaderError, match="cannot read .*nothing.h"):
        cheader.read_header(tmp_path / "nothing.h")
    bad = tmp_path / "bad.h"
    bad.write_text("struct cw_x { float f; };\n")
    with pytest.raises(BpfHeaderError, match=re.escape(f"{bad}: struct cw_x: unknown type 'float'")):
        cheader.read_header(bad)


@pytest.mark.parametrize("edit, expect", [
    (lambda h: h.replace("__u64 listener_ino;", "unsigned long listener_ino;"), "cannot parse"),
    (lambda h: h.replace("#define CW_EV_APP_CLOSE 6", "#define CW_EV_APP_CLOSE 7"),
     "EventType.APP_CLOSE: 7 in C"),
    (lambda h: h.replace("#define CW_HIST_BUCKETS 40", ""), "#define CW_HIST_BUCKETS is missing"),
    (lambda h: None, "cannot read"),
])
def test_a_shipped_header_decode_cannot_use_stops_the_import_with_bpf_header_error(
    tmp_path: Path, header_text: str, edit: Callable[[str], str | None], expect: str
) -> None:
    pkg = tmp_path / "closewait_trace"
    shutil.copytree(Path(D.__file__).parent.parent, pkg,  # the package, decode.py is in kernel/
                    ignore=shutil.ignore_patterns("__pycache__", "bpf"))
    (pkg / "bpf").mkdir()
    (pkg / "bpf" / "closewait.bpf.c").write_text("")
    text = edit(header_text)
    if text is not None:
        (pkg / "bpf" / "closewait.h").write_text(text)
    probe = subprocess.run(
        [sys.executable, "-c", "import closewait_trace.kernel.decode"], capture_output=True, text=True,
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert probe.returncode != 0
    last = probe.stderr.strip().splitlines()[-1]
    assert last.startswith("closewait_trace.errors.BpfHeaderError: "), probe.stderr
    assert expect in last


def test_header_parses_to_the_expected_structs(header_text: str) -> None:
    structs = parse_structs(header_text)
    assert list(structs) == [
        "cw_config", "cw_sock", "cw_event", "cw_lkey", "cw_listener", "cw_peer", "cw_accept_stat",
        "cw_accept_err",
    ]
    # Spot values computed by hand from the header, so the parser cannot drift unnoticed.
    assert structs["cw_config"].size == 40
    assert structs["cw_sock"].size == 128
    assert [f.offset for f in structs["cw_sock"].fields][-4:] == [72, 88, 104, 120]
    assert structs["cw_event"].size == 184
    ev = {f.name: f for f in structs["cw_event"].fields}
    assert (ev["comm"].offset, ev["sock"].offset, ev["sock"].ctype) == (40, 56, "struct cw_sock")
    assert structs["cw_peer"].size == 24
    assert structs["cw_accept_stat"].size == 40
    assert structs["cw_accept_err"].size == 8
    assert cheader.parse_header(header_text) == D.HEADER  # decode read the same file


# --- header vs ctypes -----------------------------------------------------------------------


def test_decode_builds_every_header_struct(header_text: str) -> None:
    assert list(D.C_STRUCTS) == list(parse_structs(header_text))
    assert cheader.layout_problems(D.HEADER, D.C_STRUCTS) == []
    # the same hand-computed spot values, read from the built classes
    assert (ct.sizeof(D.CConfig), ct.sizeof(D.CSock), ct.sizeof(CEvent)) == (40, 128, 184)
    assert (CEvent.comm.offset, CEvent.sock.offset, D.CSock.laddr.offset) == (40, 56, 72)
    assert (ct.sizeof(D.CPeer), ct.sizeof(D.CAcceptStat), ct.sizeof(D.CAcceptErr)) == (24, 40, 8)
    assert (ct.sizeof(D.CListenerKey), ct.sizeof(D.CListener)) == (8, 32)
    assert dict(CEvent._fields_)["sock"] is D.CSock


@pytest.mark.parametrize("name", sorted(D.C_STRUCTS))
def test_struct_fields_offsets_and_size(header_text: str, name: str) -> None:
    cs = parse_structs(header_text)[name]
    cls = D.C_STRUCTS[name]
    assert [f.name for f in cs.fields] == [f[0] for f in cls._fields_]
    assert [f.offset for f in cs.fields] == [getattr(cls, f.name).offset for f in cs.fields]
    assert [f.size for f in cs.fields] == [getattr(cls, f.name).size for f in cs.fields]
    assert cs.size == ct.sizeof(cls)


def test_a_field_the_header_does_not_have_fails_on_write_too() -> None:
    with pytest.raises(AttributeError):
        D.CSock().closer_pid = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        D.CConfig().redy = 1  # type: ignore[attr-defined]


def _field(structs: dict[str, type[ct.Structure]], struct: str, name: str) -> object:
    return dict(structs[struct]._fields_).get(name)


@pytest.mark.parametrize(
    "old, new, follows",
    [
        # rename a field: the old name is gone (a stale caller fails on read and on write)
        ("__u32 closer_tgid;", "__u32 closer_pid;",
         lambda s: _field(s, "cw_sock", "closer_tgid") is None
         and _field(s, "cw_sock", "closer_pid") is ct.c_uint32),
        # reorder two fields of the same size (sizes unchanged: only the offsets by name tell)
        ("__u16 lport;          /* local port, host order */\n    __u16 rport;",
         "__u16 rport;\n    __u16 lport;",
         lambda s: (s["cw_sock"].rport.offset, s["cw_sock"].lport.offset) == (62, 64)),
        # widen a field: offsets of everything after it move
        ("__u16 family;", "__u32 family;",
         lambda s: (s["cw_sock"].lport.offset, ct.sizeof(s["cw_sock"])) == (64, 136)),
        # same size, other signedness
        ("__s32 last_err;", "__u32 last_err;",
         lambda s: _field(s, "cw_accept_stat", "last_err") is ct.c_uint32),
        # drop a field
        ("    __u32 ready;         /* non-zero: everything above and the filter maps are written */\n",
         "", lambda s: _field(s, "cw_config", "ready") is None and ct.sizeof(s["cw_config"]) == 40),
        # an array length constant changes
        ("#define CW_COMM_LEN 16", "#define CW_COMM_LEN 32",
         lambda s: (s["cw_sock"].owner_comm.size, ct.sizeof(s["cw_sock"])) == (32, 144)),
    ],
)
def test_the_python_side_follows_a_changed_header(
    header_text: str, old: str, new: str, follows: Callable[[dict[str, type[ct.Structure]]], bool]
) -> None:
    assert old in header_text, f"test needs updating: {old!r} not in the header"
    built = fresh_structs(header_text.replace(old, new, 1))
    assert follows(built)
    assert not follows(fresh_structs(header_text)), "the mutation changed nothing"


@pytest.mark.parametrize(
    "old, new, expect",
    [
        # a new struct decode.py has no class for
        ("#endif /* CLOSEWAIT_H */", "struct cw_new { __u64 x; };\n#endif", "struct sets differ"),
        # a type outside the subset
        ("__u64 listener_ino;", "unsigned long listener_ino;", "cannot parse"),
        # an array sized by a constant the header does not define
        ("__u8 laddr[CW_ADDR_LEN];", "__u8 laddr[CW_ADDR_LENGTH];", "'CW_ADDR_LENGTH'"),
    ],
)
def test_a_header_decode_cannot_follow_is_refused(header_text: str, old: str, new: str,
                                                  expect: str) -> None:
    assert old in header_text, f"test needs updating: {old!r} not in the header"
    header = header_text.replace(old, new, 1)
    with pytest.raises(BpfHeaderError, match=expect):
        cheader.fill_structs(cheader.parse_header(header),
                             {name: type(name, (ct.Structure,), {}) for name in D.C_STRUCTS})


# --- constants ------------------------------------------------------------------------------


def test_enum_constants_mirror_the_header() -> None:
    assert [prefix for prefix, _enum, _exclude in D.C_ENUMS] == [
        "CW_F_", "CW_EV_", "CW_EXIT_", "CW_STAT_", "CW_TCP_", "CW_PID_"]
    for prefix, members, exclude in D.C_ENUMS:
        assert D.HEADER.prefixed(prefix, exclude), f"no {prefix}* constants parsed"
        assert cheader.enum_problems(D.HEADER, prefix, members, exclude) == []


@pytest.mark.parametrize(
    "old, new, expect",
    [
        ("#define CW_F_REPORTED (1u << 9)", "#define CW_F_REPORTED (1u << 11)",
         ["SockFlag.REPORTED: 2048 in C (CW_F_REPORTED), 512 in Python"]),
        ("#define CW_EV_APP_CLOSE 6", "#define CW_EV_APP_CLOSE 6\n#define CW_EV_NEW 7",
         ["EventType.NEW: 7 in C (CW_EV_NEW), None in Python"]),
        ("#define CW_EXIT_NONE 0\n", "", ["ExitHow.NONE: None in C (CW_EXIT_NONE), 0 in Python"]),
    ],
)
def test_enum_checker_catches_drift(header_text: str, old: str, new: str,
                                    expect: list[str]) -> None:
    assert old in header_text, f"test needs updating: {old!r} not in the header"
    header = cheader.parse_header(header_text.replace(old, new, 1))
    problems = [p for prefix, members, exclude in D.C_ENUMS
                for p in cheader.enum_problems(header, prefix, members, exclude)]
    assert problems == expect


def test_flag_values_are_the_documented_bits(header_text: str) -> None:
    defines = parse_defines(header_text)
    assert defines["CW_F_PASSIVE"] == 1
    assert defines["CW_F_REPORTED"] == 1 << 9
    assert SockFlag.ACCEPT_IN_CW == 0x80


def test_scalar_constants_mirror_the_header(header_text: str) -> None:
    defines = parse_defines(header_text)
    assert defines["CW_COMM_LEN"] == D.COMM_LEN == 16
    assert defines["CW_ADDR_LEN"] == D.ADDR_LEN == 16
    assert defines["CW_HIST_BUCKETS"] == D.HIST_BUCKETS == 40
    assert defines["CW_STAT_MAX"] == D.STAT_MAX == 18
    assert max(Stat) < D.STAT_MAX
    assert set(D.LOSS_STATS) <= set(Stat)


def test_define_parser_handles_shift_and_suffix() -> None:
    assert parse_defines("#define A (1u << 7) /* c */\n#define B 40\n#define C \"x\"") == {
        "A": 128,
        "B": 40,
    }


# --- codec ----------------------------------------------------------------------------------


def _raw_event(*, family: int, laddr: bytes, raddr: bytes) -> bytes:
    c = CEvent()
    c.ts = 123_456_789_012
    c.type = EventType.CW_EXIT
    c.tgid = 4242
    c.tid = 4243
    c.oldstate = TcpState.CLOSE_WAIT
    c.newstate = TcpState.LAST_ACK
    c.exit_how = ExitHow.APP_CLOSE
    c.comm = b"nginx: worker"
    s = c.sock
    s.skaddr = 0xFFFF_8880_DEAD_BEEF
    s.ts_first = 1
    s.ts_established = 2
    s.ts_cw_enter = 100_000_000_000
    s.ts_accept = 3
    s.ts_close = 123_456_789_000
    s.owner_tgid = 4242
    s.closer_tgid = 4242
    s.flags = int(SockFlag.PASSIVE | SockFlag.ACCEPTED | SockFlag.APP_CLOSED | SockFlag.REPORTED)
    s.family = family
    s.lport = 443
    s.rport = 61_000
    s.laddr[:] = list(laddr)
    s.raddr[:] = list(raddr)
    s.owner_comm = b"nginx"
    return bytes(c)


V4_MAPPED_L = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
V4_MAPPED_R = bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 7])
V6_L = bytes.fromhex("20010db8000000000000000000000001")
V6_R = bytes.fromhex("fe800000000000000000000000000abc")


def test_decode_ipv4_mapped_event() -> None:
    raw = _raw_event(family=socket.AF_INET, laddr=V4_MAPPED_L, raddr=V4_MAPPED_R)
    ev = decode_event(raw)
    assert ev.type is EventType.CW_EXIT and ev.exit_how is ExitHow.APP_CLOSE
    assert (ev.ts, ev.tgid, ev.tid, ev.comm) == (123_456_789_012, 4242, 4243, "nginx: worker")
    assert (ev.oldstate, ev.newstate) == (8, 9)
    s = ev.sock
    assert (s.laddr, s.lport, s.raddr, s.rport) == ("192.0.2.1", 443, "198.51.100.7", 61_000)
    assert s.key == (0xFFFF_8880_DEAD_BEEF, 100_000_000_000)
    assert s.flags == SockFlag.PASSIVE | SockFlag.ACCEPTED | SockFlag.APP_CLOSED | SockFlag.REPORTED
    assert s.owner_comm == "nginx"


def test_decode_ipv6_event() -> None:
    raw = _raw_event(family=socket.AF_INET6, laddr=V6_L, raddr=V6_R)
    s = decode_event(raw).sock
    assert (s.family, s.laddr, s.raddr) == (socket.AF_INET6, "2001:db8::1", "fe80::abc")


def test_dual_stack_socket_with_mapped_address_shows_ipv4_text() -> None:
    raw = _raw_event(family=socket.AF_INET6, laddr=V4_MAPPED_L, raddr=V4_MAPPED_R)
    s = decode_event(raw).sock
    assert (s.laddr, s.raddr) == ("192.0.2.1", "198.51.100.7")


@pytest.mark.parametrize(
    "family, laddr, raddr",
    [
        (socket.AF_INET, V4_MAPPED_L, V4_MAPPED_R),
        (socket.AF_INET6, V6_L, V6_R),
        (socket.AF_INET6, V4_MAPPED_L, V6_R),
    ],
)
def test_round_trip_bytes(family: int, laddr: bytes, raddr: bytes) -> None:
    raw = _raw_event(family=family, laddr=laddr, raddr=raddr)
    assert len(raw) == ct.sizeof(CEvent)
    again = encode_event(decode_event(raw))
    assert again == raw
    # the address bytes sit where the header says: cw_event.sock (56) + cw_sock.laddr (72)
    assert again[56 + 72 : 56 + 88] == laddr


def test_round_trip_records() -> None:
    sock = SockInfo(
        skaddr=7, ts_first=1, ts_established=2, ts_cw_enter=3, ts_accept=4, ts_close=5,
        owner_tgid=6, closer_tgid=7, flags=SockFlag.ACTIVE | SockFlag.OWNER_KNOWN,
        family=socket.AF_INET6, laddr="::1", lport=1, raddr="2001:db8::ff", rport=65535,
        owner_comm="python3",
    )
    ev = Event(
        ts=9, type=EventType.APP_CLOSE, tgid=1, tid=2, oldstate=-1, newstate=0,
        exit_how=ExitHow.NONE, comm="x", sock=sock,
    )
    assert decode_event(encode_event(ev)) == ev
    v4 = replace(sock, family=socket.AF_INET, laddr="127.0.0.1", raddr="10.1.2.3")
    ev4 = replace(ev, sock=v4)
    assert decode_event(encode_event(ev4)) == ev4
    assert decode_event(bytearray(encode_event(ev4))) == ev4
    assert decode_event(memoryview(encode_event(ev4))) == ev4


def test_decode_of_a_longer_buffer_reads_the_record_only() -> None:
    raw = _raw_event(family=socket.AF_INET, laddr=V4_MAPPED_L, raddr=V4_MAPPED_R)
    assert decode_event(raw + b"\xff" * 8) == decode_event(raw)


@pytest.mark.parametrize("length", [0, 1, ct.sizeof(CEvent) - 1])
def test_decode_short_buffer_raises(length: int) -> None:
    with pytest.raises(ValueError, match=f"{length} bytes, expected {ct.sizeof(CEvent)}"):
        decode_event(b"\0" * length)


@pytest.mark.parametrize("code, text", [
    (9, "killed by signal 9 (SIGKILL)"),
    (15, "killed by signal 15 (SIGTERM)"),
    (0x86, "killed by signal 6 (SIGABRT), core dumped"),
    (3 << 8, "exited with status 3"),
    (0, "exited with status 0"),
    (0x7E, "killed by signal 126"),
])
def test_exit_code_text(code: int, text: str) -> None:
    assert D.exit_code_text(code) == text


def test_process_exit_event_carries_its_exit_code() -> None:
    raw = bytearray(_raw_event(family=socket.AF_INET, laddr=V4_MAPPED_L, raddr=V4_MAPPED_R))
    c = CEvent.from_buffer(raw)
    c.exit_how, c.exit_code = int(ExitHow.PROCESS_EXIT), 9
    ev = decode_event(bytes(raw))
    assert (ev.exit_how, ev.exit_code) == (ExitHow.PROCESS_EXIT, 9)
    assert encode_event(ev) == bytes(raw)
