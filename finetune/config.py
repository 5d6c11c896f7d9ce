"""`FinetuneConfig`: every setting of one stage-1 run, made once at the edge from a recipe and flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from featstore.epic.frames import MODALITY_CHANNELS
from featstore.models import UnknownModelError, get_backbone_record, parse_model_spec
from featstore.training.run_folder import settings_differences
from finetune.recipes import Recipe, get_recipe, list_recipes, recipe_for_backbone
from finetune.settings import check_run_settings, path_settings

__all__ = ["FinetuneConfig", "FinetuneError", "RECIPE_FIELDS", "TARGETS", "make_config", "resume_differences"]

TARGETS = ("verb", "noun")
# The settings a recipe gives and a flag overrides.
RECIPE_FIELDS = ("modality", "clip_frames", "clip_stride", "crop", "scale_range", "test_size", "epochs", "lr",
                 "lr_steps", "momentum", "weight_decay", "batch_size")
# What may differ between a run and its resumption: how it runs, not what it computes (``epochs``:
# a finished run may be continued for more epochs).
_RESUMABLE_CHANGES = ("resume", "progress", "workers", "command", "epochs", "compile", "check_every", "device",
                      "rank", "world_size", "local_rank", "tensorboard", "half_checkpoint", "keep_resume_state")


class FinetuneError(Exception):
    """A stage-1 run cannot start or cannot go on (bad settings, too many unreadable segments, NaN loss)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One run of `finetune.backbone.finetune` (recorded in the run's config.json)."""

    out: Path  # the run folder
    annotations: Path  # EPIC-55 / EPIC-100 annotation file
    backbone: str  # registered backbone name (featstore.models.list_backbones)
    target: str  # 'verb' (a VerbNet) or 'noun' (a NounNet)
    recipe: str  # the recipe the defaults came from (finetune.recipes)
    init: Path | None = None  # local checkpoint to start from (its classifier is dropped); None: random init
    frames_root: Path | None = None  # EPIC JPEG layout root (exactly one of frames_root / videos_dir)
    videos_dir: Path | None = None  # folder of video files decoded with PyAV (RGB only)
    modality: str = "rgb"  # 'rgb' (3 channels) or 'flow' (u, v: 2 channels)
    clip_frames: int = 64  # frames per clip (TSN / TSM: segments, one snippet each)
    clip_stride: int = 2  # frames between clip frames, in the video's own frames (TSN: within a snippet)
    crop: int = 224  # square training crop; also the validation centre crop
    scale_range: tuple[int, int] = (224, 288)  # training short side, drawn uniformly (inclusive)
    test_size: int = 256  # validation short side before the centre crop
    epochs: int = 35
    lr: float = 0.003
    lr_steps: tuple[int, ...] = (31,)  # 1-based epochs at whose start the lr drops x0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32  # clips per step over all processes
    split: str | None = None  # named split ANDed into both selections (as `featstore build --split`)
    where: str | None = None  # DuckDB WHERE ANDed into both selections (as `featstore build --where`)
    train_split: str | None = None  # named split of the training segments (as `heads train --train`)
    train_where: str | None = None
    val_split: str | None = None  # named split of the validation segments; no validation when both are None
    val_where: str | None = None
    limit: int | None = None  # first N segments of each selection (file order)
    fps: float | None = None  # frame rate when neither the video info file nor the container knows
    video_info: Path | None = None  # EPIC_video_info.csv; None: looked for beside the annotations
    num_classes: int | None = None  # classifier outputs; None: the dataset's verb / noun count
    workers: int = 4  # decode worker processes; 0 decodes in the main process
    device: str = "cpu"  # 'cpu' or 'cuda' (a torchrun rank uses cuda:LOCAL_RANK)
    amp: str = "bf16"  # autocast dtype on CUDA: 'bf16', 'fp16' (with a gradient scaler) or 'off'; CPU runs fp32
    channels_last: bool | None = None  # channels_last_3d memory format; None: on with CUDA, off on the CPU
    compile: bool = False  # torch.compile the model
    seed: int = 0  # model init, clip order and every augmentation draw derive from it
    max_failed_fraction: float = 0.01  # more unreadable segments than this share of an epoch stops the run
    check_every: int = 20  # steps between the host's checks of the losses (NaN / inf)
    resume: bool = False  # continue the run in `out` from its last checkpoint
    rank: int = 0  # this process's rank under torchrun
    world_size: int = 1
    local_rank: int = 0
    progress: bool = True  # tqdm bars on stderr (clips/s, ETA)
    command: str | None = None  # the command line, for config.json
    tensorboard: Path | None = None  # also write each epoch's scalars there (TensorBoard events); None: not
    half_checkpoint: bool = False  # checkpoint.pt's weights in float16 (half the size)
    keep_resume_state: bool = False  # keep checkpoints/last.pt when the run finishes (to extend it later)

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise FinetuneError(message)

        if self.target not in TARGETS:
            fail(f"target must be 'verb' or 'noun', got {self.target!r}")
        try:
            get_backbone_record(self.backbone)
        except UnknownModelError as err:
            fail(str(err))
        if (self.frames_root is None) == (self.videos_dir is None):
            fail("give exactly one frame source: frames_root (--frames, EPIC JPEG folders) or videos_dir (--videos)")
        if self.modality not in MODALITY_CHANNELS:
            fail(f"modality must be 'rgb' or 'flow', got {self.modality!r}")
        if self.modality == "flow" and self.videos_dir is not None:
            fail("flow comes as EPIC JPEG u/v folders: use --frames, not --videos")
        for name in ("clip_frames", "clip_stride", "crop", "test_size", "batch_size", "check_every"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        low, high = self.scale_range
        if not self.crop <= low <= high:
            fail(f"scale_range must be crop <= low <= high (a {self.crop} crop must fit the resized frame), "
                 f"got {low}, {high} with crop {self.crop}")
        if self.test_size < self.crop:
            fail(f"test_size {self.test_size} is below the crop {self.crop}: the centre crop would not fit")
        if self.epochs < 0:
            fail(f"epochs must be >= 0, got {self.epochs}")
        check_run_settings(self, fail, step_unit="epochs")
        if self.fps is not None and not self.fps > 0:
            fail(f"fps must be > 0, got {self.fps}")
        if self.num_classes is not None and self.num_classes < 1:
            fail(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def in_channels(self) -> int:
        """Input channels of the backbone: 3 for RGB, 2 (u, v) per stacked flow frame (10 for TSN flow)."""
        return get_backbone_record(self.backbone).in_channels(self.modality)

    @property
    def clip_sampling(self) -> str:
        """How the backbone takes its clip (its record's): ``"centred"`` (3D CNNs) or ``"segments"`` (TSN / TSM)."""
        return get_backbone_record(self.backbone).clip_sampling

    @property
    def snippet_frames(self) -> int:
        """Frames stacked as channels per clip sample (its record's: 5 for TSN / TSM flow, else 1)."""
        return get_backbone_record(self.backbone).snippet_frames(self.modality)

    @property
    def uses_channels_last(self) -> bool:
        """Whether the model and its input use the channels_last_3d memory format."""
        return self.device == "cuda" if self.channels_last is None else self.channels_last

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``: x0.1 for every step in ``lr_steps`` already reached."""
        drops = sum(1 for step in self.lr_steps if epoch + 1 >= step)
        return self.lr * 0.1 ** drops

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON types (paths as strings, tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def resume_differences(config: FinetuneConfig, recorded: Mapping[str, Any]) -> list[str]:
    """Settings of ``config`` that differ from a run's recorded config.json (what a resume may not change).

    Args:
        config: the settings of the resuming call.
        recorded: the ``settings`` the run recorded.
    Returns:
        ``"name: run has X, now Y"`` for each differing setting; empty when the run may be resumed.
    """
    return settings_differences(config.to_json(), recorded, _RESUMABLE_CHANGES, paths=path_settings(config))


def make_config(*, out: Path, annotations: Path, backbone: str, target: str, recipe: str | None = None,
                **settings: Any) -> FinetuneConfig:
    """A `FinetuneConfig` from a recipe and the settings given (None: the recipe's value).

    Args:
        out: the run folder.
        annotations: the annotation file.
        backbone: ``"NAME"`` or ``"NAME:/local/init.pt"``.
        target: ``"verb"`` or ``"noun"``.
        recipe: a recipe name; None: the report's recipe of that backbone and modality.
        settings: any other `FinetuneConfig` field; for the recipe's fields (`RECIPE_FIELDS`) None
            means "the recipe's value".
    Returns:
        The config.
    Raises:
        FinetuneError: an unknown recipe, no recipe for the backbone, or settings that cannot work.
    """
    try:
        name, init = parse_model_spec(backbone)
    except ValueError as err:
        raise FinetuneError(str(err)) from err
    if recipe is None:
        modality = settings.get("modality") or "rgb"
        chosen: Recipe | None = recipe_for_backbone(name, modality)
        if chosen is None:
            raise FinetuneError(
                f"the report has no {modality} recipe for backbone {name!r}; pass --recipe "
                f"({', '.join(list_recipes())}) and override its values with flags")
    else:
        try:
            chosen = get_recipe(recipe)
        except LookupError as err:
            raise FinetuneError(err.args[0]) from err
    values = {field: getattr(chosen, field) for field in RECIPE_FIELDS}
    for field, value in settings.items():
        if field in RECIPE_FIELDS and value is None:
            continue
        values[field] = value
    values["scale_range"] = tuple(int(v) for v in values["scale_range"])
    values["lr_steps"] = tuple(int(v) for v in values["lr_steps"])
    if init is not None and values.get("init") is not None:
        raise FinetuneError("give the init checkpoint once: as NAME:/path or as init, not both")
    if init is not None:
        values["init"] = init
    try:
        return FinetuneConfig(out=Path(out), annotations=Path(annotations), backbone=name, target=target,
                              recipe=chosen.name, **values)
    except TypeError as err:  # an unknown setting name
        raise FinetuneError(str(err)) from err
