"""The run folder of a stage-1 run, every file written atomically (`featstore.io.atomic`).

::

    OUT/checkpoint.pt        what `featstore build --verb-backbone NAME:OUT/checkpoint.pt` loads:
                             {"state_dict": backbone, "classifier": linear layer, "finetune": run record}
    OUT/checkpoints/last.pt  everything a resume needs (model, optimiser, scaler, history, failures)
    OUT/config.json          every setting, the recipe, the init checkpoint's sha256, the data
    OUT/metrics.json         top-1 / top-5 of the target on the validation selection, per epoch and final
    OUT/failures.json        the segments that could not be read: uid, epoch, phase, reason
    OUT/curves.png           loss and validation accuracy per epoch
    OUT/log.txt              what the run printed
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from featstore.io.atomic import atomic_write, atomic_write_text, remove_temporaries
from featstore.io.figures import pyplot, save_figure
from featstore.models.checkpoints import FINETUNE_RECORD_KEY

__all__ = [
    "CHECKPOINT_NAME",
    "RunLog",
    "STATE_NAME",
    "load_training_state",
    "plot_curves",
    "remove_run_temporaries",
    "write_finetuned_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
STATE_NAME = "checkpoints/last.pt"
_RUN_FILES = ("checkpoint.pt", "config.json", "metrics.json", "failures.json", "curves.png", "log.txt")


def _save(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a failed write (full disk) as an "enforce fail" naming no file.
            raise OSError(f"cannot write {path} (is the disk full?): {err}") from err

    atomic_write(path, write)


def _json_types(value: Any) -> Any:
    # The record is read back with weights_only=True, which accepts plain containers and scalars only.
    return json.loads(json.dumps(value, default=str))


def write_finetuned_checkpoint(path: str | os.PathLike, *, backbone: Mapping[str, torch.Tensor],
                               classifier: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> Path:
    """Write the checkpoint `featstore build` loads: the backbone strictly, the rest beside it.

    Args:
        path: the file (``OUT/checkpoint.pt``).
        backbone: the backbone's state dict (keys exactly as `featstore.models.build_backbone` builds).
        classifier: the linear classifier's state dict (``weight`` (K, C), ``bias`` (K,)).
        record: the run record (settings, epoch, metrics); `featstore build` copies it into the
            store's provenance.
    Returns:
        ``path``.
    """
    path = Path(path)
    _save(path, {
        "state_dict": {key: value.detach().cpu() for key, value in backbone.items()},
        "classifier": {key: value.detach().cpu() for key, value in classifier.items()},
        FINETUNE_RECORD_KEY: _json_types(record),
    })
    return path


def load_training_state(out: Path) -> dict[str, Any] | None:
    """The resume state (written by `featstore.training.engine.Checkpointer`), or None when the run has none yet."""
    path = out / STATE_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_run_temporaries(out: Path) -> None:
    """Delete what killed writes of the run's files left (hidden ``.NAME.HEX.tmp``; checkpoints are large)."""
    remove_temporaries(out, _RUN_FILES)
    if (out / "checkpoints").is_dir():
        remove_temporaries(out / "checkpoints", ("last.pt",))


class RunLog:
    """The run's log: each line goes to ``OUT/log.txt`` and to ``echo`` (stderr by default).

    The file is rewritten whole and atomically for each line (a run logs a few lines per epoch); a
    resumed run appends to what its predecessor wrote.
    """

    def __init__(self, path: str | os.PathLike, *, echo: Callable[[str], None] | None = None) -> None:
        """
        Args:
            path: the log file.
            echo: also called with each line; None: print to stderr.
        """
        self.path = Path(path)
        self.echo = echo if echo is not None else (lambda line: print(line, file=sys.stderr))
        self.lines: list[str] = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []

    def __call__(self, line: str) -> None:
        self.echo(line)
        self.lines.append(line)
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, target: str, title: str,
                metrics: Sequence[tuple[str, str]] | None = None, x: str = "epoch",
                ylabel: str | None = None) -> Path:
    """Training loss and validation metrics per round, side by side, as a PNG.

    Args:
        history: one entry per epoch (or validation round).
        path: the PNG.
        target: what the run trains (``verb``, ``noun``), for the default metrics and label.
        title: the figure's title.
        metrics: (history key, legend label) of the validation lines; default the target's top-1 / top-5.
        x: the history key on the x axis (``epoch``; ``iteration`` for a detector).
        ylabel: the validation axis label; default "<target> accuracy (%)".
    """
    plt = pyplot()
    metrics = metrics if metrics is not None else [(f"{target}_top{k}", f"top-{k}") for k in (1, 5)]
    steps = [entry[x] for entry in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(steps, [entry["loss"] for entry in history], marker="o")
    ax_loss.set(xlabel=x, ylabel="training loss", title="loss")
    for key, label in metrics:
        values = [entry.get(key) for entry in history]
        if any(v is not None and not math.isnan(v) for v in values):
            ax_acc.plot(steps, [math.nan if v is None else v for v in values], marker="o", label=label)
    ax_acc.set(xlabel=x, ylabel=ylabel or f"{target} accuracy (%)", title="validation")
    if ax_acc.lines:
        ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
