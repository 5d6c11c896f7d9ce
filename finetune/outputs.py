"""What a stage-1 backbone run writes into its run folder (names: `featstore.training.run_folder`).

::

    OUT/checkpoint.pt        what `featstore build --verb-backbone NAME:OUT/checkpoint.pt` loads:
                             {"state_dict": backbone, "classifier": linear layer, "finetune": run record}
                             (float16 with --half-checkpoint)
    OUT/checkpoints/last.pt  everything a resume needs (model, optimiser, scaler, history, failures);
                             deleted when the run finishes unless --keep-resume-state
    OUT/config.json          every setting, the recipe, the init checkpoint's sha256, the data
    OUT/metrics.json         top-1 / top-5 of the target on the validation selection, per epoch and final;
                             ``warnings`` (a run that ends at chance)
    OUT/history.csv          one row per epoch (loss, lr, speed, validation)
    OUT/failures.json        the segments that could not be read: uid, epoch, phase, reason
    OUT/curves.png           loss and validation accuracy per epoch
    OUT/log.txt              what the run printed

Every file is written atomically (`featstore.io.atomic`); the detector runs use `plot_curves` too.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from featstore.io.atomic import atomic_write_torch
from featstore.io.figures import pyplot, save_figure
from featstore.models.checkpoints import FINETUNE_RECORD_KEY
from featstore.training.hooks import refuse_non_finite
from featstore.training.run_folder import RESUME_STATE_NAME

__all__ = [
    "half_weights",
    "load_training_state",
    "plot_curves",
    "write_finetuned_checkpoint",
]


def _json_types(value: Any) -> Any:
    # The record is read back with weights_only=True, which accepts plain containers and scalars only.
    return json.loads(json.dumps(value, default=str))


def half_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's floating tensors in float16 (others as they are), on the CPU, detached."""
    return {key: value.detach().cpu().half() if value.is_floating_point() else value.detach().cpu()
            for key, value in state.items()}


def write_finetuned_checkpoint(path: str | os.PathLike, *, backbone: Mapping[str, torch.Tensor],
                               classifier: Mapping[str, torch.Tensor], record: Mapping[str, Any],
                               half: bool = False) -> Path:
    """Write the checkpoint `featstore build` loads: the backbone strictly, the rest beside it.

    Args:
        path: the file (``OUT/checkpoint.pt``).
        backbone: the backbone's state dict (keys exactly as `featstore.models.build_backbone` builds).
        classifier: the linear classifier's state dict (``weight`` (K, C), ``bias`` (K,)).
        record: the run record (settings, epoch, metrics); `featstore build` copies it into the
            store's provenance.
        half: the weights in float16 (half the file; a model loading them casts them back).
    Returns:
        ``path``.
    """
    path = Path(path)
    refuse_non_finite({"backbone": backbone, "classifier": classifier}, what=f"for {path}")
    weights = half_weights if half else (lambda state: {key: value.detach().cpu() for key, value in state.items()})
    atomic_write_torch(path, {
        "state_dict": weights(backbone),
        "classifier": weights(classifier),
        FINETUNE_RECORD_KEY: _json_types(record),
    })
    return path


def load_training_state(out: Path) -> dict[str, Any] | None:
    """The resume state (written by `featstore.training.hooks.Checkpointer`), or None when the run has none yet."""
    path = out / RESUME_STATE_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


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
