"""Process memory hygiene for long compression runs.

glibc raises its mmap threshold every time a large block is freed, after which the many
layer-sized temporaries of a compression pass (codes, unpacked planes, dequantized copies) are
carved from the heap and fragment it instead of being returned (SmolLM2-135M RTN-4 in
benchmarks/quant.py: peak RSS 3,117 MiB before, 1,049 MiB with a 1 MiB threshold). A low threshold
makes every large temporary a fresh mmap (page faults, system time), which cost decoding 3–6× in
benchmarks/cost.py, so it only holds while compressing.

Weights loaded from safetensors are views into a private memory map of the file: every page a pass
touches stays in the process's RSS until the whole file is unmapped, even after the layer that read
it has been replaced. :func:`drop_file_pages` hands a replaced weight's pages back to the page cache,
so a compressed layer stops costing its fp32 bytes as soon as it is done. :func:`page_out` does the
same for a tensor that is still in use but will not be read again soon (a slice of a table being
re-encoded): the kernel reclaims clean pages and keeps any modified ones, so no data can be lost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

M_TRIM_THRESHOLD = -1  # glibc mallopt() parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MADV_DONTNEED = 4  # Linux madvise(2): drop the pages; a file-backed page reads back from the file
MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim the pages now; a modified page is kept (swapped or left resident)
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


_thresholds = FAST  # what this module last set (glibc cannot be asked)


def _set(mmap: int, trim: int) -> None:
    global _thresholds
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, mmap)
        libc.mallopt(M_TRIM_THRESHOLD, trim)
    _thresholds = (mmap, trim)


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


@contextmanager
def reuse_heap() -> Iterator[None]:
    """Inside :func:`compact_heap`, for a stretch of same-sized short-lived temporaries (a calibration
    block forward's activations): let them be reused from the heap instead of fresh memory maps. Each
    fresh map is page-faulted and zeroed again: 250 k faults per SmolLM2 block forward over 16 k
    tokens, and GPTQ ~1.4× slower. Afterwards the heap is trimmed, holes included, so what the stretch
    freed does not stay resident between forwards."""
    previous = _thresholds
    if previous == FAST:
        yield
        return
    _set(*FAST)
    try:
        yield
    finally:
        _set(*previous)
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)  # free pages inside the heap go back too, not only its top


def _in_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one mapping of a regular file (``/proc/self/maps``, Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= start and end <= hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    return fields[4] != "0" and path.startswith("/") and not path.startswith("/dev/")
    except OSError:
        return False
    return False


def _whole_pages(t: torch.Tensor) -> tuple[int, int]:
    """The page-aligned [lo, hi) inside ``t``'s own bytes (empty when it spans no whole page)."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = 4096
    return -(-start // page) * page, end // page * page


def page_out(t: torch.Tensor) -> int:
    """Ask the kernel to reclaim the resident file-backed pages of ``t`` (a contiguous CPU tensor) now.

    Safe on live tensors: clean pages read back from the file on the next access, modified ones are kept.
    Returns the bytes advised; 0 off Linux/glibc, on kernels before 5.4 and outside file mappings.
    """
    libc = _glibc()
    if libc is None or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    lo, hi = _whole_pages(t)
    if hi <= lo or not _in_file_mapping(lo, hi):
        return 0
    return hi - lo if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_PAGEOUT) == 0 else 0


def drop_file_pages(t: torch.Tensor, live: nn.Module) -> int:
    """Give the memory-mapped pages of a discarded weight back to the page cache; returns the bytes.

    Only whole pages of ``t``'s own storage are dropped, only inside a file mapping, and only when no
    tensor of ``live`` (the model it was removed from) overlaps them; ``t`` must not be read again.
    A no-op off Linux/glibc, for device tensors and for weights that live in ordinary memory.
    """
    libc = _glibc()
    if libc is None or t.device.type != "cpu":
        return 0
    storage = t.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = 4096
    lo, hi = -(-start // page) * page, end // page * page
    if hi <= lo or not _in_file_mapping(start, end):
        return 0
    for other in list(live.parameters()) + list(live.buffers()):
        s = other.untyped_storage()
        if other.device.type == "cpu" and s.data_ptr() < end and start < s.data_ptr() + s.nbytes():
            return 0
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) != 0:
        return 0
    return hi - lo
