"""Torch's CPU thread count, set for a block and put back after it."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, then restore the previous count.

    The `one_thread` fixture (tests/conftest.py) is this around one test; fixtures of a wider
    scope, which cannot use a function-scoped fixture, use it directly.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
