"""SlowFast R50 8x8 (Feichtenhofer et al. 2019) as the EPIC-KITCHENS-100 release trains it.

Written to load ``SlowFast.pyth`` of epic-kitchens/epic-kitchens-slowfast (PySlowFast,
``configs/EPIC-KITCHENS/SLOWFAST_8x8_R50.yaml``) without renaming. That file is
``{'epoch', 'model_state', 'optimizer_state', 'cfg'}`` and its keys are PySlowFast's:

- ``s1.pathway{0,1}_stem.{conv,bn}``: slow stem 1x7x7 -> 64, fast stem 5x7x7 -> 8 (beta = 1/8),
  spatial stride 2 and a 1x3x3 max pool;
- ``s{1..4}_fuse.{conv_f2s,bn}``: fast -> slow lateral connections, a 7x1x1 conv with temporal stride
  alpha = 4 and twice the fast channels, concatenated to the slow pathway;
- ``s{2..5}.pathway{p}_res{i}``: ResNet-50 bottlenecks 3-4-6-3 with ``branch1`` / ``branch1_bn``
  (projection shortcut) and ``branch2.{a,a_bn,b,b_bn,c,c_bn}`` (Tx1x1 -> 1x3x3 carrying the stride ->
  1x1x1); temporal kernels: slow 1, 1, 3, 3 and fast 3 in s2-s5;
- ``head.projection_verb`` (97 x 2304) / ``head.projection_noun`` (300 x 2304): EPIC-100 classifiers,
  ignored by featstore.

The fast pathway takes the clip as given (32 frames at stride 2 of 60 fps video); the slow pathway takes
``clip[:, :, linspace(0, T - 1, T // alpha).long()]``, as PySlowFast's ``pack_pathway_output`` does (for
T = 32 that is frames 0, 4, 8, 13, 17, 22, 26, 31: nearly every 4th). Input: RGB in [0, 1], mean 0.45,
std 0.225 (PySlowFast ``DATA.MEAN`` / ``DATA.STD``).

The stored map is s5 of both pathways at the slow frame rate: the slow map (2048, T/4, H/32, W/32) and
the fast map (256, T, H/32, W/32) averaged over each 4 consecutive frames, concatenated on channels
(slow first, as the head concatenates them): (2304, T/4, H/32, W/32).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featstore.models.backbones import (
    BackboneRecord,
    VideoBackbone,
    conv_out,
    register_backbone,
)

ALPHA = 4  # fast / slow frame-rate ratio
BETA_INV = 8  # slow / fast channel ratio
FUSION_CHANNEL_RATIO = 2
FUSION_KERNEL = 7
# (blocks, inner width of the slow pathway, temporal kernel slow, temporal kernel fast, spatial stride)
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 64, 1, 3, 1),  # s2
    (4, 128, 1, 3, 2),  # s3
    (6, 256, 3, 3, 2),  # s4
    (3, 512, 3, 3, 2),  # s5
)


class _Stem(nn.Module):
    """``conv`` (Tx7x7, stride 1x2x2) + ``bn`` + ReLU + 1x3x3 max pool, stride 1x2x2."""

    def __init__(self, in_channels: int, out_channels: int, temporal_kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (temporal_kernel, 7, 7), stride=(1, 2, 2),
                              padding=(temporal_kernel // 2, 3, 3), bias=False)
        self.bn = nn.BatchNorm3d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, Cin, T, H, W). Returns: (B, Cout, T, H/4, W/4)."""
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        return F.max_pool3d(x, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))


class _StemPair(nn.Module):
    """PySlowFast's ``VideoModelStem``: one `_Stem` per pathway (``pathway0_stem``, ``pathway1_stem``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.pathway0_stem = _Stem(in_channels, 64, 1)
        self.pathway1_stem = _Stem(in_channels, 64 // BETA_INV, 5)

    def forward(self, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
        return self.pathway0_stem(slow), self.pathway1_stem(fast)


class _FuseFastToSlow(nn.Module):
    """Lateral connection: ``conv_f2s`` (7x1x1, temporal stride alpha) + ``bn`` + ReLU on the fast
    pathway, concatenated to the slow pathway's channels."""

    def __init__(self, fast_channels: int) -> None:
        super().__init__()
        self.conv_f2s = nn.Conv3d(fast_channels, fast_channels * FUSION_CHANNEL_RATIO, (FUSION_KERNEL, 1, 1),
                                  stride=(ALPHA, 1, 1), padding=(FUSION_KERNEL // 2, 0, 0), bias=False)
        self.bn = nn.BatchNorm3d(fast_channels * FUSION_CHANNEL_RATIO)

    def forward(self, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
        fuse = F.relu(self.bn(self.conv_f2s(fast)), inplace=True)  # (B, 2 Cf, T/alpha, H, W)
        return torch.cat([slow, fuse], dim=1), fast


class _BottleneckTransform(nn.Module):
    """``a`` (Tx1x1) -> ``b`` (1x3x3, strided) -> ``c`` (1x1x1), each with its BatchNorm."""

    def __init__(self, dim_in: int, dim_out: int, dim_inner: int, temporal_kernel: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv3d(dim_in, dim_inner, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0),
                           bias=False)
        self.a_bn = nn.BatchNorm3d(dim_inner)
        self.b = nn.Conv3d(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                           bias=False)
        self.b_bn = nn.BatchNorm3d(dim_inner)
        self.c = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.c_bn = nn.BatchNorm3d(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.a_bn(self.a(x)), inplace=True)
        x = F.relu(self.b_bn(self.b(x)), inplace=True)
        return self.c_bn(self.c(x))


class _ResBlock(nn.Module):
    """Bottleneck residual block; ``branch1`` / ``branch1_bn`` project the shortcut when shapes change."""

    def __init__(self, dim_in: int, dim_out: int, dim_inner: int, temporal_kernel: int, stride: int) -> None:
        super().__init__()
        if dim_in != dim_out or stride != 1:
            self.branch1 = nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False)
            self.branch1_bn = nn.BatchNorm3d(dim_out)
        self.branch2 = _BottleneckTransform(dim_in, dim_out, dim_inner, temporal_kernel, stride)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.branch1_bn(self.branch1(x)) if hasattr(self, "branch1") else x
        return F.relu(shortcut + self.branch2(x), inplace=True)


class _ResStage(nn.Module):
    """One stage of both pathways: blocks ``pathway{p}_res{i}``."""

    def __init__(self, dims_in: Sequence[int], dims_out: Sequence[int], dims_inner: Sequence[int],
                 temporal_kernels: Sequence[int], blocks: int, stride: int) -> None:
        super().__init__()
        self.blocks = blocks
        for pathway in range(2):
            for index in range(blocks):
                self.add_module(f"pathway{pathway}_res{index}", _ResBlock(
                    dims_in[pathway] if index == 0 else dims_out[pathway], dims_out[pathway], dims_inner[pathway],
                    temporal_kernels[pathway], stride if index == 0 else 1))

    def forward(self, slow: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
        for index in range(self.blocks):
            slow = getattr(self, f"pathway0_res{index}")(slow)
            fast = getattr(self, f"pathway1_res{index}")(fast)
        return slow, fast


def slow_frame_indices(clip_frames: int) -> Tensor:
    """Indices of the fast clip's frames the slow pathway takes (PySlowFast ``pack_pathway_output``).

    Args:
        clip_frames: T of the fast clip.

    Returns:
        (T // alpha,) int64 indices ``linspace(0, T - 1, T // alpha)`` truncated, as PySlowFast does.
    """
    return torch.linspace(0, clip_frames - 1, clip_frames // ALPHA).long()


class SlowFastBackbone(VideoBackbone):
    """SlowFast R50 up to s5, with PySlowFast state-dict keys; the map joins both pathways.

    Args:
        record: registry record.
        in_channels: 3 (RGB) or 2 (flow; no public weights, random until a checkpoint is loaded).
    """

    classifier_prefixes = ("head.",)

    def __init__(self, *, record: BackboneRecord, in_channels: int) -> None:
        super().__init__(record=record, in_channels=in_channels)
        self.s1 = _StemPair(in_channels)
        slow_in, fast = 64, 64 // BETA_INV
        self.s1_fuse = _FuseFastToSlow(fast)
        slow_in += fast * FUSION_CHANNEL_RATIO
        for index, (blocks, inner, kernel_slow, kernel_fast, stride) in enumerate(_STAGES):
            slow_out = inner * 4
            fast_out = slow_out // BETA_INV
            self.add_module(f"s{index + 2}", _ResStage(
                (slow_in, fast), (slow_out, fast_out), (inner, inner // BETA_INV), (kernel_slow, kernel_fast),
                blocks, stride))
            if index < len(_STAGES) - 1:
                self.add_module(f"s{index + 2}_fuse", _FuseFastToSlow(fast_out))
            slow_in, fast = slow_out + fast_out * FUSION_CHANNEL_RATIO, fast_out
        # PySlowFast's initialisation: MSRA fill for convs, BatchNorm 1 / 0 (the final BN of each
        # block is zero-initialised, ZERO_INIT_FINAL_BN).
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.constant_(module.weight, 0.0 if name.endswith("branch2.c_bn") else 1.0)
                nn.init.zeros_(module.bias)

    def pathways(self, clip: Tensor) -> tuple[Tensor, Tensor]:
        """Both pathways' s5 maps.

        Args:
            clip: (B, Cin, T, H, W) normalised, T a multiple of alpha (4).

        Returns:
            ``(slow, fast)``: (B, 2048, T/4, H/32, W/32) and (B, 256, T, H/32, W/32).
        """
        frames = clip.shape[2]
        if frames < ALPHA or frames % ALPHA:
            raise ValueError(f"{self.record.name} needs clips of a multiple of {ALPHA} frames, got {frames}")
        slow = clip.index_select(2, slow_frame_indices(frames).to(clip.device))  # (B, C, T/4, H, W)
        slow, fast = self.s1(slow, clip)
        slow, fast = self.s1_fuse(slow, fast)
        for stage in range(2, 6):
            slow, fast = getattr(self, f"s{stage}")(slow, fast)
            if stage < 5:
                slow, fast = getattr(self, f"s{stage}_fuse")(slow, fast)
        return slow, fast

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised. Returns: (B, 2304, T/4, H/32, W/32): slow s5 and fast
        s5 averaged over each 4 frames."""
        slow, fast = self.pathways(clip)
        fast = F.avg_pool3d(fast, kernel_size=(ALPHA, 1, 1), stride=(ALPHA, 1, 1))  # (B, 256, T/4, h, w)
        return torch.cat([slow, fast], dim=1)


def _slowfast_map_size(clip_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Stem conv (7x7, stride 2, padding 3) and pool (3x3, stride 2, padding 1) quarter H, W; s3-s5
    halve them (1x3x3 stride-2 conv, padding 1; the 1x1x1 shortcut agrees); time: T / alpha."""
    if clip_frames % ALPHA:
        raise ValueError(f"slowfast_r50 needs clips of a multiple of {ALPHA} frames, got {clip_frames}")

    def spatial(size: int) -> int:
        size = conv_out(conv_out(size, 7, 2, 3), 3, 2, 1)
        for _ in range(3):
            size = conv_out(size, 3, 2, 1)
        return size

    return clip_frames // ALPHA, spatial(height), spatial(width)


SLOWFAST_R50 = BackboneRecord(
    name="slowfast_r50",
    feature_dim=2048 + 256,
    temporal_stride=ALPHA,
    spatial_stride=32,
    mean=(0.45, 0.45, 0.45),
    std=(0.225, 0.225, 0.225),
    # SLOWFAST_8x8_R50.yaml: DATA.NUM_FRAMES 32, SAMPLING_RATE 2 (of 60 fps video), TEST_CROP_SIZE 256.
    default_clip_frames=32,
    default_clip_stride=2,
    default_size=256,
    description="SlowFast R50 8x8 (EPIC-100 epic-kitchens-slowfast SlowFast.pyth layout), slow s5 + fast s5 map",
)


@register_backbone(SLOWFAST_R50, map_size=_slowfast_map_size)
def slowfast_r50(*, in_channels: int = 3) -> SlowFastBackbone:
    """SlowFast R50 8x8 trunk; loads EPIC-100 ``SlowFast.pyth``. Args: in_channels: 3 RGB / 2 flow."""
    return SlowFastBackbone(record=SLOWFAST_R50, in_channels=in_channels)
