"""AVION's video ViT: the publisher's VisionTransformer + VideoClassifier (``../shared/peers/AVION``) at a
tiny size, saved as its EK-100 fine-tuning script saves them (flash-attn layout or torch's, with its
argparse.Namespace), loads strictly into featstore's (after ``convert-checkpoint``) and gives the
publisher's tokens and classifier input; the registered ViT-B/L have the publisher's layout (meta device)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from featstore.models import (
    CheckpointError,
    backbone_map_shape,
    build_backbone,
    convert_checkpoint,
    load_backbone_checkpoint,
)
from featstore.models.spacetime_vit import AVION_VITB, AVION_VITL, SpaceTimeViTBackbone, patch_map_size

# A tiny ViT of the same family: 32 x 32 frames in 8 x 8 patches (a 4 x 4 grid), 4 frames.
IMAGE, PATCH, WIDTH, LAYERS, HEADS, FRAMES = 32, 8, 64, 2, 4, 4
TINY_RECORD = dataclasses.replace(AVION_VITB, name="avion_vit_tiny", feature_dim=WIDTH, spatial_stride=PATCH)
# AVION's --norm-style openai (scripts/main_lavila_finetune_cls.py), on 0-255, written down here.
MEAN_255 = (108.3272985, 116.7460125, 104.09373615000001)
STD_255 = (68.5005327, 66.6321579, 70.32316305)
TOLERANCE = 1e-5  # max |ours - theirs| relative to the map's scale, float32

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def avion(peer_module, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """AVION's ``transformer``, ``model_clip`` and ``utils`` modules.

    ``transformer`` imports flash-attn's MHA and Mlp at the top (used only with use_flash_attn=True)
    and ``model_clip`` OpenAI's ``clip`` (for the text side and the CLIP weights): stand-ins take their
    place in sys.modules while the test runs. The stand-in ``clip.load`` gives a state dict with no
    key of the model, so that AVION's builders make randomly initialised models.
    """
    pytest.importorskip("einops")
    pytest.importorskip("timm")
    mha, mlp, clip = (types.ModuleType(name) for name in ("flash_attn.modules.mha", "flash_attn.modules.mlp", "clip"))
    mha.MHA = mlp.Mlp = None  # type: ignore[attr-defined]
    no_weights = types.SimpleNamespace(state_dict=lambda: {"unused": torch.zeros(1)})
    clip.load = lambda *_, **__: (no_weights, None)  # type: ignore[attr-defined]
    stubs = {"flash_attn": types.ModuleType("flash_attn"), "flash_attn.modules": types.ModuleType("flash_attn.modules"),
             "flash_attn.modules.mha": mha, "flash_attn.modules.mlp": mlp, "clip": clip}
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(transformer=peer_module("AVION", "avion.models.transformer"),
                                 model_clip=peer_module("AVION", "avion.models.model_clip"),
                                 utils=peer_module("AVION", "avion.models.utils"))


def _publisher_tiny(avion: types.SimpleNamespace, seed: int = 0) -> nn.Module:
    """``VideoClassifier(VisionTransformer(...))`` as the fine-tuning script builds it (3806 actions,
    dropout 0.5), tiny; LayerNorms, biases and the temporal embedding perturbed so that none can hide."""
    torch.manual_seed(seed)
    visual = avion.transformer.VisionTransformer(IMAGE, PATCH, WIDTH, LAYERS, HEADS, 4, num_frames=FRAMES,
                                                 output_dim=32)
    model = avion.model_clip.VideoClassifier(visual, dropout=0.5, num_classes=3806).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 or "temporal" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _published_state(avion: types.SimpleNamespace, model: nn.Module, *, flash: bool, layers: int) -> dict:
    """The ``state_dict`` entry of AVION's checkpoint: DistributedDataParallel's ``module.`` keys, in the
    flash-attn / fast-conv1 layout of the published runs (renamed by AVION's own remapping) or torch's."""
    state = model.state_dict()
    if flash:
        state = avion.utils.remap_keys_from_open_clip_to_vit(state, visual_transformer_layers=layers,
                                                             use_fast_conv1=True, use_flash_attn=True)
    return {f"module.{key}": value for key, value in state.items()}


def _save_published(path: Path, state: dict) -> Path:
    """The container ``main_lavila_finetune_cls.py`` saves, its args as the script leaves them (with
    the pandas table of the action classes it adds for ek100_cls)."""
    pandas = pytest.importorskip("pandas")
    args = argparse.Namespace(dataset="ek100_cls", model="CLIP_VITB16", clip_length=16, clip_stride=2,
                              use_flash_attn=True, use_fast_conv1=True, norm_style="openai", lr=3e-3,
                              mapping_act2v={0: 1, 1: 3}, mapping_act2n={0: 2, 1: 5})
    args.actions = pandas.DataFrame.from_dict({"verb": args.mapping_act2v.values(),
                                               "noun": args.mapping_act2n.values()})
    torch.save({"epoch": 100, "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0}, "best_acc1": 47.3, "args": args}, path)
    return path


def _publisher_outputs(model: nn.Module, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The publisher's tokens after its last block (read with a forward hook, its own forward runs),
    through its ``ln_post``, as a (B, D, T, h, w) map; and what its classifier reads."""
    mean = torch.tensor(MEAN_255).view(1, 3, 1, 1, 1) / 255
    std = torch.tensor(STD_255).view(1, 3, 1, 1, 1) / 255
    captured: dict[str, torch.Tensor] = {}
    handle = model.visual.transformer.register_forward_hook(lambda _m, _i, out: captured.setdefault("tokens", out))
    try:
        with torch.no_grad():
            classifier_input = model.visual((clip - mean) / std)
            tokens = model.visual.ln_post(captured["tokens"].permute(1, 0, 2))  # LND -> NLD
    finally:
        handle.remove()
    batch, _, frames, height, width = clip.shape
    grid = tokens[:, 1:].reshape(batch, frames, height // PATCH, width // PATCH, WIDTH)
    return grid.permute(0, 4, 1, 2, 3), classifier_input


@pytest.mark.parametrize("flash", [True, False], ids=["flash-attn-layout", "torch-layout"])
def test_the_published_checkpoint_converts_loads_strictly_and_gives_the_publishers_features(
        avion, flash: bool, tmp_path: Path) -> None:
    model = _publisher_tiny(avion)
    state = _published_state(avion, model, flash=flash, layers=LAYERS)
    published = _save_published(tmp_path / "avion_finetune_cls_lavila_vitb_best.pt", state)
    clip = torch.rand(2, 3, FRAMES, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    their_map, their_feature = _publisher_outputs(model, clip)

    torch.manual_seed(123)  # featstore's own random init differs: every weight must come from the file
    ours = SpaceTimeViTBackbone(record=TINY_RECORD, in_channels=3, patch=PATCH, width=WIDTH, layers=LAYERS,
                                heads=HEADS, grid=IMAGE // PATCH, frames=FRAMES).eval()
    with pytest.raises(CheckpointError, match="featstore convert-checkpoint"):
        load_backbone_checkpoint(ours, published)  # the pickled Namespace is refused by the safe reader
    converted = tmp_path / "avion_vitb.state_dict.pt"
    conversion = convert_checkpoint(published, converted)
    assert "args" in conversion.dropped and "pandas.DataFrame" in conversion.inert
    report = load_backbone_checkpoint(ours, converted)
    assert set(report.ignored) == {"fc_cls.weight", "fc_cls.bias"}, "the 3806-action classifier is named as ignored"
    assert report.loaded + len(report.ignored) == len(state)
    with torch.no_grad():
        feature_map, global_feature = ours(clip)

    assert feature_map.shape == their_map.shape == (2, WIDTH, FRAMES, IMAGE // PATCH, IMAGE // PATCH)
    scale = max(1.0, float(their_map.abs().max()))
    assert float((feature_map - their_map).abs().max()) <= TOLERANCE * scale
    assert float((global_feature - their_feature).abs().max()) <= TOLERANCE * scale


def test_another_clip_length_resizes_the_temporal_embedding_as_avion_does(avion, tmp_path: Path) -> None:
    """8 frames through weights trained on 4: AVION's resume code resizes the temporal embedding linearly
    (main_lavila_finetune_cls.py, when a checkpoint's clip_length differs); featstore's gives the map of the
    publisher's 8-frame model loaded that way."""
    model = _publisher_tiny(avion)
    path = tmp_path / "converted.pt"
    torch.save(_published_state(avion, model, flash=True, layers=LAYERS), path)
    ours = SpaceTimeViTBackbone(record=TINY_RECORD, in_channels=3, patch=PATCH, width=WIDTH, layers=LAYERS,
                                heads=HEADS, grid=IMAGE // PATCH, frames=FRAMES).eval()
    load_backbone_checkpoint(ours, path)

    state = model.state_dict()
    # The publisher's expression, as its script writes it.
    state["visual.temporal_embedding"] = torch.nn.functional.interpolate(
        state["visual.temporal_embedding"].unsqueeze(0).permute(0, 2, 1), size=(8,), mode="linear",
    ).permute(0, 2, 1).squeeze(0)
    longer = avion.model_clip.VideoClassifier(
        avion.transformer.VisionTransformer(IMAGE, PATCH, WIDTH, LAYERS, HEADS, 4, num_frames=8, output_dim=32),
        dropout=0.5, num_classes=3806).eval()
    longer.load_state_dict(state)
    clip = torch.rand(1, 3, 8, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    their_map, their_feature = _publisher_outputs(longer, clip)
    with torch.no_grad():
        feature_map, global_feature = ours(clip)
    scale = max(1.0, float(their_map.abs().max()))
    assert float((feature_map - their_map).abs().max()) <= TOLERANCE * scale
    assert float((global_feature - their_feature).abs().max()) <= TOLERANCE * scale


def test_frames_of_another_size_get_the_positional_embedding_resized() -> None:
    """Ours (the publisher crops 224 x 224): full 40 x 75 frames give a 5 x 9 grid (the remainder of 75
    dropped, as a stride-8 conv does), the positional embedding resized bicubically to it."""
    ours = SpaceTimeViTBackbone(record=TINY_RECORD, in_channels=3, patch=PATCH, width=WIDTH, layers=LAYERS,
                                heads=HEADS, grid=IMAGE // PATCH, frames=FRAMES).eval()
    embeddings = ours.visual.embeddings(FRAMES, 5, 9)
    grid = ours.visual.positional_embedding[1:].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(5, 9), mode="bicubic", align_corners=False)
    torch.testing.assert_close(embeddings[1:46] - ours.visual.temporal_embedding[0],
                               resized[0].permute(1, 2, 0).reshape(45, WIDTH))
    with torch.no_grad():
        feature_map, global_feature = ours(torch.rand(1, 3, FRAMES, 40, 75))
    assert tuple(feature_map.shape) == (1, WIDTH, FRAMES, 5, 9) and global_feature.shape == (1, WIDTH)
    assert patch_map_size(PATCH)(FRAMES, 40, 75) == (FRAMES, 5, 9)
    assert torch.isfinite(feature_map).all()


@pytest.mark.parametrize(("name", "builder", "layers"), [("avion_vitb", "CLIP_VITB16", 12),
                                                         ("avion_vitl", "CLIP_VITL14", 24)])
def test_the_registered_vits_have_the_publishers_layout(avion, name: str, builder: str, layers: int) -> None:
    """AVION's own builder (CLIP weights stubbed out) and VideoClassifier as the fine-tuning script makes
    them, on the meta device: both layouts' keys and shapes are featstore's, the classifier ignored."""
    with torch.device("meta"):
        clip_model = getattr(avion.model_clip, builder)(num_frames=16, use_flash_attn=False, use_fast_conv1=False,
                                                       use_quick_gelu=True)
        model = avion.model_clip.VideoClassifier(clip_model.visual, dropout=0.5, num_classes=3806)
        ours, record = build_backbone(name)
    expected = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    for flash in (True, False):
        published = _published_state(avion, model, flash=flash, layers=layers)
        state = ours.translate_checkpoint({k.removeprefix("module."): v for k, v in published.items()})
        assert {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc_cls.")} == expected
        assert tuple(state["fc_cls.weight"].shape) == (3806, record.feature_dim)
    patch = record.spatial_stride
    assert backbone_map_shape(record, clip_frames=16, height=224, width=224) == (
        record.feature_dim, 16, 224 // patch, 224 // patch)


def test_the_records_are_the_publishers_epic_input() -> None:
    for record, width, patch in ((AVION_VITB, 768, 16), (AVION_VITL, 1024, 14)):
        assert record.mean == pytest.approx(tuple(m / 255 for m in MEAN_255))
        assert record.std == pytest.approx(tuple(s / 255 for s in STD_255))
        # ek100_cls: 16 segments of the action (get_frame_ids), short side / crop 224.
        assert (record.default_clip_frames, record.clip_sampling, record.default_size) == (16, "segments", 224)
        assert record.global_feature == "class_token"
        assert (record.feature_dim, record.temporal_stride, record.spatial_stride) == (width, 1, patch)
