"""Precomputed boxes (``featstore build --boxes``): a CSV or Parquet file of detections, read and checked.

A boxes file has one row per box, ``video_id, frame, x1, y1, x2, y2, score[, label]``, ``frame`` the
EPIC 1-based RGB frame index. The build pools its detector's features at these boxes instead of
detecting (`PrecomputedBoxes.frame`); detector training reads the same file as ground truth
(`PrecomputedBoxes.frames`, `featstore.epic.objects.read_box_file_objects`). Every error names the
file, the 1-based data row and the column.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["BoxFileFrame", "BoxesFileError", "PrecomputedBoxes", "describe_box_file"]


class BoxesFileError(ValueError):
    """A ``--boxes`` file cannot be used: unreadable, a column missing, or values that make no sense."""


_BOX_FILE_COLUMNS = ("video_id", "frame", "x1", "y1", "x2", "y2", "score")
_PARQUET_SUFFIXES = (".parquet", ".pq")
# Normalised coordinates a little outside [0, 1] are rounding; far outside means pixel coordinates.
_NORMALISED_SLACK = 0.01


@dataclass(frozen=True)
class _VideoBoxes:
    frames: np.ndarray  # (F,) int64 distinct frames, ascending
    starts: np.ndarray  # (F,) first row of each frame
    ends: np.ndarray  # (F,) one past its last row
    boxes: np.ndarray  # (R, 4) float32, rows grouped by frame, best score first within a frame
    scores: np.ndarray  # (R,) float32
    labels: np.ndarray | None  # (R,) int64; -1 where the file's label cell is empty
    file_rows: np.ndarray  # (R,) int64 1-based data row of the file each box came from


@dataclass(frozen=True)
class BoxFileFrame:
    """The rows of a boxes file for one frame, as the file gives them.

    Attributes:
        video_id: the video.
        frame: EPIC 1-based RGB frame index.
        boxes: (k, 4) float32 x1, y1, x2, y2 in the file's coordinates (not clipped).
        scores: (k,) float32, descending.
        labels: (k,) int64 (-1 for an empty label cell), or None when the file has no label column.
        file_rows: (k,) 1-based data rows of the file (header excluded), for messages.
    """

    video_id: str
    frame: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    file_rows: np.ndarray


class PrecomputedBoxes:
    """Boxes from a CSV or Parquet file of ``video_id, frame, x1, y1, x2, y2, score[, label]``.

    ``frame`` is the EPIC 1-based RGB frame index. Coordinates are pixels of the source frames
    (``coords="pixel"``, normalised per video once its frame size is known) or already normalised
    to [0, 1] (``coords="normalized"``). Rows are grouped per video and frame once, at load, so a
    lookup is a binary search.
    """

    def __init__(self, path: Path, coords: str, videos: dict[str, _VideoBoxes], rows: int) -> None:
        self.path = path
        self.coords = coords
        self.rows = rows
        self._videos = videos

    @classmethod
    def read(cls, path: str | os.PathLike, *, coords: str, videos: Iterable[str] | None = None) -> PrecomputedBoxes:
        """Read and check a boxes file.

        Args:
            path: ``.csv`` (any other suffix is read as CSV too) or ``.parquet`` / ``.pq``.
            coords: ``"pixel"`` or ``"normalized"``.
            videos: keep only these videos (the build's selection), or None for all.
        Returns:
            The boxes, ready for `frame` lookups.
        Raises:
            BoxesFileError: unreadable file, a missing column, nulls, a frame < 1, non-finite or
                inverted coordinates, normalised coordinates that look like pixels.
        """
        path = Path(path)
        if coords not in ("pixel", "normalized"):
            raise BoxesFileError(f"boxes coordinates must be 'pixel' or 'normalized', got {coords!r}")
        table, file_rows = _box_rows(path, videos)
        columns = _box_columns(path, table)
        _check_box_values(path, file_rows, columns, coords)
        return cls(path, coords, _group_by_video(columns, file_rows), rows=len(columns.video))

    def has_labels(self) -> bool:
        return any(v.labels is not None for v in self._videos.values())

    def frames(self) -> Iterator[BoxFileFrame]:
        """Every frame the file has rows for, by video then frame, in the file's coordinates.

        This is the file as ground truth (training a detector on it), where `frame` serves lookups.
        """
        for video_id in sorted(self._videos):
            entry = self._videos[video_id]
            for frame, lo, hi in zip(entry.frames.tolist(), entry.starts.tolist(), entry.ends.tolist()):
                yield BoxFileFrame(
                    video_id=video_id,
                    frame=int(frame),
                    boxes=entry.boxes[lo:hi].copy(),
                    scores=entry.scores[lo:hi].copy(),
                    labels=None if entry.labels is None else entry.labels[lo:hi].copy(),
                    file_rows=entry.file_rows[lo:hi].copy(),
                )

    def frame(
        self, video_id: str, frame: int, *, topk: int, frame_size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """The best ``topk`` boxes of one frame, normalised.

        Args:
            video_id: the video.
            frame: EPIC 1-based RGB frame index.
            topk: how many to keep (highest scores).
            frame_size: (H, W) of the video's source frames, to normalise pixel coordinates.
        Returns:
            ``(boxes (k, 4) float32 in [0, 1], scores (k,) float32, labels (k,) int64 or None)``, or
            None when the file has no row for that frame.
        """
        entry = self._videos.get(video_id)
        if entry is None:
            return None
        at = int(np.searchsorted(entry.frames, frame))
        if at == len(entry.frames) or entry.frames[at] != frame:
            return None
        lo, hi = int(entry.starts[at]), int(entry.ends[at])
        hi = min(hi, lo + topk)
        boxes = entry.boxes[lo:hi].copy()
        if self.coords == "pixel":
            height, width = frame_size
            boxes /= np.array([width, height, width, height], dtype=np.float32)
        np.clip(boxes, 0.0, 1.0, out=boxes)
        labels = None if entry.labels is None else entry.labels[lo:hi].copy()
        return boxes, entry.scores[lo:hi].copy(), labels


def _box_rows(path: Path, videos: Iterable[str] | None) -> tuple[pa.Table, np.ndarray]:
    """The file's box columns, of the wanted videos, without nulls (but labels).

    Returns:
        (the table, (R,) int64 1-based data row of the file each of its rows is).
    """
    table = _read_box_table(path)
    missing = [c for c in _BOX_FILE_COLUMNS if c not in table.column_names]
    if missing:
        raise BoxesFileError(
            f"{path}: column(s) {', '.join(missing)} missing; a boxes file has "
            f"{', '.join(_BOX_FILE_COLUMNS)}[, label] (has {', '.join(table.column_names)})"
        )
    if table.num_rows == 0:
        raise BoxesFileError(f"{path}: no rows, only a header; a boxes file has one row per box "
                             f"({', '.join(_BOX_FILE_COLUMNS)}[, label])")
    has_label = "label" in table.column_names
    table = table.select(list(_BOX_FILE_COLUMNS) + (["label"] if has_label else []))
    file_rows = np.arange(1, table.num_rows + 1, dtype=np.int64)  # 1-based data rows, as messages count
    if videos is not None:
        wanted = pa.array(sorted(set(videos)), pa.string())
        keep = pc.is_in(pc.cast(table.column("video_id"), pa.string()), value_set=wanted).fill_null(False)
        table = table.filter(keep)
        file_rows = file_rows[np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)]
    for name in table.column_names:
        nulls = table.column(name).null_count
        if nulls and not (name == "label"):
            row = int(file_rows[np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0]])
            raise BoxesFileError(f"{path}: row {row}, column {name!r}: empty value ({nulls} in all)")
    return table, file_rows


@dataclass(frozen=True)
class _BoxColumns:
    video: np.ndarray  # (R,) object: video ids
    frame: np.ndarray  # (R,) float64, checked to be 1-based integers by _check_box_values
    xyxy: np.ndarray  # (R, 4) float64
    score: np.ndarray  # (R,) float64
    label: np.ndarray | None  # (R,) float64, -1 for an empty cell; None without a label column


def _box_columns(path: Path, table: pa.Table) -> _BoxColumns:
    """The table's columns as numbers (the checks and the grouping work on float64 arrays)."""
    try:
        return _BoxColumns(
            video=np.asarray(pc.cast(table.column("video_id"), pa.string()).to_pylist(), dtype=object),
            frame=table.column("frame").to_numpy().astype(np.float64),
            xyxy=np.stack([table.column(c).to_numpy().astype(np.float64) for c in ("x1", "y1", "x2", "y2")], axis=1),
            score=table.column("score").to_numpy().astype(np.float64),
            label=(np.asarray(table.column("label").fill_null(-1).to_numpy(), dtype=np.float64)
                   if "label" in table.column_names else None),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as err:
        raise BoxesFileError(f"{path}: non-numeric frame, coordinate, score or label ({err})") from err


def _group_by_video(columns: _BoxColumns, file_rows: np.ndarray) -> dict[str, _VideoBoxes]:
    """The rows grouped by video, then frame, best score first (stable, so ties keep file order)."""
    order = np.lexsort((-columns.score, columns.frame, columns.video.astype(str)))
    video, frame = columns.video[order], columns.frame[order].astype(np.int64)
    xyxy, score = columns.xyxy[order], columns.score[order]
    label = None if columns.label is None else columns.label[order].astype(np.int64)
    file_rows = file_rows[order]
    by_video: dict[str, _VideoBoxes] = {}
    if not len(video):
        return by_video
    video_starts = np.flatnonzero(np.r_[True, video[1:] != video[:-1]])
    video_ends = np.r_[video_starts[1:], len(video)]
    for lo, hi in zip(video_starts, video_ends):
        frames_here = frame[lo:hi]
        firsts = np.flatnonzero(np.r_[True, frames_here[1:] != frames_here[:-1]])
        by_video[str(video[lo])] = _VideoBoxes(
            frames=frames_here[firsts],
            starts=firsts,
            ends=np.r_[firsts[1:], hi - lo],
            boxes=xyxy[lo:hi].astype(np.float32),
            scores=score[lo:hi].astype(np.float32),
            labels=None if label is None else label[lo:hi],
            file_rows=file_rows[lo:hi],
        )
    return by_video


def _read_box_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise BoxesFileError(f"boxes file not found: {path}")
    try:
        if path.suffix.lower() in _PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pacsv

        # video ids like "P01_01" must stay text even when a column of them looks numeric.
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"video_id": pa.string()}))
    except (pa.ArrowInvalid, OSError) as err:
        raise BoxesFileError(f"cannot read boxes file {path}: {err}") from err


def _check_box_values(path: Path, file_rows: np.ndarray, columns: _BoxColumns, coords: str) -> None:
    """Refuse frames that are not 1-based integers, non-finite values, inverted boxes, pixel-sized
    normalised coordinates and fractional labels, naming the first bad row."""
    frame, xyxy, score, label = columns.frame, columns.xyxy, columns.score, columns.label

    def first_bad(mask: np.ndarray) -> int:
        return int(file_rows[np.flatnonzero(mask)[0]])  # 1-based data row, as the annotation errors count

    bad = ~np.isfinite(frame) | (frame < 1) | (frame != np.floor(frame))
    if bad.any():
        raise BoxesFileError(
            f"{path}: row {first_bad(bad)}, column 'frame': must be a 1-based integer, got {frame[bad][0]}"
        )
    values = np.concatenate([xyxy, score[:, None]], axis=1)  # (N, 5): x1, y1, x2, y2, score
    bad = ~np.isfinite(values)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        name = ("x1", "y1", "x2", "y2", "score")[column]
        raise BoxesFileError(f"{path}: row {int(file_rows[row])}, column {name!r}: non-finite value {values[row, column]}")
    for low, high in (("x1", "x2"), ("y1", "y2")):
        at = {"x1": 0, "y1": 1, "x2": 2, "y2": 3}
        bad = xyxy[:, at[high]] <= xyxy[:, at[low]]
        if bad.any():
            raise BoxesFileError(
                f"{path}: row {first_bad(bad)}, column {high!r}: box {xyxy[bad][0].tolist()} has {high} <= {low} "
                "(expected x1, y1, x2, y2 corners)"
            )
    if coords == "normalized":
        bad = (xyxy < -_NORMALISED_SLACK).any(axis=1) | (xyxy > 1 + _NORMALISED_SLACK).any(axis=1)
        if bad.any():
            raise BoxesFileError(
                f"{path}: row {first_bad(bad)}: coordinates {xyxy[bad][0].tolist()} are outside [0, 1]; "
                "pixel coordinates need --boxes-coords pixel"
            )
    if label is not None and np.any(label != np.floor(label)):
        raise BoxesFileError(f"{path}: row {first_bad(label != np.floor(label))}, column 'label': labels must be integers")


def describe_box_file(boxes: PrecomputedBoxes, sha256: str) -> dict[str, Any]:
    """The manifest's record of a boxes file."""
    return {"path": str(boxes.path.resolve()), "sha256": sha256, "coords": boxes.coords, "rows": boxes.rows}
