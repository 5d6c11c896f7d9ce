"""The checks every stage-1 run's settings share (the backbone and detector configs call them).

Torch-free, as the configs are: the commands' ``--help`` reads the recipes without loading torch.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

__all__ = ["check_run_settings", "path_settings"]


def check_run_settings(config: Any, fail: Callable[[str], None], *, step_unit: str) -> None:
    """The checks every stage-1 run's settings share (backbone and detector configs call it).

    Args:
        config: a config with ``lr, lr_steps, workers, device, amp, seed, max_failed_fraction, limit,
            rank, world_size, batch_size``.
        fail: raises the config's own error with a message.
        step_unit: what ``lr_steps`` count (``"epochs"``, ``"iterations"``), for the message.
    """
    if not config.lr > 0:
        fail(f"lr must be > 0, got {config.lr}")
    if any(step < 1 for step in config.lr_steps):
        fail(f"lr_steps are 1-based {step_unit}, got {list(config.lr_steps)}")
    if config.workers < 0:
        fail(f"workers must be >= 0, got {config.workers}")
    if config.device not in ("cpu", "cuda"):
        fail(f"device must be 'cpu' or 'cuda', got {config.device!r}")
    if config.amp not in ("fp16", "bf16", "off"):
        fail(f"amp must be 'bf16', 'fp16' or 'off', got {config.amp!r}")
    if config.seed < 0:
        fail(f"seed must be >= 0, got {config.seed}")
    if not 0.0 <= config.max_failed_fraction <= 1.0:
        fail(f"max_failed_fraction must be in [0, 1], got {config.max_failed_fraction}")
    if config.limit is not None and config.limit < 1:
        fail(f"limit must be >= 1, got {config.limit}")
    if config.world_size < 1 or not 0 <= config.rank < config.world_size:
        fail(f"rank {config.rank} is not in [0, world_size={config.world_size})")
    if config.batch_size < config.world_size:
        fail(f"batch_size {config.batch_size} is smaller than the {config.world_size} processes sharing each batch")


def path_settings(config: Any) -> tuple[str, ...]:
    """The settings of a config (a dataclass) that hold paths: a resume compares them resolved."""
    return tuple(field.name for field in dataclasses.fields(config) if isinstance(getattr(config, field.name), Path))
