"""COCO-style detection AP of predictions against ground-truth objects, computed by pycocotools.

The matching, the 101-point interpolated precision and the averaging over IoU thresholds are
pycocotools' own (``COCOeval``, ``iouType="bbox"``, all object areas), so numbers compare with
detectron2's and published COCO-style results; this module only translates records into COCO's
dictionaries and reads its accumulated precision array.

Conventions (COCO's): mAP is the mean over classes that have ground truth in the evaluated images;
a prediction of a class without ground truth there counts for nothing; an image without objects
still makes every prediction on it a false positive; at most ``max_detections`` predictions per
image, best scores first.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featstore.epic.objects import ObjectImage

__all__ = ["ClassAP", "DetectionAP", "ImagePredictions", "detection_ap"]

# COCO's IoU thresholds 0.50:0.05:0.95; index 0 is IoU 0.5.
_IOU_50 = 0


@dataclass(frozen=True, eq=False)
class ImagePredictions:
    """A detector's output on one image.

    Attributes:
        boxes: (k, 4) x1, y1, x2, y2 in pixels of the image (as `ObjectImage.boxes`).
        scores: (k,) confidences.
        labels: (k,) int class ids (the ground truth's label space).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class ClassAP:
    """AP of one class, fractions in [0, 1].

    Attributes:
        ap_50: AP at IoU 0.5.
        ap_50_95: AP averaged over IoU 0.50:0.05:0.95.
        n_ground_truth: its ground-truth boxes in the evaluated images.
    """

    ap_50: float
    ap_50_95: float
    n_ground_truth: int


@dataclass(frozen=True)
class DetectionAP:
    """COCO-style AP, fractions in [0, 1].

    Attributes:
        map_50: mAP at IoU 0.5 (PASCAL-style threshold, COCO interpolation).
        map_50_95: mAP averaged over IoU 0.50:0.05:0.95 (COCO's primary metric).
        per_class: class id -> its AP, for every class with ground truth.
    """

    map_50: float
    map_50_95: float
    per_class: dict[int, ClassAP]


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def detection_ap(
    ground_truth: Sequence[ObjectImage],
    predictions: Sequence[ImagePredictions],
    *,
    max_detections: int = 100,
) -> DetectionAP:
    """COCO mAP@0.5, mAP@[0.5:0.95] and per-class AP of predictions on the ground truth's images.

    Args:
        ground_truth: the evaluated images (e.g. a validation `featstore.epic.objects.ObjectLabels`).
        predictions: one per ground-truth image, in the same order.
        max_detections: predictions kept per image (COCO's 100).

    Returns:
        A `DetectionAP`.

    Raises:
        ValueError: predictions and images differ in number, arrays of the wrong shape, or no
            ground-truth box at all (AP is undefined).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images")
    images, gt_annotations, dt_annotations = [], [], []
    categories: set[int] = set()
    for image_id, (truth, predicted) in enumerate(zip(ground_truth, predictions), start=1):
        images.append({"id": image_id})
        for box, label in zip(_xywh(truth.boxes), np.asarray(truth.labels).tolist()):
            # ids from 1: COCOeval marks unmatched boxes with id 0.
            gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": image_id, "category_id": int(label),
                                   "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})
            categories.add(int(label))
        boxes = _xywh(predicted.boxes)
        scores = np.asarray(predicted.scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(predicted.labels).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"predictions for image {image_id - 1}: {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(labels)} labels")
        for box, score, label in zip(boxes, scores.tolist(), labels.tolist()):
            dt_annotations.append({"id": len(dt_annotations) + 1, "image_id": image_id, "category_id": int(label),
                                   "bbox": box.tolist(), "area": float(box[2] * box[3]), "score": score,
                                   "iscrowd": 0})
            categories.add(int(label))
    if not gt_annotations:
        raise ValueError("no ground-truth boxes: AP is undefined")

    category_list = [{"id": c} for c in sorted(categories)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "annotations": gt_annotations, "categories": category_list}
        coco_dt.dataset = {"images": images, "annotations": dt_annotations, "categories": category_list}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
    # (T IoU thresholds, R recall points, K classes, A area ranges, M max-dets); -1: no ground truth.
    precision = evaluation.eval["precision"][:, :, :, 0, -1]

    def mean(values: np.ndarray) -> float:
        present = values[values > -1]
        return float(present.mean()) if present.size else float("nan")

    counts = np.unique([a["category_id"] for a in gt_annotations], return_counts=True)
    n_truth = dict(zip(counts[0].tolist(), counts[1].tolist()))
    per_class = {
        category: ClassAP(ap_50=mean(precision[_IOU_50, :, k]), ap_50_95=mean(precision[:, :, k]),
                          n_ground_truth=int(n_truth[category]))
        for k, category in enumerate(evaluation.params.catIds)
        if category in n_truth
    }
    return DetectionAP(map_50=mean(precision[_IOU_50]), map_50_95=mean(precision), per_class=per_class)
