"""The report's recipes (section 3.1) and the publishers' own, the defaults they give and the flags that
override them; the transformer backbones run under stage 1."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main
from featstore.models import build_backbone
from finetune.backbone import finetune
from finetune.config import RECIPE_FIELDS, FinetuneError, make_config
from finetune.recipes import (
    UnknownRecipeError,
    get_recipe,
    list_recipes,
    recipe_for_backbone,
)
from tests.finetune.conftest import small_config
from tests.helpers.shallow_backbones import make_transformers_shallow

FRAMES = Path("/nonexistent/frames")  # the config does not touch the file system


def config(**settings):
    values = dict(out=Path("run"), annotations=Path("labels.csv"), frames_root=FRAMES, target="verb")
    values.update(settings)
    return make_config(**values)


def test_recipes_are_the_reports() -> None:
    r50 = get_recipe("r50-3d")
    assert (r50.backbone, r50.modality, r50.clip_frames, r50.clip_stride) == ("r3d_50", "rgb", 64, 2)
    assert (r50.crop, r50.scale_range, r50.test_size) == (224, (224, 288), 256)
    assert (r50.epochs, r50.lr, r50.lr_steps, r50.batch_size, r50.momentum, r50.weight_decay) == (
        35, 0.003, (31,), 32, 0.9, 1e-4)
    for name in ("i3d", "i3d-flow", "r50-3d-flow"):
        other = get_recipe(name)
        assert {f: getattr(other, f) for f in RECIPE_FIELDS if f != "modality"} == {
            f: getattr(r50, f) for f in RECIPE_FIELDS if f != "modality"}
    assert get_recipe("i3d-flow").modality == "flow" and get_recipe("i3d").backbone == "i3d"
    r21 = get_recipe("r2plus1d-34")
    assert (r21.backbone, r21.clip_frames, r21.clip_stride, r21.crop, r21.scale_range) == (
        "r2plus1d_34", 32, 4, 112, (112, 144))
    assert (r21.epochs, r21.lr, r21.lr_steps) == (20, 2e-4, (10, 19))


def test_learning_rate_schedules_follow_the_report() -> None:
    r50 = config(backbone="r3d_50")
    lrs = [r50.lr_at(epoch) for epoch in range(35)]
    assert lrs[:30] == [0.003] * 30 and lrs[30:] == pytest.approx([0.0003] * 5)  # the last 5 epochs
    r21 = config(backbone="r2plus1d_34")
    lrs = [r21.lr_at(epoch) for epoch in range(20)]
    # "decayed by 0.1 after 9 and 18 epochs"
    assert lrs[:9] == [2e-4] * 9 and lrs[9:18] == pytest.approx([2e-5] * 9) and lrs[18:] == pytest.approx([2e-6] * 2)


def test_the_backbone_picks_its_recipe_and_flags_override_every_value() -> None:
    assert config(backbone="r3d_50").recipe == "r50-3d"
    assert config(backbone="i3d", modality="flow").recipe == "i3d-flow"
    assert recipe_for_backbone("r3d_18", "rgb") is None
    overrides = dict(modality="flow", clip_frames=8, clip_stride=3, crop=32, scale_range=(40, 48), test_size=36,
                     epochs=3, lr=0.5, lr_steps=(2, 3), momentum=0.5, weight_decay=0.0, batch_size=4)
    assert set(overrides) == set(RECIPE_FIELDS)
    made = config(backbone="r3d_18", recipe="r50-3d", **overrides)
    assert {name: getattr(made, name) for name in RECIPE_FIELDS} == overrides
    # None means "the recipe's value", as an absent flag does.
    assert config(backbone="r3d_50", epochs=None).epochs == 35


def test_the_init_checkpoint_comes_from_the_backbone_spec() -> None:
    made = config(backbone="r3d_50:/ckpt/kinetics.pth")
    assert made.backbone == "r3d_50" and made.init == Path("/ckpt/kinetics.pth")


@pytest.mark.parametrize("settings, message", [
    (dict(backbone="r3d_18"), "no rgb recipe for backbone 'r3d_18'"),
    (dict(backbone="r3d_50", recipe="nope"), "unknown recipe 'nope'"),
    (dict(backbone="nope", recipe="r50-3d"), "unknown backbone 'nope'"),
    (dict(backbone="r3d_50", crop=300), "scale_range must be crop <= low <= high"),
    (dict(backbone="r3d_50", test_size=200), "test_size 200 is below the crop 224"),
    (dict(backbone="r3d_50", target="action"), "target must be 'verb' or 'noun'"),
    (dict(backbone="r3d_50", modality="flow", frames_root=None, videos_dir=Path("v")), "flow comes as EPIC JPEG"),
])
def test_settings_that_cannot_work_are_refused(settings, message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        config(**settings)


def test_help_lists_every_recipe_and_marks_recipe_values() -> None:
    result = CliRunner().invoke(featstore_main, ["finetune", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in list_recipes():
        assert name in result.output
    assert "[recipe]" in result.output and "--scale-range" in result.output
    with pytest.raises(UnknownRecipeError):
        get_recipe("r50")


def test_the_avion_recipes_are_the_publishers_and_say_so() -> None:
    for name, backbone in (("avion-vitb", "avion_vitb"), ("avion-vitl", "avion_vitl")):
        recipe = get_recipe(name)
        assert recipe_for_backbone(backbone, "rgb") is recipe
        assert "AVION" in recipe.source and "theirs" in recipe.description
        # main_lavila_finetune_cls.py: --clip-length 16, SGD (momentum = betas[0] 0.9), --wd 4e-5, 100
        # epochs, lr 3e-3 per 128 clips at their per-GPU batch of 64; val: short side 224, centre crop 224.
        assert (recipe.clip_frames, recipe.crop, recipe.test_size) == (16, 224, 224)
        assert (recipe.momentum, recipe.weight_decay, recipe.epochs) == (0.9, 4e-5, 100)
        assert recipe.lr == pytest.approx(3e-3 * recipe.batch_size / 128) and recipe.batch_size == 64
        # RandomResizedCrop(224, scale=(0.5, 1)): a 224 crop of a short side up to 224 / sqrt(0.5).
        assert recipe.scale_range == (224, 316)
    assert {get_recipe(name).source for name in ("r50-3d", "i3d", "r2plus1d-34")} == {"report"}
    assert recipe_for_backbone("omnivore_swinb_epic", "rgb") is None  # Omnivore publishes no EPIC recipe


@pytest.mark.parametrize(("backbone", "recipe"), [("avion_vitb", "avion-vitb"), ("omnivore_swinb_epic", "r50-3d")])
def test_a_transformer_backbone_finetunes_and_its_checkpoint_builds(
        small_epic, backbone: str, recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch of stage 1 on tiny clips with the transformer as the backbone (its publisher's recipe,
    or another recipe's values for Omnivore's, which has none); the checkpoint loads back into the
    registered backbone. The builders are made shallow (`make_transformers_shallow`)."""
    make_transformers_shallow(monkeypatch)
    out = tmp_path / "run"
    config = small_config(small_epic, out, backbone=backbone, recipe=recipe, clip_frames=4, epochs=1)
    assert config.recipe == recipe
    finetune(config, log=lambda _: None)
    loaded, _ = build_backbone(f"{backbone}:{out / 'checkpoint.pt'}")
    assert loaded.load_report is not None and loaded.load_report.loaded > 0
