"""The detector's stage-1 recipes (report section 3.1, "Detector details") and `DetectorFinetuneConfig`.

The report fine-tunes a Faster R-CNN on EPIC-Kitchens' object annotations with SGD (momentum 0.9,
weight decay 1e-4), batch 12, lr 0.005:

- ``epic-trainval``: every annotated training video, 180k iterations, x0.1 at 140k and 160k (the
  detector of the challenge submission);
- ``epic-train``: the train / validation protocol (P26-P31 held out), 150k iterations, x0.1 at 116k
  and 133k.

The report does not give a warm-up. Ours is detectron2's default, stated in every run's config.json:
the lr rises linearly from ``warmup_factor`` x lr to lr over the first ``warmup_iterations``. Every
value is a default that a flag of ``featstore finetune-detector`` overrides.

Iterations are counted in optimiser steps of ``batch_size`` images over all processes; the run
validates and checkpoints every ``eval_every`` iterations (and at the end), which is the unit the
training engine calls an epoch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featstore.epic.objects import HELD_OUT_PARTICIPANTS, IMAGE_LAYOUTS
from featstore.training.run_folder import settings_differences
from finetune.recipes import RecipeBook, UnknownRecipeError
from finetune.settings import check_run_settings, path_settings

__all__ = [
    "DETECTOR_RECIPE_FIELDS",
    "DetectorFinetuneConfig",
    "DetectorFinetuneError",
    "DetectorRecipe",
    "detector_recipes_help",
    "detector_resume_differences",
    "get_detector_recipe",
    "list_detector_recipes",
    "make_detector_config",
]

# The settings a recipe gives and a flag overrides.
DETECTOR_RECIPE_FIELDS = ("iterations", "lr", "lr_steps", "batch_size", "momentum", "weight_decay",
                          "warmup_iterations", "warmup_factor", "val_where")


class DetectorFinetuneError(Exception):
    """A detector run cannot start or cannot go on (bad settings or data, NaN loss, unreadable images)."""


@dataclass(frozen=True)
class DetectorRecipe:
    """One detector stage-1 recipe.

    Attributes:
        name: what ``--recipe`` takes.
        iterations: optimiser steps.
        lr: base learning rate (after the warm-up).
        lr_steps: iterations (1-based) from which the lr is x0.1 per step reached.
        batch_size: images per step over all processes.
        momentum, weight_decay: SGD's.
        warmup_iterations: steps of linear warm-up (ours: the report gives none).
        warmup_factor: the lr at iteration 0, as a fraction of ``lr``.
        val_where: DuckDB WHERE over the image table (``participant_id, video_id, frame, n_objects``)
            of the held-out images; None: no validation (train on everything).
        description: one line for ``--help``.
    """

    name: str
    iterations: int
    lr: float
    lr_steps: tuple[int, ...]
    batch_size: int = 12
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 1000
    warmup_factor: float = 0.001
    val_where: str | None = HELD_OUT_PARTICIPANTS
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON types (for config.json)."""
        values = asdict(self)
        values["lr_steps"] = list(self.lr_steps)
        return values


_RECIPES = RecipeBook("detector recipe")
_register = _RECIPES.register


_register(DetectorRecipe(
    name="epic-trainval", iterations=180_000, lr=0.005, lr_steps=(140_000, 160_000), val_where=None,
    description="every training video: 180k iterations of 12 images, lr 0.005 x0.1 at 140k and 160k"))
_register(DetectorRecipe(
    name="epic-train", iterations=150_000, lr=0.005, lr_steps=(116_000, 133_000),
    description="train/val protocol (P26-P31 held out): 150k iterations, lr 0.005 x0.1 at 116k and 133k"))


def list_detector_recipes() -> list[str]:
    """Names of the detector recipes, sorted."""
    return _RECIPES.names()


def get_detector_recipe(name: str) -> DetectorRecipe:
    """The recipe called ``name``.

    Raises:
        DetectorFinetuneError: no such recipe (the message lists them).
    """
    try:
        return _RECIPES.get(name)
    except UnknownRecipeError as err:
        raise DetectorFinetuneError(err.args[0]) from None


def detector_recipes_help() -> str:
    """One line per recipe, for ``featstore finetune-detector --help``."""
    return _RECIPES.help()


# What may differ between a run and its resumption: how it runs, not what it computes.
_RESUMABLE_CHANGES = ("resume", "progress", "workers", "command", "iterations", "device", "rank", "world_size",
                      "local_rank", "check_every", "tensorboard", "half_checkpoint", "keep_resume_state")


@dataclass(frozen=True)
class DetectorFinetuneConfig:
    """One detector stage-1 run (recorded in the run's config.json)."""

    out: Path  # the run folder
    objects: Path  # ground truth: EPIC_train_object_labels.csv or a `featstore build --boxes` file
    images: Path  # root of the images
    detector: str  # registered detector name, or 'detectron2:CONFIG' (a model-zoo name or a .yaml)
    recipe: str  # the recipe the defaults came from
    init: Path | None = None  # local checkpoint to start from (COCO / Visual Genome); None: random init
    image_pattern: str = IMAGE_LAYOUTS["object-detection"]  # key of IMAGE_LAYOUTS or a format string
    class_names: Path | None = None  # EPIC_noun_classes.csv (names and count); None: from the objects file
    num_classes: int | None = None  # object classes without background; None: EPIC-55's 352 or the file's max + 1
    coords: str = "pixel"  # boxes files: 'pixel' or 'normalized'
    where: str | None = None  # DuckDB WHERE over the image table: the images used at all
    val_where: str | None = HELD_OUT_PARTICIPANTS  # the held-out images; None: no validation
    limit: int | None = None  # first N images of each of train / val
    iterations: int = 150_000
    lr: float = 0.005
    lr_steps: tuple[int, ...] = (116_000, 133_000)  # 1-based iterations from which the lr is x0.1 per step
    batch_size: int = 12  # images per step over all processes
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 1000
    warmup_factor: float = 0.001
    eval_every: int = 5000  # iterations between validations and checkpoints (the engine's "epoch")
    min_size: int = 800  # the detector's resize: short side
    max_size: int = 1333  # and the cap of the long side
    score_threshold: float = 0.05  # detections kept for evaluation
    roi_batch_size: int = 512  # sampled proposals per training image for the box head (detectron2 / torchvision: 512)
    rpn_proposals: int = 2000  # RPN proposals kept per training image after NMS (both libraries' FPN default: 2000)
    workers: int = 4  # decode worker processes; 0 decodes in the main process
    device: str = "cpu"  # 'cpu' or 'cuda' (a torchrun rank uses cuda:LOCAL_RANK)
    amp: str = "bf16"  # autocast dtype on CUDA: 'bf16', 'fp16' (with a gradient scaler) or 'off'; CPU runs fp32
    seed: int = 0  # model init, image order and every augmentation draw derive from it
    max_failed_fraction: float = 0.01  # more unreadable images than this share of an epoch stops the run
    check_every: int = 20  # steps between the host's checks of the losses (NaN / inf)
    resume: bool = False  # continue the run in `out` from its last checkpoint
    rank: int = 0  # this process's rank under torchrun
    world_size: int = 1
    local_rank: int = 0
    progress: bool = True  # tqdm bars on stderr (images/s, ETA)
    command: str | None = None  # the command line, for config.json
    tensorboard: Path | None = None  # also write each round's scalars there (TensorBoard events); None: not
    half_checkpoint: bool = False  # checkpoint.pt's weights in float16 (half the size)
    keep_resume_state: bool = False  # keep checkpoints/last.pt when the run finishes (to extend it later)

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise DetectorFinetuneError(message)

        for name in ("iterations", "eval_every", "batch_size", "min_size", "max_size", "check_every", "roi_batch_size",
                     "rpn_proposals"):
            if getattr(self, name) < (0 if name == "iterations" else 1):
                fail(f"{name} must be >= {0 if name == 'iterations' else 1}, got {getattr(self, name)}")
        if self.max_size < self.min_size:
            fail(f"max_size {self.max_size} is below min_size {self.min_size}")
        if self.warmup_iterations < 0 or not 0.0 < self.warmup_factor <= 1.0:
            fail(f"warm-up needs warmup_iterations >= 0 and 0 < warmup_factor <= 1, got {self.warmup_iterations}, "
                 f"{self.warmup_factor}")
        if self.coords not in ("pixel", "normalized"):
            fail(f"coords must be 'pixel' or 'normalized', got {self.coords!r}")
        if self.num_classes is not None and self.num_classes < 1:
            fail(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.score_threshold < 1.0:
            fail(f"score_threshold must be in [0, 1), got {self.score_threshold}")
        if self.backend == "detectron2" and (self.tensorboard is not None or self.half_checkpoint):
            fail("--tensorboard and --half-checkpoint are for the torchvision detectors (the project's engine); "
                 "detectron2's own trainer keeps its checkpoint format, its resume state and its event files")
        check_run_settings(self, fail, step_unit="iterations")

    @property
    def backend(self) -> str:
        """``"detectron2"`` for a ``detectron2:CONFIG`` detector, else ``"torchvision"``."""
        return "detectron2" if self.detector.split(":", 1)[0] == "detectron2" else "torchvision"

    @property
    def epochs(self) -> int:
        """Validation rounds: ``iterations / eval_every``, rounded up (the last may be shorter)."""
        return -(-self.iterations // self.eval_every)

    def lr_at(self, iteration: int) -> float:
        """Learning rate of 0-based ``iteration``: the warm-up ramp, then x0.1 per step reached."""
        drops = sum(1 for step in self.lr_steps if iteration + 1 >= step)
        lr = self.lr * 0.1 ** drops
        if iteration < self.warmup_iterations:
            alpha = iteration / self.warmup_iterations
            lr *= self.warmup_factor * (1.0 - alpha) + alpha
        return lr

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON types (paths as strings, tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def detector_resume_differences(config: DetectorFinetuneConfig, recorded: dict[str, Any]) -> list[str]:
    """Settings of ``config`` that differ from a run's recorded ``settings`` (what a resume may not change)."""
    return settings_differences(config.to_json(), recorded, _RESUMABLE_CHANGES, paths=path_settings(config))


def _split_detector_spec(spec: str) -> tuple[str, Path | None]:
    """``(detector, init)`` of a ``--detector`` spec: ``NAME[:INIT]`` or ``detectron2[:CONFIG][:INIT]``.

    A detectron2 detector stays ``"detectron2:CONFIG"`` (the config is part of what is trained).
    """
    from featstore.models import CheckpointError, parse_model_spec

    name, _, rest = spec.partition(":")
    try:
        if name.strip() == "detectron2":
            from featstore.models.detectron2_rcnn import DEFAULT_CONFIG, parse_detectron2_spec

            config, weights = parse_detectron2_spec(rest or None) if rest else (DEFAULT_CONFIG, None)
            return f"detectron2:{config}", weights
        return parse_model_spec(spec)
    except (CheckpointError, ValueError) as err:
        raise DetectorFinetuneError(str(err)) from err


def make_detector_config(*, out: Path, objects: Path, images: Path, detector: str, recipe: str = "epic-train",
                         **settings: Any) -> DetectorFinetuneConfig:
    """A `DetectorFinetuneConfig` from a recipe and the settings given (None: the recipe's value).

    Args:
        out: the run folder.
        objects: the ground-truth file.
        images: the images' root.
        detector: ``"NAME"``, ``"NAME:/local/init.pth"`` or ``"detectron2:CONFIG"``.
        recipe: a recipe name.
        settings: any other field; for `DETECTOR_RECIPE_FIELDS` None means "the recipe's value"
            (``val_where`` takes ``"none"`` for no validation).
    Raises:
        DetectorFinetuneError: an unknown recipe or setting, or settings that cannot work.
    """
    chosen = get_detector_recipe(recipe)
    detector, init = _split_detector_spec(detector)
    if init is not None:
        if settings.get("init") is not None:
            raise DetectorFinetuneError("give the init checkpoint once: in --detector NAME:INIT or as init, not both")
        settings["init"] = init
    values = {field: getattr(chosen, field) for field in DETECTOR_RECIPE_FIELDS}
    for field, value in settings.items():
        if field in DETECTOR_RECIPE_FIELDS and value is None:
            continue
        values[field] = value
    if isinstance(values["val_where"], str) and values["val_where"].strip().lower() == "none":
        values["val_where"] = None
    values["lr_steps"] = tuple(int(v) for v in values["lr_steps"])
    try:
        return DetectorFinetuneConfig(out=Path(out), objects=Path(objects), images=Path(images), detector=detector,
                                      recipe=chosen.name, **values)
    except TypeError as err:  # an unknown setting name
        raise DetectorFinetuneError(str(err)) from err
