"""Checkpoint containers and the converter for files that pickle Python objects.

The safe reader (``torch.load(weights_only=True)``) refuses files holding an ``argparse.Namespace``
(EPIC-55 action-models, TSN / TSM training scripts); ``featstore convert-checkpoint`` extracts their
state dict with an allow-listed unpickler, and refuses any file naming a class outside that list.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.models import CheckpointError, build_backbone, convert_checkpoint, read_state_dict


class ScriptConfig:
    """A class of some training script: not on the converter's allow-list."""

    def __init__(self) -> None:
        self.lr = 0.1


class RunsACommand:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _epic55_style(path: Path, state: dict[str, torch.Tensor], **extra) -> Path:
    """As the EPIC-55 action-models / TSN repositories save: the state dict beside their argparse args."""
    torch.save({"epoch": 80, "arch": "resnet50", "state_dict": collections.OrderedDict(state),
                "best_prec1": np.float64(31.2), "args": argparse.Namespace(arch="resnet50", lr=0.001,
                                                                           root=Path("/data/epic")), **extra}, path)
    return path


def test_reader_refuses_pickled_objects_and_names_the_converter(tmp_path: Path) -> None:
    original, _ = build_backbone("r3d_18")
    published = _epic55_style(tmp_path / "r3d18_epic55.pth.tar", original.state_dict())
    with pytest.raises(CheckpointError, match=r"featstore convert-checkpoint .*r3d18_epic55\.pth\.tar"):
        read_state_dict(published)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_converted_file_loads_strictly_with_the_same_weights(tmp_path: Path, zip_format: bool) -> None:
    torch.manual_seed(0)
    original, _ = build_backbone("r3d_18")
    state = {f"module.{key}": value for key, value in original.state_dict().items()}
    state["module.fc.weight"] = torch.randn(125, 512)
    published = tmp_path / "published.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1), "epoch": 3}, published,
               _use_new_zipfile_serialization=zip_format)

    report = convert_checkpoint(published, tmp_path / "converted.pt")
    assert report.tensors == len(state)
    assert set(report.dropped) == {"args", "epoch"}
    assert report.target.is_file() and len(report.sha256) == 64
    assert not list(tmp_path.glob(".converted.pt.tmp*")), "no temporary file is left behind"

    torch.manual_seed(1)
    loaded, _ = build_backbone(f"r3d_18:{report.target}")
    assert loaded.load_report.ignored == ("fc.weight",)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("payload", ["custom class", "os.system"])
def test_converter_refuses_classes_outside_the_allow_list(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "command-ran"
    extra = {"config": ScriptConfig()} if payload == "custom class" else {"hook": RunsACommand(marker)}
    published = _epic55_style(tmp_path / "bad.pth", {"w": torch.zeros(2)}, **extra)
    expected = "ScriptConfig" if payload == "custom class" else "system"
    with pytest.raises(CheckpointError, match=f"refused to rebuild .*{expected}"):
        convert_checkpoint(published, tmp_path / "out.pt")
    assert not marker.exists(), "nothing in the file ran"
    assert not (tmp_path / "out.pt").exists()


def test_lightning_configuration_is_read_as_inert_data(tmp_path: Path) -> None:
    """Lightning keeps omegaconf containers as hyper-parameters: read as plain records, never imported."""
    fake = types.ModuleType("omegaconf.dictconfig")

    class DictConfig(dict):
        def __reduce__(self):
            return DictConfig, (), {"_content": dict(self)}

    DictConfig.__module__ = "omegaconf.dictconfig"
    DictConfig.__qualname__ = "DictConfig"
    fake.DictConfig = DictConfig
    package = types.ModuleType("omegaconf")
    sys.modules.update({"omegaconf": package, "omegaconf.dictconfig": fake})
    try:
        path = tmp_path / "tsn_rgb.ckpt"
        torch.save({"state_dict": {"model.base_model.conv1.weight": torch.ones(1)}, "epoch": 1,
                    "hyper_parameters": DictConfig(modality="RGB"), "hparams_type": DictConfig}, path)
    finally:
        del sys.modules["omegaconf"], sys.modules["omegaconf.dictconfig"]
    with pytest.raises(CheckpointError, match="convert-checkpoint"):
        read_state_dict(path)

    report = convert_checkpoint(path, tmp_path / "tsn_rgb.pt")
    assert report.inert == ("omegaconf.dictconfig.DictConfig",)
    assert "omegaconf" not in sys.modules, "the configuration package is never imported"
    assert read_state_dict(report.target) == {"model.base_model.conv1.weight": torch.ones(1)}


def test_converter_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    published = _epic55_style(tmp_path / "x.pth", {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="input itself"):
        convert_checkpoint(published, published)


def test_slowfast_and_lightning_containers_unwrap(tmp_path: Path) -> None:
    """PySlowFast's 'model_state' and Lightning's 'model.' prefix (stripped by the TSN backbones)."""
    slowfast = tmp_path / "SlowFast.pyth"
    torch.save({"epoch": 1, "model_state": {"s1.x": torch.ones(1)}, "optimizer_state": {}, "cfg": "yaml"}, slowfast)
    assert read_state_dict(slowfast) == {"s1.x": torch.ones(1)}
    torch.manual_seed(0)
    tsn, _ = build_backbone("tsn_r50")
    ckpt = tmp_path / "tsn.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tsn.state_dict().items()}
                | {"model.new_fc.weight": torch.zeros(397, 2048), "model.new_fc.bias": torch.zeros(397)}}, ckpt)
    loaded, _ = build_backbone(f"tsn_r50:{ckpt}")
    assert set(loaded.load_report.ignored) == {"new_fc.weight", "new_fc.bias"}
    assert torch.equal(loaded.state_dict()["base_model.conv1.weight"], tsn.state_dict()["base_model.conv1.weight"])
