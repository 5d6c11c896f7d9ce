"""AVION's video ViT-B/16 and ViT-L/14 (Zhao & Krähenbühl 2023) as fine-tuned on EPIC-KITCHENS-100.

Written to load the EK-100 action-recognition checkpoints of zhaoyue-zephyrus/AVION
(``avion_finetune_cls_lavila_vit{b,l}_best.pt``, docs/MODEL_ZOO.md). Such a file is ``{'epoch',
'state_dict', 'optimizer', 'scaler', 'best_acc1', 'args'}``, ``args`` a pickled ``argparse.Namespace``:
featstore's safe reader refuses it and names ``featstore convert-checkpoint``, whose allow-listed
unpickler keeps the state dict. Its keys are AVION's ``VideoClassifier`` under DistributedDataParallel:

- ``module.visual.*``: the ``VisionTransformer`` (open_clip's ViT with one temporal embedding per frame):
  ``conv1`` (patch embedding, no bias), ``class_embedding``, ``positional_embedding`` (a 224 / p grid
  plus the class token), ``temporal_embedding`` (16 frames), ``ln_pre``,
  ``transformer.resblocks.{i}.{ln_1, attn, ln_2, mlp}``, ``ln_post``;
- ``module.fc_cls.{weight,bias}``: 3806 EPIC-100 actions; ignored by featstore.

The published files come from runs with ``--use-fast-conv1 --use-flash-attn`` (MODEL_ZOO.md), so
``conv1`` is a Linear over (C, p, p)-flattened patches and the blocks keep flash-attn's names
(``attn.Wqkv``, ``attn.out_proj``, ``mlp.fc1``, ``mlp.fc2``); those are this module's keys. A run
without those flags saves torch's names (``conv1`` a Conv2d, ``attn.in_proj_weight`` / ``_bias``,
``mlp.c_fc``, ``mlp.c_proj``): `SpaceTimeViTBackbone.translate_checkpoint` renames them one to one.

What the publisher's model computes, and this module too: every frame's patches (a p x p conv with
stride p) plus the class token, the positional embedding of the patch's place plus the temporal
embedding of its frame (the class token: its own positional embedding only), ``ln_pre``, joint
space-time attention over all T x H/p x W/p + 1 tokens in pre-norm blocks (GELU MLP; LayerNorm eps
1e-6), then ``ln_post`` of the class token: the feature its classifier reads (``global_average_pool``
is off), and here the global feature (record ``global_feature="class_token"``). No flash-attn: attention
is ``torch.nn.functional.scaled_dot_product_attention``.

Ours:

- the map is every patch token (the class token left out) through the same ``ln_post``, as
  (D, T, H/p, W/p): the tokens and the global feature are normalised alike;
- frames of another size than the 224 x 224 crop the publisher trains and tests on get the
  positional embedding resized to their patch grid (bicubic), sizes not divisible by p lose the
  remainder (as a stride-p conv does); clips of another length than 16 frames get the temporal
  embedding resized linearly, as AVION's own resume code does for a checkpoint of another length.

Input, as AVION's EK-100 scripts take it (``scripts/main_lavila_finetune_cls.py``, its
``VideoClassyDataset`` for ``ek100_cls``): 16 frames, one from the middle of each of 16 equal parts
of the segment (its ``get_frame_ids``; featstore's ``segments`` sampling), short side 224, RGB
normalised with its "openai" values (mean 108.33 / 116.75 / 104.09, std 68.50 / 66.63 / 70.32 on
0-255). The AVION code and weights are MIT-licensed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featstore.models.backbones import (
    CLASS_TOKEN,
    SEGMENTS,
    BackboneRecord,
    VideoBackbone,
    register_backbone,
)

# AVION's --norm-style openai, in [0, 1] units (its scripts give them on 0-255).
AVION_MEAN: tuple[float, float, float] = (108.3272985 / 255, 116.7460125 / 255, 104.09373615 / 255)
AVION_STD: tuple[float, float, float] = (68.5005327 / 255, 66.6321579 / 255, 70.32316305 / 255)
LAYER_NORM_EPS = 1e-6
# torch's names of a block (AVION without --use-flash-attn / --use-fast-conv1) -> flash-attn's (ours).
_TORCH_TO_FLASH = {
    "attn.in_proj_weight": "attn.Wqkv.weight",
    "attn.in_proj_bias": "attn.Wqkv.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


class _JointAttention(nn.Module):
    """Multi-head self-attention over all tokens: ``Wqkv`` (q, k, v stacked, heads within each) and ``out_proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.Wqkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, L, D). Returns: (B, L, D)."""
        batch, tokens, width = x.shape
        qkv = self.Wqkv(x).view(batch, tokens, 3, self.heads, width // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _VitMlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    """Pre-norm attention and MLP, each residual (``ln_1``, ``attn``, ``ln_2``, ``mlp``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = _JointAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = _VitMlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _BlockStack(nn.Module):
    """``resblocks``: the transformer's blocks, in order."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_VitBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class _SpaceTimeViT(nn.Module):
    """The visual tower, with AVION's attribute names (see the module docstring)."""

    def __init__(self, *, in_channels: int, patch: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 grid: int, frames: int) -> None:
        super().__init__()
        self.patch = patch
        self.grid = grid
        self.conv1 = nn.Linear(in_channels * patch * patch, width, bias=False)  # (C, p, p)-flattened patches
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.temporal_embedding = nn.Parameter(torch.zeros(frames, width))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = _BlockStack(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def embeddings(self, frames: int, height: int, width: int) -> Tensor:
        """Positional + temporal embedding of a clip's tokens.

        Args:
            frames: T of the clip.
            height: patch rows h.
            width: patch columns w.

        Returns:
            (1 + T * h * w, D): the class token's, then frame-major, row-major patches'.
        """
        spatial = self.positional_embedding[1:]  # (grid * grid, D)
        if (height, width) != (self.grid, self.grid):
            square = spatial.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            spatial = F.interpolate(square, size=(height, width), mode="bicubic", align_corners=False)
            spatial = spatial.permute(0, 2, 3, 1).reshape(height * width, -1)
        temporal = self.temporal_embedding  # (frames the weights were trained on, D)
        if frames != temporal.shape[0]:
            temporal = F.interpolate(temporal.T.unsqueeze(0), size=frames, mode="linear").squeeze(0).T
        patches = spatial.repeat(frames, 1) + temporal.repeat_interleave(height * width, dim=0)
        return torch.cat([self.positional_embedding[:1], patches])

    def forward(self, clip: Tensor) -> tuple[Tensor, Tensor]:
        """Args: clip (B, Cin, T, H, W) normalised.

        Returns:
            ``(tokens, grid)``: (B, 1 + T * h * w, D) after the last block (class token first), and
            (T, h, w), h = H // p, w = W // p.
        """
        batch, channels, frames, height, width = clip.shape
        rows, cols = height // self.patch, width // self.patch
        kernel = self.conv1.weight.view(-1, channels, self.patch, self.patch)
        patches = F.conv2d(clip.transpose(1, 2).reshape(batch * frames, channels, height, width), kernel,
                           stride=self.patch)  # (B*T, D, h, w)
        x = patches.flatten(2).transpose(1, 2).reshape(batch, frames * rows * cols, -1)  # (B, T*h*w, D)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(batch, 1, -1), x], dim=1)
        x = x + self.embeddings(frames, rows, cols).to(x.dtype)
        return self.transformer(self.ln_pre(x)), (frames, rows, cols)


class SpaceTimeViTBackbone(VideoBackbone):
    """AVION's video ViT under ``visual``; map: the normalised patch tokens; global: the normalised class token.

    Args:
        record: registry record (its feature_dim is ``width``, its spatial_stride ``patch``).
        in_channels: 3 (RGB) or 2 per stacked flow frame (no public flow weights: random until loaded).
        patch: patch side p.
        width: token channels D.
        layers: blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        grid: patches per side of the positional embedding (the 224 x 224 crop: 224 / p).
        frames: frames of the temporal embedding.
    """

    classifier_prefixes = ("fc_cls.",)

    def __init__(self, *, record: BackboneRecord, in_channels: int, patch: int = 16, width: int = 768,
                 layers: int = 12, heads: int = 12, mlp_ratio: float = 4.0, grid: int = 14, frames: int = 16) -> None:
        super().__init__(record=record, in_channels=in_channels)
        if record.feature_dim != width:
            raise ValueError(f"{record.name}: feature_dim {record.feature_dim} is not the width {width}")
        self.visual = _SpaceTimeViT(in_channels=in_channels, patch=patch, width=width, layers=layers, heads=heads,
                                    mlp_ratio=mlp_ratio, grid=grid, frames=frames)
        # The publisher's initialisation (its weights replace it): normal 0.02 for the class and
        # positional embeddings, truncated normal 0.02 for the blocks' weights, zero biases, zero
        # temporal embedding, PyTorch's default for the patch embedding.
        nn.init.normal_(self.visual.class_embedding, std=0.02)
        nn.init.normal_(self.visual.positional_embedding, std=0.02)
        for name, parameter in self.visual.transformer.named_parameters():
            if name.endswith("weight"):
                nn.init.trunc_normal_(parameter, std=0.02)
            else:
                nn.init.zeros_(parameter)

    def translate_checkpoint(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """torch's names (AVION run without flash-attn / fast conv1) -> flash-attn's; the Conv2d patch
        weight (D, C, p, p) flattened to the Linear's (D, C * p * p). Files in the flash layout pass unchanged."""
        translated: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            head, _, tail = key.partition(".transformer.resblocks.")
            if tail:
                index, _, name = tail.partition(".")
                key = f"{head}.transformer.resblocks.{index}.{_TORCH_TO_FLASH.get(name, name)}"
            elif key.endswith("visual.conv1.weight") and value.dim() == 4:
                value = value.flatten(1)
            translated[key] = value
        return translated

    def forward_features(self, clip: Tensor) -> tuple[Tensor, Tensor]:
        """Args: clip (B, Cin, T, H, W) normalised.

        Returns:
            ``(feature_map, global_feature)``: (B, D, T, H // p, W // p) the patch tokens after ``ln_post``,
            and (B, D) the class token after ``ln_post`` (what AVION's classifier reads).
        """
        tokens, (frames, rows, cols) = self.visual(clip)
        tokens = self.visual.ln_post(tokens)  # per token: the class token's is the publisher's feature
        batch, _, width = tokens.shape
        feature_map = tokens[:, 1:].reshape(batch, frames, rows, cols, width).permute(0, 4, 1, 2, 3)
        return feature_map, tokens[:, 0]

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised. Returns: (B, D, T, H // p, W // p)."""
        return self.forward_features(clip)[0]


def patch_map_size(patch: int) -> Callable[[int, int, int], tuple[int, int, int]]:
    """The map-size rule of a ViT with ``patch`` x ``patch`` patches per frame: (T, H // p, W // p)."""

    def map_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
        return frames, height // patch, width // patch

    return map_size


def _avion_record(name: str, width: int, patch: int, description: str) -> BackboneRecord:
    return BackboneRecord(
        name=name,
        feature_dim=width,
        temporal_stride=1,
        spatial_stride=patch,
        mean=AVION_MEAN,
        std=AVION_STD,
        # 16 segments (--clip-length 16); --clip-stride's default 2 is unused by the ek100_cls loader,
        # which samples segments (it would be the step within a flow snippet here).
        default_clip_frames=16,
        default_clip_stride=2,
        default_size=224,
        description=description,
        clip_sampling=SEGMENTS,
        global_feature=CLASS_TOKEN,
    )


AVION_VITB = _avion_record(
    "avion_vitb", 768, 16,
    "AVION ViT-B/16, 16 frames, fine-tuned on EPIC-100 (avion_finetune_cls_lavila_vitb_best.pt layout), "
    "patch-token map")
AVION_VITL = _avion_record(
    "avion_vitl", 1024, 14,
    "AVION ViT-L/14, 16 frames, fine-tuned on EPIC-100 (avion_finetune_cls_lavila_vitl_best.pt layout), "
    "patch-token map")


@register_backbone(AVION_VITB, map_size=patch_map_size(16))
def avion_vitb(*, in_channels: int = 3) -> SpaceTimeViTBackbone:
    """AVION ViT-B/16 (768 wide, 12 blocks, 12 heads). Args: in_channels: 3 RGB / 2 flow (random weights)."""
    return SpaceTimeViTBackbone(record=AVION_VITB, in_channels=in_channels, patch=16, width=768, layers=12, heads=12,
                                grid=224 // 16)


@register_backbone(AVION_VITL, map_size=patch_map_size(14))
def avion_vitl(*, in_channels: int = 3) -> SpaceTimeViTBackbone:
    """AVION ViT-L/14 (1024 wide, 24 blocks, 16 heads). Args: in_channels: 3 RGB / 2 flow (random weights)."""
    return SpaceTimeViTBackbone(record=AVION_VITL, in_channels=in_channels, patch=14, width=1024, layers=24,
                                heads=16, grid=224 // 14)
