"""What a detector run writes about its validation: metrics, per-class AP and a picture of predictions.

Shared by every detector backend (torchvision's and detectron2's trainers), so that their run folders
read the same: ``metrics.json`` entries from `detection_entry`, ``per_class_ap.csv`` from
`write_per_class_ap` and ``predictions.png`` from `plot_predictions`. The AP itself is
`featstore.epic.detection_metrics.detection_ap` (pycocotools).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featstore.epic.detection_metrics import DetectionAP, ImagePredictions
from featstore.epic.objects import ObjectImage
from featstore.io.atomic import atomic_write_csv
from featstore.io.figures import pyplot, save_figure

__all__ = ["PER_CLASS_COLUMNS", "detection_entry", "plot_predictions", "predictions_caption", "shown_predictions",
           "write_per_class_ap"]

PER_CLASS_COLUMNS = ("class_id", "name", "n_ground_truth", "n_train_boxes", "ap_50", "ap_50_95")


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * value


def detection_entry(result: DetectionAP) -> dict[str, Any]:
    """The validation fields of a history entry / metrics.json, in percent (None where undefined).

    ``map_50`` (COCO interpolation at IoU 0.5), ``map_50_95`` (COCO's primary metric) and
    ``n_classes_evaluated`` (classes with ground truth in the validation images).
    """
    return {"map_50": _percent(result.map_50), "map_50_95": _percent(result.map_50_95),
            "n_classes_evaluated": len(result.per_class)}


def write_per_class_ap(path: str | os.PathLike, result: DetectionAP, *, class_names: Sequence[str] | None = None,
                       train_counts: Mapping[int, int] | None = None) -> Path:
    """``per_class_ap.csv``: one row per class with validation ground truth, best AP first.

    Args:
        path: the CSV to write (atomically).
        result: the validation AP.
        class_names: id -> name (the checkpoint's); None: names are left empty.
        train_counts: boxes per class in the training images (``ObjectLabels.class_counts``).
    """
    def name(class_id: int) -> str:
        return class_names[class_id] if class_names is not None and 0 <= class_id < len(class_names) else ""

    rows = sorted(result.per_class.items(), key=lambda item: (-np.nan_to_num(item[1].ap_50, nan=-1.0), item[0]))
    return atomic_write_csv(path, PER_CLASS_COLUMNS, (
        (class_id, name(class_id), ap.n_ground_truth, (train_counts or {}).get(class_id, 0),
         f"{100 * ap.ap_50:.2f}", f"{100 * ap.ap_50_95:.2f}")
        for class_id, ap in rows))


def shown_predictions(predicted: ImagePredictions, *, min_score: float, max_boxes: int) -> list[int]:
    """Which of an image's predictions a picture draws: the best ``max_boxes`` at or above ``min_score``."""
    scores = np.asarray(predicted.scores, dtype=np.float64)
    return [i for i in np.argsort(-scores)[:max_boxes].tolist() if scores[i] >= min_score]


def predictions_caption(n_drawn: int, *, min_score: float) -> str:
    """What ``predictions.png`` shows, honestly: a picture without a single prediction says so."""
    if n_drawn == 0:
        return f"ground truth (dashed); no predictions above the score threshold {min_score:g}"
    return f"ground truth (dashed) and predictions (score >= {min_score:g})"


def plot_predictions(path: str | os.PathLike, images: Sequence[np.ndarray], truths: Sequence[ObjectImage],
                     predictions: Sequence[ImagePredictions], *, class_names: Sequence[str] | None = None,
                     min_score: float = 0.3, max_boxes: int = 5, title: str = "") -> Path:
    """``predictions.png``: validation images with ground truth (green, dashed) and predictions (orange).

    The title says what is drawn (`predictions_caption`): when no prediction reaches ``min_score`` it
    says there are none, rather than promising predictions the picture does not hold.

    Args:
        path: the PNG.
        images: (H, W, 3) uint8 RGB, one per truth.
        truths: their ground truth.
        predictions: the detector's output on each.
        class_names: for the labels drawn; None: class ids.
        min_score: predictions below it are not drawn.
        max_boxes: at most this many predictions per image, best first.
        title: put before the caption (e.g. ``iteration 500``).
    """
    plt = pyplot()
    drawn = 0

    def label(class_id: int) -> str:
        if class_names is not None and 0 <= class_id < len(class_names):
            return class_names[class_id]
        return str(class_id)

    n = len(images)
    columns = min(n, 4) or 1
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, truth, predicted in zip(axes.flat, images, truths, predictions):
        ax.imshow(image)
        for (x1, y1, x2, y2), class_id in zip(truth.boxes.tolist(), truth.labels.tolist()):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="limegreen",
                                       linestyle="--", linewidth=1.5))
            ax.text(x1, y2, label(int(class_id)), color="limegreen", fontsize=6, va="top")
        for index in shown_predictions(predicted, min_score=min_score, max_boxes=max_boxes):
            score = float(predicted.scores[index])
            drawn += 1
            x1, y1, x2, y2 = np.asarray(predicted.boxes[index], dtype=np.float64).tolist()
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="orange", linewidth=1.2))
            ax.text(x1, y1, f"{label(int(predicted.labels[index]))} {score:.2f}", color="orange", fontsize=6,
                    va="bottom")
        ax.set_title(f"{truth.video_id} frame {truth.frame}", fontsize=7)
    caption = predictions_caption(drawn, min_score=min_score)
    fig.suptitle(f"{title}: {caption}" if title else caption, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
