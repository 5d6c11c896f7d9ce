"""How often a store's detections find the moved object of the demo sample's validation segments."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each box of ``a`` (n, 4) with the box ``b`` (4,), x1, y1, x2, y2."""
    width = np.clip(np.minimum(a[:, 2], b[2]) - np.maximum(a[:, 0], b[0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[3]) - np.maximum(a[:, 1], b[1]), 0, None)
    inter = width * height
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / np.maximum(area, 1e-9)


def moved_object_hits(store_path: Path, sample) -> tuple[int, int]:
    """(validation segments with a stored detection at IoU >= 0.5 on the segment's moved object on one of
    its detection frames, validation segments). The moved object is the box of the segment's noun class
    in the sample's ``boxes.csv``."""
    import pandas as pd

    from featstore.samples.kitchens import FRAME_HEIGHT, FRAME_WIDTH
    from featstore.store.reader import FeatureStore

    store = FeatureStore.open(store_path)
    truth = pd.read_csv(sample.boxes)
    scale = np.array([FRAME_WIDTH, FRAME_HEIGHT, FRAME_WIDTH, FRAME_HEIGHT], np.float64)
    boxes = store.boxes().to_pandas()
    boxes = boxes[boxes["valid"] & boxes["frame"].notna()]
    validation = [segment for segment in sample.segments if segment.participant_id >= "P26"]
    hits = 0
    for segment in validation:
        hit = False
        for frame, rows in boxes[boxes["uid"] == segment.uid].groupby("frame"):
            active = truth[(truth.video_id == segment.video_id) & (truth.frame == int(frame))
                           & (truth.label == segment.noun_class)]
            if len(active):
                detected = rows[["x1", "y1", "x2", "y2"]].to_numpy(np.float64) * scale
                hit |= bool((iou(detected, active[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)[0]) >= 0.5).any())
        hits += hit
    return hits, len(validation)
