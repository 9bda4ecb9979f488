"""A minimal reader of the kernel's BTF (BPF Type Format), enough to answer questions about
kernel functions (does ``tcp_close`` exist, what is its BTF type id, how many parameters does
``inet_csk_accept`` take on this kernel) and about struct layouts (at which byte offset, and
with which size, ``task_struct.exit_code`` or ``sock.__sk_common.skc_net`` sits on this
kernel, through nested and anonymous members).

Layout (Documentation/bpf/btf.rst, include/uapi/linux/btf.h)::

    struct btf_header { u16 magic (0xeB9F); u8 version; u8 flags; u32 hdr_len;
                        u32 type_off; u32 type_len; u32 str_off; u32 str_len; };

``type_off``/``str_off`` count from the end of the header (``hdr_len``).  The type section is
a sequence of ``struct btf_type { u32 name_off; u32 info; u32 size_or_type; }`` records, each
followed by kind-specific data whose size depends on the kind and on ``vlen``
(``info & 0xffff``).  Type ids start at 1 (id 0 is ``void``) and follow the order of records.
Every record and every trailer is a multiple of 4 bytes, so the section is read as an array of
u32 words.

The file is parsed once per (path, inode, size, mtime) and the result cached; parsing the
~5.5 MB vmlinux BTF of a 6.x kernel takes a fraction of a second.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path

from ..errors import TracingUnavailableError

__all__ = [
    "VMLINUX_BTF",
    "BTF_MAGIC",
    "BtfKind",
    "BtfFile",
    "load_btf",
    "func_arg_count",
    "func_btf_id",
    "Member",
    "member",
    "clear_cache",
]

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_HEADER_MIN_LEN = _HEADER.size  # 24


class BtfKind:
    """BTF_KIND_* numbers from include/uapi/linux/btf.h."""

    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Trailing data after the 3-word struct btf_type, in u32 words: (fixed, per vlen entry).
# Index = kind.  None = not a valid kind in a type section.
_TRAILER: tuple[tuple[int, int] | None, ...] = (
    None,  # 0 UNKN: never in the type section (id 0 is void, implicit)
    (1, 0),  # 1 INT: u32 encoding/offset/bits
    (0, 0),  # 2 PTR
    (3, 0),  # 3 ARRAY: struct btf_array {type, index_type, nelems}
    (0, 3),  # 4 STRUCT: vlen * struct btf_member {name_off, type, offset}
    (0, 3),  # 5 UNION: same as STRUCT
    (0, 2),  # 6 ENUM: vlen * struct btf_enum {name_off, val}
    (0, 0),  # 7 FWD
    (0, 0),  # 8 TYPEDEF
    (0, 0),  # 9 VOLATILE
    (0, 0),  # 10 CONST
    (0, 0),  # 11 RESTRICT
    (0, 0),  # 12 FUNC (vlen holds the linkage, no trailer)
    (0, 2),  # 13 FUNC_PROTO: vlen * struct btf_param {name_off, type}
    (1, 0),  # 14 VAR: struct btf_var {linkage}
    (0, 3),  # 15 DATASEC: vlen * struct btf_var_secinfo {type, offset, size}
    (0, 0),  # 16 FLOAT
    (1, 0),  # 17 DECL_TAG: struct btf_decl_tag {component_idx}
    (0, 0),  # 18 TYPE_TAG
    (0, 3),  # 19 ENUM64: vlen * struct btf_enum64 {name_off, val_lo32, val_hi32}
)
_FIXED = tuple(t[0] if t else 0 for t in _TRAILER)
_PER_VLEN = tuple(t[1] if t else 0 for t in _TRAILER)
_VALID = tuple(t is not None for t in _TRAILER)


#: Kinds that only qualify or rename another type: followed to find the real one.
_ALIASES = frozenset({BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT,
                      BtfKind.TYPE_TAG})
#: Kinds whose size_or_type word is their size in bytes.
_SIZED = frozenset({BtfKind.INT, BtfKind.STRUCT, BtfKind.UNION, BtfKind.ENUM, BtfKind.ENUM64,
                    BtfKind.FLOAT})
_POINTER_SIZE = 8  # vmlinux BTF of a 64-bit kernel


@dataclass(frozen=True)
class Member:
    """Where a (possibly nested) struct member lies: bytes from the start of the outer
    struct, and its size in bytes."""

    offset: int
    size: int


@dataclass(frozen=True)
class _FuncEntry:
    type_id: int
    proto_id: int


class BtfFile:
    """One parsed BTF blob (base BTF only: split/module BTF is not supported)."""

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self._parse(data)

    # -- parsing -----------------------------------------------------------------------------
    def _corrupt(self, why: str) -> TracingUnavailableError:
        return TracingUnavailableError(f"corrupt BTF in {self.source}: {why}")

    def _parse(self, data: bytes) -> None:
        order, hdr_len, type_off, type_len, str_off, str_len = self._header(data)
        start = hdr_len + type_off
        words = array("I")
        if words.itemsize != 4:  # pragma: no cover - every Linux ABI has a 4-byte unsigned int
            words = array("L")
        words.frombytes(data[start : start + type_len])
        native = "<" if sys.byteorder == "little" else ">"
        if order != native:
            words.byteswap()
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._words = words
        self._index_types(words)
        self._funcs: dict[str, _FuncEntry] | None = None
        self._func_by_name_off: dict[int, int] | None = None
        self._structs: dict[str, int] | None = None
        self._lock = threading.Lock()

    def _header(self, data: bytes) -> tuple[str, int, int, int, int, int]:
        """(byte order, header length, type section offset and length, string section
        offset and length), each checked against the blob."""
        if len(data) < _HEADER_MIN_LEN:
            raise self._corrupt(f"file is {len(data)} bytes, shorter than a BTF header")
        magic_le = struct.unpack_from("<H", data, 0)[0]
        if magic_le == BTF_MAGIC:
            order = "<"
        elif magic_le == 0x9FEB:
            order = ">"
        else:
            raise self._corrupt(f"bad magic 0x{magic_le:04x} (expected 0xeb9f)")
        _magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            order + _HEADER.format[1:], data, 0
        )
        if version != 1:
            raise self._corrupt(f"unsupported BTF version {version}")
        if hdr_len < _HEADER_MIN_LEN or hdr_len > len(data):
            raise self._corrupt(f"bad header length {hdr_len}")
        body = len(data) - hdr_len
        if type_off + type_len > body or str_off + str_len > body:
            raise self._corrupt("type or string section extends past the end of the file")
        if type_off % 4 or type_len % 4:
            raise self._corrupt("type section is not 4-byte aligned")
        if str_len == 0 or data[hdr_len + str_off + str_len - 1] != 0:
            raise self._corrupt("string section is empty or not NUL-terminated")
        return order, hdr_len, type_off, type_len, str_off, str_len

    def _index_types(self, words: array[int]) -> None:
        """Where each type record starts, and the FUNC records, in one pass."""
        offsets = array("I")  # word index of each type record; type id N -> offsets[N - 1]
        func_name_offs: list[int] = []
        func_ids: list[int] = []
        fixed, per_vlen, valid = _FIXED, _PER_VLEN, _VALID
        nkinds = len(valid)
        func_kind = BtfKind.FUNC
        n = len(words)
        i = 0
        append = offsets.append
        while i < n:
            if i + 3 > n:
                raise self._corrupt(f"truncated type record at byte {i * 4} of the type section")
            info = words[i + 1]
            kind = (info >> 24) & 0x1F
            if kind >= nkinds or not valid[kind]:
                raise self._corrupt(
                    f"unknown type kind {kind} for type id {len(offsets) + 1} "
                    f"(at byte {i * 4} of the type section)"
                )
            append(i)
            if kind == func_kind:
                func_name_offs.append(words[i])
                func_ids.append(len(offsets))
            i += 3 + fixed[kind] + per_vlen[kind] * (info & 0xFFFF)
        if i != n:
            raise self._corrupt("last type record runs past the end of the type section")
        self._offsets = offsets
        self._func_name_offs = func_name_offs
        self._func_ids = func_ids

    def _string(self, off: int) -> str:
        strings = self._strings
        if off >= len(strings):
            raise self._corrupt(f"string offset {off} is outside the string section")
        end = strings.find(b"\0", off)
        return strings[off:end].decode("utf-8", "replace")

    def _func_index(self) -> dict[str, _FuncEntry]:
        funcs = self._funcs
        if funcs is not None:
            return funcs
        with self._lock:
            if self._funcs is None:
                strings = self._strings
                words = self._words
                offsets = self._offsets
                index: dict[str, _FuncEntry] = {}
                for name_off, tid in zip(self._func_name_offs, self._func_ids):
                    end = strings.find(b"\0", name_off)
                    if name_off >= len(strings) or end < 0:
                        raise self._corrupt(f"FUNC type {tid} has a bad name offset {name_off}")
                    name = strings[name_off:end].decode("utf-8", "replace")
                    if name not in index:  # first definition wins, like libbpf's lookup
                        index[name] = _FuncEntry(tid, words[offsets[tid - 1] + 2])
                self._funcs = index
            return self._funcs

    # -- queries ------------------------------------------------------------------------------
    @property
    def type_count(self) -> int:
        """Number of types, not counting the implicit void (id 0)."""
        return len(self._offsets)

    def kind(self, type_id: int) -> int:
        """BTF_KIND_* of a type id (0 for void)."""
        if type_id == 0:
            return 0
        if not 0 < type_id <= len(self._offsets):
            raise self._corrupt(f"type id {type_id} is out of range (1..{len(self._offsets)})")
        return (self._words[self._offsets[type_id - 1] + 1] >> 24) & 0x1F

    def name(self, type_id: int) -> str:
        """Name of a type ("" for anonymous types and void)."""
        if type_id == 0:
            return ""
        self.kind(type_id)  # range check
        return self._string(self._words[self._offsets[type_id - 1]])

    def _lookup(self, name: str) -> _FuncEntry | None:
        """Find a FUNC by name without decoding every name when possible.

        Fast path: find ``name`` as a whole string of the string section and look its offset
        up among the FUNC records.  Only when that fails (absent function, or a name stored
        at an offset the search cannot see) is the full name index built.
        """
        if self._funcs is not None:
            return self._funcs.get(name)
        by_off = self._func_by_name_off
        if by_off is None:
            by_off = {}
            for name_off, tid in zip(self._func_name_offs, self._func_ids):
                by_off.setdefault(name_off, tid)
            self._func_by_name_off = by_off
        needle = b"\0" + name.encode("utf-8") + b"\0"
        strings = self._strings
        pos = strings.find(needle)
        while pos >= 0:
            found = by_off.get(pos + 1)
            if found is not None:
                return _FuncEntry(found, self._words[self._offsets[found - 1] + 2])
            pos = strings.find(needle, pos + 1)
        return self._func_index().get(name)

    def func_btf_id(self, name: str) -> int | None:
        """Type id of the BTF_KIND_FUNC named ``name``, None if absent."""
        entry = self._lookup(name)
        return entry.type_id if entry else None

    def func_params(self, name: str) -> list[str] | None:
        """Parameter names of the function ``name`` (a trailing ``...`` counts as none)."""
        entry = self._lookup(name)
        if entry is None:
            return None
        proto = entry.proto_id
        if self.kind(proto) != BtfKind.FUNC_PROTO:
            raise self._corrupt(
                f"FUNC {name!r} (id {entry.type_id}) points to type {proto} of kind "
                f"{self.kind(proto)}, not FUNC_PROTO"
            )
        base = self._offsets[proto - 1]
        words = self._words
        vlen = words[base + 1] & 0xFFFF
        params: list[str] = []
        for k in range(vlen):
            p_name_off = words[base + 3 + 2 * k]
            p_type = words[base + 3 + 2 * k + 1]
            if k == vlen - 1 and p_name_off == 0 and p_type == 0:
                break  # variadic marker "..."
            params.append(self._string(p_name_off))
        return params

    def func_arg_count(self, name: str) -> int | None:
        """Number of parameters of the function ``name``, None if absent."""
        params = self.func_params(name)
        return None if params is None else len(params)

    # -- struct layouts -----------------------------------------------------------------------
    def _record(self, type_id: int) -> tuple[int, int, int]:
        """(kind, vlen, size_or_type) of a type id."""
        kind = self.kind(type_id)
        base = self._offsets[type_id - 1]
        return kind, self._words[base + 1] & 0xFFFF, self._words[base + 2]

    def _strip(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the type they name."""
        for _ in range(64):
            if type_id == 0 or self.kind(type_id) not in _ALIASES:
                return type_id
            type_id = self._record(type_id)[2]
        raise self._corrupt(f"type {type_id}: a typedef or qualifier chain does not end")

    def type_size(self, type_id: int) -> int:
        """Size in bytes of a type (0 for void and functions)."""
        type_id = self._strip(type_id)
        if type_id == 0:
            return 0
        kind, _vlen, size_or_type = self._record(type_id)
        if kind in _SIZED:
            return size_or_type
        if kind == BtfKind.PTR:
            return _POINTER_SIZE
        if kind == BtfKind.ARRAY:
            base = self._offsets[type_id - 1]
            elem, nelems = self._words[base + 3], self._words[base + 5]
            return nelems * self.type_size(elem)
        return 0

    def _struct_index(self) -> dict[str, int]:
        index = self._structs
        if index is None:
            index = {}
            for tid in range(1, len(self._offsets) + 1):
                kind = self.kind(tid)
                if kind in (BtfKind.STRUCT, BtfKind.UNION):
                    index.setdefault(self.name(tid), tid)  # first definition wins
            index.pop("", None)
            self._structs = index
        return index

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of member ``name`` of a struct or union, looking inside its
        anonymous struct and union members too; None if absent or a bitfield."""
        kind, vlen, _size = self._record(type_id)
        if kind not in (BtfKind.STRUCT, BtfKind.UNION):
            return None
        base = self._offsets[type_id - 1] + 3
        kflag = self._words[base - 2] >> 31
        for k in range(vlen):
            name_off, mtype, moff = self._words[base + 3 * k: base + 3 * k + 3]
            bits = moff & 0xFFFFFF if kflag else moff
            if kflag and moff >> 24:
                if self._string(name_off) == name:
                    return None  # a bitfield: not readable as whole bytes
                continue
            if name_off and self._string(name_off) == name:
                return bits, mtype
            if not name_off:
                inner = self._find_member(self._strip(mtype), name)
                if inner is not None:
                    return bits + inner[0], inner[1]
        return None

    def member(self, struct: str, path: str) -> Member | None:
        """Byte offset and size of ``path`` (``"flags"``, ``"__sk_common.skc_net"``) inside
        ``struct <struct>``; None when the struct or a member is absent, a member is a
        bitfield, or the path steps through something other than a struct or union."""
        type_id = self._struct_index().get(struct)
        if type_id is None:
            return None
        bits = 0
        for part in path.split("."):
            found = self._find_member(self._strip(type_id), part)
            if found is None:
                return None
            bits += found[0]
            type_id = found[1]
        if bits % 8:
            return None
        return Member(bits // 8, self.type_size(type_id))


_cache: dict[str, tuple[tuple[int, int, int, int], BtfFile]] = {}
_cache_lock = threading.Lock()


def load_btf(path: Path = VMLINUX_BTF) -> BtfFile:
    """Parse (or return the cached parse of) the BTF file at ``path``."""
    key_path = os.fspath(path)
    try:
        st = os.stat(key_path)
    except FileNotFoundError:
        raise TracingUnavailableError(
            f"no BTF at {key_path}: the kernel was built without CONFIG_DEBUG_INFO_BTF"
            if key_path == os.fspath(VMLINUX_BTF)
            else f"no BTF file at {key_path}"
        ) from None
    except OSError as e:
        raise TracingUnavailableError(f"cannot read BTF at {key_path}: {e.strerror}") from None
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key_path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            with open(key_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TracingUnavailableError(f"cannot read BTF at {key_path}: {e.strerror}") from None
        btf = BtfFile(data, key_path)
        _cache[key_path] = (stamp, btf)
        return btf


def clear_cache() -> None:
    """Forget every parsed file (tests)."""
    with _cache_lock:
        _cache.clear()


def func_arg_count(name: str, path: Path = VMLINUX_BTF) -> int | None:
    """Number of parameters of the kernel function ``name``; None if it is not in BTF.

    Raises TracingUnavailableError when the BTF file is missing, unreadable or corrupt.
    """
    return load_btf(path).func_arg_count(name)


def member(struct: str, path_in_struct: str, path: Path = VMLINUX_BTF) -> Member | None:
    """Offset and size of a member of a kernel struct (see BtfFile.member)."""
    return load_btf(path).member(struct, path_in_struct)


def func_btf_id(name: str, path: Path = VMLINUX_BTF) -> int | None:
    """BTF type id of the BTF_KIND_FUNC ``name`` (the fentry attach_btf_id); None if absent."""
    return load_btf(path).func_btf_id(name)
