"""Keep freed memory in the process (glibc), so CPU work stops page-faulting.

CPU training and CPU extraction both allocate blocks of megabytes and free them a moment later: a
preloaded batch of saoa's fields at C = 2048 is ~23 MiB of fresh float32 tensors, and every backbone
and detector layer's activations are blocks of that size. glibc's malloc maps blocks above its mmap
threshold (at most 32 MiB; a detector layer's output for 16 frames is ~190 MiB) fresh from the
kernel and unmaps them on free, and it trims the top of the heap back to the kernel: either way the
next batch faults the same pages in again, zeroed. Measured on 2 cores (benchmarks/README.md): a
featstore build spent 6.2 s of 23 s in the kernel on 3.2 million page faults; with mmap off and
trimming pinned, 0.5 s, and the build took 16 s (peak memory 2.17 -> 2.32 GiB). The batch gather ran
at 50-60 instead of 420-500 batches/s for whole runs. So: every block comes from the heap, and freed
blocks stay there for reuse. The cost is that the process holds on to its peak heap until it exits,
which a training or extraction process does anyway. (A block the heap cannot grow for in another
thread's arena is retried in the main arena, so nothing fails for want of mmap.)
Other allocators (jemalloc, tcmalloc via LD_PRELOAD) are left alone: mallopt then changes nothing
they use.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable

__all__ = ["M_MMAP_MAX", "M_TRIM_THRESHOLD", "TRIM_THRESHOLD", "glibc_mallopt", "keep_freed_memory", "tune_malloc"]

# glibc's mallopt parameters (malloc.h), and the trim threshold pinned: above any batch's blocks.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for blocks and pin its trim threshold, once per process.

    Returns:
        True when glibc took the settings; False elsewhere (another OS or C library), where nothing
        is changed.
    """
    return tune_malloc(glibc_mallopt)


def tune_malloc(mallopt: Callable[[int, int], bool]) -> bool:
    """Apply the two settings through ``mallopt``, stopping at the first it refuses.

    Args:
        mallopt: ``(param, value) -> accepted``, e.g. `glibc_mallopt`.
    Returns:
        True when both settings were accepted.
    """
    return mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def glibc_mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False without glibc (another OS or C library).

    Args:
        param: a mallopt parameter (`M_MMAP_MAX`, `M_TRIM_THRESHOLD`).
        value: its new value.
    Returns:
        True when the C library accepted the setting.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(param, value) == 1
