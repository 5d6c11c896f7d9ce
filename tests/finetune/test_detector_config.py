"""Detector recipes and `DetectorFinetuneConfig`: the report's values, overrides, warm-up, checks."""
from __future__ import annotations

import pytest

from finetune.detector_config import (
    DetectorFinetuneError,
    detector_recipes_help,
    detector_resume_differences,
    get_detector_recipe,
    list_detector_recipes,
    make_detector_config,
)


def make(tmp_path, **settings):
    return make_detector_config(out=tmp_path / "run", objects=tmp_path / "objects.csv", images=tmp_path,
                                **{"detector": "fasterrcnn_mobilenet_v3_large_320_fpn", **settings})


def test_recipes_are_the_reports():
    trainval, train = get_detector_recipe("epic-trainval"), get_detector_recipe("epic-train")
    assert (trainval.iterations, trainval.lr_steps, trainval.val_where) == (180_000, (140_000, 160_000), None)
    assert (train.iterations, train.lr_steps) == (150_000, (116_000, 133_000))
    for recipe in (trainval, train):
        assert (recipe.batch_size, recipe.lr, recipe.momentum, recipe.weight_decay) == (12, 0.005, 0.9, 1e-4)
    assert list_detector_recipes() == ["epic-train", "epic-trainval"]
    assert "180k" in detector_recipes_help()
    with pytest.raises(DetectorFinetuneError, match="epic-train, epic-trainval"):
        get_detector_recipe("coco")


def test_flags_override_the_recipe_and_none_keeps_it(tmp_path):
    config = make(tmp_path, iterations=300, lr=None, lr_steps=(200,), val_where=None)
    assert (config.iterations, config.lr, config.lr_steps) == (300, 0.005, (200,))
    assert config.val_where == get_detector_recipe("epic-train").val_where
    assert make(tmp_path, val_where="none").val_where is None
    assert make(tmp_path, recipe="epic-trainval").val_where is None


def test_learning_rate_warms_up_then_steps(tmp_path):
    config = make(tmp_path, iterations=100, lr=0.01, lr_steps=(51, 91), warmup_iterations=10, warmup_factor=0.1)
    assert config.lr_at(0) == pytest.approx(0.001)
    assert config.lr_at(5) == pytest.approx(0.01 * (0.1 * 0.5 + 0.5))
    assert config.lr_at(10) == pytest.approx(0.01)
    assert config.lr_at(49) == pytest.approx(0.01)
    assert config.lr_at(50) == pytest.approx(0.001)
    assert config.lr_at(90) == pytest.approx(0.0001)


def test_epochs_are_validation_rounds(tmp_path):
    assert make(tmp_path, iterations=250, eval_every=100).epochs == 3
    assert make(tmp_path, iterations=0, eval_every=100).epochs == 0


def test_detector_spec_carries_the_init(tmp_path):
    config = make(tmp_path, detector=f"fasterrcnn_resnet50_fpn:{tmp_path / 'coco.pth'}")
    assert config.detector == "fasterrcnn_resnet50_fpn" and config.init == tmp_path / "coco.pth"
    assert config.backend == "torchvision"
    with pytest.raises(DetectorFinetuneError, match="once"):
        make(tmp_path, detector=f"fasterrcnn_resnet50_fpn:{tmp_path / 'a.pth'}", init=tmp_path / "b.pth")


def test_detectron2_spec_keeps_its_config(tmp_path):
    pytest.importorskip("detectron2")
    config = make(tmp_path, detector="detectron2")
    assert config.detector == "detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml" and config.init is None
    assert config.backend == "detectron2"
    config = make(tmp_path, detector=f"detectron2:my.yaml:{tmp_path / 'model.pth'}")
    assert (config.detector, config.init) == ("detectron2:my.yaml", tmp_path / "model.pth")


@pytest.mark.parametrize("settings, message", [
    ({"iterations": -1}, "iterations"),
    ({"min_size": 800, "max_size": 400}, "max_size"),
    ({"lr": 0.0}, "lr must be"),
    ({"lr_steps": (0,)}, "1-based"),
    ({"warmup_factor": 0.0}, "warm-up"),
    ({"device": "tpu"}, "device"),
    ({"batch_size": 1, "world_size": 2, "rank": 0}, "smaller than"),
    ({"bogus": 1}, "bogus"),
    ({"detector": "detectron2:my.yaml", "half_checkpoint": True}, "for the torchvision detectors"),
])
def test_bad_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(DetectorFinetuneError, match=message):
        make(tmp_path, **settings)


def test_resume_differences_name_what_changes_the_result(tmp_path):
    recorded = make(tmp_path, iterations=100).to_json()
    assert detector_resume_differences(make(tmp_path, iterations=200, workers=0), recorded) == []
    # How a run reports and what it keeps are not what it computes.
    assert detector_resume_differences(make(tmp_path, iterations=100, tensorboard=tmp_path / "tb", half_checkpoint=True,
                                            keep_resume_state=True), recorded) == []
    assert detector_resume_differences(make(tmp_path, iterations=100, lr=0.02), recorded) == [
        "lr: run has 0.005, now 0.02"]
