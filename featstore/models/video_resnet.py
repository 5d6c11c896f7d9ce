"""VideoResNet backbones: torchvision's r3d_18 / mc3_18 / r2plus1d_18 and the IG-65M R(2+1)D-34.

All are torchvision's `VideoResNet` (blocks and per-layer convolution types passed in) without its
average pool and fc, so checkpoint keys are torchvision's (``stem.0.weight``, ``layer1.0.conv1.0.weight``,
...) and the classifier ``fc.*`` is ignored on load.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor, nn
from torchvision.models.video.resnet import (
    BasicBlock,
    BasicStem,
    Conv2Plus1D,
    Conv3DNoTemporal,
    Conv3DSimple,
    R2Plus1dStem,
    VideoResNet,
)

from featstore.models.backbones import (
    BackboneRecord,
    VideoBackbone,
    conv_out,
    register_backbone,
    replace_first_conv,
)

# torchvision's Kinetics-400 video normalisation (also used by the IG-65M ports).
KINETICS_MEAN: tuple[float, float, float] = (0.43216, 0.394666, 0.37645)
KINETICS_STD: tuple[float, float, float] = (0.22803, 0.22145, 0.216989)

ConvMaker = type[Conv3DSimple] | type[Conv3DNoTemporal] | type[Conv2Plus1D]
Block = type[BasicBlock]


class VideoResNetBackbone(VideoBackbone):
    """torchvision `VideoResNet` up to ``layer4``.

    Args:
        record: registry record.
        in_channels: 3 (RGB) or 2 (flow); the stem's first conv is rebuilt for flow.
        block: residual block type.
        conv_makers: convolution type of each of the four layers.
        layers: blocks per layer.
        stem: stem module type.
    """

    classifier_prefixes = ("fc.",)

    def __init__(
        self,
        *,
        record: BackboneRecord,
        in_channels: int,
        block: Block,
        conv_makers: Sequence[ConvMaker],
        layers: Sequence[int],
        stem: Callable[[], nn.Module],
    ) -> None:
        super().__init__(record=record, in_channels=in_channels)
        # Borrow torchvision's construction and initialisation, keep only the trunk; attributes are
        # set directly on self so state-dict keys equal torchvision's.
        reference = VideoResNet(block=block, conv_makers=list(conv_makers), layers=list(layers), stem=stem)
        self.stem = reference.stem
        self.layer1 = reference.layer1
        self.layer2 = reference.layer2
        self.layer3 = reference.layer3
        self.layer4 = reference.layer4
        if in_channels != 3:
            replace_first_conv(self.stem, in_channels)

    def forward_map(self, clip: Tensor) -> Tensor:
        """Args: clip (B, Cin, T, H, W) normalised. Returns: layer4 output (B, C, T', H', W')."""
        x = self.stem(clip)  # (B, 64, T, H/2, W/2)
        x = self.layer1(x)  # (B, 64 * expansion, T, H/2, W/2)
        x = self.layer2(x)  # (B, 128 * expansion, ~T/2, ~H/4, ~W/4)  (T kept by Conv3DNoTemporal)
        x = self.layer3(x)
        return self.layer4(x)  # (B, 512 * expansion, ~T/8, ~H/16, ~W/16)


def _video_resnet_map_size(
    clip_frames: int, height: int, width: int, *, temporal_downsampling: bool
) -> tuple[int, int, int]:
    """Map size of a VideoResNet trunk.

    Both stems keep T (temporal kernel 3, padding 1) and halve H, W (kernel 7, stride 2, padding 3);
    layer2-4 each apply a kernel-3 stride-2 padding-1 convolution (the 1x1 stride-2 shortcut gives the
    same length), temporally too unless the layer is Conv3DNoTemporal.
    """
    frames = clip_frames
    height = conv_out(height, 7, 2, 3)
    width = conv_out(width, 7, 2, 3)
    for _ in range(3):
        if temporal_downsampling:
            frames = conv_out(frames, 3, 2, 1)
        height = conv_out(height, 3, 2, 1)
        width = conv_out(width, 3, 2, 1)
    return frames, height, width


_downsampling_map_size = partial(_video_resnet_map_size, temporal_downsampling=True)
_spatial_only_map_size = partial(_video_resnet_map_size, temporal_downsampling=False)

_TORCHVISION_NOTE = "torchvision {name} (Kinetics-400 weights from a local file), layer4 map"

R3D_18 = BackboneRecord(
    name="r3d_18",
    feature_dim=512,
    temporal_stride=8,
    spatial_stride=16,
    mean=KINETICS_MEAN,
    std=KINETICS_STD,
    # torchvision trains these on 16-frame clips at 15 fps; EPIC frames are 50-60 fps, hence stride 4.
    default_clip_frames=16,
    default_clip_stride=4,
    default_size=128,
    description="R3D-18: 3D ResNet-18 (torchvision), layer4 map",
)
MC3_18 = BackboneRecord(
    name="mc3_18",
    feature_dim=512,
    temporal_stride=1,  # 3D convs only in layer1; layers 2-4 are 2D (1x3x3), so T is never reduced
    spatial_stride=16,
    mean=KINETICS_MEAN,
    std=KINETICS_STD,
    default_clip_frames=16,
    default_clip_stride=4,
    default_size=128,
    description="MC3-18: mixed 3D/2D ResNet-18 (torchvision), layer4 map",
)
R2PLUS1D_18 = BackboneRecord(
    name="r2plus1d_18",
    feature_dim=512,
    temporal_stride=8,
    spatial_stride=16,
    mean=KINETICS_MEAN,
    std=KINETICS_STD,
    default_clip_frames=16,
    default_clip_stride=4,
    default_size=128,
    description="R(2+1)D-18 (torchvision), layer4 map",
)
R2PLUS1D_34 = BackboneRecord(
    name="r2plus1d_34",
    feature_dim=512,
    temporal_stride=8,
    spatial_stride=16,
    mean=KINETICS_MEAN,
    std=KINETICS_STD,
    # Paper: 32 frames at stride 4, frames resized to 128 without cropping.
    default_clip_frames=32,
    default_clip_stride=4,
    default_size=128,
    description="R(2+1)D-34, IG-65M port layout (Caffe2 mid-planes, BN eps 1e-3), layer4 map",
)


@register_backbone(R3D_18, map_size=_downsampling_map_size)
def r3d_18(*, in_channels: int = 3) -> VideoResNetBackbone:
    """torchvision R3D-18 trunk. Args: in_channels: 3 RGB / 2 flow."""
    return VideoResNetBackbone(
        record=R3D_18,
        in_channels=in_channels,
        block=BasicBlock,
        conv_makers=[Conv3DSimple] * 4,
        layers=[2, 2, 2, 2],
        stem=BasicStem,
    )


@register_backbone(MC3_18, map_size=_spatial_only_map_size)
def mc3_18(*, in_channels: int = 3) -> VideoResNetBackbone:
    """torchvision MC3-18 trunk. Args: in_channels: 3 RGB / 2 flow."""
    return VideoResNetBackbone(
        record=MC3_18,
        in_channels=in_channels,
        block=BasicBlock,
        conv_makers=[Conv3DSimple] + [Conv3DNoTemporal] * 3,
        layers=[2, 2, 2, 2],
        stem=BasicStem,
    )


@register_backbone(R2PLUS1D_18, map_size=_downsampling_map_size)
def r2plus1d_18(*, in_channels: int = 3) -> VideoResNetBackbone:
    """torchvision R(2+1)D-18 trunk. Args: in_channels: 3 RGB / 2 flow."""
    return VideoResNetBackbone(
        record=R2PLUS1D_18,
        in_channels=in_channels,
        block=BasicBlock,
        conv_makers=[Conv2Plus1D] * 4,
        layers=[2, 2, 2, 2],
        stem=R2Plus1dStem,
    )


def _caffe2_midplanes(planes: int) -> int:
    """Mid-planes of a (2+1)D conv with ``planes`` in and out, as Caffe2/VMZ computes them."""
    return (planes * planes * 3 * 3 * 3) // (planes * 3 * 3 + 3 * planes)


@register_backbone(R2PLUS1D_34, map_size=_downsampling_map_size)
def r2plus1d_34(*, in_channels: int = 3) -> VideoResNetBackbone:
    """R(2+1)D-34 trunk in the layout of the public IG-65M ports (moabitcoin/ig65m-pytorch).

    Two differences from a plain torchvision build, both needed for those checkpoints to load and
    to give the same numbers (see facebookresearch/VMZ#89, pytorch/vision#1265):
    the second (2+1)D conv of the first block of layer2-4 uses the Caffe2 mid-plane count
    (288 / 576 / 1152 rather than torchvision's 230 / 460 / 921), and BatchNorm eps is 1e-3.

    Args:
        in_channels: 3 RGB / 2 flow.
    """
    backbone = VideoResNetBackbone(
        record=R2PLUS1D_34,
        in_channels=in_channels,
        block=BasicBlock,
        conv_makers=[Conv2Plus1D] * 4,
        layers=[3, 4, 6, 3],
        stem=R2Plus1dStem,
    )
    for layer, planes in ((backbone.layer2, 128), (backbone.layer3, 256), (backbone.layer4, 512)):
        conv = Conv2Plus1D(planes, planes, _caffe2_midplanes(planes))
        for module in conv.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        layer[0].conv2[0] = conv
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.eps = 1e-3
    return backbone
