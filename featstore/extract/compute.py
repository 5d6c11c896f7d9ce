"""What a build computes on its device: the models, their outputs per batch, and each segment's tensors.

`build_models` builds the backbones and the detector (randomly initialised ones under a fixed seed,
so that every process and every rerun gets the same weights; the manifest says "random weights"
loudly) and records their provenance. Per batch, `run_backbones` runs the VerbNet and NounNet on the
same clip (ours: one clip, two models, as the paper's backbones share their sampling) and
`run_detector` runs the detector once per distinct frame, under fp16 / bf16 autocast on CUDA;
`segment_outputs` cuts one segment's tensors and box rows (of one temporal view: its clip's row, its
own windows' slots from the shared frame detections) out of those, and `apply_map_choice`
turns its ``verb.map`` into the fields ``--map`` keeps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from featstore.epic.boxes import PrecomputedBoxes
from featstore.epic.frames import MODALITY_CHANNELS
from featstore.extract.config import AMP_DTYPES, RANDOM_WEIGHTS_NOTE, BuildConfig
from featstore.extract.decode import DecodedSegment
from featstore.extract.plan import FrameDetections, ResolvedSampling, detection_slots, merge_box_rows
from featstore.models import (
    BackboneRecord,
    DetectorRecord,
    ObjectDetector,
    VideoBackbone,
    build_backbone,
    build_detector,
    file_sha256,
    parse_model_spec,
)
from featstore.models.checkpoints import read_finetune_record
from featstore.store.local_pool import pool_local_verb_features
from featstore.store.schema import (
    BOX_SETS,
    DET_LOCAL_BOX,
    NOUN_GLOBAL,
    NOUN_MAP,
    VERB_GLOBAL,
    VERB_LOCAL,
    VERB_MAP,
    VERB_MAP_TMEAN,
    FieldSpec,
)

__all__ = ["BuiltModels", "apply_map_choice", "build_models", "run_backbones", "run_detector", "segment_outputs",
           "unstorable"]


@dataclass
class BuiltModels:
    """The models of a build, on its device in eval mode, with what the manifest records of them.

    Attributes:
        verb, noun: the backbones; ``noun`` is None when its spec is the verb backbone's (its outputs
            are reused).
        verb_record, noun_record: their records (feature dims, map-size rules, normalisation).
        detector, detector_record: the detector and its record, or None for a build without one.
        provenance: ``verb_backbone`` / ``noun_backbone`` / ``detector`` -> the manifest's entry.
        warnings: random weights and sampling notes, for the report.
        sampling: the build's resolved sampling.
    """

    verb: VideoBackbone
    noun: VideoBackbone | None
    verb_record: BackboneRecord
    noun_record: BackboneRecord
    detector: ObjectDetector | None
    detector_record: DetectorRecord | None
    provenance: dict[str, Any]
    warnings: list[str]
    sampling: ResolvedSampling


def build_models(config: BuildConfig, sampling: ResolvedSampling) -> BuiltModels:
    """Build the backbones and the detector the config names, each under ``config.seed``, on its device.

    Args:
        config: the build (model specs, detector options, device, seed).
        sampling: the build's sampling (stacked frames set the backbones' input channels).
    Returns:
        The models in eval mode, with their provenance and warnings.
    """
    # Both backbones run on one clip, so they take its channels: 3 for RGB, 2 per stacked flow frame.
    in_channels = MODALITY_CHANNELS[config.modality] * sampling.config.snippet_frames
    verb, verb_record = _seeded(config.seed, lambda: build_backbone(config.verb_backbone, in_channels=in_channels))
    if config.noun_backbone == config.verb_backbone:
        # The same spec is the same network (same checkpoint, or the same seed): run it once.
        noun, noun_record = None, verb_record
    else:
        noun, noun_record = _seeded(config.seed, lambda: build_backbone(config.noun_backbone, in_channels=in_channels))
    detector = detector_record = None
    if config.detector is not None:
        detector, detector_record = _seeded(config.seed, lambda: build_detector(
            config.detector,
            score_thresh=config.det_score_thresh,
            min_size=config.det_min_size,
            max_size=config.det_max_size,
            feature=config.det_feature,
        ))
    device = config.torch_device
    for module in (verb, noun, detector):
        if module is not None:
            module.to(device).eval()
    provenance, warnings = _models_provenance(config, in_channels, (verb_record, noun_record), detector, detector_record)
    warnings += [note for note in sampling.notes if note not in warnings]
    return BuiltModels(verb=verb, noun=noun, verb_record=verb_record, noun_record=noun_record, detector=detector,
                       detector_record=detector_record, provenance=provenance, warnings=warnings, sampling=sampling)


def _models_provenance(
    config: BuildConfig,
    in_channels: int,
    backbone_records: tuple[BackboneRecord, BackboneRecord],
    detector: ObjectDetector | None,
    detector_record: DetectorRecord | None,
) -> tuple[dict[str, Any], list[str]]:
    """The manifest's entry of each model, and a warning for each without a checkpoint."""
    warnings: list[str] = []
    provenance: dict[str, Any] = {}
    for key, kind, spec, record in (
        ("verb_backbone", "verb backbone", config.verb_backbone, backbone_records[0]),
        ("noun_backbone", "noun backbone", config.noun_backbone, backbone_records[1]),
    ):
        entry, warning = _model_provenance(kind, spec, record.name, record.feature_dim, parse_model_spec(spec)[1])
        entry["in_channels"] = in_channels
        mean, std = record.normalisation(in_channels)  # always the record's: the publisher's values
        entry["normalisation"] = {"mean": list(mean), "std": list(std), "input": "[0, 1]"}
        provenance[key] = entry
        if warning and warning not in warnings:
            warnings.append(warning)
    provenance["detector"] = None
    if detector is not None and detector_record is not None:
        # The detector says which file it loaded: a detectron2 spec also names a config.
        entry, warning = _model_provenance("detector", config.detector, detector_record.name,
                                           detector_record.feature_dim, detector.checkpoint)
        entry.update(score_thresh=config.det_score_thresh, min_size=config.det_min_size,
                     max_size=config.det_max_size, feature=detector.feature,
                     input="rgb frames" if config.modality == "rgb" else "rgb frames of the same videos (flow store)")
        provenance["detector"] = entry
        if warning:
            warnings.append(warning)
    return provenance, warnings


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    # fork_rng: seeding for the build must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _model_provenance(
    kind: str, spec: str, name: str, feature_dim: int, checkpoint: Path | None
) -> tuple[dict[str, Any], str | None]:
    entry: dict[str, Any] = {
        "name": name,
        "spec": spec,
        "feature_dim": feature_dim,
        "checkpoint": None if checkpoint is None else str(checkpoint.resolve()),
        "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint),
    }
    warning = None
    if checkpoint is None:
        entry["weights"] = RANDOM_WEIGHTS_NOTE
        warning = f"{RANDOM_WEIGHTS_NOTE}: {kind} {name!r} has no checkpoint; its features are meaningless for training"
    else:
        entry["weights"] = "checkpoint"
        # A stage-1 checkpoint (featstore finetune) says which run made it: the store links to it.
        finetune = read_finetune_record(checkpoint)
        if finetune is not None:
            entry["finetune"] = finetune
            if "classes" in finetune:  # a stage-1 detector: what its label ids mean
                entry["classes"] = finetune["classes"]
    return entry, warning


# ------------------------------------------------------------------------------------------------
# running the models (main process, on the device)


def _autocast(config: BuildConfig) -> contextlib.AbstractContextManager:
    if config.device == "cuda" and config.amp != "off":
        return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[config.amp])
    # CPU runs fp32: CPU autocast is slower than fp32 on most machines, and results must not depend on it.
    return contextlib.nullcontext()


def run_backbones(models: BuiltModels, clips: Tensor, config: BuildConfig) -> dict[str, np.ndarray]:
    """Backbone features of a batch of clips, ``config.batch_size`` clips per forward.

    Args:
        clips: uint8 (B, T, H, W, C) on the CPU (with temporal views, B counts the distinct clips
            of the batch's segments, which may exceed the batch size).
    Returns:
        ``verb.global`` (B, Cv), ``verb.map`` (B, Cv, T', H', W'), ``noun.global`` (B, Cn) and, when
        configured, ``noun.map``; float32 numpy.
    """
    if len(clips) <= config.batch_size:
        return _run_backbones(models, clips, config)
    chunks = [_run_backbones(models, clips[lo:lo + config.batch_size], config)
              for lo in range(0, len(clips), config.batch_size)]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}


def _run_backbones(models: BuiltModels, clips: Tensor, config: BuildConfig) -> dict[str, np.ndarray]:
    device = config.torch_device
    # uint8 crosses to the device (4x less than float); the conversion runs there.
    x = clips.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).float().div_(255.0)  # (B, C, T, H, W)
    with _autocast(config):
        verb_map, verb_global = models.verb(x)  # (B, Cv, T', H', W'), (B, Cv)
        if models.noun is None:
            noun_map, noun_global = verb_map, verb_global
        else:
            noun_map, noun_global = models.noun(x)
    out = {
        VERB_GLOBAL: verb_global.float().cpu().numpy(),
        VERB_MAP: verb_map.float().cpu().numpy(),
        NOUN_GLOBAL: noun_global.float().cpu().numpy(),
    }
    if config.noun_map:
        out[NOUN_MAP] = noun_map.float().cpu().numpy()
    return out


def _images_on_device(images: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    # (h, w, 3) uint8 -> (3, h, w) float in [0, 1], as the detectors take them.
    return [image.to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0) for image in images]


def run_detector(
    models: BuiltModels,
    items: Sequence[DecodedSegment],
    rows: Sequence[Mapping[str, Any]],
    boxes: PrecomputedBoxes | None,
    config: BuildConfig,
) -> dict[tuple[str, int], FrameDetections]:
    """Detections of every distinct (video, frame) of the batch.

    A frame shared by both windows of a segment, or by neighbouring segments of the batch, is run
    through the detector once. With precomputed boxes only frames that have rows are run, through
    `features_at` (no proposals).

    Returns:
        (video_id, frame) -> its detections (frames without any are absent: padded).
    """
    detector = models.detector
    assert detector is not None
    topk = config.sampling.det_topk
    images: dict[tuple[str, int], Tensor] = {}
    given: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for item, row in zip(items, rows):
        if item.det_images is None:
            continue
        video = str(row["video_id"])
        for frame, image in zip(item.det_frames, item.det_images):
            key = (video, frame)
            if key in images or key in given:
                continue
            if boxes is not None:
                rows_here = boxes.frame(video, frame, topk=topk, frame_size=item.source_size)  # type: ignore[arg-type]
                if rows_here is None:
                    continue  # no box given on this frame: its slots stay padded
                given[key] = rows_here
            images[key] = image
    keys = list(images)
    out: dict[tuple[str, int], FrameDetections] = {}
    device = config.torch_device
    for lo in range(0, len(keys), config.det_batch_size):
        chunk = keys[lo:lo + config.det_batch_size]
        batch = _images_on_device([images[k] for k in chunk], device)
        with _autocast(config):
            if boxes is None:
                detected = detector.detect(batch, topk)
                for key, det in zip(chunk, detected):
                    out[key] = FrameDetections(
                        boxes=det.boxes.float().cpu().numpy(),
                        scores=det.scores.float().cpu().numpy(),
                        labels=det.labels.cpu().numpy().astype(np.int64),
                        features=det.features.float().cpu().numpy(),
                    )
            else:
                features = detector.features_at(batch, [torch.from_numpy(given[k][0]) for k in chunk])
                for key, feats in zip(chunk, features):
                    box, score, label = given[key]
                    out[key] = FrameDetections(boxes=box, scores=score, labels=label,
                                               features=feats.float().cpu().numpy())
    return out


def segment_outputs(
    item: DecodedSegment,
    row: Mapping[str, Any],
    backbone: Mapping[str, np.ndarray],
    at: int,
    detections: Mapping[tuple[str, int], FrameDetections] | None,
    models: BuiltModels,
    config: BuildConfig,
    view: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, list] | None]:
    """The tensors and box rows of one segment's view, from the batch outputs.

    Args:
        at: the row of the segment's first clip in the batch outputs (its view's clip is
            ``at + item.clip_rows[view]``).
        detections: the batch's detections per (video, frame): a frame several views (or segments)
            share was detected once, and each view fills its own windows' slots from it.
        view: the temporal view (0 without views).
    """
    row_at = at + item.clip_rows[view]
    tensors = {name: values[row_at] for name, values in backbone.items()}
    if detections is None or models.detector_record is None:
        return tensors, None
    video = str(row["video_id"])
    by_frame = {frame: detections[(video, frame)] for frame in item.det_frames if (video, frame) in detections}
    parts = []
    plan = item.plans[view] if item.plans else item.plan
    assert plan is not None
    for box_set, frames in zip(BOX_SETS, (plan.global_frames, plan.local_frames)):
        slots, rows = detection_slots(box_set, frames, by_frame, topk=config.sampling.det_topk,
                                      feature_dim=models.detector_record.feature_dim)
        tensors.update(slots)
        parts.append(rows)
    return tensors, merge_box_rows(parts)


def apply_map_choice(tensors: dict[str, np.ndarray], *, map_mode: str, local_pool: str | None) -> None:
    """Turn a segment's ``verb.map`` into the fields ``--map`` keeps, in place.

    Pooled and time-averaged from the float32 map the backbone gave (the writer rounds the results
    to float16): what ``featstore derive`` makes from a ``--map full`` store of the same segments,
    which holds the map in float16, differs by that rounding only.

    Args:
        tensors: the segment's outputs; ``verb.map`` (C, T, H, W) and, for ``verb.local``,
            ``det.local.box`` (N, 4).
        map_mode: ``full``, ``time-mean`` or ``none``.
        local_pool: ``avg`` / ``max`` to store ``verb.local``, None for a build without it.
    """
    verb_map = np.ascontiguousarray(tensors[VERB_MAP], dtype=np.float32)  # (C, T, H, W)
    if local_pool is not None:
        tensors[VERB_LOCAL] = pool_local_verb_features(
            torch.from_numpy(verb_map)[None], torch.from_numpy(tensors[DET_LOCAL_BOX])[None], pool=local_pool,
        )[0].numpy()
    if map_mode == "time-mean":
        tensors[VERB_MAP_TMEAN] = verb_map.mean(axis=1)
    if map_mode != "full":
        del tensors[VERB_MAP]


def unstorable(tensors: Mapping[str, np.ndarray], fields: Mapping[str, FieldSpec]) -> str | None:
    """Why a segment's outputs cannot be stored as they are (NaN, or beyond float16), or None.

    float16 ends at 65504: a backbone whose activations exceed it (an unnormalised input, a wrong
    checkpoint) would otherwise be stored as inf without anyone noticing.
    """
    for name, values in tensors.items():
        if not np.isfinite(values).all():
            return f"{name} holds NaN or inf (model output)"
        # verb.map is checked before --map turns it into the stored fields: float16 either way.
        dtype = fields[name].dtype if name in fields else "float16"
        if dtype == "float16" and values.size and float(np.abs(values).max()) > np.finfo(np.float16).max:
            return (f"{name} overflows float16 (max |value| {float(np.abs(values).max()):.3g}); "
                    "check the checkpoint and the input normalisation")
    return None
