"""COCO-style AP (pycocotools) on hand-made cases whose AP is known.

COCO interpolates precision at 101 recall points 0, 0.01, ..., 1 (precision at recall r = the best
precision at any recall >= r, 0 beyond the highest recall reached) and averages over IoU thresholds
0.50, 0.55, ..., 0.95. So: one of two objects found = precision 1 up to recall 0.5 = 51 of 101
points = 51/101; a box of IoU 0.62 counts at thresholds 0.50, 0.55, 0.60 = 3 of 10.
"""
from __future__ import annotations

import numpy as np
import pytest

from featstore.epic.detection_metrics import ImagePredictions, detection_ap
from featstore.epic.objects import ObjectImage


def image(boxes: list[list[float]], labels: list[int], frame: int = 1) -> ObjectImage:
    return ObjectImage("P26", "P26_01", frame, np.asarray(boxes, np.float32).reshape(-1, 4),
                       np.asarray(labels, np.int64))


def predicted(boxes: list[list[float]], scores: list[float], labels: list[int]) -> ImagePredictions:
    return ImagePredictions(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores), np.asarray(labels))


TRUTH = [
    image([[10, 10, 60, 80], [100, 20, 180, 90]], [1, 2], frame=1),
    image([[0, 0, 50, 50]], [1], frame=2),
    image([], [], frame=3),  # an image without objects
]


def test_perfect_predictions_score_one() -> None:
    perfect = [predicted(t.boxes.tolist(), [0.9] * len(t), t.labels.tolist()) for t in TRUTH]
    result = detection_ap(TRUTH, perfect)
    assert result.map_50 == pytest.approx(1.0) and result.map_50_95 == pytest.approx(1.0)
    assert {k: (v.ap_50, v.ap_50_95, v.n_ground_truth) for k, v in result.per_class.items()} == {
        1: (pytest.approx(1.0), pytest.approx(1.0), 2), 2: (pytest.approx(1.0), pytest.approx(1.0), 1)}


def test_one_of_two_objects_found() -> None:
    truth = [image([[0, 0, 10, 10], [50, 50, 70, 70]], [1, 1])]
    result = detection_ap(truth, [predicted([[0, 0, 10, 10]], [0.8], [1])])
    assert result.map_50 == pytest.approx(51 / 101) and result.map_50_95 == pytest.approx(51 / 101)


def test_a_loose_box_counts_at_the_low_iou_thresholds_only() -> None:
    truth = [image([[0, 0, 100, 100]], [3])]
    result = detection_ap(truth, [predicted([[0, 0, 100, 62]], [0.7], [3])])  # IoU 0.62
    assert result.map_50 == pytest.approx(1.0) and result.map_50_95 == pytest.approx(0.3)


def test_a_missed_class_and_a_better_scored_false_positive() -> None:
    # Class 2 is never predicted: AP 0; class 1's true positive ranks below a false positive on the
    # image without objects: precision 1/2 at every recall.
    predictions = [
        predicted([[10, 10, 60, 80]], [0.5], [1]),
        predicted([[0, 0, 50, 50]], [0.4], [1]),
        predicted([[5, 5, 30, 30]], [0.9], [1]),
    ]
    result = detection_ap(TRUTH, predictions)
    assert result.per_class[2].ap_50 == 0.0 and result.per_class[2].ap_50_95 == 0.0
    # Ranked: FP (0.9), TP (0.5), TP (0.4): precision 0, 1/2, 2/3 at recall 0, 1/2, 1.
    assert result.per_class[1].ap_50 == pytest.approx(2 / 3)
    assert result.map_50 == pytest.approx((2 / 3 + 0) / 2)


def test_predictions_of_classes_without_ground_truth_do_not_count() -> None:
    truth = [image([[0, 0, 10, 10]], [1])]
    result = detection_ap(truth, [predicted([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.95], [1, 7])])
    assert result.map_50 == pytest.approx(1.0) and set(result.per_class) == {1}


def test_no_predictions_and_bad_input() -> None:
    empty = [predicted([], [], []) for _ in TRUTH]
    result = detection_ap(TRUTH, empty)
    assert result.map_50 == 0.0 and result.map_50_95 == 0.0
    with pytest.raises(ValueError, match="2 predictions for 3 ground-truth images"):
        detection_ap(TRUTH, empty[:2])
    with pytest.raises(ValueError, match="image 0: 1 boxes, 2 scores"):
        detection_ap(TRUTH, [predicted([[0, 0, 1, 1]], [0.1, 0.2], [1, 1])] + empty[1:])
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        detection_ap([image([], [])], [predicted([], [], [])])


def test_max_detections_caps_predictions_per_image() -> None:
    # Ten false positives outrank the true positive; with max_detections=10 it is never reached.
    truth = [image([[0, 0, 10, 10]], [1])]
    boxes = [[50 + i, 50, 60 + i, 60] for i in range(10)] + [[0, 0, 10, 10]]
    scores = [0.9 - 0.01 * i for i in range(10)] + [0.1]
    found = predicted(boxes, scores, [1] * 11)
    assert detection_ap(truth, [found], max_detections=10).map_50 == 0.0
    assert detection_ap(truth, [found]).map_50 == pytest.approx(1 / 11)
