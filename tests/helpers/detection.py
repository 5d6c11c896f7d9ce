"""How often a detector finds the moved object of the demo sample's validation segments.

The detector runs on each validation segment's detection frames (the frames a `featstore build` with
the demo's sampling would detect on), as the build runs it; no store is built.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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

    from cli.demo_recipe import SAMPLING
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


OBJECT_IMAGE_PATTERN = "{video_id}/{frame:04d}.jpg"  # the images' --image-pattern


def write_object_images(root: Path) -> Path:
    """Eight 64 x 80 images per video (P01_01, P02_01 train; P26_01 val), one red square of class 1 and
    one blue of class 2 each, moving with the frame; a boxes CSV of them."""
    rows = ["video_id,frame,x1,y1,x2,y2,score,label"]
    rng = np.random.default_rng(0)
    for video in ("P01_01", "P02_01", "P26_01"):
        (root / video).mkdir(parents=True, exist_ok=True)
        for frame in range(1, 9):
            image = (rng.integers(0, 40, size=(64, 80, 3))).astype(np.uint8)
            red = (4 + 3 * frame, 6, 24 + 3 * frame, 26)
            blue = (40, 30 + frame, 70, 60 + frame)
            for (x1, y1, x2, y2), colour in ((red, (220, 20, 20)), (blue, (20, 20, 220))):
                image[y1:y2, x1:x2] = colour
            Image.fromarray(image).save(root / video / f"{frame:04d}.jpg", quality=95)
            rows += [f"{video},{frame},{red[0]},{red[1]},{red[2]},{red[3]},1,1",
                     f"{video},{frame},{blue[0]},{blue[1]},{blue[2]},{blue[3]},1,2"]
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root / "boxes.csv"
