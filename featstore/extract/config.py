"""A build's configuration and report (`featstore build`): made once at the edge, read by the service.

`BuildConfig` checks its options when it is made, so that a build that cannot work fails before any
model is built; `BuildReport` is what one `featstore.extract.service.build_store` call (one rank) did.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from featstore.epic.frames import MODALITY_CHANNELS
from featstore.epic.sampling import SamplingConfig
from featstore.models.detectors import BOX_HEAD, DET_FEATURES
from featstore.store.local_pool import LOCAL_POOLS
from featstore.store.schema import STATUS_FAILED

__all__ = ["AMP_DTYPES", "RANDOM_WEIGHTS_NOTE", "BuildConfig", "BuildError", "BuildEstimate", "BuildReport",
           "distributed_env"]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # BuildConfig.amp -> autocast dtype on CUDA
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS"  # marks a model without a checkpoint in the manifest and warnings


class BuildError(Exception):
    """A build cannot start or go on (bad options, a store built with other models, no readable video)."""


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
    det_feature: str = BOX_HEAD  # per-box feature: 'box-head' (representation) or 'roi' (RoIAlign output, averaged)
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
    # Temporal views (docs/views.md): the segments of views_where get `views` clips each (view 0 the
    # centre one, the others centred on frames drawn under `seed`), every other segment one. 1: one
    # clip per segment, the store as without views. views_where None: the training halves of the
    # validation protocols (featstore.epic.splits.training_selection).
    views: int = 1
    views_where: str | None = None
    device: str = "cpu"  # 'cpu' or 'cuda' (a rank uses cuda:LOCAL_RANK)
    amp: str = "fp16"  # autocast dtype on CUDA: 'fp16', 'bf16' or 'off'; CPU always runs fp32
    batch_size: int = 8  # segments per batch (with all their views), clips per backbone forward
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
        if self.det_feature not in DET_FEATURES:
            raise BuildError(f"det_feature must be one of {', '.join(DET_FEATURES)}, got {self.det_feature!r}")
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
        if self.views < 1:
            raise BuildError(f"views must be >= 1, got {self.views}")
        if self.views_where is not None and self.views == 1:
            raise BuildError("--views-where selects the segments that get --views K views; give --views K > 1 too")
        if self.views > 1 and self.sampling is not None and self.sampling.clip_sampling != "centred":
            raise BuildError("temporal views move a centred clip (3D CNNs); segment sampling (TSN / TSM) "
                             "has no centre to move: build it without --views")
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
    def views_selection(self) -> str | None:
        """The WHERE expression of the segments that get ``views`` views (None without views)."""
        if self.views == 1:
            return None
        if self.views_where is not None:
            return self.views_where
        from featstore.epic.splits import training_selection

        return training_selection()

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
    views: int = 0  # temporal views stored now (== built without views)
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
        views = f" ({self.views} views)" if self.views != self.built else ""
        lines = [
            f"built {self.built}{views}, already stored {self.skipped}, failed {len(self.failed)} "
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


@dataclass(frozen=True)
class BuildEstimate:
    """What a build would store, before it runs (`featstore build --dry-run`): counts and bytes.

    Attributes:
        segments: segments of the selection (this rank's share not taken: the whole build).
        with_views: those that get ``views`` temporal views; the others get one.
        views: views per segment of ``views_where`` (1 without views).
        views_where: the views' selection, or None.
        fields: field -> (dtype, shape) the store holds.
        bytes_per_view: field -> bytes of one view as LMDB lays it out (`featstore.store.sizes`).
        stored: segments the store holds already (a resumed build skips them), or 0.
    """

    segments: int
    with_views: int
    views: int
    views_where: str | None
    fields: dict[str, tuple[str, tuple[int, ...]]]
    bytes_per_view: dict[str, int]
    stored: int = 0

    @property
    def total_views(self) -> int:
        return self.segments - self.with_views + self.with_views * self.views

    @property
    def view_bytes(self) -> int:
        """Bytes of one view (every field) in LMDB."""
        return sum(self.bytes_per_view.values())

    @property
    def total_bytes(self) -> int:
        """Every view's fields in LMDB: the store's size, less its index and journal (a few KiB a view)."""
        return self.total_views * self.view_bytes

    def to_json(self) -> dict[str, Any]:
        return {"segments": self.segments, "with_views": self.with_views, "views": self.views,
                "views_where": self.views_where, "total_views": self.total_views,
                "fields": {name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in self.fields.items()},
                "bytes_per_view": dict(self.bytes_per_view), "view_bytes": self.view_bytes,
                "total_bytes": self.total_bytes, "stored": self.stored}

    def summary(self) -> str:
        """The lines `featstore build --dry-run` prints."""
        lines = [f"segments    {self.segments} selected"
                 + (f" ({self.stored} stored already)" if self.stored else "")]
        if self.views > 1:
            lines.append(f"views       {self.views} for the {self.with_views} segments where {self.views_where}, 1 for "
                         f"the other {self.segments - self.with_views}: {self.total_views} views")
        lines.append(f"{'fields':<23}{'dtype':<9}{'shape':<16}bytes per view in LMDB")
        for name, (dtype, shape) in self.fields.items():
            lines.append(f"  {name:<20} {dtype:<8} {str(list(shape)):<15} {self.bytes_per_view[name] / 1024:>10,.1f} KiB")
        lines.append(f"size        {self.view_bytes / 1024:,.1f} KiB per view x {self.total_views} views = "
                     f"{self.total_bytes / 2**20:,.1f} MiB, plus a few KiB per view of index and journal")
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
