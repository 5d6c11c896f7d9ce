"""The report's stage-1 recipes (section 3.1) as frozen records, one per backbone and modality, and
the publishers' own for backbones the report does not train.

ResNet50-3D and I3D: initialised from Kinetics weights; 64 successive frames at stride 2, the clip's
centre drawn uniformly inside the segment; a random 224 x 224 crop of frames whose short side is
drawn in [224, 288]; SGD (momentum 0.9, weight decay 1e-4), batch 32, 35 epochs, lr 0.003 and 0.0003
for the last 5; no dropout. Testing: the centre clip, short side 256, one centre crop of 224.

R(2+1)D-34: initialised from IG-65M weights; 32 frames at stride 4; random 112 x 112 crops of frames
whose short side is drawn in [112, 144]; 20 epochs, lr 2e-4, x0.1 after epochs 9 and 18. Stage 2
extracts at 128 without cropping; validation here takes the centre 112 of the 128 short side (ours:
the same 128 / 112 ratio as 256 / 224).

Flow: the same recipes on the 2-channel (u, v) stacks that ``featstore build --modality flow`` reads.

Learning-rate steps are 1-based epochs at whose start the lr drops x0.1, as ``heads train
--lr-steps`` reads them: "0.0003 for the last 5 of 35" is step 31, "after 9 and 18" is 10 and 19.
Every value is a default that a flag of ``featstore finetune`` overrides.

Backbones the report does not train get their publisher's fine-tuning recipe where it publishes one,
marked as theirs (``source``). AVION (``scripts/main_lavila_finetune_cls.py`` and the EK-100 command
of ``docs/MODEL_ZOO.md``): 16 segments of the action, RandomResizedCrop(224, scale 0.5-1) in training
(here: short side in [224, 316], 224 / 316 = sqrt(0.5), and a random 224 crop), short side 224 and a
centre crop for testing, SGD momentum 0.9, weight decay 4e-5, lr 3e-3 per 128 clips (1.5e-3 at
their per-GPU batch of 64), 100 epochs. Ours, where featstore's stage-1 trainer has no equivalent:
their cosine decay after 2 warm-up epochs becomes x0.1 at epochs 76 and 96; their mixup / cutmix,
label smoothing 0.1 and classifier dropout 0.5 are left out. Omnivore publishes no EPIC
fine-tuning recipe: ``--recipe`` and flags set one for ``omnivore_swinb_epic``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Recipe", "RecipeBook", "UnknownRecipeError", "get_recipe", "list_recipes", "recipe_for_backbone", "recipes_help"]


@dataclass(frozen=True)
class Recipe:
    """One stage-1 training recipe.

    Attributes:
        name: what ``--recipe`` takes.
        backbone: the registered backbone the report trains with it (the default recipe of that backbone).
        init: the weights the report starts from (a description: the user gives the local file).
        modality: ``"rgb"`` or ``"flow"``.
        clip_frames: frames per clip.
        clip_stride: frames between clip frames, in the video's own frames.
        crop: side of the square training crop (also the validation centre crop).
        scale_range: (low, high) short side the training frames are resized to, drawn uniformly.
        test_size: short side of the validation frames before their centre crop.
        epochs: training epochs.
        lr: initial learning rate.
        lr_steps: 1-based epochs at whose start the lr drops x0.1.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: clips per optimiser step (over all processes).
        description: one line for ``--help``.
        source: whose recipe it is: ``"report"`` (section 3.1) or the publisher's script it transcribes.
    """

    name: str
    backbone: str
    init: str
    modality: str
    clip_frames: int
    clip_stride: int
    crop: int
    scale_range: tuple[int, int]
    test_size: int
    epochs: int
    lr: float
    lr_steps: tuple[int, ...]
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    description: str = ""
    source: str = "report"

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON types (for config.json)."""
        values = asdict(self)
        values["scale_range"] = list(self.scale_range)
        values["lr_steps"] = list(self.lr_steps)
        return values


class UnknownRecipeError(LookupError):
    """``--recipe`` names no recipe."""


class RecipeBook:
    """The recipes of one kind of stage-1 run (backbones here, detectors in `finetune.detector_config`).

    A plain dict, not featstore.models' Registry: importing that package imports torch, and the CLI
    lists the recipes in its help text, which must come up without it.

    Args:
        kind: what the recipes train, for messages (``"recipe"``, ``"detector recipe"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._recipes: dict[str, Any] = {}

    def register(self, recipe: Any) -> Any:
        """Add a recipe (any record with ``name`` and ``description``); names are unique."""
        if recipe.name in self._recipes:
            raise ValueError(f"{self.kind} {recipe.name!r} is already registered")
        self._recipes[recipe.name] = recipe
        return recipe

    def names(self) -> list[str]:
        """Names of the recipes, sorted."""
        return sorted(self._recipes)

    def get(self, name: str) -> Any:
        """The recipe called ``name``.

        Raises:
            UnknownRecipeError: no such recipe (the message lists them).
        """
        try:
            return self._recipes[name]
        except KeyError:
            raise UnknownRecipeError(f"unknown {self.kind} {name!r}; recipes: {', '.join(self.names())}") from None

    def values(self) -> list[Any]:
        """The recipes, in registration order."""
        return list(self._recipes.values())

    def help(self) -> str:
        """One line per recipe, for a command's ``--help``."""
        return "; ".join(f"{name}: {self._recipes[name].description}" for name in self.names())


_RECIPES = RecipeBook("recipe")
_register = _RECIPES.register


_KINETICS_3D = dict(clip_frames=64, clip_stride=2, crop=224, scale_range=(224, 288), test_size=256, epochs=35,
                    lr=0.003, lr_steps=(31,))
_register(Recipe(name="r50-3d", backbone="r3d_50", init="Kinetics (3D-ResNets-PyTorch ResNet-50)", modality="rgb",
                 description="ResNet50-3D RGB: 64x2 clips, 224 crops of [224, 288], 35 epochs, lr 0.003 -> 0.0003 at 31",
                 **_KINETICS_3D))
_register(Recipe(name="r50-3d-flow", backbone="r3d_50", init="Kinetics flow weights", modality="flow",
                 description="ResNet50-3D flow (u, v): as r50-3d", **_KINETICS_3D))
_register(Recipe(name="i3d", backbone="i3d", init="Kinetics + ImageNet (rgb_imagenet.pt)", modality="rgb",
                 description="I3D RGB: 64x2 clips, 224 crops of [224, 288], 35 epochs, lr 0.003 -> 0.0003 at 31",
                 **_KINETICS_3D))
_register(Recipe(name="i3d-flow", backbone="i3d", init="Kinetics + ImageNet (flow_imagenet.pt)", modality="flow",
                 description="I3D flow (u, v): as i3d", **_KINETICS_3D))
_register(Recipe(name="r2plus1d-34", backbone="r2plus1d_34", init="IG-65M (ig65m-pytorch port)", modality="rgb",
                 clip_frames=32, clip_stride=4, crop=112, scale_range=(112, 144), test_size=128, epochs=20, lr=2e-4,
                 lr_steps=(10, 19),
                 description="R(2+1)D-34 RGB: 32x4 clips, 112 crops of [112, 144], 20 epochs, lr 2e-4 x0.1 at 10, 19"))


# The publishers' own recipes (see the module docstring for what is theirs and what is ours).
_AVION_SOURCE = ("AVION scripts/main_lavila_finetune_cls.py + docs/MODEL_ZOO.md (EK-100 CLS); ours: x0.1 at "
                 "epochs 76 and 96 for their cosine schedule, no mixup / cutmix / label smoothing / dropout")
_AVION_EK100 = dict(modality="rgb", clip_frames=16, clip_stride=2, crop=224, scale_range=(224, 316), test_size=224,
                    epochs=100, lr=1.5e-3, lr_steps=(76, 96), momentum=0.9, weight_decay=4e-5, batch_size=64,
                    source=_AVION_SOURCE)
_AVION_INIT = ("LaViLa's Ego4D dual-encoder in their runs (--pretrain-model); featstore reads AVION's EK-100 "
               "checkpoints (after featstore convert-checkpoint)")
_register(Recipe(name="avion-vitb", backbone="avion_vitb", init=_AVION_INIT,
                 description="AVION ViT-B/16 RGB (theirs): 16 segments, 224 crops of [224, 316], SGD lr 1.5e-3 at "
                             "batch 64, wd 4e-5, 100 epochs, x0.1 at 76, 96",
                 **_AVION_EK100))
_register(Recipe(name="avion-vitl", backbone="avion_vitl", init=_AVION_INIT,
                 description="AVION ViT-L/14 RGB (theirs): as avion-vitb", **_AVION_EK100))


def list_recipes() -> list[str]:
    """Names of the recipes, sorted."""
    return _RECIPES.names()


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        UnknownRecipeError: no such recipe (the message lists them).
    """
    return _RECIPES.get(name)


def recipe_for_backbone(backbone: str, modality: str) -> Recipe | None:
    """The report's recipe for a backbone and modality, or None when the report trains none like it."""
    for recipe in _RECIPES.values():
        if recipe.backbone == backbone and recipe.modality == modality:
            return recipe
    return None


def recipes_help() -> str:
    """One line per recipe, for ``featstore finetune --help``."""
    return _RECIPES.help()
