"""Keep freed memory in the process (glibc), so CPU batches stop page-faulting.

A preloaded CPU batch of saoa's fields at C = 2048 is ~23 MiB of fresh float32 tensors, freed a
step later. glibc's malloc adapts its thresholds to such blocks, but depending on the order of
earlier allocations it keeps returning the top of the heap to the kernel (trim) and faulting the
same pages in again on the next batch: the same gather then runs 5-8x slower for the whole run
(measured: 50-60 against 420-500 batches/s, benchmarks/README.md). Pinning the thresholds keeps
the freed blocks for reuse. The cost is that the process holds on to its peak heap until it exits,
which a training process does anyway. Other allocators (jemalloc, tcmalloc via LD_PRELOAD) do not
need this and are left alone: mallopt then changes nothing they use.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2); blocks below it come
# from the heap and are reused, larger ones (whole preloaded fields) are still mapped and unmapped.
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2**30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds once per process.

    Returns:
        True when glibc took the settings; False elsewhere (another OS or C library), where nothing
        is changed.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(param, value) == 1
