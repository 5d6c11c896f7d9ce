"""Helpers that damage stores on purpose, the way disks and bugs do."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def flip_live_byte(data_file: Path, payload: bytes, offset: int, caught: Callable[[], bool]) -> int:
    """Flip one byte of ``payload`` where it is stored in ``data_file`` until ``caught()`` says so.

    LMDB is copy-on-write: stale copies of a value can linger in free pages, so the first match
    is not necessarily the live one. Each occurrence is tried in turn with exactly one byte
    flipped; the flip stays in place at the first occurrence where ``caught()`` is true.

    Returns:
        The file offset of the flipped byte.
    Raises:
        AssertionError: no single flip was caught.
    """
    raw = bytearray(data_file.read_bytes())
    start = raw.find(payload)
    assert start >= 0, "payload not found in the data file"
    while start >= 0:
        raw[start + offset] ^= 0xFF
        data_file.write_bytes(bytes(raw))
        if caught():
            return start + offset
        raw[start + offset] ^= 0xFF
        data_file.write_bytes(bytes(raw))
        start = raw.find(payload, start + 1)
    raise AssertionError("no single-byte flip of the payload was detected")
