"""Where a segment lies in time, in seconds: the one clock every published layout is mapped from.

Published features are indexed by their own clocks (RULSTM's and LFB's frames of 30 fps
re-encodes, ActionFormer's windows of 16 frames at 30 fps); EPIC's annotations give each segment
both timestamps (``00:01:02.35``) and native frame numbers (at the video's own rate, 59.94 fps for
most EPIC-55 videos, 50 or 48 for some). A `TimeMap` turns an annotation row into seconds, from the
timestamps or from the native frames and ``EPIC_video_info.csv``'s frame rates; each format then
turns seconds into its own frames or windows, as its publisher's reader does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from featstore.epic.annotations import AnnotationError
from featstore.epic.metadata import find_video_info, read_video_info
from featstore.store.importer import ImportFailure

__all__ = ["TIME_MAPS", "SegmentSpan", "SegmentSkipped", "TimeMap", "make_time_map", "timestamp_seconds"]

TIME_MAPS = ("auto", "timestamps", "frames")


class SegmentSkipped(Exception):
    """One segment cannot be imported (no frames or windows of it in the source, no time for it);
    its reason is recorded with it in the store, and the import goes on."""


@dataclass(frozen=True)
class SegmentSpan:
    """One segment on the seconds clock.

    Attributes:
        uid: the segment id.
        video_id: its video.
        start, stop: seconds from the start of the video.
    """

    uid: str
    video_id: str
    start: float
    stop: float

    @property
    def centre(self) -> float:
        return (self.start + self.stop) / 2


def timestamp_seconds(text: str) -> float:
    """``"HH:MM:SS.ff"`` (EPIC's timestamps) -> seconds.

    Raises:
        ValueError: not three ``:``-separated numbers.
    """
    hours, minutes, seconds = text.strip().split(":")
    return 3600.0 * int(hours) + 60.0 * int(minutes) + float(seconds)


@dataclass(frozen=True)
class TimeMap:
    """How annotation rows become seconds.

    Attributes:
        kind: ``timestamps`` (the rows' start/stop timestamps) or ``frames`` (native frame numbers
            divided by the video's frame rate).
        fps_by_video: ``{video_id: fps}`` for ``frames``.
        video_info: the file the frame rates came from (provenance).
    """

    kind: str
    fps_by_video: Mapping[str, float] | None = None
    video_info: str | None = None

    def span(self, row: Mapping[str, Any]) -> SegmentSpan:
        """The segment of an annotation row (``read_segments``' columns) in seconds.

        Raises:
            SegmentSkipped: the row lacks what this map reads (a timestamp, its video's frame rate).
        """
        uid, video = str(row["uid"]), str(row["video_id"])
        if self.kind == "timestamps":
            try:
                start, stop = timestamp_seconds(row["start_timestamp"]), timestamp_seconds(row["stop_timestamp"])
            except (AttributeError, TypeError, ValueError):
                raise SegmentSkipped(f"no usable timestamps ({row.get('start_timestamp')!r}, "
                                     f"{row.get('stop_timestamp')!r}); use --time-map frames") from None
        else:
            fps = (self.fps_by_video or {}).get(video)
            if fps is None:
                raise SegmentSkipped(f"video {video} has no frame rate in {self.video_info}")
            start, stop = int(row["start_frame"]) / fps, int(row["stop_frame"]) / fps
        if stop < start:
            raise SegmentSkipped(f"it stops ({stop:.3f} s) before it starts ({start:.3f} s)")
        return SegmentSpan(uid, video, start, stop)

    def describe(self) -> dict[str, Any]:
        """The provenance entry: which clock the segments were read on."""
        if self.kind == "timestamps":
            return {"from": "timestamps", "seconds": "start_timestamp / stop_timestamp (HH:MM:SS.ff)"}
        return {"from": "frames", "seconds": "start_frame / fps, stop_frame / fps", "video_info": self.video_info}


def _video_info_beside(annotations: str | os.PathLike) -> Path | None:
    try:
        return find_video_info(annotations)
    except (AnnotationError, KeyError, ValueError):  # a file of no known dataset: nothing to look for beside it
        return None


def make_time_map(rows: list[Mapping[str, Any]], annotations: str | os.PathLike, *, time_map: str = "auto",
                  video_info: str | os.PathLike | None = None) -> TimeMap:
    """The time map an import uses.

    Args:
        rows: the annotation rows (``auto`` looks at their timestamps).
        annotations: the annotation file (its dataset's video-info file is looked for beside it).
        time_map: ``timestamps``, ``frames``, or ``auto``: timestamps when every row has them,
            else frames.
        video_info: ``EPIC_video_info.csv`` / ``EPIC_100_video_info.csv`` for ``frames``
            (default: the one beside the annotations).
    Raises:
        ImportFailure: an unknown ``time_map``, or ``frames`` without a video-info file.
    """
    if time_map not in TIME_MAPS:
        raise ImportFailure(f"--time-map {time_map!r}: use one of {', '.join(TIME_MAPS)}")
    if time_map == "auto":
        time_map = "timestamps" if all(row.get("start_timestamp") and row.get("stop_timestamp") for row in rows) \
            else "frames"
    if time_map == "timestamps":
        return TimeMap("timestamps")
    info = Path(video_info) if video_info is not None else _video_info_beside(annotations)
    if info is None:
        raise ImportFailure(f"--time-map frames needs the videos' frame rates: pass --video-info "
                            f"(EPIC_video_info.csv); none lies beside {annotations}")
    return TimeMap("frames", read_video_info(info), str(Path(info).resolve()))
