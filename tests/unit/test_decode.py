"""bpf/closewait.h and closewait_trace/decode.py must agree: struct layouts, constants, codec.

The header is parsed here with a small regex parser and laid out with the C rules for
natural alignment (what clang does for the BPF target and for x86-64/arm64 userspace), then
compared with the ctypes mirror field by field: name, order, type, offset, size.
"""

from __future__ import annotations

import ctypes as ct
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from closewait_trace import decode as D
from closewait_trace.decode import (
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

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "closewait.h"

# --- a tiny C header parser -------------------------------------------------------------------

#: C scalar type -> (size, alignment, ctypes type)
SCALARS: dict[str, tuple[int, int, type]] = {
    "__u8": (1, 1, ct.c_uint8),
    "__u16": (2, 2, ct.c_uint16),
    "__u32": (4, 4, ct.c_uint32),
    "__u64": (8, 8, ct.c_uint64),
    "__s32": (4, 4, ct.c_int32),
    "char": (1, 1, ct.c_char),
}

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^[ \t]*#define[ \t]+(\w+)[ \t]+(.+?)[ \t]*$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_FIELD = re.compile(r"^(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?$")


@dataclass(frozen=True)
class CField:
    name: str
    ctype: str  # "__u32", "char", "struct cw_sock"
    count: int | None  # array length, None for a scalar
    offset: int
    size: int


@dataclass(frozen=True)
class CStruct:
    name: str
    fields: tuple[CField, ...]
    size: int
    align: int


def _eval_define(text: str) -> int | None:
    """Integer value of a #define body: 16, 1u, (1u << 3); None for anything else."""
    t = text.strip()
    while t.startswith("(") and t.endswith(")"):
        t = t[1:-1].strip()
    m = re.fullmatch(r"(\d+)[uUlL]*", t)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"(\d+)[uUlL]*\s*<<\s*(\d+)", t)
    if m:
        return int(m.group(1)) << int(m.group(2))
    return None


def parse_defines(text: str) -> dict[str, int]:
    out = {}
    for name, body in _DEFINE.findall(_COMMENT.sub("", text)):
        value = _eval_define(body)
        if value is not None:
            out[name] = value
    return out


def parse_structs(text: str) -> dict[str, CStruct]:
    """Every `struct NAME { ... };` of the header, laid out with natural alignment."""
    defines = parse_defines(text)
    body_text = _COMMENT.sub("", text)
    structs: dict[str, CStruct] = {}
    for sname, body in _STRUCT.findall(body_text):
        offset = 0
        align = 1
        fields = []
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            m = _FIELD.match(decl)
            if m is None:
                raise ValueError(f"struct {sname}: cannot parse {decl!r}")
            ctype, fname, count_text = m.groups()
            if ctype.startswith("struct "):
                inner = structs[ctype.split()[1]]  # must be defined earlier in the header
                esize, ealign = inner.size, inner.align
            elif ctype in SCALARS:
                esize, ealign, _ = SCALARS[ctype]
            else:
                raise ValueError(f"struct {sname}: unknown type {ctype!r}")
            count = None
            if count_text is not None:
                count = int(count_text) if count_text.isdigit() else defines[count_text]
            size = esize * (count or 1)
            offset = (offset + ealign - 1) // ealign * ealign
            fields.append(CField(fname, ctype, count, offset, size))
            offset += size
            align = max(align, ealign)
        total = (offset + align - 1) // align * align
        structs[sname] = CStruct(sname, tuple(fields), total, align)
    return structs


def layout_problems(text: str, mirrors: dict[str, type[ct.Structure]]) -> list[str]:
    """Every disagreement between the header's structs and their ctypes mirrors."""
    problems: list[str] = []
    structs = parse_structs(text)
    if set(structs) != set(mirrors):
        problems.append(f"struct sets differ: header {sorted(structs)} vs mirror {sorted(mirrors)}")
    ctype_of_struct = {name: cls for name, cls in mirrors.items()}
    for name, cls in mirrors.items():
        cs = structs.get(name)
        if cs is None:
            continue
        py_fields = [f[0] for f in cls._fields_]
        c_fields = [f.name for f in cs.fields]
        if py_fields != c_fields:
            problems.append(f"{name}: fields {c_fields} in C, {py_fields} in Python")
        if cs.size != ct.sizeof(cls):
            problems.append(f"{name}: size {cs.size} in C, {ct.sizeof(cls)} in Python")
        py_types = dict(cls._fields_)
        for f in cs.fields:
            if f.name not in py_types:
                continue
            desc = getattr(cls, f.name)
            if desc.offset != f.offset:
                problems.append(f"{name}.{f.name}: offset {f.offset} in C, {desc.offset} in Python")
            if desc.size != f.size:
                problems.append(f"{name}.{f.name}: size {f.size} in C, {desc.size} in Python")
            pt = py_types[f.name]
            if f.count is not None:
                if getattr(pt, "_length_", None) != f.count:
                    problems.append(f"{name}.{f.name}: array length {f.count} in C, {pt} in Python")
                    continue
                pt = pt._type_
            if f.ctype.startswith("struct "):
                want = ctype_of_struct.get(f.ctype.split()[1])
            else:
                want = SCALARS[f.ctype][2]
            if pt is not want:
                problems.append(f"{name}.{f.name}: type {f.ctype} in C, {pt.__name__} in Python")
    return problems


@pytest.fixture(scope="module")
def header_text() -> str:
    return HEADER.read_text()


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


def test_parser_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="unknown type 'int'"):
        parse_structs("struct bad { int x; };")


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


# --- header vs ctypes -----------------------------------------------------------------------


def test_every_header_struct_matches_its_ctypes_mirror(header_text: str) -> None:
    assert layout_problems(header_text, D.C_STRUCTS) == []


@pytest.mark.parametrize("name", sorted(D.C_STRUCTS))
def test_struct_fields_offsets_and_size(header_text: str, name: str) -> None:
    cs = parse_structs(header_text)[name]
    cls = D.C_STRUCTS[name]
    assert [f.name for f in cs.fields] == [f[0] for f in cls._fields_]
    assert [f.offset for f in cs.fields] == [getattr(cls, f.name).offset for f in cs.fields]
    assert [f.size for f in cs.fields] == [getattr(cls, f.name).size for f in cs.fields]
    assert cs.size == ct.sizeof(cls)


@pytest.mark.parametrize(
    "old, new, expect",
    [
        # rename a field
        ("__u32 closer_tgid;", "__u32 closer_pid;", "cw_sock: fields"),
        # reorder two fields of the same size (sizes and offsets unchanged: only names tell)
        ("__u16 lport;          /* local port, host order */\n    __u16 rport;",
         "__u16 rport;\n    __u16 lport;", "cw_sock: fields"),
        # widen a field: offsets of everything after it move
        ("__u16 family;", "__u32 family;", "cw_sock.lport: offset 64 in C, 62 in Python"),
        # same size, other signedness
        ("__s32 last_err;", "__u32 last_err;", "cw_accept_stat.last_err: type __u32"),
        # drop a field
        ("    __u32 ready;         /* non-zero: everything above and the filter maps are written */\n", "",
         "cw_config: fields"),
        # an array length constant changes
        ("#define CW_COMM_LEN 16", "#define CW_COMM_LEN 32", "cw_sock.owner_comm: size 32"),
        # a new struct the mirror does not know
        ("#endif /* CLOSEWAIT_H */", "struct cw_new { __u64 x; };\n#endif", "struct sets differ"),
    ],
)
def test_layout_checker_catches_drift(header_text: str, old: str, new: str, expect: str) -> None:
    assert old in header_text, f"test needs updating: {old!r} not in the header"
    mutated = header_text.replace(old, new, 1)
    problems = layout_problems(mutated, D.C_STRUCTS)
    assert problems, "the layout checker accepted a changed header"
    assert any(expect in p for p in problems), problems


# --- constants ------------------------------------------------------------------------------


def _prefixed(defines: dict[str, int], prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    return {
        k[len(prefix):]: v for k, v in defines.items() if k.startswith(prefix) and k not in exclude
    }


@pytest.mark.parametrize(
    "prefix, enum_cls, exclude",
    [
        ("CW_F_", SockFlag, ()),
        ("CW_EV_", EventType, ()),
        ("CW_EXIT_", ExitHow, ()),
        ("CW_STAT_", Stat, ("CW_STAT_MAX",)),
        ("CW_TCP_", TcpState, ()),
        ("CW_PID_", D.PidMark, ()),
    ],
)
def test_enum_constants_mirror_the_header(
    header_text: str, prefix: str, enum_cls: type, exclude: tuple[str, ...]
) -> None:
    defines = parse_defines(header_text)
    c_side = _prefixed(defines, prefix, exclude)
    py_side = {m.name: int(m.value) for m in enum_cls}  # type: ignore[attr-defined]
    assert c_side, f"no {prefix}* constants parsed"
    assert py_side == c_side


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
    assert defines["CW_STAT_MAX"] == D.STAT_MAX == 16
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
