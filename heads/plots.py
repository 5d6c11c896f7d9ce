"""Plots of runs: the training curves of one run (a grid's bars are in ``heads.results``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from featstore.io.figures import pyplot, save_figure
from heads.metric_registry import list_metrics


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Loss and the validation metrics of the registry's curves (top-1 accuracies) per epoch, as a PNG.

    Args:
        history: one record per epoch (``epoch``, ``loss``, ``val_<metric>``).
        path: the PNG to write.
        title: figure title.
    Returns:
        ``path``.
    """
    plt = pyplot()
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    curves = list_metrics(curve=True)
    for metric in curves:
        values = [h.get(f"val_{metric.key}") for h in history]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, values, marker="o", label=metric.task)
    measures = " / ".join(dict.fromkeys(m.measure for m in curves))
    ax_acc.set(xlabel="epoch", ylabel=f"{measures} (%)", title="validation")
    if ax_acc.lines:
        ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path
