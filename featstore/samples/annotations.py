"""Generated annotation files in the EPIC schemas, for tests, benchmarks and the demo.

``write_epic55_annotations`` writes a CSV in the EPIC-55 training-label schema (or its test-timestamps
schema); ``write_video_info`` the ``EPIC_video_info.csv`` beside it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from featstore.io.atomic import atomic_write_csv

EPIC55_COLUMNS = (
    "uid", "participant_id", "video_id", "narration", "start_timestamp", "stop_timestamp",
    "start_frame", "stop_frame", "verb", "verb_class", "noun", "noun_class", "all_nouns", "all_noun_classes",
)


@dataclass(frozen=True)
class SegmentLabel:
    """One generated segment's annotation."""

    uid: str
    participant_id: str
    video_id: str
    start_frame: int
    stop_frame: int
    verb_class: int
    noun_class: int


def _timestamp(frame: int, fps: float) -> str:
    seconds = frame / fps
    return f"{int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}:{seconds % 60:05.2f}"


def generate_segments(
    n: int,
    *,
    num_verbs: int,
    num_nouns: int,
    participants: Sequence[str] = ("P01", "P02", "P26", "P27"),
    videos_per_participant: int = 2,
    frames_per_segment: int = 120,
    seed: int = 0,
) -> list[SegmentLabel]:
    """Segments spread over participants and videos, with labels drawn uniformly.

    Args:
        n: number of segments.
        num_verbs, num_nouns: class counts to draw labels from.
        participants: participant ids, assigned round-robin.
        videos_per_participant: videos per participant, assigned round-robin.
        frames_per_segment: segment length in frames; segments follow each other within a video.
        seed: RNG seed.
    Returns:
        n labelled segments, uids "0".."n-1".
    """
    rng = np.random.default_rng(seed)
    verbs = rng.integers(0, num_verbs, size=n)
    nouns = rng.integers(0, num_nouns, size=n)
    next_start: dict[str, int] = {}
    segments = []
    for i in range(n):
        participant = participants[i % len(participants)]
        video = f"{participant}_{(i // len(participants)) % videos_per_participant + 1:02d}"
        start = next_start.get(video, 1)
        stop = start + frames_per_segment - 1
        next_start[video] = stop + 1
        segments.append(SegmentLabel(str(i), participant, video, start, stop, int(verbs[i]), int(nouns[i])))
    return segments


def write_epic55_annotations(path: str | os.PathLike, segments: Sequence[SegmentLabel], *, fps: float = 60.0,
                             labelled: bool = True, verb_names: Mapping[int, str] | None = None,
                             noun_names: Mapping[int, str] | None = None) -> Path:
    """Write segments as an EPIC-55 training-label CSV (or a test-timestamps CSV when unlabelled).

    ``verb_names`` / ``noun_names`` map class ids to the names written in the verb, noun and
    narration columns; classes without one are named ``verb<id>`` / ``noun<id>``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = EPIC55_COLUMNS if labelled else (
        "uid", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "start_frame", "stop_frame")
    rows = []
    for seg in segments:
        verb = (verb_names or {}).get(seg.verb_class, f"verb{seg.verb_class}")
        noun = (noun_names or {}).get(seg.noun_class, f"noun{seg.noun_class}")
        row = {
            "uid": seg.uid, "participant_id": seg.participant_id, "video_id": seg.video_id,
            "narration": f"{verb} {noun}",
            "start_timestamp": _timestamp(seg.start_frame, fps), "stop_timestamp": _timestamp(seg.stop_frame, fps),
            "start_frame": seg.start_frame, "stop_frame": seg.stop_frame,
            "verb": verb, "verb_class": seg.verb_class, "noun": noun, "noun_class": seg.noun_class,
            "all_nouns": f"['{noun}']", "all_noun_classes": f"[{seg.noun_class}]",
        }
        rows.append([row[column] for column in columns])
    return atomic_write_csv(path, columns, rows)


def write_video_info(path: str | os.PathLike, videos: Iterable[tuple[str, int, int, int]], *, fps: float) -> Path:
    """Write an ``EPIC_video_info.csv`` (video, resolution, duration, fps) for (video, width, height, frames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_csv(path, ["video", "resolution", "duration", "fps"],
                            [[video, f"{width}x{height}", n_frames / fps, fps] for video, width, height, n_frames in videos])
