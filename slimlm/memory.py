"""Process memory hygiene for long compression runs.

glibc raises its mmap threshold every time a large block is freed, after which the many
layer-sized temporaries of a compression pass (codes, unpacked planes, dequantized copies) are
carved from the heap and fragment it instead of being returned (SmolLM2-135M RTN-4 in
benchmarks/quant.py: peak RSS 3,117 MiB before, 1,049 MiB with a 1 MiB threshold). A low threshold
makes every large temporary a fresh mmap (page faults, system time), which cost decoding 3–6× in
benchmarks/cost.py, so it only holds while compressing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1  # glibc mallopt() parameters (malloc.h)
M_MMAP_THRESHOLD = -3
COMPACT = (1 << 20, 1 << 20)  # (mmap, trim) thresholds while compressing
FAST = (32 << 20, 64 << 20)  # afterwards: where glibc's dynamic thresholds end up on a long run


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def _set(mmap: int, trim: int) -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, mmap)
        libc.mallopt(M_TRIM_THRESHOLD, trim)


@contextmanager
def compact_heap() -> Iterator[None]:
    """Inside: large blocks go back to the OS when freed. After: thresholds fit for inference, and the
    heap is trimmed. Process-wide; a no-op where the C library is not glibc."""
    _set(*COMPACT)
    try:
        yield
    finally:
        _set(*FAST)
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
