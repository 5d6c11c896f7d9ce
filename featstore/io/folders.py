"""What an output folder already holds: a store, a run, or neither.

A store and a run are different kinds of folder: a command that writes one must never write into a
folder that holds the other (`featstore finetune STORE` would put checkpoints among the store's
shards; `featstore build RUN` a store among the run's files). Both sides check through this module,
which knows each kind by the files it always has.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RUN_MARKERS", "STORE_MARKER", "folder_kind", "other_kind_refusal"]

STORE_MARKER = "manifest.json"
# config.json, checkpoint.pt, the resume state and the names older releases gave them
# (featstore.training.run_folder names the same files; a test checks they agree).
RUN_MARKERS = ("config.json", "checkpoint.pt", "checkpoints/last.pt", "training_state.pt", "checkpoint.pth",
               "checkpoints/last.pth")

_KINDS = {"store": "a feature store", "run": "a training run"}


def folder_kind(path: str | os.PathLike) -> str | None:
    """``"store"``, ``"run"`` or None (neither: absent, empty, or something else)."""
    path = Path(path)
    if (path / STORE_MARKER).is_file():
        return "store"
    if any((path / name).exists() for name in RUN_MARKERS):
        return "run"
    return None


def other_kind_refusal(path: str | os.PathLike, writing: str) -> str | None:
    """Why ``path`` cannot take a ``writing`` (``"store"`` or ``"run"``), or None when it can.

    Args:
        path: the output folder a command is about to write.
        writing: what the command writes there.
    Returns:
        One line for the user naming the folder and what it holds; None when it holds no other kind.
    """
    kind = folder_kind(path)
    if kind is None or kind == writing:
        return None
    return (f"{path} holds {_KINDS[kind]}; {_KINDS[writing]} cannot be written into it. "
            f"Choose another folder for the {writing}.")
