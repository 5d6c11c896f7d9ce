"""The store's contract in one place: index schemas, field names and dtypes, errors (DESIGN section 3).

Everything that reads or writes a store (the store itself, its query sandbox, the importer, the
extraction service, the heads) takes these names from here, so that they are defined once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from featstore.epic.annotations import SEGMENT_SCHEMA as ANNOTATION_SCHEMA

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

STATUS_OK = "ok"
STATUS_FAILED = "failed"

# The index: the annotation columns of a segment, then what the store adds.
SEGMENT_SCHEMA = pa.schema(
    list(ANNOTATION_SCHEMA)
    + [
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("checksum", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("written_at", pa.int64()),  # ns since the epoch; orders attempts at the same uid
    ]
)

BOX_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("set", pa.string()),  # 'global' | 'local'
        ("slot", pa.int32()),
        ("frame", pa.int64()),  # EPIC 1-based frame; null for padded slots or imported features
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
        ("label", pa.int64()),
        ("valid", pa.bool_()),
        ("written_at", pa.int64()),
    ]
)


# Temporal views (docs/views.md). A store built with `featstore build --views K` holds, per segment,
# one index row per view with these columns too; a store without views has none of them in its
# Parquet parts, and its query views show ``view`` = 0 for every row.
VIEW_COLUMN = "view"  # 0: the centre clip (what evaluation reads); 1..K-1: clips centred at random
FIRST_VIEW = 0
VIEW_FIELDS = [
    pa.field(VIEW_COLUMN, pa.int32()),
    pa.field("clip_start_frame", pa.int64()),  # first frame of the view's clip (after clamping)
    pa.field("clip_stop_frame", pa.int64()),  # last frame of the view's clip
    pa.field("clip_center", pa.int64()),  # the frame its clip is centred on
    pa.field("window_center", pa.int64()),  # the frame both its detection windows are centred on
]
VIEW_SEGMENT_SCHEMA = pa.schema(list(SEGMENT_SCHEMA) + VIEW_FIELDS)
VIEW_BOX_SCHEMA = pa.schema(list(BOX_SCHEMA) + [pa.field(VIEW_COLUMN, pa.int32())])


def view_key(uid: str, view: int = FIRST_VIEW) -> str:
    """The key a view's tensors are stored and read under: ``uid`` for view 0, ``uid/v{view}`` after it.

    LMDB holds ``"{view_key}/{field}"``, so view 0 is stored exactly as a segment of a store without
    views, and the views of one segment are neighbours in the shard's key order.

    Args:
        uid: the segment.
        view: its view, >= 0.
    Returns:
        The key.
    """
    view = int(view)
    if view < 0:
        raise ValueError(f"a view is >= 0, got {view}")
    return str(uid) if view == FIRST_VIEW else f"{uid}/v{view}"


class StoreError(Exception):
    """A store cannot be opened, written or read as asked."""


class FormatVersionError(StoreError):
    """The store was written by another format version of featstore."""


class FieldMismatchError(StoreError):
    """A tensor's name, shape or dtype does not match the store's field schema."""


class StoreLockedError(StoreError):
    """Another process is writing the same LMDB shard."""


@dataclass(frozen=True)
class FieldSpec:
    """The dtype and shape every segment's tensor of one field has."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


def default_dtype(field: str) -> str:
    """The stored dtype of a field, from its name.

    float32 for box coordinates and scores (they are compared and thresholded), int64 for frame
    numbers and class labels, bool for masks, float16 for features.
    """
    leaf = field.rsplit(".", 1)[-1]
    if leaf in ("box", "score"):
        return "float32"
    if leaf in ("frame", "label"):
        return "int64"
    if leaf == "valid":
        return "bool"
    return "float16"


# The canonical fields of one segment (DESIGN section 3). A store holds any subset; shapes are per
# store (the manifest's field schema). Code names a field by these constants, never by its text.
VERB_GLOBAL = "verb.global"  # [C] VerbNet feature, pooled over time and space
VERB_MAP = "verb.map"  # [C, T, H, W] VerbNet last-stage spatial map (local alignment)
VERB_MAP_TMEAN = "verb.map_tmean"  # [C, H, W] the verb map averaged over time (build --map time-mean)
VERB_LOCAL = "verb.local"  # [N, C] the verb map pooled at the det.local boxes (featstore.store.local_pool)
NOUN_GLOBAL = "noun.global"  # [C] NounNet pooled feature
NOUN_MAP = "noun.map"  # [C, T, H, W] NounNet last-stage spatial map (optional)

BOX_SETS = ("global", "local")  # det.global.* (noun branch, 6 s window) and det.local.* (verb branch, 4 s)
BOX_PARTS = ("feat", "box", "score")  # per box set: RoI features, normalised x1y1x2y2, detection score
# Per box set, optional arrays of an imported npz that fill the boxes table's frame and label columns.
BOX_INDEX_PARTS = ("frame", "label")


def det_field(box_set: str, part: str) -> str:
    """The field name of one part of a box set, e.g. ``det_field("local", "box") == "det.local.box"``.

    Args:
        box_set: one of `BOX_SETS`.
        part: one of `BOX_PARTS` (or `BOX_INDEX_PARTS`, for imported arrays).
    Returns:
        The field name.
    Raises:
        ValueError: an unknown box set or part.
    """
    if box_set not in BOX_SETS or part not in BOX_PARTS + BOX_INDEX_PARTS:
        raise ValueError(f"no detection field for box set {box_set!r} / part {part!r}")
    return f"det.{box_set}.{part}"


DET_GLOBAL_FEAT = det_field("global", "feat")  # [60, Cd] RoI features of the noun window's boxes
DET_GLOBAL_BOX = det_field("global", "box")  # [60, 4] normalised x1, y1, x2, y2 (float32)
DET_GLOBAL_SCORE = det_field("global", "score")  # [60] detection scores, 0 for padded slots (float32)
DET_LOCAL_FEAT = det_field("local", "feat")  # [40, Cd] the same for the verb window
DET_LOCAL_BOX = det_field("local", "box")  # [40, 4]
DET_LOCAL_SCORE = det_field("local", "score")  # [40]

CANONICAL_FIELDS: dict[str, str] = {
    VERB_GLOBAL: "[C] VerbNet feature, pooled over time and space",
    VERB_MAP: "[C, T, H, W] VerbNet last-stage spatial map (local alignment)",
    NOUN_GLOBAL: "[C] NounNet pooled feature",
    VERB_MAP_TMEAN: "[C, H, W] verb.map averaged over time (`featstore build --map time-mean`)",
    VERB_LOCAL: "[N, C] verb.map averaged over time, RoIAlign 7x7 (aligned) at the N det.local boxes, "
                "pooled (avg, or max: the manifest's derived['verb.local'] says which)",
    NOUN_MAP: "[C, T, H, W] NounNet last-stage spatial map (optional)",
    **{det_field(box_set, part): f"{meaning} of the {box_set} detection slots"
       for box_set in BOX_SETS
       for part, meaning in (("feat", "[N, Cd] RoI features"), ("box", "[N, 4] normalised x1, y1, x2, y2 (float32)"),
                             ("score", "[N] detection scores, 0 for padded slots (float32)"))},
}
