"""Plots of runs: training curves per run, metric bars per grid."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from featstore.figures import pyplot, save_figure


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Loss and validation top-1 accuracies per epoch, side by side, as a PNG."""
    plt = pyplot()
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("val_verb_top1", "verb"), ("val_noun_top1", "noun"), ("val_action_top1", "action")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, values, marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation")
    if ax_acc.lines:
        ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path
