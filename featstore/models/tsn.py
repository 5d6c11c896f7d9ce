"""TSN and TSM ResNet-50 (segment-based 2D networks) as the EPIC-KITCHENS-100 release trains them.

Written to load the Lightning ``.ckpt`` files of epic-kitchens/C1-Action-Recognition-TSN-TRN-TSM
(``tsn_rgb.ckpt``, ``tsn_flow.ckpt``, ``tsm_rgb.ckpt``, ``tsm_flow.ckpt``) without renaming. Their
``state_dict`` holds the LightningModule's ``model`` (``src/models/tsn.py`` / ``tsm.py``), so keys are
``model.base_model.<torchvision resnet50 key>`` and ``model.new_fc.{weight,bias}`` (397 = 97 verbs +
300 nouns, x 2048; ignored by featstore). TSM wraps the first conv of every bottleneck in a temporal
shift (``make_temporal_shift``, place ``blockres``, 8 segments, shift_div 8): its weight is stored as
``...layerN.M.conv1.net.weight``. After ``featstore convert-checkpoint`` the EPIC-55 action-models
ResNet-50 TSN / TSM files (``base_model.*``, verb / noun heads ``fc_verb`` / ``fc_noun``) load too.

The network runs on each clip sample (a segment's frame, or for flow its 5 stacked (u, v) pairs: 10
channels, ``[u1, v1, u2, v2, ...]``) independently, except TSM's shift, which moves 1/8 of the channels
one sample forward and 1/8 one sample back along the clip. The map is layer4 per sample, stacked over
the samples: (2048, T, H/32, W/32), T = 8 segments by default.

Normalisation, as the repository's configs give it: RGB in [0, 1] with ImageNet mean / std; flow in
[0, 1] with mean 0.5 and std 0.226 (``configs/tsn_flow.yaml``: "mean of imagenet std").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet50

from featstore.models.backbones import (
    SEGMENTS,
    BackboneRecord,
    VideoBackbone,
    conv_out,
    register_backbone,
)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
EPIC_FLOW_STD = 0.226  # C1-Action-Recognition-TSN-TRN-TSM configs/*_flow.yaml
SHIFT_DIV = 8


def temporal_shift(x: Tensor, samples: int, shift_div: int = SHIFT_DIV) -> Tensor:
    """TSM's shift: 1/shift_div of the channels come from the next sample, 1/shift_div from the previous.

    Args:
        x: (B * samples, C, H, W), samples of one clip consecutive.
        samples: clip samples per batch element.
        shift_div: 1 / fraction of channels shifted each way.

    Returns:
        (B * samples, C, H, W); the shifted-in channels of the first / last sample are zero.
    """
    batch_samples, channels, height, width = x.shape
    x = x.view(batch_samples // samples, samples, channels, height, width)
    fold = channels // shift_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]  # from the next sample
    out[:, 1:, fold:2 * fold] = x[:, :-1, fold:2 * fold]  # from the previous sample
    out[:, :, 2 * fold:] = x[:, :, 2 * fold:]
    return out.view(batch_samples, channels, height, width)


class TemporalShift(nn.Module):
    """Shift, then ``net`` (the wrapped conv, hence the ``conv1.net.weight`` keys).

    Args:
        net: the convolution to run after the shift.
        shift_div: 1 / fraction of channels shifted each way.
    """

    def __init__(self, net: nn.Module, shift_div: int = SHIFT_DIV) -> None:
        super().__init__()
        self.net = net
        self.shift_div = shift_div
        self.samples = 1  # set by TSMBackbone.forward_map for each clip

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B * samples, C, H, W). Returns: net of the shifted input."""
        return self.net(temporal_shift(x, self.samples, self.shift_div))


class TSNBackbone(VideoBackbone):
    """torchvision ResNet-50 up to layer4 under ``base_model``, run on every clip sample.

    Args:
        record: registry record.
        in_channels: 3 (RGB) or 2 x N for N stacked flow frames (10 for the EPIC flow models).
    """

    classifier_prefixes = ("new_fc.", "fc_verb.", "fc_noun.")
    checkpoint_prefixes = ("model.",)  # the C1 LightningModule keeps the network as `self.model`

    def __init__(self, *, record: BackboneRecord, in_channels: int) -> None:
        super().__init__(record=record, in_channels=in_channels)
        base_model = resnet50(weights=None)
        base_model.fc = nn.Identity()  # TSN replaces it by dropout; featstore never runs it
        if in_channels != 3:
            # As TSN's _construct_flow_model: a conv1 for the stacked channels (random until loaded).
            base_model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(base_model.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.base_model = base_model

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised, T clip samples.

        Returns:
            layer4 of every sample, (B, 2048, T, H/32, W/32).
        """
        batch, channels, samples, height, width = clip.shape
        x = clip.permute(0, 2, 1, 3, 4).reshape(batch * samples, channels, height, width)  # (B*T, Cin, H, W)
        net = self.base_model
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))  # (B*T, 64, H/4, W/4)
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))  # (B*T, 2048, H/32, W/32)
        x = x.view(batch, samples, *x.shape[1:])
        return x.permute(0, 2, 1, 3, 4)  # (B, 2048, T, H/32, W/32)


class TSMBackbone(TSNBackbone):
    """TSN's ResNet-50 with a temporal shift before the first conv of every bottleneck ("blockres")."""

    def __init__(self, *, record: BackboneRecord, in_channels: int) -> None:
        super().__init__(record=record, in_channels=in_channels)
        self.shifts: list[TemporalShift] = []
        for layer in (self.base_model.layer1, self.base_model.layer2, self.base_model.layer3, self.base_model.layer4):
            for block in layer:
                block.conv1 = TemporalShift(block.conv1)
                self.shifts.append(block.conv1)

    def forward_map(self, clip: Tensor) -> Tensor:
        """As `TSNBackbone.forward_map`; the shift runs along the clip's T samples (8 in training)."""
        for shift in self.shifts:
            shift.samples = clip.shape[2]
        return super().forward_map(clip)


def _resnet50_map_size(clip_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Per sample: conv1 (7x7, stride 2, padding 3), max pool (3x3, stride 2, padding 1), layer2-4
    each a stride-2 3x3 conv (padding 1; the 1x1 shortcut agrees). T is the number of samples."""

    def spatial(size: int) -> int:
        size = conv_out(conv_out(size, 7, 2, 3), 3, 2, 1)
        for _ in range(3):
            size = conv_out(size, 3, 2, 1)
        return size

    return clip_frames, spatial(height), spatial(width)


def _epic_segment_record(name: str, description: str) -> BackboneRecord:
    return BackboneRecord(
        name=name,
        feature_dim=2048,
        temporal_stride=1,
        spatial_stride=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        # configs/ts{n,m}_{rgb,flow}.yaml: 8 segments (frame_count), test frames rescaled to 256 (then
        # a 224 centre crop there; no crop here). For flow, 5 consecutive (u, v) pairs per segment:
        # EPIC flow runs at half the RGB rate, so consecutive flow frames are 2 RGB frames apart.
        default_clip_frames=8,
        default_clip_stride=2,
        default_size=256,
        description=description,
        clip_sampling=SEGMENTS,
        flow_snippet_frames=5,
        flow_mean=0.5,
        flow_std=EPIC_FLOW_STD,
    )


TSN_R50 = _epic_segment_record(
    "tsn_r50", "TSN ResNet-50 (EPIC-100 C1 tsn_{rgb,flow}.ckpt layout), layer4 per segment, 8 segments")
TSM_R50 = _epic_segment_record(
    "tsm_r50", "TSM ResNet-50, shift 1/8 (EPIC-100 C1 tsm_{rgb,flow}.ckpt layout), layer4 per segment, 8 segments")


@register_backbone(TSN_R50, map_size=_resnet50_map_size)
def tsn_r50(*, in_channels: int = 3) -> TSNBackbone:
    """EPIC-100 TSN ResNet-50. Args: in_channels: 3 RGB / 10 flow (5 stacked (u, v) pairs)."""
    return TSNBackbone(record=TSN_R50, in_channels=in_channels)


@register_backbone(TSM_R50, map_size=_resnet50_map_size)
def tsm_r50(*, in_channels: int = 3) -> TSMBackbone:
    """EPIC-100 TSM ResNet-50. Args: in_channels: 3 RGB / 10 flow (5 stacked (u, v) pairs)."""
    return TSMBackbone(record=TSM_R50, in_channels=in_channels)
