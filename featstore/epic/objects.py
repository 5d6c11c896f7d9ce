"""Ground-truth objects for training and evaluating detectors: per-image records, images, splits.

Two sources read into the same records (`ObjectLabels`, one `ObjectImage` per annotated image):

- EPIC-55's ``EPIC_train_object_labels.csv`` (:func:`read_epic_object_labels`): one row per noun
  on one frame, ``noun_class, noun, participant_id, video_id, frame, bounding_boxes`` with boxes as a
  list of ``(top, left, height, width)`` pixel tuples, ``"[(76, 1260, 462, 186)]"``. The rows of a
  frame are merged into one image; a frame whose rows all have ``[]`` is an image without objects,
  which trains as background.
- A boxes file in the ``featstore build --boxes`` format (:func:`read_box_file_objects`): ``video_id,
  frame, x1, y1, x2, y2, score, label``, read by the build's own reader
  (`featstore.epic.boxes.PrecomputedBoxes`), so the demo sample's ``boxes.csv`` is training data
  too. ``label`` is required (the class of each box); ``score`` is ignored.

Boxes in the records are ``x1, y1, x2, y2`` in pixels of the image. Boxes without area (zero height
or width in the EPIC file) are dropped and counted in `ObjectLabels.dropped_boxes`, since detector
losses cannot use them.

Images are found by an `ImageLayout`: a root folder and a pattern over ``participant_id``,
``video_id`` and ``frame``: the object-detection release's ``<participant>/<video>/<frame:010d>.jpg``
(default), the EPIC frame folders the build reads (``rgb-frames``), or any format string.

Train / validation: `ObjectLabels.split` takes a DuckDB ``WHERE`` over the image table
(``participant_id, video_id, frame, n_objects``), the same SQL the segment selections use; the default
`HELD_OUT_PARTICIPANTS` holds out P26-P31, the participants of the paper's validation protocol (DESIGN
section 6), so a detector is never validated on kitchens it was trained on.
"""
from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from featstore.epic.annotations import (
    AnnotationError,
    check_participant_ids,
    parse_int_column,
    read_annotation_rows,
)
from featstore.epic.boxes import PrecomputedBoxes
from featstore.epic.splits import select_segments

__all__ = [
    "EPIC_OBJECT_COLUMNS",
    "HELD_OUT_PARTICIPANTS",
    "IMAGE_LAYOUTS",
    "ImageLayout",
    "ObjectImage",
    "ObjectLabels",
    "read_box_file_objects",
    "read_epic_object_labels",
    "read_objects",
]

EPIC_OBJECT_COLUMNS = ("noun_class", "noun", "participant_id", "video_id", "frame", "bounding_boxes")
# The paper's validation participants (P26-P31; 'P##' compares as text in numeric order).
HELD_OUT_PARTICIPANTS = "participant_id >= 'P26'"
IMAGE_LAYOUTS = {
    # EPIC-55's object-detection images.
    "object-detection": "{participant_id}/{video_id}/{frame:010d}.jpg",
    # The EPIC frame folders `featstore build --frames` reads (frame = the RGB frame index).
    "rgb-frames": "{participant_id}/rgb_frames/{video_id}/frame_{frame:010d}.jpg",
}
_PATTERN_FIELDS = frozenset({"participant_id", "video_id", "frame"})

_INT = r"\s*(\d{1,9})\s*"
_BOX = rf"\({_INT},{_INT},{_INT},{_INT}\)"
_BOX_LIST = re.compile(rf"\[\s*(?:{_BOX}\s*(?:,\s*{_BOX}\s*)*)?\]")
_VIDEO_PARTICIPANT = re.compile(r"(P\d\d)_\w+")


@dataclass(frozen=True, eq=False)
class ObjectImage:
    """One annotated image and its objects.

    Attributes:
        participant_id: e.g. ``"P01"``.
        video_id: e.g. ``"P01_01"``.
        frame: the image's frame number (EPIC object labels: the object-detection image's; a boxes
            file: the 1-based RGB frame index).
        boxes: (k, 4) float32 x1, y1, x2, y2 in pixels; k = 0 for an image without objects.
        labels: (k,) int64 class ids (EPIC ``noun_class``; a boxes file's ``label``).
    """

    participant_id: str
    video_id: str
    frame: int
    boxes: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass(frozen=True)
class ObjectLabels:
    """The annotated images of one ground-truth file, sorted by video and frame.

    Attributes:
        images: the records.
        source: the file they were read from.
        dropped_boxes: boxes without area left out when reading.
    """

    images: tuple[ObjectImage, ...]
    source: str
    dropped_boxes: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ObjectImage]:
        return iter(self.images)

    def __getitem__(self, index: int) -> ObjectImage:
        return self.images[index]

    @property
    def n_boxes(self) -> int:
        return sum(len(image) for image in self.images)

    def class_counts(self) -> dict[int, int]:
        """Boxes per class id, ascending by id."""
        labels = np.concatenate([image.labels for image in self.images]) if self.images else np.zeros(0, np.int64)
        ids, counts = np.unique(labels, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts)}

    def table(self) -> pa.Table:
        """One row per image: ``participant_id, video_id, frame, n_objects`` (what selections see)."""
        return pa.table(
            {
                "participant_id": pa.array([image.participant_id for image in self.images], pa.string()),
                "video_id": pa.array([image.video_id for image in self.images], pa.string()),
                "frame": pa.array([image.frame for image in self.images], pa.int64()),
                "n_objects": pa.array([len(image) for image in self.images], pa.int64()),
            }
        )

    def select(self, where: str | None) -> ObjectLabels:
        """The images a DuckDB ``WHERE`` over `table`'s columns selects (all for None).

        Raises:
            ValueError: DuckDB rejects the expression (its message is included).
        """
        return self._take(self._selected(where))

    def split(self, val_where: str = HELD_OUT_PARTICIPANTS) -> tuple[ObjectLabels, ObjectLabels]:
        """``(train, val)``: val is what ``val_where`` selects, train everything else.

        Args:
            val_where: a DuckDB ``WHERE`` over `table`'s columns, e.g. ``"video_id in ('P01_05')"``.
        Returns:
            Two disjoint `ObjectLabels` covering all images.
        Raises:
            ValueError: a bad expression, or one that leaves either side empty.
        """
        val = self._selected(val_where)
        train = np.setdiff1d(np.arange(len(self.images)), val)
        for name, rows in (("validation", val), ("training", train)):
            if len(rows) == 0:
                raise ValueError(f"{self.source}: the split {val_where!r} leaves no {name} images")
        return self._take(train), self._take(val)

    def _selected(self, where: str | None) -> np.ndarray:
        table = self.table()
        row = "__object_image__"
        indexed = table.append_column(row, pa.array(np.arange(len(self.images), dtype=np.int64)))
        return np.asarray(select_segments(indexed, where).column(row).to_numpy(), dtype=np.int64)

    def _take(self, rows: np.ndarray) -> ObjectLabels:
        return ObjectLabels(images=tuple(self.images[int(i)] for i in rows), source=self.source,
                            dropped_boxes=self.dropped_boxes)


# ------------------------------------------------------------------------------------------------
# reading


def read_objects(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    coords: str = "pixel",
    frame_size: tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
) -> ObjectLabels:
    """Read either kind of ground-truth file, told apart by its columns.

    A CSV with a ``bounding_boxes`` column is EPIC object labels; anything else (and Parquet) is a
    boxes file. ``coords`` and ``frame_size`` apply to boxes files; ``class_names`` to both.

    Raises:
        AnnotationError: see `read_epic_object_labels` / `read_box_file_objects`.
        BoxesFileError: a boxes file the build's reader refuses.
    """
    path = Path(path)
    if path.suffix.lower() not in (".parquet", ".pq") and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as handle:
            header = [column.strip().strip('"') for column in handle.readline().split(",")]
        if "bounding_boxes" in header:
            return read_epic_object_labels(path, class_names=class_names)
    return read_box_file_objects(path, class_names=class_names, coords=coords, frame_size=frame_size)


def read_epic_object_labels(
    path: str | os.PathLike, *, class_names: Sequence[str] | None = None
) -> ObjectLabels:
    """Read ``EPIC_train_object_labels.csv`` into per-image records.

    Args:
        path: the CSV (columns `EPIC_OBJECT_COLUMNS`).
        class_names: the class table (e.g. `featstore.epic.metadata.read_class_list` of
            ``EPIC_noun_classes.csv``); when given, every ``noun_class`` must index it.
    Returns:
        The images, sorted by video and frame; boxes converted from (top, left, height, width) to
        x1, y1, x2, y2 pixels.
    Raises:
        AnnotationError: naming file, row and column: a missing column, an empty or non-integer
            ``noun_class`` / ``frame``, a ``bounding_boxes`` cell that is not a list of 4-tuples of
            non-negative integers, a class outside ``class_names``, a participant or video id that
            does not look like EPIC's.
    """
    path = Path(path)
    rows = read_annotation_rows(path)
    for column in EPIC_OBJECT_COLUMNS:
        if column not in rows.columns:
            raise AnnotationError(path, None, column, "required column missing; EPIC object labels have "
                                                      + ", ".join(EPIC_OBJECT_COLUMNS))
    noun_class, _ = parse_int_column(rows, "noun_class", path, nullable=False)
    frame, _ = parse_int_column(rows, "frame", path, nullable=False)
    _check_range(path, noun_class, "noun_class", class_names)
    if (frame < 0).any():
        bad = int(np.flatnonzero(frame < 0)[0])
        raise AnnotationError(path, bad + 1, "frame", f"negative frame {int(frame[bad])}")
    participant = rows["participant_id"].astype("string").str.strip().to_numpy(dtype=object, na_value="")
    video = rows["video_id"].astype("string").str.strip().to_numpy(dtype=object, na_value="")
    check_participant_ids(participant, video, path, "video_id")

    cells = rows["bounding_boxes"].astype("string").str.strip().fillna("")
    well_formed = cells.str.fullmatch(_BOX_LIST).fillna(False).to_numpy(dtype=bool)
    if not well_formed.all():
        bad = int(np.flatnonzero(~well_formed)[0])
        raise AnnotationError(
            path, bad + 1, "bounding_boxes",
            f"expected a list of (top, left, height, width) tuples of non-negative integers such as "
            f"'[(76, 1260, 462, 186)]' or '[]', got {cells.iloc[bad]!r}",
        )
    found = cells.str.extractall(_BOX)  # one row per box; index (file row, box within the cell)
    box_rows = found.index.get_level_values(0).to_numpy(dtype=np.int64)
    top, left, height, width = (found[i].to_numpy(dtype=np.int64) for i in range(4))
    has_area = (height > 0) & (width > 0)
    dropped = int((~has_area).sum())
    box_rows, top, left, height, width = (a[has_area] for a in (box_rows, top, left, height, width))
    xyxy = np.stack([left, top, left + width, top + height], axis=1).astype(np.float32)

    # One image per (video, frame); rows without boxes still make their image (background).
    keys = pd.DataFrame({"video_id": video, "frame": frame})
    image_of_row = keys.groupby(["video_id", "frame"], sort=True).ngroup().to_numpy()
    first_row = pd.Series(np.arange(len(keys))).groupby(image_of_row).first().to_numpy()
    box_image = image_of_row[box_rows]
    order = np.argsort(box_image, kind="stable")  # boxes grouped by image, file order within one
    box_image, xyxy, box_label = box_image[order], xyxy[order], noun_class[box_rows][order]
    bounds = np.searchsorted(box_image, np.arange(len(first_row) + 1))
    images = tuple(
        ObjectImage(
            participant_id=str(participant[row]),
            video_id=str(video[row]),
            frame=int(frame[row]),
            boxes=xyxy[bounds[i]:bounds[i + 1]],
            labels=box_label[bounds[i]:bounds[i + 1]].astype(np.int64),
        )
        for i, row in enumerate(first_row)
    )
    return ObjectLabels(images=images, source=str(path), dropped_boxes=dropped)


def read_box_file_objects(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    coords: str = "pixel",
    frame_size: tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
) -> ObjectLabels:
    """Read a ``--boxes`` file (CSV / Parquet) as ground truth, one image per video and frame.

    Args:
        path: the file; parsed and checked by `featstore.epic.boxes.PrecomputedBoxes`.
        class_names: when given, every label must index it.
        coords: ``"pixel"`` or ``"normalized"`` (then ``frame_size`` gives the pixels).
        frame_size: (H, W) of every image, or video_id -> (H, W); only for normalized coordinates.
    Returns:
        The images; ``participant_id`` is the ``P##`` prefix of the EPIC video id.
    Raises:
        BoxesFileError: what the build's reader refuses (named by file, row and column).
        AnnotationError: no ``label`` column, an empty or negative label, a label outside
            ``class_names``, a video id without a participant prefix, a video without a frame size.
        ValueError: normalized coordinates without ``frame_size``.
    """
    path = Path(path)
    if coords == "normalized" and frame_size is None:
        raise ValueError(f"{path}: normalized box coordinates need frame_size=(H, W) or a per-video mapping")
    boxes = PrecomputedBoxes.read(path, coords=coords)
    if boxes.rows and not boxes.has_labels():
        raise AnnotationError(path, None, "label", "required column missing: ground truth needs a class per box")
    images = []
    for found in boxes.frames():
        labels = found.labels
        assert labels is not None  # has_labels() held
        if (labels < 0).any():
            row = int(found.file_rows[np.flatnonzero(labels < 0)[0]])
            raise AnnotationError(path, row, "label", "empty or negative label; ground truth needs a class id per box")
        _check_range(path, labels, "label", class_names, rows=found.file_rows)
        participant = _VIDEO_PARTICIPANT.fullmatch(found.video_id)
        if participant is None:
            raise AnnotationError(path, int(found.file_rows[0]), "video_id",
                                  f"{found.video_id!r} is not an EPIC video id 'P##_...' (its participant is its prefix)")
        pixel_boxes = found.boxes
        if coords == "normalized":
            height, width = _frame_size(path, frame_size, found.video_id, int(found.file_rows[0]))
            pixel_boxes = pixel_boxes * np.array([width, height, width, height], dtype=np.float32)
        images.append(ObjectImage(participant_id=participant[1], video_id=found.video_id, frame=found.frame,
                                  boxes=pixel_boxes.astype(np.float32), labels=labels.astype(np.int64)))
    return ObjectLabels(images=tuple(images), source=str(path))


def _check_range(path: Path, values: np.ndarray, column: str, class_names: Sequence[str] | None,
                 rows: np.ndarray | None = None) -> None:
    bad = values < 0
    if class_names is not None:
        bad |= values >= len(class_names)
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        row = int(rows[at]) if rows is not None else at + 1
        known = f" of the {len(class_names)} classes" if class_names is not None else ""
        raise AnnotationError(path, row, column, f"class {int(values[at])} is not a class id{known}")


def _frame_size(path: Path, frame_size: tuple[int, int] | Mapping[str, tuple[int, int]], video_id: str,
                row: int) -> tuple[int, int]:
    if isinstance(frame_size, Mapping):
        if video_id not in frame_size:
            raise AnnotationError(path, row, "video_id", f"no frame size for video {video_id!r}")
        return frame_size[video_id]
    return frame_size


# ------------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class ImageLayout:
    """Where the image of an `ObjectImage` is: ``root / pattern.format(participant_id, video_id, frame)``.

    Attributes:
        root: the images' root folder.
        pattern: a key of `IMAGE_LAYOUTS` or a format string over ``{participant_id}``,
            ``{video_id}`` and ``{frame}`` (e.g. ``"{video_id}/{frame:06d}.jpg"``).
    """

    root: Path
    pattern: str = IMAGE_LAYOUTS["object-detection"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "pattern", IMAGE_LAYOUTS.get(self.pattern, self.pattern))
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.pattern) if name is not None}
            unknown = fields - _PATTERN_FIELDS
            if unknown or not fields:
                raise ValueError(f"fields {sorted(unknown)} are not among {sorted(_PATTERN_FIELDS)}"
                                 if unknown else "it names no field")
            self.pattern.format(participant_id="P01", video_id="P01_01", frame=1)
        except (ValueError, IndexError, KeyError) as err:
            raise ValueError(
                f"bad image pattern {self.pattern!r}: {err}; expected one of {sorted(IMAGE_LAYOUTS)} or a format "
                "string over {participant_id}, {video_id} and {frame}, e.g. '{video_id}/{frame:010d}.jpg'"
            ) from None

    def path(self, image: ObjectImage) -> Path:
        """The image file of one record."""
        return self.root / self.pattern.format(
            participant_id=image.participant_id, video_id=image.video_id, frame=image.frame
        )

    def missing(self, labels: ObjectLabels | Sequence[ObjectImage]) -> list[Path]:
        """The image files of ``labels`` that do not exist, in record order."""
        return [path for path in (self.path(image) for image in labels) if not path.is_file()]
