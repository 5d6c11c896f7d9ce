"""What a build computes, as pure functions over arrays: no models, no decoding, no store I/O.

The extraction service (`featstore.extract.service`) is a loop over segments; everything it decides that
can be checked by hand lives here: which segments a rank takes, the store's field schema and input
size, and how a frame's detections fill the fixed-size slot tensors and the ``boxes`` rows. A file of
precomputed boxes (``--boxes``) is read by `featstore.epic.boxes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from featstore.epic.sampling import SamplingConfig
from featstore.models import BackboneRecord, backbone_map_shape
from featstore.store.schema import (
    NOUN_GLOBAL,
    NOUN_MAP,
    VERB_GLOBAL,
    VERB_LOCAL,
    VERB_MAP,
    VERB_MAP_TMEAN,
    FieldSpec,
    default_dtype,
    det_field,
)

__all__ = [
    "FrameDetections",
    "ResolvedSampling",
    "detection_slots",
    "input_size_for",
    "store_input_size",
    "resolve_sampling",
    "shard_uids",
    "store_fields",
]


# A stored score of 0 is the padding marker readers mask on (DESIGN section 3: "0 for padded slots"),
# so a real box keeps a positive score even when its source said 0 (a boxes file, or an underflow).
MIN_VALID_SCORE = float(np.finfo(np.float32).tiny)

BOX_COLUMNS = ("set", "slot", "frame", "x1", "y1", "x2", "y2", "score", "label", "valid")


# ------------------------------------------------------------------------------------------------
# who does what


def shard_uids(uids: Iterable[str], *, rank: int, world_size: int) -> list[str]:
    """The uids one rank of a distributed build takes: every ``world_size``-th of the sorted list.

    Sorting first makes the split depend only on the selection, not on file order, so every rank
    computes the same partition without talking to the others, and the shards are disjoint and
    together cover the selection.

    Args:
        uids: the selected segments' uids (distinct).
        rank: this process's rank, 0 <= rank < world_size.
        world_size: number of processes.
    Returns:
        This rank's uids, sorted.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return sorted(uids)[rank::world_size]


# ------------------------------------------------------------------------------------------------
# sampling settings: the verb backbone's record, unless given

# SamplingConfig fields a backbone record has an opinion on; the others (detection windows) default
# to the paper's values.
CLIP_FIELDS = ("clip_frames", "clip_stride", "size", "clip_sampling", "snippet_frames")


def _record_clip(record: BackboneRecord, modality: str) -> dict[str, Any]:
    return {
        "clip_frames": record.default_clip_frames,
        "clip_stride": record.default_clip_stride,
        "size": record.default_size,
        "clip_sampling": record.clip_sampling,
        "snippet_frames": record.snippet_frames(modality),
    }


@dataclass(frozen=True)
class ResolvedSampling:
    """A build's sampling and where each of its values came from.

    Attributes:
        config: the sampling the build uses.
        sources: field -> ``"backbone:NAME"`` (the verb backbone's record), ``"flag"`` (given by the
            user) or ``"default"`` (SamplingConfig's paper default).
        notes: what the user should know, e.g. that the noun backbone's record asks for another clip
            than the one it runs on.
    """

    config: SamplingConfig
    sources: dict[str, str]
    notes: tuple[str, ...] = ()


def resolve_sampling(
    verb_record: BackboneRecord,
    noun_record: BackboneRecord,
    *,
    modality: str,
    given: Mapping[str, Any] | None = None,
) -> ResolvedSampling:
    """The sampling of a build: what the user gave, else the verb backbone's record, else the defaults.

    Both backbones run on one clip (DESIGN: one clip, two models), so the clip follows the verb
    backbone's record. When the noun backbone's record asks for something else on a setting the user
    did not give, the noun backbone still runs on the verb backbone's clip, and a note says so.

    Args:
        verb_record: the verb backbone's record (clip frames, stride, size, sampling mode, stacked
            flow frames).
        noun_record: the noun backbone's record (only compared).
        modality: ``"rgb"`` or ``"flow"`` (stacked flow frames apply to flow only).
        given: SamplingConfig field -> value the user set (flags); absent or None means not given.

    Returns:
        The `ResolvedSampling`.

    Raises:
        ValueError: an unknown field, or values that make no sampling (e.g. a clip of 0 frames).
    """
    given = {key: value for key, value in (given or {}).items() if value is not None}
    known = {f.name for f in dataclass_fields(SamplingConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown sampling setting(s): {', '.join(unknown)}")
    verb_clip = _record_clip(verb_record, modality)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in sorted(known):
        if name in given:
            values[name], sources[name] = given[name], "flag"
        elif name in verb_clip:
            values[name], sources[name] = verb_clip[name], f"backbone:{verb_record.name}"
        else:
            sources[name] = "default"
    config = SamplingConfig(**values)
    notes: list[str] = []
    if noun_record.name != verb_record.name:
        noun_clip = _record_clip(noun_record, modality)
        differ = [f"{name} {noun_clip[name]}" for name in CLIP_FIELDS
                  if name not in given and noun_clip[name] != verb_clip[name]]
        if differ:
            notes.append(
                f"the noun backbone {noun_record.name} runs on the verb backbone {verb_record.name}'s clip "
                f"({config.clip_sampling}, {config.clip_frames} x {config.snippet_frames} frames at stride "
                f"{config.clip_stride}, short side {config.size}); its own record asks for {', '.join(differ)}")
    return ResolvedSampling(config=config, sources=sources, notes=tuple(notes))


def input_size_for(height: int, width: int, size: int) -> tuple[int, int]:
    """The (H, W) a frame of ``height x width`` has after its short side is resized to ``size``.

    Same rule as `featstore.epic.frames.resize_short_side`: the long side is ``long * size / short``
    rounded half up. The store's input size is this, computed once from the first video; every clip
    is then resized to exactly that size, so that a field has one shape (DESIGN section 3).

    Args:
        height, width: source frame size in pixels.
        size: target short side.
    Returns:
        (H, W).
    """
    if min(height, width) < 1 or size < 1:
        raise ValueError(f"bad sizes: frame {height}x{width}, short side {size}")
    if height <= width:
        return size, max(1, int(math.floor(width * size / height + 0.5)))
    return max(1, int(math.floor(height * size / width + 0.5))), size


def store_input_size(height: int, width: int, sampling: SamplingConfig) -> tuple[int, int]:
    """The (H, W) every clip of a store is resized to, from its first video's frame size.

    ``resize="short-side"``: `input_size_for` (aspect kept); ``"square"``: ``size x size``, the frame
    squeezed without cropping (the report's R(2+1)D-34 stage-2 input, "128 x 128 without cropping").

    Args:
        height, width: source frame size in pixels.
        sampling: the build's sampling (``size`` and ``resize``).
    Returns:
        (H, W).
    """
    if sampling.resize == "square":
        return sampling.size, sampling.size
    return input_size_for(height, width, sampling.size)


def store_fields(
    *,
    verb_record: BackboneRecord,
    noun_record: BackboneRecord,
    sampling: SamplingConfig,
    input_size: tuple[int, int],
    detector_dim: int | None,
    noun_map: bool = False,
    verb_map: str = "full",
    verb_local: bool = False,
) -> dict[str, FieldSpec]:
    """The field schema of a built store (DESIGN section 3), computed before any model runs.

    Args:
        verb_record, noun_record: the backbones' records (their feature_dim and map-size rules).
        sampling: the sampling config (clip length; detection frames x top-k set the slot counts).
        input_size: (H, W) every clip is resized to.
        detector_dim: Cd of the detector's box features, or None for a store without detections.
        noun_map: also store ``noun.map``.
        verb_map: ``full`` stores ``verb.map``, ``time-mean`` its time mean ``verb.map_tmean``,
            ``none`` neither (``featstore build --map``).
        verb_local: store ``verb.local`` (needs the detections' ``det.local`` boxes).
    Returns:
        field name -> spec. ``verb.map`` is (Cv, T', H', W'), ``verb.map_tmean`` (Cv, H', W'),
        ``verb.local`` (local slots, Cv); ``det.{global,local}.feat`` is (slots, Cd), ``.box``
        (slots, 4), ``.score`` (slots,).
    """
    height, width = input_size
    map_shape = backbone_map_shape(verb_record, clip_frames=sampling.clip_frames, height=height, width=width)
    fields: dict[str, tuple[int, ...]] = {
        VERB_GLOBAL: (verb_record.feature_dim,),
        NOUN_GLOBAL: (noun_record.feature_dim,),
    }
    if verb_map == "full":
        fields[VERB_MAP] = map_shape
    elif verb_map == "time-mean":
        fields[VERB_MAP_TMEAN] = (map_shape[0], *map_shape[2:])
    elif verb_map != "none":
        raise ValueError(f"verb_map must be 'full', 'time-mean' or 'none', got {verb_map!r}")
    if verb_local:
        if detector_dim is None:
            raise ValueError("verb.local is pooled at the det.local boxes: a store without detections has none")
        fields[VERB_LOCAL] = (sampling.n_local_slots, map_shape[0])
    if noun_map:
        fields[NOUN_MAP] = backbone_map_shape(
            noun_record, clip_frames=sampling.clip_frames, height=height, width=width
        )
    if detector_dim is not None:
        for box_set, slots in (("global", sampling.n_global_slots), ("local", sampling.n_local_slots)):
            fields[det_field(box_set, "feat")] = (slots, detector_dim)
            fields[det_field(box_set, "box")] = (slots, 4)
            fields[det_field(box_set, "score")] = (slots,)
    return {name: FieldSpec(dtype=default_dtype(name), shape=tuple(int(d) for d in shape))
            for name, shape in fields.items()}


# ------------------------------------------------------------------------------------------------
# detection slots


@dataclass(frozen=True)
class FrameDetections:
    """The boxes kept on one frame, best first, on the CPU.

    Attributes:
        boxes: (k, 4) float32 x1, y1, x2, y2 normalised to [0, 1].
        scores: (k,) float32, descending.
        labels: (k,) int64 class indices, or None when the source has no labels.
        features: (k, Cd) float32 box-head representation at ``boxes``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    features: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def detection_slots(
    box_set: str,
    frames: Sequence[int | None],
    detections: Mapping[int, FrameDetections],
    *,
    topk: int,
    feature_dim: int,
) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Fill one window's fixed-size slot tensors and its ``boxes`` rows.

    Frame i of the window owns slots ``i * topk .. i * topk + topk - 1``; its detections fill them
    best first. Slots of a frame outside the video (``None``), of a frame with no detections, and
    beyond a frame's k < topk detections are padded: zero feature, zero box, score 0, and a
    ``boxes`` row with ``valid`` False and null frame and label.

    Args:
        box_set: ``"global"`` or ``"local"``.
        frames: the window's frames (``SegmentPlan.global_frames`` / ``local_frames``).
        detections: frame -> its detections (frames absent here are padded).
        topk: slots per frame.
        feature_dim: Cd.
    Returns:
        ``(tensors, rows)``: tensors ``det.{set}.feat`` (N, Cd) float32, ``det.{set}.box`` (N, 4)
        float32, ``det.{set}.score`` (N,) float32 with N = len(frames) * topk; rows holds the
        ``boxes`` columns (set, slot, frame, x1, y1, x2, y2, score, label, valid), one per slot.
    """
    n_slots = len(frames) * topk
    feat = np.zeros((n_slots, feature_dim), dtype=np.float32)
    box = np.zeros((n_slots, 4), dtype=np.float32)
    score = np.zeros((n_slots,), dtype=np.float32)
    slot_frame: list[int | None] = [None] * n_slots
    label: list[int | None] = [None] * n_slots
    valid = [False] * n_slots
    for i, frame in enumerate(frames):
        found = detections.get(frame) if frame is not None else None
        if found is None:
            continue
        k = min(topk, len(found))
        first = i * topk
        feat[first:first + k] = found.features[:k]
        box[first:first + k] = found.boxes[:k]
        score[first:first + k] = np.maximum(found.scores[:k], MIN_VALID_SCORE)
        for j in range(k):
            slot_frame[first + j] = int(frame)
            label[first + j] = None if found.labels is None else int(found.labels[j])
            valid[first + j] = True
    rows = {
        "set": [box_set] * n_slots,
        "slot": list(range(n_slots)),
        "frame": slot_frame,
        "x1": box[:, 0].tolist(),
        "y1": box[:, 1].tolist(),
        "x2": box[:, 2].tolist(),
        "y2": box[:, 3].tolist(),
        "score": score.tolist(),
        "label": label,
        "valid": valid,
    }
    tensors = {det_field(box_set, "feat"): feat, det_field(box_set, "box"): box, det_field(box_set, "score"): score}
    return tensors, rows


def merge_box_rows(parts: Sequence[Mapping[str, list]]) -> dict[str, list]:
    """Concatenate ``boxes`` column dicts (one per window) into one."""
    return {name: [value for part in parts for value in part[name]] for name in BOX_COLUMNS}
