"""The detector run's report files: metrics entry, per-class AP CSV, predictions picture."""
from __future__ import annotations

import csv
import math

import numpy as np

from featstore.epic.detection_metrics import ClassAP, DetectionAP, ImagePredictions
from featstore.epic.objects import ObjectImage
from finetune.detection_report import (
    PER_CLASS_COLUMNS,
    detection_entry,
    plot_predictions,
    predictions_caption,
    shown_predictions,
    write_per_class_ap,
)


def result() -> DetectionAP:
    return DetectionAP(map_50=0.5, map_50_95=0.25, per_class={
        3: ClassAP(ap_50=0.2, ap_50_95=0.1, n_ground_truth=4),
        1: ClassAP(ap_50=0.8, ap_50_95=0.4, n_ground_truth=2)})


def test_entry_is_in_percent_and_undefined_is_none():
    assert detection_entry(result()) == {"map_50": 50.0, "map_50_95": 25.0, "n_classes_evaluated": 2}
    empty = detection_entry(DetectionAP(map_50=math.nan, map_50_95=math.nan, per_class={}))
    assert empty["map_50"] is None and empty["map_50_95"] is None


def test_per_class_csv_is_sorted_best_first_with_names_and_counts(tmp_path):
    path = write_per_class_ap(tmp_path / "per_class_ap.csv", result(), class_names=["a", "pan", "c", "tap"],
                              train_counts={1: 7})
    rows = list(csv.reader(open(path)))
    assert tuple(rows[0]) == PER_CLASS_COLUMNS
    assert rows[1] == ["1", "pan", "2", "7", "80.00", "40.00"]
    assert rows[2] == ["3", "tap", "4", "0", "20.00", "10.00"]


def test_predictions_picture_is_a_png(tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    truth = ObjectImage("P26", "P26_01", 5, np.array([[4, 4, 20, 20]], np.float32), np.array([1]))
    predicted = ImagePredictions(boxes=np.array([[5, 5, 21, 19], [0, 0, 8, 8]], np.float32),
                                 scores=np.array([0.9, 0.1]), labels=np.array([1, 2]))
    path = plot_predictions(tmp_path / "predictions.png", [image] * 3, [truth] * 3, [predicted] * 3,
                            class_names=["a", "pan", "c"], title="val")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_picture_without_predictions_says_so_instead_of_promising_them(tmp_path):
    predicted = ImagePredictions(boxes=np.array([[5, 5, 21, 19], [0, 0, 8, 8], [1, 1, 9, 9]], np.float32),
                                 scores=np.array([0.2, 0.9, 0.5]), labels=np.array([1, 2, 1]))
    assert shown_predictions(predicted, min_score=0.3, max_boxes=5) == [1, 2]  # best first, above the threshold
    assert shown_predictions(predicted, min_score=0.95, max_boxes=5) == []
    assert predictions_caption(0, min_score=0.3) == ("ground truth (dashed); no predictions above the score "
                                                     "threshold 0.3")
    assert predictions_caption(2, min_score=0.3) == "ground truth (dashed) and predictions (score >= 0.3)"
    nothing = ImagePredictions(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0), labels=np.zeros(0, np.int64))
    truth = ObjectImage("P26", "P26_01", 5, np.array([[4, 4, 20, 20]], np.float32), np.array([1]))
    path = plot_predictions(tmp_path / "none.png", [np.zeros((48, 64, 3), np.uint8)], [truth], [nothing])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
