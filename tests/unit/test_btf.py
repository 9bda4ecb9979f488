"""Kernel-free tests of closewait_trace.kernel.btf on synthetic BTF blobs built here byte by byte."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from closewait_trace.kernel import btf
from closewait_trace.kernel.btf import BtfFile, BtfKind, func_arg_count, func_btf_id
from closewait_trace.errors import TracingUnavailableError


class BtfBuilder:
    """Writes a BTF blob: header, type section, string section (little or big endian)."""

    def __init__(self, order: str = "<") -> None:
        self.order = order
        self.strings = bytearray(b"\0")
        self.string_offs: dict[str, int] = {"": 0}
        self.types: list[bytes] = []

    def s(self, text: str) -> int:
        if text not in self.string_offs:
            self.string_offs[text] = len(self.strings)
            self.strings += text.encode() + b"\0"
        return self.string_offs[text]

    def u32(self, *vals: int) -> bytes:
        return struct.pack(f"{self.order}{len(vals)}I", *vals)

    def add(self, kind: int, name: str | int, vlen: int, size_or_type: int, trailer: bytes = b"", kflag: int = 0) -> int:
        name_off = name if isinstance(name, int) else self.s(name)
        info = (kflag << 31) | (kind << 24) | vlen
        self.types.append(self.u32(name_off, info, size_or_type) + trailer)
        return len(self.types)  # type id

    def blob(self, type_off: int = 0, extra_header: bytes = b"") -> bytes:
        types = b"".join(self.types)
        hdr_len = 24 + len(extra_header)
        pad = b"\0" * type_off
        header = struct.pack(
            f"{self.order}HBBIIIII",
            0xEB9F,
            1,
            0,
            hdr_len,
            type_off,
            len(types),
            type_off + len(types),
            len(self.strings),
        )
        return header + extra_header + pad + types + bytes(self.strings)


def sample(order: str = "<") -> BtfBuilder:
    """Every kind, each with trailing data, before and between the FUNCs under test."""
    b = BtfBuilder(order)
    u = b.u32
    int_id = b.add(BtfKind.INT, "int", 0, 4, u(0x01000020))  # signed, 32 bits
    ptr_id = b.add(BtfKind.PTR, "", 0, int_id)
    b.add(BtfKind.ARRAY, "", 0, 0, u(int_id, int_id, 16))
    sock_id = b.add(BtfKind.STRUCT, "sock", 2, 16, u(b.s("a"), int_id, 0) + u(b.s("b"), ptr_id, 64))
    b.add(BtfKind.UNION, "u", 1, 8, u(b.s("x"), ptr_id, 0))
    b.add(BtfKind.ENUM, "e", 3, 4, u(b.s("E0"), 0) + u(b.s("E1"), 1) + u(b.s("E2"), 2))
    b.add(BtfKind.FWD, "fwd", 0, 0)
    b.add(BtfKind.TYPEDEF, "int_t", 0, int_id)
    b.add(BtfKind.VOLATILE, "", 0, int_id)
    b.add(BtfKind.CONST, "", 0, int_id)
    b.add(BtfKind.RESTRICT, "", 0, ptr_id)
    sock_ptr = b.add(BtfKind.PTR, "", 0, sock_id)
    proto4 = b.add(
        BtfKind.FUNC_PROTO,
        "",
        4,
        sock_ptr,
        u(b.s("sk"), sock_ptr) + u(b.s("flags"), int_id) + u(b.s("err"), ptr_id) + u(b.s("kern"), int_id),
    )
    b.add(BtfKind.FUNC, "inet_csk_accept", 1, proto4)  # vlen = linkage (global)
    b.add(BtfKind.VAR, "some_var", 0, int_id, u(1))
    b.add(BtfKind.DATASEC, ".data", 2, 8, u(int_id, 0, 4) + u(int_id, 4, 4))
    b.add(BtfKind.FLOAT, "double", 0, 8)
    b.add(BtfKind.DECL_TAG, "tag", 0, int_id, u(0xFFFFFFFF))
    b.add(BtfKind.TYPE_TAG, "user", 0, int_id)
    b.add(BtfKind.ENUM64, "e64", 2, 8, u(b.s("A"), 1, 0) + u(b.s("B"), 0, 1))
    proto2 = b.add(BtfKind.FUNC_PROTO, "", 2, 0, u(b.s("sk"), sock_ptr) + u(b.s("timeout"), int_id))
    b.add(BtfKind.FUNC, "tcp_close", 1, proto2)
    vararg = b.add(BtfKind.FUNC_PROTO, "", 2, int_id, u(b.s("fmt"), ptr_id) + u(0, 0))
    b.add(BtfKind.FUNC, "_printk", 1, vararg)
    proto0 = b.add(BtfKind.FUNC_PROTO, "", 0, 0)
    b.add(BtfKind.FUNC, "noargs", 0, proto0)
    b.add(BtfKind.STRUCT, "empty", 0, 0)
    return b


def write(tmp_path: Path, data: bytes, name: str = "vmlinux") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    btf.clear_cache()


def test_func_arg_count_after_every_kind(tmp_path: Path) -> None:
    p = write(tmp_path, sample().blob())
    assert func_arg_count("inet_csk_accept", p) == 4
    assert func_arg_count("tcp_close", p) == 2
    assert func_arg_count("noargs", p) == 0
    assert func_arg_count("not_there", p) is None
    assert func_arg_count("sock", p) is None  # a STRUCT, not a FUNC


def test_func_btf_id_and_names(tmp_path: Path) -> None:
    p = write(tmp_path, sample().blob())
    b = btf.load_btf(p)
    fid = func_btf_id("inet_csk_accept", p)
    assert fid == 14
    assert b.kind(fid) == BtfKind.FUNC
    assert b.name(fid) == "inet_csk_accept"
    assert b.func_params("inet_csk_accept") == ["sk", "flags", "err", "kern"]
    tcp_close = func_btf_id("tcp_close", p)
    assert tcp_close is not None and b.name(tcp_close) == "tcp_close"
    assert func_btf_id("nope", p) is None
    assert b.type_count == 27
    assert b.kind(0) == 0 and b.name(0) == ""


def test_variadic_marker_is_not_a_parameter(tmp_path: Path) -> None:
    p = write(tmp_path, sample().blob())
    assert func_arg_count("_printk", p) == 1


def test_big_endian_blob(tmp_path: Path) -> None:
    p = write(tmp_path, sample(">").blob())
    assert func_arg_count("inet_csk_accept", p) == 4
    assert func_arg_count("tcp_close", p) == 2


def test_longer_header_and_type_offset(tmp_path: Path) -> None:
    # A newer kernel may grow the header; offsets count from hdr_len.
    p = write(tmp_path, sample().blob(type_off=8, extra_header=b"\0" * 8))
    assert func_arg_count("inet_csk_accept", p) == 4


def test_name_inside_another_string_found_by_full_index(tmp_path: Path) -> None:
    b = BtfBuilder()
    long_off = b.s("xx_hidden")
    proto = b.add(BtfKind.FUNC_PROTO, "", 1, 0, b.u32(b.s("a"), 0))
    b.add(BtfKind.FUNC, long_off + 3, 0, proto)  # name "hidden" shares the tail of "xx_hidden"
    p = write(tmp_path, b.blob())
    assert func_arg_count("hidden", p) == 1
    assert func_btf_id("hidden", p) == 2


def test_first_definition_wins(tmp_path: Path) -> None:
    b = BtfBuilder()
    p1 = b.add(BtfKind.FUNC_PROTO, "", 1, 0, b.u32(b.s("a"), 0))
    first = b.add(BtfKind.FUNC, "dup", 0, p1)
    p3 = b.add(BtfKind.FUNC_PROTO, "", 3, 0, b.u32(b.s("a"), 0) * 3)
    b.add(BtfKind.FUNC, "dup", 0, p3)
    p = write(tmp_path, b.blob())
    assert func_btf_id("dup", p) == first
    assert func_arg_count("dup", p) == 1


def test_cache_reuses_and_notices_changes(tmp_path: Path) -> None:
    p = write(tmp_path, sample().blob())
    a = btf.load_btf(p)
    assert btf.load_btf(p) is a
    b = BtfBuilder()
    proto = b.add(BtfKind.FUNC_PROTO, "", 3, 0, b.u32(b.s("a"), 0) * 3)
    b.add(BtfKind.FUNC, "inet_csk_accept", 0, proto)
    p.write_bytes(b.blob())
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert func_arg_count("inet_csk_accept", p) == 3


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TracingUnavailableError, match="no BTF file"):
        func_arg_count("tcp_close", tmp_path / "nope")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[:10], "shorter than a BTF header"),
        (lambda d: b"\x00\x00" + d[2:], "bad magic"),
        (lambda d: d[:2] + b"\x02" + d[3:], "unsupported BTF version"),
        (lambda d: d[:-5], "past the end"),
    ],
)
def test_corrupt_header(tmp_path: Path, mutate: object, message: str) -> None:
    data = sample().blob()
    assert callable(mutate)
    p = write(tmp_path, mutate(data))
    with pytest.raises(TracingUnavailableError, match=message):
        func_arg_count("tcp_close", p)


def test_unknown_kind_is_corrupt(tmp_path: Path) -> None:
    b = sample()
    b.add(25, "future", 0, 0)
    with pytest.raises(TracingUnavailableError, match="unknown type kind 25"):
        BtfFile(b.blob())


def test_trailer_running_past_section_is_corrupt() -> None:
    b = BtfBuilder()
    # A STRUCT that claims 5 members but carries only one.
    b.add(BtfKind.STRUCT, "s", 5, 4, b.u32(0, 0, 0))
    with pytest.raises(TracingUnavailableError, match="runs past the end"):
        BtfFile(b.blob())


def test_func_pointing_to_non_proto_is_corrupt(tmp_path: Path) -> None:
    b = BtfBuilder()
    i = b.add(BtfKind.INT, "int", 0, 4, b.u32(32))
    b.add(BtfKind.FUNC, "weird", 0, i)
    p = write(tmp_path, b.blob())
    assert func_btf_id("weird", p) == 2
    with pytest.raises(TracingUnavailableError, match="not FUNC_PROTO"):
        func_arg_count("weird", p)


def test_string_section_must_end_with_nul() -> None:
    b = sample()
    data = bytearray(b.blob())
    data[-1] = ord("x")
    with pytest.raises(TracingUnavailableError, match="NUL-terminated"):
        BtfFile(bytes(data))


# --- struct member offsets ------------------------------------------------------------------


def layouts(order: str = "<") -> BtfBuilder:
    """task_struct / sock (here inet_sk: sample() has a sock) / net shapes in miniature: nested structs, an anonymous union and
    struct, typedefs and qualifiers on the way, a bitfield struct (kind_flag), an array."""
    b = sample(order)
    u = b.u32
    u8 = b.add(BtfKind.INT, "u8", 0, 1, u(8))
    u16 = b.add(BtfKind.INT, "u16", 0, 2, u(16))
    uint = b.add(BtfKind.INT, "unsigned int", 0, 4, u(32))
    ns_common = b.add(BtfKind.STRUCT, "ns_common", 2, 16,
                      u(b.s("stashed"), uint, 0) + u(b.s("inum"), uint, 64))
    net = b.add(BtfKind.STRUCT, "net", 2, 64, u(b.s("passive"), uint, 0) + u(b.s("ns"), ns_common, 128))
    net_ptr = b.add(BtfKind.PTR, "", 0, net)
    possible_net = b.add(BtfKind.STRUCT, "", 1, 8, u(b.s("net"), net_ptr, 0))
    possible_net_t = b.add(BtfKind.TYPEDEF, "possible_net_t", 0, possible_net)
    anon_ports = b.add(BtfKind.STRUCT, "", 2, 4, u(b.s("skc_dport"), u16, 0) + u(b.s("skc_num"), u16, 16))
    anon_union = b.add(BtfKind.UNION, "", 2, 4, u(b.s("skc_portpair"), uint, 0) + u(0, anon_ports, 0))
    const_u16 = b.add(BtfKind.CONST, "", 0, u16)
    # bitfields: kind_flag set, offset = bitfield_size << 24 | bit offset
    sock_common = b.add(BtfKind.STRUCT, "sock_common", 5, 64,
                        u(b.s("skc_daddr"), uint, 0) + u(0, anon_union, 96)
                        + u(b.s("skc_family"), const_u16, 128)
                        + u(b.s("skc_reuse"), u8, (4 << 24) | 144)
                        + u(b.s("skc_net"), possible_net_t, 384), kflag=1)
    comm = b.add(BtfKind.ARRAY, "", 0, 0, u(u8, uint, 16))
    b.add(BtfKind.STRUCT, "inet_sk", 2, 256, u(b.s("__sk_common"), sock_common, 0) + u(b.s("sk_comm"), comm, 512))
    task_ptr = b.add(BtfKind.PTR, "", 0, 0)
    vol_uint = b.add(BtfKind.VOLATILE, "", 0, uint)
    b.add(BtfKind.STRUCT, "task_struct", 4, 2048,
          u(b.s("__state"), vol_uint, 0) + u(b.s("flags"), uint, 352)
          + u(b.s("exit_code"), uint, 9312) + u(b.s("real_parent"), task_ptr, 10240))
    b.add(BtfKind.FWD, "inet_sk", 0, 0)  # a forward declaration of the same name changes nothing
    return b


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("struct, path, offset, size", [
    ("task_struct", "flags", 44, 4),
    ("task_struct", "exit_code", 1164, 4),
    ("task_struct", "real_parent", 1280, 8),
    ("task_struct", "__state", 0, 4),  # through a volatile
    ("inet_sk", "__sk_common.skc_net", 48, 8),  # a typedef'd anonymous struct
    ("inet_sk", "__sk_common.skc_net.net", 48, 8),
    ("inet_sk", "__sk_common.skc_family", 16, 2),  # through a const
    ("inet_sk", "__sk_common.skc_num", 14, 2),  # inside an anonymous struct inside an anonymous union
    ("inet_sk", "__sk_common.skc_portpair", 12, 4),
    ("inet_sk", "sk_comm", 64, 16),  # an array: elements x size
    ("sock_common", "skc_daddr", 0, 4),
    ("net", "ns.inum", 24, 4),
    ("net", "ns", 16, 16),
])
def test_member_offsets_through_nested_and_anonymous_members(
        tmp_path: Path, order: str, struct: str, path: str, offset: int, size: int) -> None:
    p = write(tmp_path, layouts(order).blob())
    assert btf.member(struct, path, p) == btf.Member(offset, size)


@pytest.mark.parametrize("struct, path", [
    ("task_struct", "nope"),
    ("nostruct", "flags"),
    ("inet_sk", "__sk_common.skc_reuse"),  # a bitfield: not readable as bytes
    ("inet_sk", "__sk_common.skc_daddr.x"),  # steps into an int
    ("fwd", "x"),  # only a forward declaration
    ("", "x"),
])
def test_member_absent(tmp_path: Path, struct: str, path: str) -> None:
    assert btf.member(struct, path, write(tmp_path, layouts().blob())) is None


def test_endless_typedef_chain_is_corrupt(tmp_path: Path) -> None:
    b = layouts()
    first = len(b.types) + 1
    b.add(BtfKind.TYPEDEF, "a", 0, first + 1)
    b.add(BtfKind.TYPEDEF, "b", 0, first)
    b.add(BtfKind.STRUCT, "loop", 1, 4, b.u32(b.s("x"), first, 0))
    with pytest.raises(TracingUnavailableError, match="does not end"):
        btf.member("loop", "x", write(tmp_path, b.blob()))
