"""Damaged inputs, made the ways real frame folders and downloads get damaged (for tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["corrupt_jpeg", "truncate_file"]


def corrupt_jpeg(path: str | Path, how: str = "truncate") -> None:
    """Damage a JPEG in one of the ways real frame folders get damaged.

    Args:
        path: the file.
        how: ``"truncate"`` (keep the first half: an interrupted copy), ``"zero"`` (zero bytes: a
            failed write) or ``"garbage"`` (same length of random bytes: not a JPEG at all).
    """
    path = Path(path)
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "garbage":
        rng = np.random.default_rng(len(data))
        garbage = rng.integers(0, 256, size=max(len(data), 64), dtype=np.uint8).tobytes()
        if garbage[:2] == b"\xff\xd8":  # make sure it does not start like a JPEG by chance
            garbage = b"\x00" + garbage[1:]
        path.write_bytes(garbage)
    else:
        raise ValueError(f"how must be 'truncate', 'zero' or 'garbage', got {how!r}")


def truncate_file(path: str | Path, keep_fraction: float) -> None:
    """Cut a file to its first ``keep_fraction`` (0..1) of bytes, as an interrupted download would.

    Args:
        path: the file.
        keep_fraction: share of bytes to keep.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    path = Path(path)
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(int(size * keep_fraction))
