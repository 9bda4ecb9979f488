"""The heap BCC's compiler frees is given back to the system after the compile: glibc keeps
freed memory below the top of its heap, and only malloc_trim returns it."""

from __future__ import annotations

import ctypes as ct
import os

from closewait_trace.kernel.attach import release_compiler_heap

CHUNK = 64 * 1024  # below glibc's mmap threshold (128 KiB): from the heap, not mmap
COUNT = 1024       # 64 MiB


def _anon_kb() -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


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
    kept = _anon_kb()
    release_compiler_heap()
    after = _anon_kb()
    libc.free(guard)
    assert kept - after > COUNT * CHUNK // 1024 // 2, (kept, after)
