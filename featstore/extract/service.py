"""The extraction service behind `featstore build` (DESIGN section 4): segments in, a store out.

One call, `build_store(BuildConfig) -> BuildReport`:

1. Select segments (annotation file, optional split / WHERE / limit); a rank of a distributed build
   takes every ``world_size``-th of the sorted uids (`shard_uids`) and skips those already stored.
2. Decode in worker processes (a torch DataLoader): plan the segment's frames
   (`featstore.epic.sampling.plan_segment`), read the clip and the detection frames in one pass over the
   video, resize the clip to the store's input size. A bad input becomes a failed item, not an
   exception, so one corrupt JPEG costs one segment.
3. In the main process, on the device: run the VerbNet and NounNet on the same batched clip (ours:
   one clip, two models, as the paper's backbones share their sampling), and the detector once per
   distinct frame of the batch (a frame in both detection windows is detected once), under fp16 /
   bf16 autocast on CUDA. Decoding of the next batches overlaps with this compute.
4. Write each segment atomically into this rank's LMDB shard (``rank{rank}``) and Parquet parts:
   the store reads all shards as one, with no merge step. A crash loses only the segments in flight;
   a rerun skips stored segments and retries failed ones.

Randomly initialised models (a spec without a checkpoint) are built under a fixed seed, so that
every process and every rerun gets the same weights; the manifest says "random weights" loudly.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from featstore import __version__
from featstore.extract.allocator import keep_freed_memory
from featstore.epic.annotations import find_video_info, read_segments, read_video_info
from featstore.extract.plan import (
    BoxesFileError,
    FrameDetections,
    PrecomputedBoxes,
    ResolvedSampling,
    describe_box_file,
    detection_slots,
    input_size_for,
    merge_box_rows,
    resolve_sampling,
    shard_uids,
    store_fields,
)
from featstore.epic.frames import (
    MODALITY_CHANNELS,
    EpicJpegFrames,
    FrameError,
    FrameSource,
    open_frame_source,
    stack_snippets,
)
from featstore.models import (
    BackboneRecord,
    DetectorRecord,
    ObjectDetector,
    VideoBackbone,
    backbone_map_shape,
    build_backbone,
    build_detector,
    file_sha256,
    get_backbone_record,
    parse_model_spec,
)
from featstore.models.checkpoints import read_finetune_record
from featstore.store.local_pool import LOCAL_POOLS, local_recipe, pool_local_verb_features
from featstore.epic.sampling import SamplingConfig, SegmentPlan, plan_segment
from featstore.store.schema import (
    BOX_SETS,
    DET_LOCAL_BOX,
    MANIFEST_NAME,
    NOUN_GLOBAL,
    NOUN_MAP,
    STATUS_FAILED,
    STATUS_OK,
    VERB_GLOBAL,
    VERB_LOCAL,
    VERB_MAP,
    VERB_MAP_TMEAN,
    FieldSpec,
)
from featstore.epic.splits import resolve_selection, select_segments
from featstore.store.reader import FeatureStore, StoreWriter

__all__ = [
    "BoxesFileError",
    "BuildConfig",
    "BuildError",
    "BuildReport",
    "build_store",
    "distributed_env",
]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS"


class BuildError(Exception):
    """A build cannot start or go on (bad options, a store built with other models, no readable video)."""


# ------------------------------------------------------------------------------------------------
# configuration and report


@dataclass(frozen=True)
class BuildConfig:
    """Everything one `build_store` call does; made once at the edge (CLI), never passed to modules."""

    store: Path  # the store directory (created when absent; a rerun resumes it)
    annotations: Path  # EPIC-55 / EPIC-100 annotation file
    verb_backbone: str  # "NAME" (random init) or "NAME:/local/checkpoint.pt"
    noun_backbone: str  # same; runs on the verb backbone's clip (one clip, two models)
    frames_root: Path | None = None  # EPIC JPEG layout root (exactly one of frames_root / videos_dir)
    videos_dir: Path | None = None  # folder of video files decoded with PyAV (RGB only)
    modality: str = "rgb"  # 'rgb' (3 channels) or 'flow' (u, v: 2 channels; one store per modality)
    detector: str | None = None  # detector spec; None: a store without det.* fields
    boxes: Path | None = None  # precomputed boxes: pool the detector's features at them, no proposals
    boxes_coords: str = "pixel"  # 'pixel' (of the source frames) or 'normalized'
    det_score_thresh: float = 0.05  # minimum score of a detection (detector path)
    det_min_size: int | None = None  # detector's resize short side (None: the model's default)
    det_max_size: int | None = None  # detector's cap on the long side
    det_batch_size: int = 16  # frames per detector forward
    noun_map: bool = False  # also store noun.map (optional in DESIGN section 3)
    # verb.map kept as 'full' [C, T, H, W], 'time-mean' (verb.map_tmean [C, H, W]) or 'none'; verb.local
    # [N, C] is stored whenever there are det.local boxes. None: 'none' with a detector (the smallest
    # store SAOA trains from), 'full' without one (verb.local cannot be made).
    verb_map: str | None = None
    local_pool: str = "avg"  # verb.local's pooling of the RoIAlign bins: 'avg' (ours) or 'max' (SlowFast/LFB)
    # None: clip frames / stride / size / sampling mode / stacked flow frames from the verb backbone's
    # record, detection windows from SamplingConfig's defaults, each unless in sampling_overrides
    # (featstore.extract.plan.resolve_sampling). A SamplingConfig is used as given.
    sampling: SamplingConfig | None = None
    sampling_overrides: Mapping[str, Any] = field(default_factory=dict)  # SamplingConfig field -> value
    fps: float | None = None  # frame rate when neither the video info file nor the container knows
    video_info: Path | None = None  # EPIC_video_info.csv; None: looked for beside the annotations
    split: str | None = None  # a named split (featstore.epic.splits.NAMED_SPLITS)
    where: str | None = None  # DuckDB WHERE over the annotation columns
    limit: int | None = None  # first N selected segments (file order), before sharding
    device: str = "cpu"  # 'cpu' or 'cuda' (a rank uses cuda:LOCAL_RANK)
    amp: str = "fp16"  # autocast dtype on CUDA: 'fp16', 'bf16' or 'off'; CPU always runs fp32
    batch_size: int = 8  # segments per backbone forward
    workers: int = 4  # decode worker processes; 0 decodes in the main process (no overlap)
    seed: int = 0  # torch seed each model is built under (random init must match across ranks)
    rank: int = 0  # this process's rank (from RANK under torchrun; see distributed_env)
    world_size: int = 1  # number of ranks
    local_rank: int = 0  # GPU index on this node
    flush_every: int = 256  # segments between Parquet exports (durability does not depend on it)
    progress: bool = True  # tqdm bar on stderr (segments/s and ETA)
    command: str | None = None  # the command line, for the manifest
    manifest_timeout_s: float = 1800.0  # how long ranks > 0 wait for rank 0 to create the store

    def __post_init__(self) -> None:
        if (self.frames_root is None) == (self.videos_dir is None):
            raise BuildError("give exactly one frame source: frames_root (EPIC JPEG folders) or videos_dir (video files)")
        if self.modality not in MODALITY_CHANNELS:
            raise BuildError(f"modality must be 'rgb' or 'flow', got {self.modality!r}")
        if self.modality == "flow" and self.videos_dir is not None:
            raise BuildError("flow comes as EPIC JPEG u/v folders: use frames_root (--frames), not videos_dir")
        if self.sampling is not None and any(v is not None for v in self.sampling_overrides.values()):
            raise BuildError("give either a whole SamplingConfig (sampling) or sampling_overrides, not both")
        if self.boxes is not None and self.detector is None:
            raise BuildError(
                "precomputed boxes need a detector spec too: its box head pools the features at the "
                "given boxes (e.g. --detector fasterrcnn_resnet50_fpn:/path/model.pth --boxes FILE)"
            )
        if self.boxes_coords not in ("pixel", "normalized"):
            raise BuildError(f"boxes_coords must be 'pixel' or 'normalized', got {self.boxes_coords!r}")
        if self.device not in ("cpu", "cuda"):
            raise BuildError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.amp not in ("fp16", "bf16", "off"):
            raise BuildError(f"amp must be 'fp16', 'bf16' or 'off', got {self.amp!r}")
        for name in ("batch_size", "det_batch_size", "flush_every"):
            if getattr(self, name) < 1:
                raise BuildError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise BuildError(f"workers must be >= 0, got {self.workers}")
        if self.limit is not None and self.limit < 0:
            raise BuildError(f"limit must be >= 0, got {self.limit}")
        if self.fps is not None and not self.fps > 0:
            raise BuildError(f"fps must be > 0, got {self.fps}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise BuildError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.verb_map not in (None, "full", "time-mean", "none"):
            raise BuildError(f"verb_map (--map) must be 'full', 'time-mean' or 'none', got {self.verb_map!r}")
        if self.local_pool not in LOCAL_POOLS:
            raise BuildError(f"local_pool must be one of {', '.join(LOCAL_POOLS)}, got {self.local_pool!r}")
        if self.verb_map == "none" and self.detector is None:
            raise BuildError(
                "--map none keeps only verb.local, which is the verb map pooled at the det.local boxes: a build "
                "without --detector has none. Give a detector, or --map full / time-mean")

    @property
    def map_mode(self) -> str:
        """The ``--map`` choice in force: ``verb_map``, or its default for this build."""
        if self.verb_map is not None:
            return self.verb_map
        return "none" if self.detector is not None else "full"

    @property
    def stores_local(self) -> bool:
        """Whether the build stores ``verb.local`` (it needs the detections' local boxes)."""
        return self.detector is not None

    @property
    def shard(self) -> str:
        """The LMDB shard this rank writes."""
        return f"rank{self.rank}"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if self.device == "cuda" else torch.device("cpu")


@dataclass
class BuildReport:
    """What one `build_store` call (one rank) did."""

    store: Path
    shard: str
    rank: int = 0
    world_size: int = 1
    selected: int = 0  # segments of this rank's share of the selection
    built: int = 0  # stored now
    skipped: int = 0  # already stored by an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uid, reason), this run
    seconds: float = 0.0  # wall time of the decode + compute + write loop
    warnings: list[str] = field(default_factory=list)

    @property
    def segments_per_second(self) -> float:
        done = self.built + len(self.failed)
        return done / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """A few lines for the terminal: counts, rate, and the failed segments with their reasons."""
        who = f" (rank {self.rank} of {self.world_size}, shard {self.shard})" if self.world_size > 1 else ""
        lines = [
            f"built {self.built}, already stored {self.skipped}, failed {len(self.failed)} "
            f"of {self.selected} segments{who} in {self.seconds:.1f} s ({self.segments_per_second:.2f} segments/s)",
        ]
        for uid, reason in self.failed[:20]:
            lines.append(f"  failed {uid}: {reason}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more (featstore query STORE \"select uid, error "
                         f"from segments where status = '{STATUS_FAILED}'\")")
        if self.failed:
            lines.append("rerun the same command to retry the failed segments (stored ones are skipped)")
        return "\n".join(lines)


def distributed_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the variables torchrun sets; (0, 1, 0) outside torchrun.

    Raises:
        BuildError: WORLD_SIZE is set but RANK is not, or the values are not integers.
    """
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return 0, 1, 0
    try:
        world_size = int(environ["WORLD_SIZE"])
        rank = int(environ["RANK"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    except KeyError as err:
        raise BuildError(f"WORLD_SIZE is set but {err.args[0]} is not (run under torchrun)") from None
    except ValueError as err:
        raise BuildError(f"bad torchrun environment: {err}") from None
    return rank, world_size, local_rank


# ------------------------------------------------------------------------------------------------
# models


@dataclass
class _Models:
    verb: VideoBackbone
    noun: VideoBackbone | None  # None: same spec as the verb backbone, so its outputs are reused
    verb_record: BackboneRecord
    noun_record: BackboneRecord
    detector: ObjectDetector | None
    detector_record: DetectorRecord | None
    provenance: dict[str, Any]
    warnings: list[str]
    sampling: ResolvedSampling


def _resolve_sampling(config: BuildConfig) -> ResolvedSampling:
    """The build's sampling (see `BuildConfig.sampling`), from the records without building a model."""
    verb_record = get_backbone_record(parse_model_spec(config.verb_backbone)[0])
    noun_record = get_backbone_record(parse_model_spec(config.noun_backbone)[0])
    if config.sampling is not None:
        return ResolvedSampling(config=config.sampling,
                                sources={name: "BuildConfig.sampling" for name in config.sampling.to_dict()})
    try:
        return resolve_sampling(verb_record, noun_record, modality=config.modality, given=config.sampling_overrides)
    except ValueError as err:
        raise BuildError(f"sampling: {err}") from err


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


def _build_models(config: BuildConfig, sampling: ResolvedSampling) -> _Models:
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
        ))
    device = config.torch_device
    for module in (verb, noun, detector):
        if module is not None:
            module.to(device).eval()

    warnings: list[str] = []
    provenance: dict[str, Any] = {}
    for key, kind, spec, record in (
        ("verb_backbone", "verb backbone", config.verb_backbone, verb_record),
        ("noun_backbone", "noun backbone", config.noun_backbone, noun_record),
    ):
        entry, warning = _model_provenance(kind, spec, record.name, record.feature_dim, parse_model_spec(spec)[1])
        entry["in_channels"] = in_channels
        mean, std = record.normalisation(in_channels)  # always the record's: the publisher's values
        entry["normalisation"] = {"mean": list(mean), "std": list(std), "input": "[0, 1]"}
        provenance[key] = entry
        if warning and warning not in warnings:
            warnings.append(warning)
    if detector_record is not None:
        # The detector says which file it loaded: a detectron2 spec also names a config.
        entry, warning = _model_provenance("detector", config.detector, detector_record.name,
                                           detector_record.feature_dim, detector.checkpoint)
        entry.update(score_thresh=config.det_score_thresh, min_size=config.det_min_size,
                     max_size=config.det_max_size,
                     input="rgb frames" if config.modality == "rgb" else "rgb frames of the same videos (flow store)")
        provenance["detector"] = entry
        if warning:
            warnings.append(warning)
    else:
        provenance["detector"] = None
    warnings += [note for note in sampling.notes if note not in warnings]
    return _Models(verb=verb, noun=noun, verb_record=verb_record, noun_record=noun_record, detector=detector,
                   detector_record=detector_record, provenance=provenance, warnings=warnings, sampling=sampling)


def _detector_short_side(detector: ObjectDetector | None) -> int | None:
    """The short side the detector resizes its input to, when it says.

    Frames larger than that are shrunk in the decode workers: the detector would do the same, and
    sending 1080p frames between processes costs more than decoding them.
    """
    return None if detector is None else detector.input_short_side


# ------------------------------------------------------------------------------------------------
# decoding (runs in DataLoader workers)


@dataclass
class DecodedSegment:
    """One segment's frames, ready for the models (or why they could not be read).

    Attributes:
        index: position in the build's to-do list.
        plan: the sampling plan (None when planning failed).
        clip: uint8 (T, H, W, C) at the store's input size; with stacked frames (TSN / TSM flow) T
            is the number of samples and C = snippet frames x channels.
        det_frames: the distinct detection frames, ascending.
        det_images: uint8 (F, h, w, 3) RGB frames for the detector, F = len(det_frames).
        source_size: (H, W) of the video's source RGB frames (to normalise pixel boxes).
        error: why the segment failed, or None.
    """

    index: int
    plan: SegmentPlan | None = None
    clip: Tensor | None = None
    det_frames: tuple[int, ...] = ()
    det_images: Tensor | None = None
    source_size: tuple[int, int] | None = None
    error: str | None = None


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize frames to exactly (height, width) (bilinear, antialiased, like `resize_short_side`).

    Args:
        frames: uint8 (T, H0, W0, C).
        height, width: the output size.
    Returns:
        uint8 (T, height, width, C); the input itself when already that size.
    """
    t, h0, w0, _ = frames.shape
    if (h0, w0) == (height, width) or t == 0:
        return frames
    batch = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, C, H0, W0)
    resized = torch.nn.functional.interpolate(batch, size=(height, width), mode="bilinear",
                                              align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class _SegmentFrames(torch.utils.data.Dataset):
    """Decodes one segment per item; picklable, so DataLoader workers each hold a copy."""

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        source: FrameSource,
        det_source: FrameSource | None,
        sampling: SamplingConfig,
        fallback_fps: float | None,
        input_size: tuple[int, int],
        det_short_side: int | None,
    ) -> None:
        self.rows = [dict(row) for row in rows]
        self.source = source
        self.det_source = det_source  # None: no detection frames are read
        self.sampling = sampling
        self.fallback_fps = fallback_fps
        self.input_size = input_size
        self.det_short_side = det_short_side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> DecodedSegment:
        row = self.rows[index]
        try:
            return self._decode(index, row)
        except (FrameError, OSError) as err:
            # A bad input (missing / corrupt / truncated file) fails this segment only; the message
            # names the file or video.
            return DecodedSegment(index=index, error=str(err))

    def _decode(self, index: int, row: Mapping[str, Any]) -> DecodedSegment:
        participant, video = str(row["participant_id"]), str(row["video_id"])
        fps = self.source.fps(video) or self.fallback_fps
        if fps is None:
            return DecodedSegment(index=index, error=(
                f"no frame rate for video {video}: it is not in the video info file and frame folders "
                "carry none; give --fps or --video-info"))
        n_frames = self.source.n_frames(participant, video)
        if self.det_source is not None and self.det_source is not self.source:
            # Flow clips, RGB detections: plan within what both can deliver.
            n_frames = min(n_frames, self.det_source.n_frames(participant, video))
        try:
            plan = plan_segment(int(row["start_frame"]), int(row["stop_frame"]), fps=float(fps),
                                n_frames=n_frames, config=self.sampling)
        except ValueError as err:  # e.g. a segment that starts past the video's last frame
            return DecodedSegment(index=index, error=f"cannot sample video {video}: {err}")
        det_frames = plan.detection_frames if self.det_source is not None else ()
        n_clip = len(plan.clip_frames)
        det_images = None
        if self.det_source is self.source:
            # One read: a video file is decoded in one forward pass over the clip and both windows.
            frames = self.source.read(participant, video, list(plan.clip_frames) + list(det_frames))
            clip, det_images = frames[:n_clip], frames[n_clip:]
        else:
            clip = self.source.read(participant, video, list(plan.clip_frames))
            if det_frames:
                det_images = self.det_source.read(participant, video, list(det_frames))
        source_size = tuple(int(s) for s in (det_images if det_images is not None and len(det_images) else clip).shape[1:3])
        clip = stack_snippets(resize_frames(clip, *self.input_size), self.sampling.snippet_frames)
        det_tensor = None
        if det_images is not None and len(det_images):
            if self.det_short_side is not None and min(source_size) > self.det_short_side:
                det_images = resize_frames(det_images, *input_size_for(*source_size, self.det_short_side))
            det_tensor = torch.from_numpy(np.ascontiguousarray(det_images))
        return DecodedSegment(
            index=index,
            plan=plan,
            clip=torch.from_numpy(np.ascontiguousarray(clip)),
            det_frames=tuple(det_frames),
            det_images=det_tensor,
            source_size=source_size,  # type: ignore[arg-type]
        )


@dataclass
class DecodedBatch:
    """A batch as the main process gets it: the readable segments' clips stacked in the worker.

    Attributes:
        items: every segment of the batch, in to-do order; failed ones carry their error. The
            readable ones' clips have moved into ``clips`` (their ``clip`` is None).
        clips: uint8 (B, T, H, W, C) of the items without an error, in item order; None when all failed.
    """

    items: list[DecodedSegment]
    clips: Tensor | None

    def pin_memory(self) -> "DecodedBatch":
        # Called by the DataLoader's pin thread (CUDA builds): page-locked buffers make the copies
        # to the device asynchronous, while the main process computes the previous batch.
        for item in self.items:
            if item.det_images is not None:
                item.det_images = item.det_images.pin_memory()
        return DecodedBatch(items=self.items, clips=None if self.clips is None else self.clips.pin_memory())


def collate_segments(items: list[DecodedSegment]) -> DecodedBatch:
    """Stack the clips of a batch (in the worker, so the main process receives one tensor)."""
    good = [item for item in items if item.error is None]
    clips = torch.stack([item.clip for item in good]) if good else None  # type: ignore[misc]
    for item in good:
        item.clip = None
    return DecodedBatch(items=items, clips=clips)


def _decoded_batches(dataset: _SegmentFrames, config: BuildConfig) -> Iterator[DecodedBatch]:
    """Batches of decoded segments, decoded ahead by ``config.workers`` processes."""
    if len(dataset) == 0:
        return iter(())
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.workers,
        collate_fn=collate_segments,
        pin_memory=config.device == "cuda",
        prefetch_factor=2 if config.workers > 0 else None,
    )
    return iter(loader)


# ------------------------------------------------------------------------------------------------
# compute (main process, on the device)


def _autocast(config: BuildConfig) -> contextlib.AbstractContextManager:
    if config.device == "cuda" and config.amp != "off":
        return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[config.amp])
    # CPU runs fp32: CPU autocast is slower than fp32 on most machines, and results must not depend on it.
    return contextlib.nullcontext()


def _run_backbones(models: _Models, clips: Tensor, config: BuildConfig) -> dict[str, np.ndarray]:
    """Backbone features of a batch of clips.

    Args:
        clips: uint8 (B, T, H, W, C) on the CPU.
    Returns:
        ``verb.global`` (B, Cv), ``verb.map`` (B, Cv, T', H', W'), ``noun.global`` (B, Cn) and, when
        configured, ``noun.map``; float32 numpy.
    """
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


def _run_detector(
    models: _Models,
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


def _segment_outputs(
    item: DecodedSegment,
    row: Mapping[str, Any],
    backbone: Mapping[str, np.ndarray],
    at: int,
    detections: Mapping[tuple[str, int], FrameDetections] | None,
    models: _Models,
    config: BuildConfig,
) -> tuple[dict[str, np.ndarray], dict[str, list] | None]:
    """The tensors and box rows of one segment, from the batch outputs (``at``: its row there)."""
    tensors = {name: values[at] for name, values in backbone.items()}
    if detections is None or models.detector_record is None:
        return tensors, None
    video = str(row["video_id"])
    by_frame = {frame: detections[(video, frame)] for frame in item.det_frames if (video, frame) in detections}
    parts = []
    assert item.plan is not None
    for box_set, frames in zip(BOX_SETS, (item.plan.global_frames, item.plan.local_frames)):
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


# ------------------------------------------------------------------------------------------------
# the store: schema, provenance, resume checks


def _probe_input_size(rows: Sequence[Mapping[str, Any]], source: FrameSource, size: int) -> tuple[tuple[int, int], str]:
    """The store's (H, W): the first readable video of the selection (sorted by uid), short side resized.

    Returns:
        ((H, W), video_id it came from).
    Raises:
        BuildError: no video of the selection can be read (with the first reason).
    """
    first_error: str | None = None
    tried: set[str] = set()
    for row in rows:
        video = str(row["video_id"])
        if video in tried:
            continue
        tried.add(video)
        try:
            n_frames = source.n_frames(str(row["participant_id"]), video)
            frame = min(max(1, int(row["start_frame"])), n_frames) if n_frames else int(row["start_frame"])
            image = source.read(str(row["participant_id"]), video, [frame])  # (1, H0, W0, C)
        except (FrameError, OSError) as err:
            first_error = first_error or str(err)
            continue
        return input_size_for(int(image.shape[1]), int(image.shape[2]), size), video
    raise BuildError(f"no video of the selection could be read to size the store: {first_error}")


def _signature(config: BuildConfig, models: _Models, boxes_record: Mapping[str, Any] | None,
               video_info: Mapping[str, Any]) -> dict[str, Any]:
    """What must not change between runs writing into one store (models, weights, sampling, fps)."""
    def model(entry: Mapping[str, Any] | None) -> Any:
        if entry is None:
            return None
        return {k: entry.get(k) for k in ("name", "checkpoint_sha256", "in_channels", "score_thresh",
                                          "min_size", "max_size") if k in entry}

    random_weights = any(
        (entry or {}).get("weights") == RANDOM_WEIGHTS_NOTE
        for entry in (models.provenance["verb_backbone"], models.provenance["noun_backbone"],
                      models.provenance["detector"])
    )
    return {
        "modality": config.modality,
        "verb_backbone": model(models.provenance["verb_backbone"]),
        "noun_backbone": model(models.provenance["noun_backbone"]),
        "noun_map": config.noun_map,
        "verb_map": config.map_mode,
        "local_pool": config.local_pool if config.stores_local else None,
        "detector": model(models.provenance["detector"]),
        "boxes": None if boxes_record is None else {"sha256": boxes_record["sha256"], "coords": boxes_record["coords"]},
        "sampling": config.sampling.to_dict(),
        "seed": config.seed if random_weights else None,
        "video_info_sha256": video_info.get("sha256"),
        "fallback_fps": config.fps,
    }


def _provenance(config: BuildConfig, models: _Models, signature: Mapping[str, Any], input_size: tuple[int, int],
                input_video: str, boxes_record: Mapping[str, Any] | None, video_info: Mapping[str, Any]) -> dict[str, Any]:
    sampling = config.sampling
    return {
        "source": "build",
        "featstore_version": __version__,
        "command": config.command,
        "modality": config.modality,
        "in_channels": MODALITY_CHANNELS[config.modality] * sampling.snippet_frames,
        **models.provenance,
        "noun_clip": "ours: the noun backbone runs on the verb backbone's clip (one clip, two models)",
        "boxes_file": boxes_record,
        "map": config.map_mode,  # --map: which of verb.map / verb.map_tmean the store keeps
        "verb_map_shape": list(backbone_map_shape(models.verb_record, clip_frames=sampling.clip_frames,
                                                  height=input_size[0], width=input_size[1])),
        "sampling": sampling.to_dict(),
        # Where each sampling value came from: "backbone:NAME" (the verb backbone's record), "flag", "default".
        "sampling_sources": dict(models.sampling.sources),
        "sampling_notes": list(models.sampling.notes),
        "clip_frames": sampling.clip_frames,
        "clip_stride": sampling.clip_stride,
        "clip_sampling": sampling.clip_sampling,
        "snippet_frames": sampling.snippet_frames,
        "size": sampling.size,
        "input_size": list(input_size),  # (H, W) every clip is resized to
        "input_size_from": input_video,
        "crop": None,  # no crop: the short side is resized to `size`, then the frame to input_size
        "det_fps": sampling.det_fps,
        "det_global_seconds": sampling.det_global_seconds,
        "det_local_seconds": sampling.det_local_seconds,
        "det_topk": sampling.det_topk,
        "det_global_slots": sampling.n_global_slots,
        "det_local_slots": sampling.n_local_slots,
        "fps_source": {
            "order": ["video info file", "video container", "--fps"],
            "video_info": video_info.get("path"),
            "container": config.videos_dir is not None,
            "fallback_fps": config.fps,
        },
        "dtype": {"features": "float16", "box": "float32", "score": "float32", "compute": _compute_dtype(config)},
        "seed": config.seed,
        "random_weights": any(RANDOM_WEIGHTS_NOTE in w for w in models.warnings),
        "warnings": list(models.warnings),
        "build_signature": dict(signature),
        "annotations": str(config.annotations.resolve()),
    }


def _compute_dtype(config: BuildConfig) -> str:
    if config.device == "cuda" and config.amp != "off":
        return f"autocast {config.amp}"
    return "float32"


def _check_resumable(store: FeatureStore, signature: Mapping[str, Any]) -> None:
    provenance = store.manifest.get("provenance", {})
    if provenance.get("source") != "build":
        raise BuildError(f"{store.path} was not made by `featstore build` (source: {provenance.get('source')!r}); "
                         "build into a new store directory")
    stored = dict(provenance.get("build_signature", {}))
    if isinstance(stored.get("sampling"), Mapping):
        # Stores built before a sampling field existed hold its default implicitly.
        stored["sampling"] = SamplingConfig.from_dict(stored["sampling"]).to_dict()
    # JSON round trips turn tuples into lists; compare as JSON.
    differ = [key for key in sorted(set(signature) | set(stored))
              if json.dumps(stored.get(key), sort_keys=True) != json.dumps(signature.get(key), sort_keys=True)]
    if differ:
        details = "; ".join(f"{key}: store has {json.dumps(stored.get(key))}, this run {json.dumps(signature.get(key))}"
                            for key in differ)
        raise BuildError(f"{store.path} was built with other settings, so its segments would not be comparable "
                         f"({details}). Use a new store directory, or rerun with the store's settings.")


def _wait_for_manifest(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path / MANIFEST_NAME).is_file():
        if time.monotonic() > deadline:
            raise BuildError(f"rank 0 did not create {path / MANIFEST_NAME} within {timeout_s:.0f} s; "
                             "see rank 0's error")
        time.sleep(0.2)


def _open_store(config: BuildConfig, models: _Models, selection: Sequence[Mapping[str, Any]], source: FrameSource,
                boxes_record: Mapping[str, Any] | None, video_info: Mapping[str, Any]) -> FeatureStore:
    """Create the store (rank 0, first run) or open it and check that this run may write into it.

    Ranks > 0 wait for rank 0's manifest and take the input size from it, so that all ranks write
    one schema without a process group.
    """
    signature = _signature(config, models, boxes_record, video_info)
    detector_dim = models.detector_record.feature_dim if models.detector_record is not None else None

    def fields_for(input_size: tuple[int, int]):
        return store_fields(verb_record=models.verb_record, noun_record=models.noun_record,
                            sampling=config.sampling, input_size=input_size, detector_dim=detector_dim,
                            noun_map=config.noun_map, verb_map=config.map_mode, verb_local=config.stores_local)

    def derived_for(input_size: tuple[int, int]):
        if not config.stores_local:
            return None
        shape = backbone_map_shape(models.verb_record, clip_frames=config.sampling.clip_frames,
                                   height=input_size[0], width=input_size[1])
        return {VERB_LOCAL: local_recipe(pool=config.local_pool, source=VERB_MAP, source_shape=shape)}

    if config.rank != 0:
        _wait_for_manifest(config.store, config.manifest_timeout_s)
    if (config.store / MANIFEST_NAME).is_file():
        store = FeatureStore.open(config.store)
        _check_resumable(store, signature)
        input_size = tuple(store.manifest["provenance"]["input_size"])
        # create() on an existing store checks that the field schema is identical.
        store = FeatureStore.create(config.store, fields=fields_for(input_size))  # type: ignore[arg-type]
    else:
        input_size, input_video = _probe_input_size(selection, source, config.sampling.size)
        provenance = _provenance(config, models, signature, input_size, input_video, boxes_record, video_info)
        store = FeatureStore.create(config.store, fields=fields_for(input_size), provenance=provenance,
                                    derived=derived_for(input_size))
    return store


def _record_run(store: FeatureStore, config: BuildConfig) -> None:
    """Append this run to the manifest's ``runs`` (rank 0, while it holds its shard's writer lock,
    so that a build refused because another one is writing the store leaves no trace)."""
    if config.rank != 0:
        return
    store.manifest = FeatureStore.open(store.path).manifest  # the newest, not the one read at start
    runs = list(store.manifest.get("provenance", {}).get("runs", []))
    runs.append({"command": config.command, "annotations": str(config.annotations.resolve()),
                 "split": config.split, "where": config.where, "limit": config.limit,
                 "world_size": config.world_size, "featstore_version": __version__,
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    store.update_provenance(runs=runs)


# ------------------------------------------------------------------------------------------------
# the service


def _select(config: BuildConfig) -> list[dict[str, Any]]:
    table = read_segments(config.annotations)
    try:
        table = select_segments(table, resolve_selection(config.split, config.where))
    except ValueError as err:
        raise BuildError(str(err)) from err
    if config.limit is not None:
        table = table.slice(0, config.limit)
    return table.to_pylist()


def _video_info(config: BuildConfig) -> tuple[dict[str, float], dict[str, Any]]:
    path = config.video_info if config.video_info is not None else find_video_info(config.annotations)
    if path is None:
        return {}, {"path": None, "sha256": None}
    return read_video_info(path), {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def build_store(config: BuildConfig, *, on_segment: Callable[[str], None] | None = None) -> BuildReport:
    """Extract features of the selected segments into a store (this rank's share), resumably.

    Args:
        config: the build (see `BuildConfig`).
        on_segment: called with each uid after its row (ok or failed) is committed; tests use it
            to interrupt a build part-way.
    Returns:
        The report. Failed segments are also in the store (``status = 'failed'``, reason in ``error``).
    Raises:
        BuildError: options that cannot work, a store built with other settings, no readable video.
        AnnotationError: an unreadable annotation file.
        CheckpointError / UnknownModelError: a model spec that cannot be built.
        BoxesFileError: an unusable ``--boxes`` file.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
    if config.device == "cuda" and config.local_rank >= torch.cuda.device_count():
        raise BuildError(f"local rank {config.local_rank} has no GPU: torch sees {torch.cuda.device_count()}")
    if config.device == "cpu":
        keep_freed_memory()  # the models' activations are fresh CPU blocks on every call: see featstore/extract/allocator.py
    sampling = _resolve_sampling(config)
    config = replace(config, sampling=sampling.config, sampling_overrides={})
    selection = _select(config)
    report = BuildReport(store=config.store, shard=config.shard, rank=config.rank, world_size=config.world_size)
    if not selection:
        report.warnings.append("no segment matches the selection; nothing to do")
        return report
    fps_by_video, video_info = _video_info(config)
    try:
        source = open_frame_source(frames_root=config.frames_root, videos_dir=config.videos_dir,
                                   modality=config.modality, fps_by_video=fps_by_video)
    except ValueError as err:
        raise BuildError(str(err)) from err

    models = _build_models(config, sampling)
    report.warnings.extend(models.warnings)
    boxes = boxes_record = None
    if config.boxes is not None:
        boxes = PrecomputedBoxes.read(config.boxes, coords=config.boxes_coords,
                                      videos={str(row["video_id"]) for row in selection})
        boxes_record = describe_box_file(boxes, file_sha256(config.boxes))

    by_uid = {str(row["uid"]): row for row in selection}
    ordered = [by_uid[uid] for uid in sorted(by_uid)]
    store = _open_store(config, models, ordered, source, boxes_record, video_info)
    input_size = tuple(store.manifest["provenance"]["input_size"])

    det_source: FrameSource | None = None
    if models.detector is not None:
        # Detections always come from RGB frames; a flow store reads them beside its flow folders.
        det_source = source if config.modality == "rgb" else EpicJpegFrames(
            config.frames_root, modality="rgb", fps_by_video=fps_by_video)  # type: ignore[arg-type]

    mine = shard_uids(by_uid, rank=config.rank, world_size=config.world_size)
    report.selected = len(mine)
    # Opening the shard's writer re-exports what a killed predecessor committed but had not indexed,
    # so the set of stored segments is read after that. The writer is then closed again until the
    # decode workers are forked: a forked worker would inherit the writer's lock descriptor and, when
    # this process is killed, hold the shard's lock until it notices its parent is gone.
    with store.writer(config.shard, flush_every=config.flush_every):
        pass
    done = set(store.uids(status=STATUS_OK))
    todo = [by_uid[uid] for uid in mine if uid not in done]
    report.skipped = len(mine) - len(todo)
    # Video then time order: consecutive segments share files (page cache, neighbouring frames).
    todo.sort(key=lambda row: (str(row["video_id"]), int(row["start_frame"]), str(row["uid"])))
    dataset = _SegmentFrames(todo, source=source, det_source=det_source, sampling=config.sampling,
                             fallback_fps=config.fps, input_size=input_size,  # type: ignore[arg-type]
                             det_short_side=_detector_short_side(models.detector))
    batches = _decoded_batches(dataset, config)  # starts the workers

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"build {config.shard}" if config.world_size > 1 else "build",
               unit="seg", disable=not config.progress, file=sys.stderr, dynamic_ncols=True,
               position=config.rank if config.world_size > 1 else None)
    started = time.perf_counter()
    try:
        with store.writer(config.shard, flush_every=config.flush_every) as writer, torch.inference_mode():
            _record_run(store, config)
            for batch in batches:
                _process_batch(batch, todo, models, boxes, writer, report, config, on_segment)
                bar.update(len(batch.items))
                if report.failed:
                    bar.set_postfix(failed=len(report.failed), refresh=False)
    finally:
        report.seconds = time.perf_counter() - started
        bar.close()
        del batches  # shuts the workers down now rather than at garbage collection
    return report


def _process_batch(
    batch: DecodedBatch,
    todo: Sequence[Mapping[str, Any]],
    models: _Models,
    boxes: PrecomputedBoxes | None,
    writer: StoreWriter,
    report: BuildReport,
    config: BuildConfig,
    on_segment: Callable[[str], None] | None,
) -> None:
    """Run the models on one batch and write each of its segments (stored, or failed with its reason)."""
    good = [item for item in batch.items if item.error is None]
    rows = [todo[item.index] for item in good]
    outputs: dict[str, np.ndarray] = {}
    detections = None
    if batch.clips is not None:
        outputs = _run_backbones(models, batch.clips, config)
        if models.detector is not None:
            detections = _run_detector(models, good, rows, boxes, config)
    at = {item.index: i for i, item in enumerate(good)}
    for item in batch.items:  # in to-do order, failed ones included
        row = todo[item.index]
        uid = str(row["uid"])
        error = item.error
        if error is None:
            tensors, box_rows = _segment_outputs(item, row, outputs, at[item.index], detections, models, config)
            error = _unstorable(tensors, writer.store.fields)
            if error is None:
                apply_map_choice(tensors, map_mode=config.map_mode,
                                 local_pool=config.local_pool if config.stores_local else None)
        if error is None:
            writer.put(row, tensors, boxes=box_rows)
            report.built += 1
        else:
            writer.fail(row, error)
            report.failed.append((uid, error))
        if on_segment is not None:
            on_segment(uid)


def _unstorable(tensors: Mapping[str, np.ndarray], fields: Mapping[str, FieldSpec]) -> str | None:
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
