"""The paper's ResNet50-3D: Hara et al.'s 3D ResNet (3D-ResNets-PyTorch, CVPR 2018), up to ``layer4``.

Written to load that repository's published Kinetics checkpoints (``r3d50_K_200ep.pth``,
``r3d50_KM_200ep.pth``, ...: ``{'state_dict', 'arch', 'epoch', 'optimizer'}``) without renaming.
Its layout, as ``models/resnet.py`` ``generate_model(50)`` builds it:

- stem: ``conv1`` (7x7x7, stride (1, 2, 2), padding 3, no bias), ``bn1``, ReLU, and a 3x3x3 max pool
  with stride 2 in time too (so the map is T/16 x H/32 x W/32);
- ``layer1`` .. ``layer4``: Bottleneck blocks 3-4-6-3 with keys ``conv1`` (1x1x1), ``bn1``,
  ``conv2`` (3x3x3, carrying the stride), ``bn2``, ``conv3`` (1x1x1), ``bn3`` and, on the first block
  of a layer, ``downsample.0`` (strided 1x1x1 conv) / ``downsample.1`` (BatchNorm): shortcut type B;
- ``fc`` (700 classes for Kinetics-700), ignored by featstore.

Input: RGB in [0, 1] normalised with the repository's Kinetics mean and std (``mean.py``,
``get_mean_std(1, 'kinetics')``; its ``--value_scale`` defaults to 1, i.e. [0, 1] input).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from featstore.models.backbones import (
    BackboneRecord,
    VideoBackbone,
    conv_out,
    register_backbone,
)

# 3D-ResNets-PyTorch mean.py, dataset 'kinetics', value_scale 1 (its default): inputs in [0, 1].
HARA_KINETICS_MEAN: tuple[float, float, float] = (0.4345, 0.4051, 0.3775)
HARA_KINETICS_STD: tuple[float, float, float] = (0.2768, 0.2713, 0.2737)


class Bottleneck3d(nn.Module):
    """Hara's 3D Bottleneck: 1x1x1 -> 3x3x3 (strided) -> 1x1x1 (x4 channels), plus the shortcut.

    Args:
        in_planes: input channels.
        planes: inner channels (output is ``4 * planes``).
        stride: stride of ``conv2`` (and of the projection shortcut).
        downsample: the projection shortcut, or None for identity.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, Cin, T, H, W). Returns: (B, 4 * planes, T/s, H/s, W/s)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class HaraResNet3dBackbone(VideoBackbone):
    """3D ResNet (Hara et al.) up to ``layer4``, with 3D-ResNets-PyTorch state-dict keys.

    Args:
        record: registry record.
        in_channels: 3 (RGB) or 2 x N (flow; random until a flow checkpoint is loaded).
        layers: Bottleneck blocks per layer (3-4-6-3 for ResNet-50).
    """

    classifier_prefixes = ("fc.",)

    def __init__(self, *, record: BackboneRecord, in_channels: int, layers: Sequence[int]) -> None:
        super().__init__(record=record, in_channels=in_channels)
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=(7, 7, 7), stride=(1, 2, 2), padding=(3, 3, 3),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or in_planes != planes * Bottleneck3d.expansion:
                downsample = nn.Sequential(
                    nn.Conv3d(in_planes, planes * Bottleneck3d.expansion, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * Bottleneck3d.expansion),
                )
            stage = [Bottleneck3d(in_planes, planes, stride, downsample)]
            in_planes = planes * Bottleneck3d.expansion
            stage += [Bottleneck3d(in_planes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        # The repository's initialisation (random-weight builds then match its statistics).
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised. Returns: layer4 output (B, 2048, ~T/16, ~H/32, ~W/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(clip))))  # (B, 64, T/2, H/4, W/4)
        x = self.layer1(x)  # (B, 256, T/2, H/4, W/4)
        x = self.layer2(x)  # (B, 512, T/4, H/8, W/8)
        x = self.layer3(x)  # (B, 1024, T/8, H/16, W/16)
        return self.layer4(x)  # (B, 2048, T/16, H/32, W/32)


def _hara_map_size(clip_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """conv1 keeps T (kernel 7, padding 3, stride 1) and halves H, W; the 3x3x3 pool halves all three;
    layer2-4 each halve all three (3x3x3 stride-2 conv, padding 1; the 1x1x1 shortcut agrees)."""
    frames = conv_out(clip_frames, 3, 2, 1)
    height = conv_out(conv_out(height, 7, 2, 3), 3, 2, 1)
    width = conv_out(conv_out(width, 7, 2, 3), 3, 2, 1)
    for _ in range(3):
        frames, height, width = (conv_out(size, 3, 2, 1) for size in (frames, height, width))
    return frames, height, width


R3D_50 = BackboneRecord(
    name="r3d_50",
    feature_dim=2048,
    temporal_stride=16,
    spatial_stride=32,
    mean=HARA_KINETICS_MEAN,
    std=HARA_KINETICS_STD,
    # Paper (report 3.1): 64 consecutive frames at stride 2, short side 256, no crop.
    default_clip_frames=64,
    default_clip_stride=2,
    default_size=256,
    description="ResNet50-3D (Hara et al., 3D-ResNets-PyTorch r3d50_K_200ep.pth layout), layer4 map",
)


@register_backbone(R3D_50, map_size=_hara_map_size)
def r3d_50(*, in_channels: int = 3) -> HaraResNet3dBackbone:
    """The paper's ResNet50-3D trunk; loads ``r3d50_*_200ep.pth``. Args: in_channels: 3 RGB / 2 flow."""
    return HaraResNet3dBackbone(record=R3D_50, in_channels=in_channels, layers=(3, 4, 6, 3))
