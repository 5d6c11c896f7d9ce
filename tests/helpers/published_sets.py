"""Small published feature sets over an annotation file's segments, in their publishers' layouts
(`featstore.samples.published`), with the values written kept for the tests to compare against."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from featstore.epic.annotations import read_segments
from featstore.imports.timing import timestamp_seconds
from featstore.samples.published import write_rulstm_lmdb

RULSTM_WIDTHS = {"rgb": 1024, "flow": 1024, "obj": 352}


def video_seconds(annotations: Path, margin: float = 1.0) -> dict[str, float]:
    """Each video's length: its last segment's end plus ``margin`` seconds."""
    ends: dict[str, float] = {}
    for row in read_segments(annotations).to_pylist():
        ends[row["video_id"]] = max(ends.get(row["video_id"], 0.0), timestamp_seconds(row["stop_timestamp"]))
    return {video: end + margin for video, end in ends.items()}


def write_rulstm_source(root: Path, annotations: Path, *, modalities: Mapping[str, int] = RULSTM_WIDTHS,
                        seed: int = 0, values: Callable[[str, str, np.ndarray], np.ndarray] | None = None,
                        leave_out: Callable[[str, int], bool] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """RULSTM LMDBs ``root/<modality>/`` holding every 30 fps frame of the annotated videos.

    Args:
        values: ``values(modality, video, frames) -> (n, D)`` instead of random values.
        leave_out: ``leave_out(video, frame)``: frames not written.
    Returns:
        modality -> video -> ``(n + 1, D)`` float32, row ``f`` the value of frame ``f`` (row 0 unused).
    """
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, np.ndarray]] = {}
    for modality, width in modalities.items():
        written[modality] = {}
        entries = []
        for video, seconds in video_seconds(annotations).items():
            frames = np.arange(math.floor(seconds * 30) + 1)
            array = (values(modality, video, frames) if values is not None
                     else rng.standard_normal((len(frames), width))).astype(np.float32)
            written[modality][video] = array
            entries += [(video, int(f), array[f]) for f in frames[1:] if leave_out is None or not leave_out(video, int(f))]
        write_rulstm_lmdb(root / modality, entries)
    return written


def rulstm_mean(frames: np.ndarray, start: float, stop: float) -> tuple[np.ndarray, int]:
    """What RULSTM's layout gives for a segment by hand: frames ``floor(t * 30)`` (at least 1) from
    ``start`` to ``stop`` seconds, averaged; and how many."""
    first, last = max(1, math.floor(start * 30)), max(1, math.floor(stop * 30))
    return frames[first:last + 1].mean(axis=0), last - first + 1


def write_actionformer_source(root: Path, annotations: Path, *, dim: int = 2304, seed: int = 0,
                              values: Callable[[str, int], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """ActionFormer's layout: ``root/<video_id>.npz`` with ``feats`` ``[T, dim]``, feature t covering
    frames ``[16 t, 16 t + 32)`` at 30 fps, as many as the video's length holds.

    Args:
        values: ``values(video, T) -> (T, dim)`` instead of random values.
    Returns:
        video -> its ``feats``.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for video, seconds in video_seconds(annotations).items():
        count = max(1, math.floor((seconds * 30 - 32) / 16) + 1)
        feats = (values(video, count) if values is not None else rng.standard_normal((count, dim))).astype(np.float32)
        np.savez(root / f"{video}.npz", feats=feats)
        written[video] = feats
    return written


def write_epic100_pickle(path: Path, n: int, *, seed: int = 0, videos: int = 2) -> Path:
    """An EPIC-100 annotation pickle (a DataFrame indexed by ``narration_id``, as the official
    ``EPIC_100_train.pkl``) of ``n`` two-second segments over ``videos`` videos of P01."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        video = f"P01_1{i % videos:02d}"
        index = i // videos
        start, stop = 1 + index * 120, 120 + index * 120
        verb, noun = int(rng.integers(0, 97)), int(rng.integers(0, 300))
        stamp = lambda frame: f"00:{frame // 3600:02d}:{frame % 3600 / 60:05.2f}"  # noqa: E731 - 60 fps
        rows.append({"narration_id": f"{video}_{index}", "participant_id": "P01", "video_id": video,
                     "narration_timestamp": stamp(start), "start_timestamp": stamp(start),
                     "stop_timestamp": stamp(stop), "start_frame": start, "stop_frame": stop,
                     "narration": f"verb{verb} noun{noun}", "verb": f"verb{verb}", "verb_class": verb,
                     "noun": f"noun{noun}", "noun_class": noun, "all_nouns": [f"noun{noun}"],
                     "all_noun_classes": [noun]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).set_index("narration_id").to_pickle(path)
    return path
