"""Omnivore's Swin: the publisher's SwinTransformer3D (``../shared/peers/omnivore``) at a tiny size,
saved as ``swinB_epic_checkpoint.torch`` is saved, loads strictly into featstore's and gives the
publisher's map; the registered full-size Swin-B has the publisher's layout (meta device, shapes only)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from featstore.models import backbone_map_shape, build_backbone, load_backbone_checkpoint
from featstore.models.swin3d import OMNIVORE_SWINB_EPIC, Swin3DBackbone, swin_map_size

# A tiny trunk of the same family: 4 stages, 16 -> 128 channels, a window small enough that the
# clips below are split into several windows, shifted, padded, and shrunk on the late stages.
TINY = dict(patch=(2, 4, 4), dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=(4, 3, 3))
TINY_RECORD = dataclasses.replace(OMNIVORE_SWINB_EPIC, name="omnivore_swin_tiny", feature_dim=128)
# The publisher's EPIC input normalisation (inference_tutorial.ipynb), written down here.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOLERANCE = 1e-5  # max |ours - theirs| relative to the map's scale, float32

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def omnivore(peer_module) -> tuple[ModuleType, ModuleType]:
    """The publisher's ``omnivision.models.swin_transformer`` and ``omnivore.models.omnivore_model``."""
    pytest.importorskip("einops")
    pytest.importorskip("timm")
    return (peer_module("omnivore", "omnivision.models.swin_transformer"),
            peer_module("omnivore", "omnivore.models.omnivore_model"))


def _publisher_tiny(swin: ModuleType, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``SwinTransformer3D`` as ``omnivore_swinB_epic`` calls it, at the tiny size, and its EPIC head;
    every LayerNorm and bias perturbed so that a wrongly mapped one cannot hide."""
    torch.manual_seed(seed)
    trunk = swin.SwinTransformer3D(pretrained2d=False, patch_size=TINY["patch"], embed_dim=TINY["dim"],
                                   depths=list(TINY["depths"]), num_heads=list(TINY["heads"]),
                                   window_size=TINY["window"], drop_path_rate=0.4, patch_norm=True)
    trunk.eval()  # its train() returns None
    heads = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(TINY["dim"] * 8, 3806))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in trunk.named_parameters():
            if parameter.dim() == 1 or "bias_table" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return trunk, heads.eval()


def _publisher_map(trunk: nn.Module, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The publisher's normalised last stage ("stage3") and its forward's output (the head's input)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1, 1)
    x = (clip - mean) / std
    with torch.no_grad():
        return trunk(x, out_feat_keys=["stage3"])[0], trunk(x)


@pytest.mark.parametrize("shape", [
    (1, 8, 64, 64),  # windows shrink to the 2 x 2 x 2 .. 4 x 16 x 16 grids
    (2, 9, 67, 93),  # odd sizes: the patch embedding and the merges pad
    (1, 16, 96, 128),  # several windows per stage, shifted with the -100 mask
    (1, 4, 32, 40),  # a grid smaller than the window along T: the bias is read through index[:N, :N]
], ids=["8x64x64", "9x67x93", "16x96x128", "4x32x40"])
def test_the_published_layout_loads_strictly_and_gives_the_publishers_map(
        omnivore, shape: tuple[int, ...], tmp_path: Path) -> None:
    swin, _ = omnivore
    trunk, heads = _publisher_tiny(swin)
    checkpoint = tmp_path / "swinB_epic_checkpoint.torch"
    torch.save({"trunk": trunk.state_dict(), "heads": heads.state_dict()}, checkpoint)  # the published container
    batch, frames, height, width = shape
    clip = torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(2))
    theirs, their_global = _publisher_map(trunk, clip)

    torch.manual_seed(123)  # featstore's own random init differs: every weight must come from the file
    ours = Swin3DBackbone(record=TINY_RECORD, in_channels=3, **TINY).eval()
    indices = {k: v for k, v in ours.state_dict().items() if k.endswith("relative_position_index")}
    assert indices and all(torch.equal(v, trunk.state_dict()[k.removeprefix("trunk.")]) for k, v in indices.items()), \
        "featstore's own relative position index is the publisher's"
    report = load_backbone_checkpoint(ours, checkpoint)
    assert set(report.ignored) == {"heads.1.weight", "heads.1.bias"}, "the 3806-action head is named as ignored"
    assert report.loaded + len(report.ignored) == len(trunk.state_dict()) + len(heads.state_dict())
    with torch.no_grad():
        feature_map, global_feature = ours(clip)

    assert feature_map.shape == theirs.shape
    assert tuple(feature_map.shape[1:]) == (128, *swin_map_size(TINY["patch"], 4)(frames, height, width))
    scale = max(1.0, float(theirs.abs().max()))
    assert float((feature_map - theirs).abs().max()) <= TOLERANCE * scale
    assert float((global_feature - their_global).abs().max()) <= TOLERANCE * scale


def test_the_registered_swin_b_has_the_publishers_layout(omnivore, monkeypatch: pytest.MonkeyPatch) -> None:
    """``omnivore_swinB_epic()`` itself, its weights loader stubbed out (it would download), on the meta
    device: every key and shape of its trunk and head is a key and shape of featstore's, the head ignored."""
    _, model = omnivore
    monkeypatch.setattr(model, "_omnivore_base", lambda trunk, heads, **_: (trunk, heads))
    # SwinTransformer3D reads its drop-path rates with .item(), which meta tensors cannot do: they are
    # made on the CPU (a few floats); everything else is built on the meta device.
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *args, **kwargs: linspace(*args, **{**kwargs, "device": "cpu"}))
    with torch.device("meta"):
        trunk, heads = model.omnivore_swinB_epic()
        ours, record = build_backbone("omnivore_swinb_epic")
    published = {f"trunk.{k}": tuple(v.shape) for k, v in trunk.state_dict().items()}
    published |= {f"heads.{k}": tuple(v.shape) for k, v in heads.state_dict().items()}
    assert published["heads.1.weight"] == (3806, 1024)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: v for k, v in published.items() if not k.startswith(ours.classifier_prefixes)}
    assert backbone_map_shape(record, clip_frames=32, height=224, width=224) == (1024, 16, 7, 7)


def test_the_record_is_the_publishers_epic_input() -> None:
    record = OMNIVORE_SWINB_EPIC
    assert (record.mean, record.std) == (MEAN, STD)
    # 32 frames at sampling rate 2 of 30 fps video: 2.1 s, stride 4 at EPIC's 60 fps; short side 224.
    assert (record.default_clip_frames, record.default_clip_stride, record.default_size) == (32, 4, 224)
    assert (record.clip_sampling, record.global_feature) == ("centred", "map_mean")
    assert (record.feature_dim, record.temporal_stride, record.spatial_stride) == (1024, 2, 32)
