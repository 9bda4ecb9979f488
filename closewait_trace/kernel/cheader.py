"""The fixed-width C subset of bpf/closewait.h, read into typed records and ctypes structs.

closewait.h is the one description of the layout the BPF programs and the decoder share. This
module reads what it holds: integer ``#define`` constants (``16``, ``1u``, ``(1u << 3)``) and
``struct NAME { ... };`` blocks whose members are ``__u8``/``__u16``/``__u32``/``__u64``/
``__s32``/``char`` scalars, arrays of them sized by a number or one of those constants, and
``struct cw_x`` members defined earlier in the file. The structs are laid out with the C rules
for natural alignment (what clang does for the BPF target and for x86-64/arm64 userspace).
Anything else raises BpfHeaderError: the decoder must never guess a layout.
"""

from __future__ import annotations

import ctypes as ct
import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BpfHeaderError

if TYPE_CHECKING:
    from ctypes import _CDataType

    CType = type[_CDataType]


@dataclass(frozen=True)
class Scalar:
    size: int
    ctype: type[ct.c_uint8 | ct.c_uint16 | ct.c_uint32 | ct.c_uint64 | ct.c_int32 | ct.c_char]

    @property
    def align(self) -> int:
        return self.size


#: C scalar type -> its size (its alignment too) and its ctypes type
SCALARS: dict[str, Scalar] = {
    "__u8": Scalar(1, ct.c_uint8),
    "__u16": Scalar(2, ct.c_uint16),
    "__u32": Scalar(4, ct.c_uint32),
    "__u64": Scalar(8, ct.c_uint64),
    "__s32": Scalar(4, ct.c_int32),
    "char": Scalar(1, ct.c_char),
}

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^[ \t]*#define[ \t]+(\w+)[ \t]+(.+?)[ \t]*$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_STRUCT_START = re.compile(r"\bstruct\s+\w+\s*\{")
_FIELD = re.compile(r"(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?")
_NUMBER = re.compile(r"(\d+)[uUlL]*")
_SHIFT = re.compile(r"(\d+)[uUlL]*\s*<<\s*(\d+)")


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


@dataclass(frozen=True)
class Header:
    """What closewait.h declares: its integer constants and its structs, in file order."""

    defines: Mapping[str, int]
    structs: Mapping[str, CStruct]

    def value(self, name: str) -> int:
        """The integer constant NAME; BpfHeaderError when the header does not define it."""
        if name not in self.defines:
            raise BpfHeaderError(f"#define {name} is missing or not an integer")
        return self.defines[name]

    def prefixed(self, prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
        """The constants named PREFIX*, by the rest of their name (CW_F_PASSIVE -> PASSIVE)."""
        return {k[len(prefix):]: v for k, v in self.defines.items()
                if k.startswith(prefix) and k not in exclude}


def eval_define(text: str) -> int | None:
    """Integer value of a #define body: 16, 1u, (1u << 3); None for anything else."""
    t = text.strip()
    while t.startswith("(") and t.endswith(")"):
        t = t[1:-1].strip()
    m = _NUMBER.fullmatch(t)
    if m:
        return int(m.group(1))
    m = _SHIFT.fullmatch(t)
    if m:
        return int(m.group(1)) << int(m.group(2))
    return None


def parse_defines(text: str) -> dict[str, int]:
    """Every #define with an integer value; the others (strings, macros) are not layout."""
    out = {}
    for name, body in _DEFINE.findall(_COMMENT.sub("", text)):
        value = eval_define(body)
        if value is not None:
            out[name] = value
    return out


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _count(sname: str, text: str | None, defines: Mapping[str, int]) -> int | None:
    if text is None:
        return None
    value = int(text) if text.isdigit() else defines.get(text)
    if value is None:
        raise BpfHeaderError(f"struct {sname}: array length {text!r} is not a number or a #define")
    return value


def _element(sname: str, ctype: str, done: Mapping[str, CStruct]) -> tuple[int, int]:
    """Size and alignment of one element of a member of type CTYPE."""
    if ctype.startswith("struct "):
        inner = done.get(ctype.split()[1])
        if inner is None:
            raise BpfHeaderError(f"struct {sname}: {ctype} is not defined before it")
        return inner.size, inner.align
    scalar = SCALARS.get(ctype)
    if scalar is None:
        raise BpfHeaderError(f"struct {sname}: unknown type {ctype!r}")
    return scalar.size, scalar.align


def _declarations(sname: str, body: str) -> Iterator[tuple[str, str, str | None]]:
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = _FIELD.fullmatch(decl)
        if m is None:
            raise BpfHeaderError(f"struct {sname}: cannot parse {decl!r}")
        ctype, fname, count_text = m.groups()
        yield " ".join(ctype.split()), fname, count_text


def _layout(sname: str, body: str, defines: Mapping[str, int],
            done: Mapping[str, CStruct]) -> CStruct:
    """One struct laid out with natural alignment: each member at the next multiple of its
    alignment, the whole rounded up to the largest alignment."""
    offset, align, fields = 0, 1, []
    for ctype, fname, count_text in _declarations(sname, body):
        esize, ealign = _element(sname, ctype, done)
        count = _count(sname, count_text, defines)
        offset = _round_up(offset, ealign)
        fields.append(CField(fname, ctype, count, offset, esize * (count or 1)))
        offset += fields[-1].size
        align = max(align, ealign)
    if not fields:
        raise BpfHeaderError(f"struct {sname} has no members")
    return CStruct(sname, tuple(fields), _round_up(offset, align), align)


def parse_structs(text: str) -> dict[str, CStruct]:
    """Every `struct NAME { ... };` of the header, laid out with natural alignment."""
    defines = parse_defines(text)
    body_text = _COMMENT.sub("", text)
    structs: dict[str, CStruct] = {}
    for sname, body in _STRUCT.findall(body_text):
        if sname in structs:
            raise BpfHeaderError(f"struct {sname} is defined twice")
        structs[sname] = _layout(sname, body, defines, structs)
    if len(_STRUCT_START.findall(body_text)) != len(structs):
        raise BpfHeaderError("a struct block is not closed by '};' or holds a nested block")
    return structs


def parse_header(text: str) -> Header:
    return Header(parse_defines(text), parse_structs(text))


def read_header(path: Path) -> Header:
    """The header at PATH, parsed; BpfHeaderError (with the path) when it cannot be."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BpfHeaderError(f"cannot read {path}: {exc}") from exc
    try:
        return parse_header(text)
    except BpfHeaderError as exc:
        raise BpfHeaderError(f"{path}: {exc}") from exc


# --- ctypes -------------------------------------------------------------------------------------


def _ctype_of(field: CField, classes: Mapping[str, type[ct.Structure]]) -> CType:
    base: CType
    if field.ctype.startswith("struct "):
        base = classes[field.ctype.split()[1]]
    else:
        base = SCALARS[field.ctype].ctype
    return base if field.count is None else base * field.count


def layout_problems(header: Header, classes: Mapping[str, type[ct.Structure]]) -> list[str]:
    """Where ctypes lays a class out otherwise than the header computes: names, order,
    offsets, sizes (empty when they agree)."""
    problems: list[str] = []
    for name, cs in header.structs.items():
        cls = classes[name]
        names = [f[0] for f in cls._fields_]
        if names != [f.name for f in cs.fields]:
            problems.append(f"{name}: fields {[f.name for f in cs.fields]} in C, {names} in Python")
            continue
        if ct.sizeof(cls) != cs.size:
            problems.append(f"{name}: size {cs.size} in C, {ct.sizeof(cls)} in Python")
        for f in cs.fields:
            desc = getattr(cls, f.name)
            if (desc.offset, desc.size) != (f.offset, f.size):
                problems.append(f"{name}.{f.name}: offset {f.offset} size {f.size} in C, "
                                f"offset {desc.offset} size {desc.size} in Python")
    return problems


def fill_structs(header: Header, classes: Mapping[str, type[ct.Structure]]) -> None:
    """Give each class (by its C struct name, one for every struct of the header and no
    other) the fields of its struct, in header order so a nested struct is complete before
    it is used; BpfHeaderError if the sets differ or ctypes lays one out otherwise."""
    if set(header.structs) != set(classes):
        raise BpfHeaderError(f"struct sets differ: header {sorted(header.structs)}, "
                             f"Python {sorted(classes)}")
    for name, cs in header.structs.items():
        classes[name]._fields_ = [(f.name, _ctype_of(f, classes)) for f in cs.fields]
    problems = layout_problems(header, classes)
    if problems:
        raise BpfHeaderError("ctypes lays out the header otherwise: " + "; ".join(problems))


# --- constants ------------------------------------------------------------------------------


def enum_problems(header: Header, prefix: str, members: type[enum.IntEnum] | type[enum.IntFlag],
                  exclude: tuple[str, ...] = ()) -> list[str]:
    """Where the Python enum MEMBERS and the header's PREFIX* constants differ (names and
    values; empty when they agree)."""
    c_side = header.prefixed(prefix, exclude)
    py_side = {str(m.name): int(m) for m in members}
    if not c_side:
        return [f"no {prefix}* constants in the header"]
    differ = sorted(k for k in c_side.keys() | py_side.keys() if c_side.get(k) != py_side.get(k))
    return [f"{members.__name__}.{k}: {c_side.get(k)} in C ({prefix}{k}), {py_side.get(k)} in Python"
            for k in differ]
