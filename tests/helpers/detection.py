"""How often a detector finds the moved object of the demo sample's validation segments.

The detector runs on each validation segment's detection frames (the frames a `featstore build` with
the demo's sampling would detect on), as the build runs it; no store is built.
"""
from __future__ import annotations

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each box of ``a`` (n, 4) with the box ``b`` (4,), x1, y1, x2, y2."""
    width = np.clip(np.minimum(a[:, 2], b[2]) - np.maximum(a[:, 0], b[0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[3]) - np.maximum(a[:, 1], b[1]), 0, None)
    inter = width * height
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / np.maximum(area, 1e-9)


def moved_object_hits(detector, sample) -> tuple[int, int]:
    """(validation segments where ``detector`` finds the segment's moved object at IoU >= 0.5 among its
    top detections on one of the segment's detection frames, validation segments).

    Args:
        detector: a `featstore.models.ObjectDetector` (e.g. ``build_detector("NAME:checkpoint")``).
        sample: the generated sample (`featstore.samples.kitchens.generate_sample`); the moved object
            is the box of the segment's noun class in its ``boxes.csv``.
    Returns:
        (hits, validation segments).
    """
    import pandas as pd
    import torch
    from PIL import Image

    from cli.demo import SAMPLING
    from featstore.epic.sampling import SamplingConfig, plan_segment
    from featstore.samples.kitchens import FPS, FRAME_HEIGHT, FRAME_WIDTH

    sampling = SamplingConfig(**SAMPLING)
    truth = pd.read_csv(sample.boxes)
    scale = np.array([FRAME_WIDTH, FRAME_HEIGHT, FRAME_WIDTH, FRAME_HEIGHT], np.float64)
    validation = [segment for segment in sample.segments if segment.participant_id >= "P26"]
    hits = 0
    for segment in validation:
        plan = plan_segment(segment.start_frame, segment.stop_frame, fps=FPS, n_frames=None, config=sampling)
        hit = False
        for frame in plan.detection_frames:
            active = truth[(truth.video_id == segment.video_id) & (truth.frame == frame)
                           & (truth.label == segment.noun_class)]
            if not len(active):
                continue
            path = sample.frames / segment.participant_id / "rgb_frames" / segment.video_id / f"frame_{frame:010d}.jpg"
            image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0
            [found] = detector.detect([image], sampling.det_topk)
            detected = found.boxes.double().numpy() * scale
            hit |= bool((iou(detected, active[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)[0]) >= 0.5).any())
        hits += hit
    return hits, len(validation)
