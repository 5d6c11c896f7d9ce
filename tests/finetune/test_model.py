"""The stage-1 model: a registered backbone with a linear classifier; init checkpoints and what they drop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featstore.models import CheckpointError, build_backbone
from finetune.model import build_video_classifier


def kinetics_like_checkpoint(path: Path, name: str = "mc3_18", classes: int = 400) -> dict[str, torch.Tensor]:
    """A torchvision-layout checkpoint of ``name`` with its 400-class ``fc`` head, as published."""
    torch.manual_seed(123)
    backbone, record = build_backbone(name)
    state = {key: torch.randn_like(value) if value.is_floating_point() else value
             for key, value in backbone.state_dict().items()}
    state["fc.weight"] = torch.randn(classes, record.feature_dim)
    state["fc.bias"] = torch.randn(classes)
    torch.save(state, path)
    return state


def test_logits_come_from_the_pooled_feature() -> None:
    model, record, report = build_video_classifier("mc3_18", num_classes=7, seed=0)
    assert model.training and report.checkpoint is None and "random weights" in report.describe()
    clip = torch.rand(2, 3, 4, 32, 32)
    logits = model(clip)
    assert logits.shape == (2, 7)
    _, pooled = model.backbone(clip)
    assert torch.allclose(logits, model.classifier(pooled))
    assert model.classifier.in_features == record.feature_dim
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())  # report 3.1: no dropout


def test_the_build_is_seeded_and_leaves_the_callers_random_stream_alone() -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first, _, _ = build_video_classifier("mc3_18", num_classes=3, seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    second, _, _ = build_video_classifier("mc3_18", num_classes=3, seed=1)
    other, _, _ = build_video_classifier("mc3_18", num_classes=3, seed=2)
    for (key, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), key
    assert not torch.equal(first.classifier.weight, other.classifier.weight)


def test_an_init_checkpoint_loads_without_its_classifier_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "kinetics.pth"
    state = kinetics_like_checkpoint(path)
    model, _, report = build_video_classifier("mc3_18", num_classes=5, init=path)
    assert report.dropped == ("fc.weight", "fc.bias")
    assert report.loaded == len(state) - 2
    assert "its classifier was dropped (fc.weight, fc.bias)" in report.describe() and str(path) in report.describe()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.classifier.weight.shape == (5, 512)  # a fresh classifier of the target's classes


def test_an_init_checkpoint_that_does_not_fit_says_what_does_not(tmp_path: Path) -> None:
    path = tmp_path / "rgb.pth"
    kinetics_like_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"shape-mismatched key\(s\): stem\.0\.weight \(64, 3, 3, 7, 7\) vs "
                                              r"model \(64, 2, 3, 7, 7\)"):
        build_video_classifier("mc3_18", num_classes=5, in_channels=2, init=path)  # a flow model
    with pytest.raises(CheckpointError, match=r"shape-mismatched key\(s\): layer2\.0\.conv1\.0\.weight"):
        build_video_classifier("r3d_18", num_classes=5, init=path)  # the 3D sibling of the 2D-layered file
    with pytest.raises(CheckpointError, match=r"missing key\(s\): .*unexpected key\(s\): stem"):
        build_video_classifier("i3d", num_classes=5, init=path)  # another family's file
    with pytest.raises(CheckpointError, match="never downloads"):
        build_video_classifier("mc3_18", num_classes=5, init=tmp_path / "absent.pth")
