"""What BCC's compiler leaves behind is given back after the load: the heap it freed (glibc
keeps freed memory below the top of its heap, and only malloc_trim returns it) and the
resident pages of its libraries (MADV_PAGEOUT)."""

from __future__ import annotations

import ctypes as ct
import mmap
import os
import re
from pathlib import Path

from bench.load import status_kb
from closewait_trace.kernel.release import (
    compiler_mappings, release_compiler_heap, release_compiler_pages,
)

CHUNK = 64 * 1024  # below glibc's mmap threshold (128 KiB): from the heap, not mmap
COUNT = 1024       # 64 MiB

MAPS = """\
55d0c0a00000-55d0c0a28000 r--p 00000000 fe:01 1311 /usr/bin/python3.11
7f1a00000000-7f1a02000000 r--p 00000000 fe:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f1a02000000-7f1a05000000 r-xp 02000000 fe:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f1a05000000-7f1a05100000 rw-p 05000000 fe:01 2001 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f1a06000000-7f1a07000000 r-xp 00100000 fe:01 2002 /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
7f1a08000000-7f1a08400000 r-xp 00100000 fe:01 2003 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f1a08400000-7f1a08500000 r-xp 00000000 fe:01 2004 /usr/lib/x86_64-linux-gnu/libbcc_bpf.so.0.26.0
7f1a09000000-7f1a09100000 r-xp 00000000 fe:01 2005 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1a0a000000-7f1a0a100000 r-xp 00000000 fe:01 2006 /opt/libLLVMish/libz.so.1
7f1a0b000000-7f1a0b100000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
"""


def test_compiler_mappings_are_the_read_only_pages_of_its_libraries() -> None:
    found = [(m.perms, Path(m.path).name) for m in compiler_mappings(MAPS)]
    assert found == [("r--p", "libLLVM-14.so.1"), ("r-xp", "libLLVM-14.so.1"),
                     ("r-xp", "libclang-cpp.so.14"), ("r-xp", "libbcc.so.0.26.0")]
    first = compiler_mappings(MAPS)[0]
    assert (first.start, first.end) == (0x7F1A00000000, 0x7F1A02000000)


def _rss_kb_of(path: Path) -> int:
    """Resident kB of this process's mappings of path, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_resident_pages_of_a_compiler_library_are_reclaimed() -> None:
    # on disk, not tmpfs: a tmpfs page has nowhere to go without swap
    lib = Path("/var/tmp") / f"libLLVM-{os.getpid()}.so.1"
    size = 16 << 20
    with open(lib, "wb") as out:
        out.write(os.urandom(size))
        os.fsync(out.fileno())  # clean pages, as a library's are: reclaimed, not only unmapped
    try:
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            assert sum(m[i] for i in range(0, size, mmap.PAGESIZE)) >= 0  # every page touched
            touched = _rss_kb_of(lib)
            assert release_compiler_pages() >= 1
            after = _rss_kb_of(lib)
            assert touched >= size // 1024 * 9 // 10, touched
            assert after <= touched // 10, (touched, after)
            assert m[size - 1] == lib.read_bytes()[-1]  # still readable: read again from the file
    finally:
        lib.unlink()


def test_freed_heap_below_a_live_chunk_is_returned() -> None:
    libc = ct.CDLL(None)
    libc.malloc.restype = ct.c_void_p
    libc.malloc.argtypes = [ct.c_size_t]
    libc.free.argtypes = [ct.c_void_p]
    chunks = [libc.malloc(CHUNK) for _ in range(COUNT)]
    assert all(chunks)
    for c in chunks:
        ct.memset(c, 1, CHUNK)  # resident
    guard = max(chunks)  # kept: below it, free() alone cannot shrink the heap
    for c in chunks:
        if c != guard:
            libc.free(c)
    kept = status_kb(os.getpid(), "RssAnon") or 0
    release_compiler_heap()
    after = status_kb(os.getpid(), "RssAnon") or 0
    libc.free(guard)
    assert kept - after > COUNT * CHUNK // 1024 // 2, (kept, after)
