"""featstore.io.allocator: freed batch-sized blocks stay in the process on glibc instead of going back to
the kernel (run in fresh interpreters: the setting is process-wide)."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
import numpy as np
from featstore.io.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
batch = np.ones(20 * 2**20, np.uint8)  # about one CPU batch of saoa's fields
del batch
print(applied, libc.mallinfo2().fordblks)
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True).stdout
    applied, free_bytes = out.split()
    return applied, int(free_bytes)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_a_freed_batch_stays_in_the_heap_only_when_tuned() -> None:
    _, untuned_free = _probe("plain")
    applied, tuned_free = _probe("tuned")
    assert applied == "True"
    # Untuned, glibc maps the 20 MiB block and unmaps it on free; tuned, it comes from the heap
    # and stays there for the next batch.
    assert untuned_free < 4 * 2**20
    assert tuned_free >= 20 * 2**20


def test_it_sets_both_settings_and_stops_at_a_refusal() -> None:
    from featstore.io import allocator

    calls = []
    assert allocator.tune_malloc(lambda param, value: calls.append((param, value)) or True) is True
    assert calls == [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]

    # A C library that refuses the first setting: reported, and the second is not tried.
    calls.clear()
    assert allocator.tune_malloc(lambda param, value: calls.append((param, value)) is not None) is False
    assert calls == [(allocator.M_MMAP_MAX, 0)]


def test_it_sets_glibc_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from featstore.io import allocator

    calls = []
    monkeypatch.setattr(allocator, "glibc_mallopt", lambda param, value: calls.append((param, value)) or True)
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator.keep_freed_memory() is True
        assert allocator.keep_freed_memory() is True
        assert len(calls) == 2  # the two settings, once
    finally:
        allocator.keep_freed_memory.cache_clear()  # the next caller applies the real settings
