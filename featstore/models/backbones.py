"""Video backbones for the VerbNet / NounNet feature extractors: records, the base module, the registry.

A backbone is described by a frozen `BackboneRecord` whose numbers (feature_dim, strides, input
normalisation, default clip) set every downstream size. Model families register a builder together
with the record and an exact output-size rule in their own files (`video_resnet.py`, `resnet3d.py`,
`i3d.py`, `slowfast.py`, `tsn.py`, `swin3d.py`, `spacetime_vit.py`); ``featstore.models`` imports
those files so the registry is complete whenever this package is used. Adding a backbone is one such
file (and its import there).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from featstore.epic.frames import MODALITY_CHANNELS
from featstore.models.checkpoints import (
    LoadReport,
    apply_state_dict,
    parse_model_spec,
    read_state_dict,
    strip_common_prefix,
)
from featstore.models.registry import Registry

# Optical flow frames (EPIC u/v JPEGs) are mapped to [0, 1]; 0.5 / 0.5 recentres them to [-1, 1],
# the range TV-L1 flow networks (I3D) are trained on. A record may say otherwise (EPIC-100 TSN/TSM: 0.226).
FLOW_MEAN: float = 0.5
FLOW_STD: float = 0.5
# How a backbone's clip is taken from a segment (featstore.epic.sampling.CLIP_SAMPLINGS).
CENTRED, SEGMENTS = "centred", "segments"
# What a backbone's global feature is: the mean of its map over time and space (CNNs; Omnivore's head
# reads the same), or the class token its publisher's classifier reads (ViTs; the map leaves it out).
MAP_MEAN, CLASS_TOKEN = "map_mean", "class_token"


@dataclass(frozen=True)
class BackboneRecord:
    """What a registered video backbone produces and expects.

    Attributes:
        name: registry name (also what the store manifest records).
        feature_dim: channels of the last stage; sets every downstream dimension.
        temporal_stride: total temporal downsampling of the map vs the input clip.
        spatial_stride: total spatial downsampling of the map vs the input clip.
        mean: per-channel RGB mean applied to [0, 1] input (flow uses 0.5 per channel).
        std: per-channel RGB std (flow uses 0.5 per channel).
        default_clip_frames: frames per clip the model is usually run on.
        default_clip_stride: frame step between clip frames (at the EPIC 50/60 fps frame rate).
        default_size: short side the frames are resized to for extraction.
        description: one line for ``featstore info`` and listings.
        clip_sampling: ``"centred"`` (consecutive frames at a stride around the segment centre: 3D
            CNNs) or ``"segments"`` (one sample from the middle of each of ``default_clip_frames``
            equal parts of the segment: TSN / TSM).
        flow_snippet_frames: consecutive flow frames stacked as channels per clip sample
            (5 for TSN / TSM: 10 channels; 1 for the 3D CNNs: 2 channels).
        flow_mean: mean subtracted from [0, 1] flow values (every flow channel).
        flow_std: std flow values are divided by.
        global_feature: ``"map_mean"`` (the global feature is the map's mean over T', H', W') or
            ``"class_token"`` (the token the publisher's classifier reads, which the map does not hold).
    """

    name: str
    feature_dim: int
    temporal_stride: int
    spatial_stride: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_clip_frames: int
    default_clip_stride: int
    default_size: int
    description: str
    clip_sampling: str = CENTRED
    flow_snippet_frames: int = 1
    flow_mean: float = FLOW_MEAN
    flow_std: float = FLOW_STD
    global_feature: str = MAP_MEAN

    def __post_init__(self) -> None:
        if self.global_feature not in (MAP_MEAN, CLASS_TOKEN):
            raise ValueError(f"{self.name}: global_feature must be {MAP_MEAN!r} or {CLASS_TOKEN!r}, "
                             f"got {self.global_feature!r}")
        if self.clip_sampling not in (CENTRED, SEGMENTS):
            raise ValueError(f"{self.name}: clip_sampling must be {CENTRED!r} or {SEGMENTS!r}, got {self.clip_sampling!r}")
        if self.flow_snippet_frames < 1:
            raise ValueError(f"{self.name}: flow_snippet_frames must be >= 1, got {self.flow_snippet_frames}")

    def normalisation(self, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std for ``in_channels`` input channels (3: the record's RGB values; else flow).

        Args:
            in_channels: 3 for RGB; an even number for optical flow (2 per stacked (u, v) frame).

        Returns:
            ``(mean, std)``, each of length ``in_channels``.
        """
        if in_channels == 3:
            return self.mean, self.std
        return (self.flow_mean,) * in_channels, (self.flow_std,) * in_channels

    def snippet_frames(self, modality: str) -> int:
        """Consecutive frames stacked as channels per clip sample for ``modality`` ('rgb' | 'flow')."""
        return self.flow_snippet_frames if modality == "flow" else 1

    def in_channels(self, modality: str) -> int:
        """Input channels the backbone takes for ``modality``: 3 for RGB, 2 x snippet frames for flow."""
        return MODALITY_CHANNELS[modality] * self.snippet_frames(modality)


class VideoBackbone(nn.Module):
    """Base class of registered video backbones: normalises a clip and returns its last-stage map.

    Subclasses hold their layers as direct attributes, so ``state_dict()`` keys are those of the
    public checkpoints of the family (torchvision, IG-65M ports, pytorch-i3d) minus the classifier,
    and implement `forward_map`.

    Args:
        record: the registry record (normalisation comes from it).
        in_channels: 3 for RGB, 2 per stacked frame for optical flow.
    """

    # Checkpoint keys of the classification head, which featstore does not build: dropped on load so
    # that published checkpoints (with any number of classes) load without complaint.
    classifier_prefixes: tuple[str, ...] = ()
    # Prefixes a publisher's training wrapper puts on every key (Lightning: "model."), stripped on load
    # when every key of the file has them.
    checkpoint_prefixes: tuple[str, ...] = ()
    # Set by `build_backbone` when weights came from a checkpoint (what was loaded / ignored).
    load_report: LoadReport | None = None

    def __init__(self, *, record: BackboneRecord, in_channels: int) -> None:
        super().__init__()
        self.record = record
        self.in_channels = in_channels
        mean, std = record.normalisation(in_channels)
        # Non-persistent: normalisation is metadata of the record, not of the checkpoint.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, in_channels, 1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, in_channels, 1, 1, 1), persistent=False)

    def translate_checkpoint(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's state dict in this module's key layout (after the prefixes are stripped).

        The default keeps it as it is. A family whose publisher saves one network under more than
        one layout (AVION: with or without flash-attn's modules) renames the other layout's keys here,
        one to one, so that every tensor of the file is still accounted for.

        Args:
            state_dict: ``{key: tensor}`` as read from the file.

        Returns:
            ``{key: tensor}`` to check and load.
        """
        return state_dict

    def forward_map(self, clip: Tensor) -> Tensor:
        """Last-stage map of a normalised clip.

        Args:
            clip: (B, Cin, T, H, W) normalised input.

        Returns:
            (B, C, T', H', W') with C = record.feature_dim.
        """
        raise NotImplementedError

    def forward(self, clip: Tensor) -> tuple[Tensor, Tensor]:
        """Run the backbone on a clip.

        Args:
            clip: (B, Cin, T, H, W) float in [0, 1].

        Returns:
            ``(feature_map, global_feature)``: (B, C, T', H', W') last-stage output before pooling,
            and (B, C) its mean over T', H', W' (or, per the record's ``global_feature``, the class
            token the publisher's classifier reads).
        """
        if clip.dim() != 5 or clip.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.record.name} expects clips (B, {self.in_channels}, T, H, W); got {tuple(clip.shape)}"
            )
        clip = (clip - self.pixel_mean.to(clip.dtype)) / self.pixel_std.to(clip.dtype)
        return self.forward_features(clip)

    def forward_features(self, clip: Tensor) -> tuple[Tensor, Tensor]:
        """Map and global feature of a normalised clip; the global feature is the map's mean.

        A family whose publisher's classifier reads something else (a ViT's class token: record
        ``global_feature="class_token"``) overrides this.

        Args:
            clip: (B, Cin, T, H, W) normalised input.

        Returns:
            ``(feature_map, global_feature)``: (B, C, T', H', W') and (B, C).
        """
        feature_map = self.forward_map(clip)  # (B, C, T', H', W')
        return feature_map, feature_map.mean(dim=(2, 3, 4))


class BackboneFactory(Protocol):
    def __call__(self, *, in_channels: int) -> VideoBackbone: ...


# (clip_frames, height, width) -> (T', H', W')
MapSizeFn = Callable[[int, int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class _BackboneEntry:
    record: BackboneRecord
    factory: BackboneFactory
    map_size: MapSizeFn


_BACKBONES: Registry[_BackboneEntry] = Registry("backbone")


def register_backbone(
    record: BackboneRecord, *, map_size: MapSizeFn
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering a backbone factory under ``record.name``.

    Args:
        record: the backbone's record.
        map_size: exact ``(frames, height, width) -> (T', H', W')`` of the last-stage map, written with
            `conv_out` / `same_out` so `backbone_map_shape` never has to run the model.

    Returns:
        The decorator; it returns the factory unchanged.

    Raises:
        ValueError: the name is already registered.
    """

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        _BACKBONES.add(record.name, _BackboneEntry(record=record, factory=factory, map_size=map_size))
        return factory

    return decorator


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return _BACKBONES.names()


def get_backbone_record(name: str) -> BackboneRecord:
    """The record of a registered backbone.

    Raises:
        UnknownModelError: not registered.
    """
    return _BACKBONES.get(name).record


def build_backbone(spec: str, *, in_channels: int = 3) -> tuple[VideoBackbone, BackboneRecord]:
    """Build a registered backbone, optionally loading a local checkpoint.

    Args:
        spec: ``"NAME"`` (random init) or ``"NAME:/local/path.pt"``.
        in_channels: 3 for RGB, 2 for optical flow, 2 x N for N stacked flow frames
            (`BackboneRecord.in_channels`); changes the stem's input channels.

    Returns:
        ``(backbone, record)``; the backbone is a CPU module in eval mode (extraction only).

    Raises:
        UnknownModelError: unknown name.
        CheckpointError: missing file, or keys/shapes that do not fit (listed).
    """
    name, checkpoint = parse_model_spec(spec)
    entry = _BACKBONES.get(name)
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    backbone = entry.factory(in_channels=in_channels)
    if checkpoint is not None:
        backbone.load_report = load_backbone_checkpoint(backbone, checkpoint)
    return backbone.eval(), entry.record


def load_backbone_checkpoint(backbone: VideoBackbone, path: str | Path) -> LoadReport:
    """Load a local checkpoint into a built backbone, ignoring its classifier head.

    The file is read by `read_state_dict`; the backbone's ``checkpoint_prefixes`` are stripped, its
    `VideoBackbone.translate_checkpoint` puts the keys in its layout, and `apply_state_dict` checks
    and copies them (its ``classifier_prefixes`` dropped and reported).

    Args:
        backbone: a registered backbone.
        path: local checkpoint file.

    Returns:
        The `LoadReport` (its ``ignored`` lists the dropped classifier keys).

    Raises:
        CheckpointError: missing file or keys/shapes that do not fit.
    """
    state_dict = read_state_dict(path)
    for prefix in backbone.checkpoint_prefixes:
        state_dict = strip_common_prefix(state_dict, prefix)
    return apply_state_dict(
        backbone,
        backbone.translate_checkpoint(state_dict),
        source=repr(str(path)),
        ignore_prefixes=backbone.classifier_prefixes,
        model_name=backbone.record.name,
    )


def backbone_map_shape(
    record: BackboneRecord, *, clip_frames: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """Shape of one clip's feature map, computed from the architecture without running it.

    Args:
        record: a registered backbone's record.
        clip_frames: T of the input clip.
        height: H of the input frames.
        width: W of the input frames.

    Returns:
        ``(C, T', H', W')`` exactly as the backbone's forward returns it (without the batch dim).

    Raises:
        ValueError: the clip is too small for the network (some size would reach zero).
    """
    entry = _BACKBONES.get(record.name)
    out_frames, out_height, out_width = entry.map_size(clip_frames, height, width)
    if min(out_frames, out_height, out_width) < 1:
        raise ValueError(
            f"a {clip_frames}x{height}x{width} clip is too small for {record.name} "
            f"(map would be {out_frames}x{out_height}x{out_width})"
        )
    return record.feature_dim, out_frames, out_height, out_width


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution / pooling along one dimension (PyTorch floor mode).

    Args:
        size: input length.
        kernel: kernel length.
        stride: stride.
        padding: padding on each side.

    Returns:
        ``floor((size + 2 * padding - kernel) / stride) + 1``.
    """
    return (size + 2 * padding - kernel) // stride + 1


def same_out(size: int, kernel: int, stride: int) -> int:
    """Output length of a TensorFlow-style 'SAME' padded op, padded exactly as `i3d.same_padding`.

    Args:
        size: input length.
        kernel: kernel length.
        stride: stride.

    Returns:
        The output length (``ceil(size / stride)`` whenever the kernel covers the remainder).
    """
    remainder = size % stride
    total_pad = max(kernel - (stride if remainder == 0 else remainder), 0)
    return conv_out(size + total_pad, kernel, stride)


def replace_first_conv(module: nn.Module, in_channels: int) -> None:
    """Swap the first Conv3d of ``module`` for a fresh one with ``in_channels`` inputs (flow stems).

    Kernel, stride, padding, output channels and bias are kept; the new weights are Kaiming-initialised
    like torchvision's video models (they are random until a flow checkpoint is loaded).

    Args:
        module: a model or stem containing at least one ``nn.Conv3d``.
        in_channels: new number of input channels.
    """
    # named_modules() is a pre-order walk, i.e. definition order, which is forward order for stems.
    for qualified_name, child in module.named_modules():
        if not isinstance(child, nn.Conv3d):
            continue
        if child.in_channels == in_channels:
            return
        replacement = nn.Conv3d(
            in_channels,
            child.out_channels,
            kernel_size=child.kernel_size,
            stride=child.stride,
            padding=child.padding,
            dilation=child.dilation,
            groups=child.groups,
            bias=child.bias is not None,
        )
        nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
        if replacement.bias is not None:
            nn.init.zeros_(replacement.bias)
        parent_name, _, child_name = qualified_name.rpartition(".")
        setattr(module.get_submodule(parent_name), child_name, replacement)
        return
    raise ValueError(f"{type(module).__name__} has no Conv3d to adapt to {in_channels} input channels")
