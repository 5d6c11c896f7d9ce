"""Video Swin Transformer (Liu et al. 2022) as Omnivore (Girdhar et al. 2022) fine-tunes it on EPIC-KITCHENS-100.

Written to load ``swinB_epic_checkpoint.torch`` of facebookresearch/omnivore (``omnivore_swinB_epic``)
without renaming. That file is ``{'trunk': ..., 'heads': ...}``; `featstore.models.read_state_dict`
reads it as one state dict with the part names as prefixes, which are this module's attributes:

- ``trunk.patch_embed.{proj,norm}``: a Conv3d whose kernel and stride are the 2x4x4 patch, then a
  LayerNorm over its 128 channels (``patch_norm``);
- ``trunk.layers.{s}.blocks.{b}``: ``norm1``, ``attn.qkv``, ``attn.proj``,
  ``attn.relative_position_bias_table`` ((2Wd-1)(2Wh-1)(2Ww-1), heads) and the integer
  ``attn.relative_position_index`` (a buffer the file keeps), ``norm2``, ``mlp.fc1``, ``mlp.fc2``;
  depths 2-2-18-2, heads 4-8-16-32, window 16x7x7, every second block's windows shifted by half;
- ``trunk.layers.{s}.downsample.{norm,reduction}`` (s < 3): patch merging, 2x2 neighbours -> 2C;
- ``trunk.norm``: the LayerNorm the publisher applies to the last stage before its mean;
- ``heads.1.{weight,bias}``: Dropout + Linear(1024, 3806 EPIC-100 actions); ignored by featstore.

What the publisher's code does and this module does too, so the maps agree:

- the input is padded at the end of T, H, W to multiples of the patch, each stage's tokens to
  multiples of its window (the padding tokens take part in attention; the shift mask is -100, not
  -inf), and patch merging pads odd H, W;
- a window larger than the token grid shrinks to it and then does not shift; the relative position
  bias of a shrunk window of N tokens is read through the first N rows and columns of the full
  window's index (not the smaller window's own index: the weights were trained so);
- the map is the last stage after ``norm``: (1024, ceil(T/2), ceil(H/32), ceil(W/32)); the global
  feature is its mean, which is what ``SwinTransformer3D.forward`` returns and the head reads.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient kernels
on CUDA) with the bias and the shift mask as an additive mask.

Input, as the publisher's EPIC inference example (``inference_tutorial.ipynb``) prepares it: 32
frames at sampling rate 2 of 30 fps video (here stride 4 of EPIC's 60 fps: the same 2.1 s), short side
224, RGB in [0, 1] with ImageNet mean / std. The Omnivore weights are CC BY-NC 4.0.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featstore.models.backbones import BackboneRecord, VideoBackbone, register_backbone

Triple = tuple[int, int, int]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SHIFT_MASK = -100.0  # the publisher's value for pairs of tokens from different shifted regions


def relative_position_index(window: Triple) -> Tensor:
    """Index of each token pair's relative offset into the bias table of a window.

    Args:
        window: (Wd, Wh, Ww).

    Returns:
        (N, N) int64, N = Wd * Wh * Ww; offsets (dd, dh, dw) in row-major order of
        (2Wd - 1, 2Wh - 1, 2Ww - 1).
    """
    grid = torch.stack(torch.meshgrid(*(torch.arange(size) for size in window), indexing="ij")).flatten(1)  # (3, N)
    offsets = grid[:, :, None] - grid[:, None, :]  # (3, N, N)
    spans = [2 * size - 1 for size in window]
    index = torch.zeros(offsets.shape[1:], dtype=torch.long)
    for axis, size in enumerate(window):
        index = index * spans[axis] + offsets[axis] + (size - 1)
    return index


def effective_window(grid: Triple, window: Triple, shift: Triple) -> tuple[Triple, Triple]:
    """The window and shift a stage uses on a token grid: a window no smaller than the grid along an
    axis becomes the grid there, and does not shift along it (the publisher's ``get_window_size``)."""
    used_window = tuple(min(size, limit) for size, limit in zip(grid, window))
    used_shift = tuple(0 if size <= limit else step for size, limit, step in zip(grid, window, shift))
    return used_window, used_shift  # type: ignore[return-value]


def partition_windows(x: Tensor, window: Triple) -> Tensor:
    """Args: x (B, D, H, W, C), each of D, H, W a multiple of the window. Returns: (B, nW, N, C)."""
    batch, depth, height, width, channels = x.shape
    wd, wh, ww = window
    x = x.view(batch, depth // wd, wd, height // wh, wh, width // ww, ww, channels)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, -1, wd * wh * ww, channels)


def merge_windows(windows: Tensor, window: Triple, grid: Triple) -> Tensor:
    """Inverse of `partition_windows`. Args: windows (B, nW, N, C); grid (D, H, W). Returns: (B, D, H, W, C)."""
    batch, _, _, channels = windows.shape
    (wd, wh, ww), (depth, height, width) = window, grid
    x = windows.view(batch, depth // wd, height // wh, width // ww, wd, wh, ww, channels)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, depth, height, width, channels)


def shift_mask(grid: Triple, window: Triple, shift: Triple, device: torch.device) -> Tensor:
    """Additive mask of shifted windows: token pairs from different regions of the rolled grid.

    Along each axis with a shift s the rolled grid has three regions ([0, P - W), [P - W, P - s),
    [P - s, P)); along an axis without shift, one.

    Args:
        grid: padded (D, H, W), multiples of the window.
        window: (Wd, Wh, Ww) in use.
        shift: (sd, sh, sw) in use.
        device: where to build it.

    Returns:
        (nW, N, N) float: 0 within a region, `SHIFT_MASK` across regions.
    """
    labels = torch.zeros(grid, device=device)
    for axis, (size, win, step) in enumerate(zip(grid, window, shift)):
        region = torch.zeros(size, device=device)
        if step > 0:
            region[size - win:size - step] = 1
            region[size - step:] = 2
        shape = [1, 1, 1]
        shape[axis] = size
        labels = labels * 3 + region.view(shape)
    regions = partition_windows(labels[None, ..., None], window)[0, :, :, 0]  # (nW, N)
    different = regions[:, None, :] != regions[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK)


class _SwinWindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a learnt bias per relative offset and head.

    Args:
        dim: channels.
        heads: attention heads.
        window: the configured (Wd, Wh, Ww) (sets the bias table and index).
    """

    def __init__(self, dim: int, heads: int, window: Triple) -> None:
        super().__init__()
        self.heads = heads
        table_size = math.prod(2 * size - 1 for size in window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))  # saved in the file
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, windows: Tensor, mask: Tensor | None) -> Tensor:
        """Args: windows (B, nW, N, C); mask (nW, N, N) additive, or None. Returns: (B, nW, N, C)."""
        batch, count, tokens, channels = windows.shape
        head_dim = channels // self.heads
        qkv = self.qkv(windows).view(batch, count, tokens, 3, self.heads, head_dim)
        query, key, value = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, d)
        index = self.relative_position_index[:tokens, :tokens].reshape(-1)
        bias = self.relative_position_bias_table[index].view(tokens, tokens, self.heads).permute(2, 0, 1)
        if mask is None:
            # (B * nW, heads, N, d); the bias broadcasts over windows
            out = F.scaled_dot_product_attention(
                query.reshape(-1, self.heads, tokens, head_dim), key.reshape(-1, self.heads, tokens, head_dim),
                value.reshape(-1, self.heads, tokens, head_dim), attn_mask=bias.unsqueeze(0).to(query.dtype))
        else:
            # Windows folded into the heads, so the (nW * heads, N, N) mask broadcasts over the batch.
            additive = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, count * self.heads, tokens, tokens)
            out = F.scaled_dot_product_attention(
                query.reshape(batch, -1, tokens, head_dim), key.reshape(batch, -1, tokens, head_dim),
                value.reshape(batch, -1, tokens, head_dim), attn_mask=additive.to(query.dtype))
        out = out.view(batch, count, self.heads, tokens, head_dim).transpose(2, 3)  # (B, nW, N, heads, d)
        out = out.reshape(batch, count, tokens, channels)
        return self.proj(out)


class _SwinMlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwinBlock(nn.Module):
    """Pre-norm window attention and MLP, each residual; ``shifted`` blocks roll the grid by half a window."""

    def __init__(self, dim: int, heads: int, window: Triple, mlp_ratio: float, shifted: bool) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SwinWindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _SwinMlp(dim, int(dim * mlp_ratio))

    def attend(self, x: Tensor, window: Triple, shift: Triple, mask: Tensor | None) -> Tensor:
        """Window attention over the grid. Args: x (B, D, H, W, C) normalised. Returns: the same shape."""
        _, depth, height, width, _ = x.shape
        pads = [(-size) % win for size, win in zip((depth, height, width), window)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        grid = tuple(x.shape[1:4])
        rolled = any(step > 0 for step in shift)
        if rolled:
            x = torch.roll(x, shifts=tuple(-step for step in shift), dims=(1, 2, 3))
        windows = self.attn(partition_windows(x, window), mask if rolled else None)
        x = merge_windows(windows, window, grid)  # type: ignore[arg-type]
        if rolled:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :depth, :height, :width]

    def forward(self, x: Tensor, window: Triple, shift: Triple, mask: Tensor | None) -> Tensor:
        """Args: x (B, D, H, W, C); window / shift in use (unshifted blocks ignore the shift). Returns: same shape."""
        x = x + self.attend(self.norm1(x), window, shift if self.shifted else (0, 0, 0), mask)
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    """Each 2x2 spatial neighbourhood's 4C channels, normalised, projected to 2C (``norm``, ``reduction``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, D, H, W, C). Returns: (B, D, ceil(H/2), ceil(W/2), 2C)."""
        height, width = x.shape[2:4]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # The publisher's order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class _SwinStage(nn.Module):
    """``blocks`` at one resolution, alternately unshifted and shifted, then ``downsample`` (but the last)."""

    def __init__(self, dim: int, depth: int, heads: int, window: Triple, mlp_ratio: float, downsample: bool) -> None:
        super().__init__()
        self.window = window
        self.shift = tuple(size // 2 for size in window)
        self.blocks = nn.ModuleList(
            _SwinBlock(dim, heads, window, mlp_ratio, shifted=index % 2 == 1) for index in range(depth))
        self.downsample = _PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, D, H, W, C). Returns: (B, D, H', W', C') (halved H, W and doubled C but after the last)."""
        grid = tuple(x.shape[1:4])
        window, shift = effective_window(grid, self.window, self.shift)  # type: ignore[arg-type]
        mask = None
        if any(step > 0 for step in shift):
            padded = tuple(size + (-size) % win for size, win in zip(grid, window))
            mask = shift_mask(padded, window, shift, x.device)  # type: ignore[arg-type]
        for block in self.blocks:
            x = block(x, window, shift, mask)
        return self.downsample(x) if self.downsample is not None else x


class _PatchEmbed3D(nn.Module):
    """``proj``: a Conv3d with kernel = stride = patch (the input padded at the end to a multiple of it); ``norm``."""

    def __init__(self, in_channels: int, dim: int, patch: Triple) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W). Returns: (B, T/pt, H/ph, W/pw, C), channels last, rounded up."""
        pads = [(-size) % step for size, step in zip(clip.shape[2:], self.patch)]
        clip = F.pad(clip, (0, pads[2], 0, pads[1], 0, pads[0]))
        return self.norm(self.proj(clip).permute(0, 2, 3, 4, 1))


class _SwinTrunk(nn.Module):
    """The Swin trunk: ``patch_embed``, ``layers`` (stages), ``norm`` (keys of omnivision's SwinTransformer3D)."""

    def __init__(self, *, in_channels: int, patch: Triple, dim: int, depths: Sequence[int], heads: Sequence[int],
                 window: Triple, mlp_ratio: float) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed3D(in_channels, dim, patch)
        self.layers = nn.ModuleList(
            _SwinStage(dim * 2 ** index, depth, heads[index], window, mlp_ratio, downsample=index < len(depths) - 1)
            for index, depth in enumerate(depths))
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))

    def forward(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised. Returns: (B, C, T', H', W'): the normalised last stage."""
        x = self.patch_embed(clip)  # (B, T/2, H/4, W/4, C0)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).permute(0, 4, 1, 2, 3)


class Swin3DBackbone(VideoBackbone):
    """Video Swin trunk under ``trunk``, loading Omnivore's checkpoints; the map is the normalised last stage.

    Args:
        record: registry record (its feature_dim must be ``dim * 2 ** (len(depths) - 1)``).
        in_channels: 3 (RGB) or 2 per stacked flow frame (no public flow weights: random until loaded).
        patch: (pt, ph, pw) patch of the embedding.
        dim: channels of the first stage.
        depths: blocks per stage.
        heads: attention heads per stage.
        window: (Wd, Wh, Ww) attention window, in tokens.
        mlp_ratio: MLP hidden width / channels.
    """

    classifier_prefixes = ("heads.",)

    def __init__(self, *, record: BackboneRecord, in_channels: int, patch: Triple = (2, 4, 4), dim: int = 128,
                 depths: Sequence[int] = (2, 2, 18, 2), heads: Sequence[int] = (4, 8, 16, 32),
                 window: Triple = (16, 7, 7), mlp_ratio: float = 4.0) -> None:
        super().__init__(record=record, in_channels=in_channels)
        if len(heads) != len(depths):
            raise ValueError(f"one head count per stage: {len(depths)} stages, {len(heads)} head counts")
        if record.feature_dim != dim * 2 ** (len(depths) - 1):
            raise ValueError(f"{record.name}: feature_dim {record.feature_dim} is not {dim} x 2^{len(depths) - 1}")
        self.trunk = _SwinTrunk(in_channels=in_channels, patch=patch, dim=dim, depths=depths, heads=heads,
                                window=window, mlp_ratio=mlp_ratio)
        # The publisher's initialisation (its weights replace it): truncated normal 0.02 for linear
        # layers and the bias tables, zero biases, unit LayerNorms; PyTorch's default for the patch conv.
        for name, parameter in self.trunk.named_parameters():
            if name.endswith("relative_position_bias_table") or (name.endswith("weight") and parameter.dim() == 2):
                nn.init.trunc_normal_(parameter, std=0.02)
            elif name.endswith("bias") and parameter.dim() == 1 and "patch_embed.proj" not in name:
                nn.init.zeros_(parameter)

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised. Returns: (B, C, ceil(T/pt), ceil(H/32), ceil(W/32))."""
        return self.trunk(clip)


def swin_map_size(patch: Triple, stages: int) -> Callable[[int, int, int], tuple[int, int, int]]:
    """The map-size rule of a Swin trunk: the patch embedding rounds up (it pads), each patch merging
    halves H and W rounding up (it pads odd sizes).

    Args:
        patch: (pt, ph, pw).
        stages: number of stages (``stages - 1`` merges).

    Returns:
        ``(frames, height, width) -> (T', H', W')``.
    """

    def map_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
        def spatial(size: int, step: int) -> int:
            size = -(-size // step)
            for _ in range(stages - 1):
                size = -(-size // 2)
            return size

        return -(-frames // patch[0]), spatial(height, patch[1]), spatial(width, patch[2])

    return map_size


OMNIVORE_SWINB_EPIC = BackboneRecord(
    name="omnivore_swinb_epic",
    feature_dim=1024,
    temporal_stride=2,
    spatial_stride=32,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    default_clip_frames=32,
    default_clip_stride=4,
    default_size=224,
    description="Omnivore Swin-B fine-tuned on EPIC-100 (swinB_epic_checkpoint.torch layout), normalised stage-4 map",
)


@register_backbone(OMNIVORE_SWINB_EPIC, map_size=swin_map_size((2, 4, 4), 4))
def omnivore_swinb_epic(*, in_channels: int = 3) -> Swin3DBackbone:
    """Omnivore's Swin-B (patch 2x4x4, 128 channels, depths 2-2-18-2, heads 4-8-16-32, window 16x7x7).
    Args: in_channels: 3 RGB / 2 flow (random weights)."""
    return Swin3DBackbone(record=OMNIVORE_SWINB_EPIC, in_channels=in_channels)
