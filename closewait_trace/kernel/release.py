"""What the compile leaves behind in the long-running process, given back once the programs
are loaded, attached and configured: the heap BCC's compiler freed, and the resident pages of
the compiler's libraries.

The tracer compiles once, at start: the compiler's code is not run again (BCC's own runtime in
libbcc, its map and ring buffer calls, is touched again and comes back a page at a time). Both
are only advice to the C library and the kernel; nothing here can fail the start.
"""

from __future__ import annotations

import ctypes as ct
import errno
import re
from dataclasses import dataclass

#: madvise(2): reclaim these pages now (Linux 5.4+; older kernels refuse it with EINVAL).
MADV_PAGEOUT = 21

#: The libraries BCC's compiler lives in (Debian, Ubuntu: libbcc links clang and LLVM as
#: shared libraries; where they are linked into libbcc, its own name covers them).
COMPILER_LIBRARIES = re.compile(r"/lib(bcc|clang-cpp|clang|LLVM)[-.][^/]*$")

#: One line of /proc/PID/maps: start-end perms offset dev inode path.
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s+(\S.*)$")


@dataclass(frozen=True)
class Mapping:
    """One file mapping of a compiler library: its address range and permissions."""

    start: int
    end: int
    perms: str
    path: str


def compiler_mappings(maps_text: str) -> list[Mapping]:
    """The mappings of the compiler libraries in a /proc/PID/maps text whose pages the kernel
    can reclaim and read back from the file: read-only or executable ones. A writable private
    mapping holds the library's data, copied on write, which could only go to swap; so do the
    pages of a read-only one written during relocation (RELRO), which the kernel leaves in
    place without swap."""
    found: list[Mapping] = []
    for line in maps_text.splitlines():
        m = _MAPS_LINE.match(line)
        if not m or not COMPILER_LIBRARIES.search(m.group(4)) or "w" in m.group(3):
            continue
        found.append(Mapping(int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4)))
    return found


def release_compiler_heap() -> None:
    """Give the system back the heap BCC's compiler freed. glibc keeps freed memory for reuse,
    and after the compile the process would otherwise hold it for its whole life (measured on
    6.18: 77 MB of anonymous memory after the load, 48 MB after this). Nothing to do where the
    C library has no malloc_trim (musl)."""
    trim = getattr(ct.CDLL(None), "malloc_trim", None)
    if trim is None:
        return
    trim.argtypes = [ct.c_size_t]
    trim.restype = ct.c_int
    trim(0)


def release_compiler_pages() -> int:
    """Ask the kernel to reclaim the resident pages of the compiler's libraries (their code
    and constants, read from the files again if ever touched). Returns how many mappings it
    took the advice for: 0 on kernels before 5.4 and where /proc is not readable. The kernel
    leaves pages other processes map too, and every page of a library file the process could
    not write (a tracer that runs as another user than the files' owner, without
    CAP_FOWNER) while still saying yes."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = compiler_mappings(f.read())
    except OSError:
        return 0
    libc = ct.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int]
    madvise.restype = ct.c_int
    done = 0
    for m in maps:
        if madvise(m.start, m.end - m.start, MADV_PAGEOUT) == 0:
            done += 1
        elif ct.get_errno() == errno.EINVAL and done == 0:
            break  # a kernel before 5.4 (later, EINVAL is a locked or special mapping)
    return done


def release_compiler_memory() -> None:
    """Both, after the programs are loaded."""
    release_compiler_heap()
    release_compiler_pages()
