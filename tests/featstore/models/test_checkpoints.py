"""Local checkpoint files: model specs, reading the usual containers, checking keys and shapes before
anything is copied, hashing, and the error that says weights are never downloaded.

Small hand-made modules stand in for the backbones (tests/featstore/models/test_backbones.py loads real
ones through `build_backbone`)."""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from featstore.models import build_backbone
from featstore.models.checkpoints import (
    CheckpointError,
    LoadReport,
    apply_state_dict,
    convert_checkpoint,
    file_sha256,
    load_checkpoint,
    parse_model_spec,
    read_state_dict,
)


def _net(seed: int = 0) -> nn.Module:
    """conv -> batch norm -> linear: weights, biases and BatchNorm buffers (num_batches_tracked too)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())


# ------------------------------------------------------------------------------------------------
# specs


def test_spec_names_a_model_and_optionally_a_local_checkpoint() -> None:
    assert parse_model_spec("i3d") == ("i3d", None)
    assert parse_model_spec("i3d:/ckpt/rgb_imagenet.pt") == ("i3d", Path("/ckpt/rgb_imagenet.pt"))
    assert parse_model_spec(" r3d_50 : /ckpt/verb.pt ") == ("r3d_50", Path("/ckpt/verb.pt"))
    assert parse_model_spec("r3d_50:~/verb.pt") == ("r3d_50", Path("~/verb.pt").expanduser())
    # Only the first ':' separates: the rest is the path.
    assert parse_model_spec("i3d:/ckpt/a:b.pt") == ("i3d", Path("/ckpt/a:b.pt"))


@pytest.mark.parametrize("spec, message", [("i3d:", "no checkpoint path"), ("i3d: ", "no checkpoint path"),
                                           ("", "empty model name"), (":/ckpt/x.pt", "empty model name")])
def test_bad_specs_say_what_a_spec_looks_like(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_model_spec(spec)
    assert "NAME:/local/checkpoint.pt" in str(caught.value)


# ------------------------------------------------------------------------------------------------
# files


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    payload = bytes(range(256)) * 5000
    path.write_bytes(payload)
    assert file_sha256(path) == hashlib.sha256(payload).hexdigest()
    assert file_sha256(path, chunk_bytes=7) == hashlib.sha256(payload).hexdigest()
    (tmp_path / "empty.bin").write_bytes(b"")
    assert file_sha256(tmp_path / "empty.bin") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("read", [read_state_dict, file_sha256, lambda path: load_checkpoint(_net(), path)])
def test_a_missing_file_says_featstore_never_downloads(tmp_path: Path, read) -> None:
    missing = tmp_path / "rgb_imagenet.pt"
    with pytest.raises(CheckpointError, match="checkpoint file not found") as caught:
        read(missing)
    message = str(caught.value)
    assert str(missing) in message and "never downloads weights" in message
    assert "NAME:/local/path.pt" in message and "bare NAME" in message


@pytest.mark.parametrize("given", [str, Path])
def test_a_url_is_named_as_a_url(given) -> None:
    url = given("https://download.pytorch.org/models/r3d_18-b3b3357e.pth")
    with pytest.raises(CheckpointError, match="looks like a URL; featstore never downloads weights"):
        read_state_dict(url)
    _, path = parse_model_spec(f"r3d_18:{url}")
    with pytest.raises(CheckpointError, match="looks like a URL") as raised:
        read_state_dict(path)
    assert "'https://download.pytorch.org/models/r3d_18-b3b3357e.pth'" in str(raised.value)  # two slashes


def test_a_file_that_is_no_checkpoint_at_all_gets_no_conversion_advice(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(bytes(range(7, 250)) * 10)  # what a truncated or wrong download can hold
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as raised:
        read_state_dict(path)
    assert "convert-checkpoint" not in str(raised.value)


# ------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("container", ["raw", "state_dict", "model"])
def test_read_state_dict_unwraps_the_usual_containers(tmp_path: Path, container: str) -> None:
    state = _net().state_dict()
    payload = state if container == "raw" else {container: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    torch.save(payload, tmp_path / "ckpt.pt")
    read = read_state_dict(tmp_path / "ckpt.pt")
    assert list(read) == list(state)
    assert all(torch.equal(read[key], value) for key, value in state.items())


def test_read_state_dict_strips_the_data_parallel_prefix_only_when_every_key_has_it(tmp_path: Path) -> None:
    state = _net().state_dict()
    torch.save({f"module.{key}": value for key, value in state.items()}, tmp_path / "ddp.pt")
    assert list(read_state_dict(tmp_path / "ddp.pt")) == list(state)
    mixed = {f"module.{key}": value for key, value in state.items()}
    mixed["head.weight"] = torch.zeros(2)
    torch.save(mixed, tmp_path / "mixed.pt")
    assert set(read_state_dict(tmp_path / "mixed.pt")) == set(mixed)  # not all prefixed: left alone


def test_read_state_dict_drops_non_tensor_entries(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(2), "step": 3, "note": "best", "nested": {"a": torch.ones(1)}},
               tmp_path / "ckpt.pt")
    assert list(read_state_dict(tmp_path / "ckpt.pt")) == ["weight"]


def test_read_state_dict_prefixes_the_parts_of_a_container_of_state_dicts(tmp_path: Path) -> None:
    """Omnivore's {'trunk': ..., 'heads': ...}: one state dict, each key under its part's name; a
    container that has a wrapper key or tensors of its own is not such a container."""
    torch.save({"trunk": {"norm.weight": torch.ones(1)}, "heads": {"1.bias": torch.zeros(1)}, "epoch": 5},
               tmp_path / "omnivore.torch")
    assert read_state_dict(tmp_path / "omnivore.torch") == {"trunk.norm.weight": torch.ones(1),
                                                            "heads.1.bias": torch.zeros(1)}
    torch.save({"state_dict": {"w": torch.ones(1)}, "ema": {"w": torch.zeros(1)}}, tmp_path / "wrapped.pt")
    assert read_state_dict(tmp_path / "wrapped.pt") == {"w": torch.ones(1)}


def test_unusable_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"'.*garbage\.pt' is not a PyTorch checkpoint"):
        read_state_dict(garbage)
    # Arbitrary pickled objects are never unpickled (weights_only); the message says how to re-save.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)}, unsafe)
    with pytest.raises(CheckpointError, match="featstore convert-checkpoint"):
        read_state_dict(unsafe)
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt' holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"empty\.pt' contains no tensors"):
        read_state_dict(tmp_path / "empty.pt")


# ------------------------------------------------------------------------------------------------
# applying


def test_apply_copies_every_tensor_and_reports_what_it_ignored() -> None:
    source, target = _net(seed=1), _net(seed=2)
    assert not _same_weights(source, target)
    state = dict(source.state_dict())
    state["fc.weight"] = torch.zeros(9, 4)  # a classifier head the module does not have
    report = apply_state_dict(target, state, source="'ckpt.pt'", ignore_prefixes=("fc.",))
    assert report == LoadReport(source="'ckpt.pt'", loaded=len(source.state_dict()), ignored=("fc.weight",))
    assert _same_weights(source, target)


def test_old_checkpoints_without_batch_norm_counters_load() -> None:
    source, target = _net(seed=1), _net(seed=2)
    state = {key: value for key, value in source.state_dict().items() if not key.endswith("num_batches_tracked")}
    report = apply_state_dict(target, state, source="old")
    assert report.loaded == len(state) == len(source.state_dict()) - 1
    assert torch.equal(target.state_dict()["1.running_mean"], source.state_dict()["1.running_mean"])


def test_a_checkpoint_that_does_not_fit_lists_missing_unexpected_and_mismatched_keys() -> None:
    state = dict(_net().state_dict())
    del state["3.weight"], state["3.bias"]  # missing
    state.update({f"extra_{i}.weight": torch.zeros(1) for i in range(12)})  # unexpected: more than ten
    state["0.weight"] = torch.zeros(4, 2, 3, 3)  # an RGB model's stem into a 2-channel one, say
    with pytest.raises(CheckpointError) as caught:
        apply_state_dict(_net(), state, source="'wrong.pt'", model_name="tiny")
    message = str(caught.value)
    assert message.startswith("checkpoint 'wrong.pt' does not fit model 'tiny': ")
    assert "2 missing key(s): 3.weight, 3.bias" in message
    assert "12 unexpected key(s): extra_0.weight" in message and "extra_9.weight, ... (2 more)" in message
    assert "extra_10.weight" not in message  # the first ten are named; the count is in full
    assert "1 shape-mismatched key(s): 0.weight (4, 2, 3, 3) vs model (4, 3, 3, 3)" in message
    with pytest.raises(CheckpointError, match="does not fit Sequential"):  # no registry name: the class
        apply_state_dict(_net(), state, source="x")


def test_a_failed_load_leaves_the_module_untouched() -> None:
    module = _net(seed=3)
    before = {key: value.clone() for key, value in module.state_dict().items()}
    poisoned = {key: torch.zeros_like(value) for key, value in before.items()}
    poisoned["not_a_layer.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 unexpected key"):
        apply_state_dict(module, poisoned, source="test")
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_load_checkpoint_reads_then_applies_a_file(tmp_path: Path) -> None:
    source, target = _net(seed=1), _net(seed=2)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    report = load_checkpoint(target, path, model_name="tiny")
    assert report.source == repr(str(path)) and report.loaded == len(source.state_dict())
    assert _same_weights(source, target)
    torch.save({"other.weight": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt' does not fit model 'tiny'"):
        load_checkpoint(target, tmp_path / "other.pt", model_name="tiny")


# Added with the published backbones (r3d_50, SlowFast, TSN/TSM, convert-checkpoint).

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


def test_a_pandas_table_in_the_args_is_read_as_inert_data(tmp_path: Path) -> None:
    """AVION's EK-100 scripts keep a DataFrame of the action classes in the Namespace they save (and
    torch.save's protocol 2 names builtins as Python 2's ``__builtin__``): converted, pandas not run."""
    pandas = pytest.importorskip("pandas")
    args = argparse.Namespace(clip_length=16, actions=pandas.DataFrame({"verb": [1, 3], "noun": [2, 5]}))
    path = tmp_path / "avion_finetune_cls.pt"
    torch.save({"epoch": 1, "state_dict": {"module.visual.ln_post.bias": torch.ones(1)}, "args": args}, path)
    report = convert_checkpoint(path, tmp_path / "avion.pt")
    assert "pandas.DataFrame" in report.inert and "args" in report.dropped
    assert read_state_dict(report.target) == {"visual.ln_post.bias": torch.ones(1)}


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
