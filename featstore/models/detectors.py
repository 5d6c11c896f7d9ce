"""Object detectors for the detection features: the registry, its base class, torchvision Faster R-CNNs.

The detectron2 adapter lives in `featstore.models.detectron2_rcnn` and registers itself here when
detectron2 is installed.

Per-box features follow the paper (report 3.1, after LFB): the box head's representation RoI-pooled
on the *final* detections, not on the proposals that produced them. The detector runs as usual to
get its final boxes (after score threshold and NMS), the boxes are expressed in the model's resized
image coordinates, and the box RoI pooler plus box head run once more at exactly those boxes. The
``--boxes`` path (`ObjectDetector.features_at`) uses the same pooling on given boxes and skips the
proposals, so both paths give identical features for identical boxes.

Which tensor is the per-box feature (``--det-feature``, `DET_FEATURES`): ``box-head`` (default) is the
box head's representation (FPN models: the FC head's output; detectron2's C4 models: res5 averaged
over the box); ``roi`` is the RoIAlign output of the box pooler itself, averaged over its bins (the
report's "output of the RoIAlign layer"; C4 models: the RoIAlign output before res5). README
("Reproduce the paper") says which matches the report's detector and why ``box-head`` is the default.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.image_list import ImageList

from featstore.io.atomic import atomic_write_torch
from featstore.models.checkpoints import (
    CheckpointError,
    LoadReport,
    apply_state_dict,
    parse_model_spec,
    read_state_dict,
)
from featstore.models.registry import Registry

# torchvision's detection models are trained on COCO: 80 classes + background, indexed with gaps to 91.
COCO_NUM_CLASSES = 91
# torchvision's own default cap on detections per image; raised on the fly when topk asks for more.
DEFAULT_DETECTIONS_PER_IMAGE = 100
# What a detector stores per box: the box head's representation, or the box pooler's RoIAlign output
# averaged over its bins (see the module docstring).
BOX_HEAD, ROI = "box-head", "roi"
DET_FEATURES = (BOX_HEAD, ROI)


@dataclass(frozen=True)
class DetectorRecord:
    """What a registered detector produces.

    Attributes:
        name: registry name (recorded in the store manifest).
        feature_dim: Cd, the per-box feature size (the box head's representation; a built detector's
            record gives the size of the feature it was built to store, `ObjectDetector.use_feature`).
        description: one line for listings.
    """

    name: str
    feature_dim: int
    description: str


@dataclass
class Detections:
    """Final detections of one image.

    Attributes:
        boxes: (k, 4) float32 x1, y1, x2, y2 normalised to [0, 1] by the image width / height.
        scores: (k,) detection scores, descending.
        labels: (k,) int64 class indices of the detector's label space: torchvision's are 1..K with 0
            for background (COCO: the 91-slot ids with gaps), detectron2's are 0..K-1.
        features: (k, Cd) box-head representation pooled at ``boxes``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    features: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class ObjectDetector(nn.Module):
    """Base class of registered detectors.

    Args:
        record: the registry record.
    """

    # Set by the builder when weights came from a checkpoint: what was loaded, and from which file
    # (the file whose hash the store manifest records).
    load_report: LoadReport | None = None
    checkpoint: Path | None = None
    # Which per-box feature `detect` and `features_at` return (`DET_FEATURES`); set by `use_feature`.
    feature: str = BOX_HEAD

    def __init__(self, *, record: DetectorRecord) -> None:
        super().__init__()
        self.record = record

    @property
    def roi_feature_dim(self) -> int:
        """Channels of the box pooler's RoIAlign output (the ``roi`` feature's size)."""
        raise NotImplementedError

    def use_feature(self, feature: str) -> None:
        """Store ``feature`` per box from now on: ``box-head`` or ``roi`` (`DET_FEATURES`).

        The record's ``feature_dim`` becomes that feature's size (the box head's representation, or
        the channels of the feature maps the box pooler reads).

        Raises:
            ValueError: an unknown feature.
        """
        if feature not in DET_FEATURES:
            raise ValueError(f"detector feature must be one of {', '.join(DET_FEATURES)}, got {feature!r}")
        if feature != self.feature:
            if self.feature == BOX_HEAD:
                self._box_head_dim = self.record.feature_dim
            dim = self.roi_feature_dim if feature == ROI else self._box_head_dim
            self.record = replace(self.record, feature_dim=int(dim))
            self.feature = feature

    @property
    def input_short_side(self) -> int | None:
        """The short side this detector resizes images to (None: it does not say)."""
        return None

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """Write this detector's weights (atomically) where `build_detector` reads them back.

        Args:
            path: the checkpoint file to write, ``{"model": state_dict}`` in torch format.

        Returns:
            The spec that rebuilds this detector from the file (``"NAME:path"``).
        """
        write_state_dict(path, self.state_dict())
        return f"{self.record.name}:{path}"

    def detect(self, images: list[Tensor], topk: int) -> list[Detections]:
        """Detect objects and pool box-head features at the final boxes.

        Args:
            images: per image a (3, H, W) float RGB tensor in [0, 1]; sizes may differ.
            topk: keep at most this many detections per image (highest scores).

        Returns:
            One `Detections` per image, at most ``topk`` rows each (fewer when the detector finds
            fewer boxes above its score threshold).
        """
        raise NotImplementedError

    def features_at(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Box-head features at given boxes (the precomputed-boxes path: no proposals, no NMS).

        Args:
            images: per image a (3, H, W) float RGB tensor in [0, 1].
            boxes: per image (k_i, 4) x1, y1, x2, y2 normalised to [0, 1].

        Returns:
            Per image a (k_i, Cd) tensor.
        """
        raise NotImplementedError

    def forward(self, images: list[Tensor], topk: int) -> list[Detections]:
        """Same as `detect`."""
        return self.detect(images, topk)


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, Tensor]) -> None:
    """Save ``{"model": state_dict}`` atomically (the container `read_state_dict` unwraps).

    Args:
        path: the file to write (`featstore.io.atomic.atomic_write_torch`: a crash leaves the old
            file or none, never a truncated one).
        state_dict: the tensors; moved to the CPU so the file loads anywhere.
    """
    tensors = {key: value.detach().cpu() for key, value in state_dict.items()}
    atomic_write_torch(path, {"model": tensors})


def check_images(images: list[Tensor]) -> None:
    """Raise ValueError naming the first image that is not (3, H, W)."""
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: expected (3, H, W), got {tuple(image.shape)}")


def check_boxes(images: list[Tensor], boxes: list[Tensor]) -> None:
    """Raise ValueError unless there is one (k, 4) box tensor per image."""
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box tensors")
    for index, image_boxes in enumerate(boxes):
        if image_boxes.dim() != 2 or image_boxes.shape[-1] != 4:
            raise ValueError(f"boxes of image {index}: expected (k, 4), got {tuple(image_boxes.shape)}")


def pixel_scale(image_size: tuple[int, int], like: Tensor) -> Tensor:
    """(4,) multiplier from normalised x1, y1, x2, y2 to pixels of an (H, W) image."""
    height, width = image_size
    return like.new_tensor([width, height, width, height])


def top_detections(
    pixel_boxes: Tensor, scores: Tensor, labels: Tensor, image_size: tuple[int, int], topk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``topk`` best final detections of one image, boxes normalised by its (resized) size.

    Args:
        pixel_boxes: (n, 4) x1, y1, x2, y2 in pixels of the image the model saw.
        scores: (n,).
        labels: (n,).
        image_size: (H, W) of that image.
        topk: how many to keep.

    Returns:
        ``(boxes (k, 4) float32 in [0, 1], scores (k,), labels (k,) int64)``, best first; NMS output is
        already score-ordered, but sorting again (stably) keeps topk independent of that detail.
    """
    order = torch.argsort(scores, descending=True, stable=True)[:topk]
    boxes = pixel_boxes[order].to(torch.float32)
    return (boxes / pixel_scale(image_size, boxes)).clamp_(0.0, 1.0), scores[order], labels[order].to(torch.int64)


class TorchvisionFasterRCNN(ObjectDetector):
    """A torchvision `FasterRCNN`, run step by step so the final boxes can be re-pooled.

    The model's parts are held as direct attributes (``transform``, ``backbone``, ``rpn``,
    ``roi_heads``), so ``state_dict()`` keys equal torchvision's and its checkpoints load as they are.

    Args:
        model: a built torchvision Faster R-CNN.
        record: the registry record.
    """

    def __init__(self, *, model: FasterRCNN, record: DetectorRecord) -> None:
        super().__init__(record=record)
        self.transform = model.transform
        self.backbone = model.backbone
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Training losses of torchvision's Faster R-CNN (``GeneralizedRCNN.forward`` in train mode).

        Args:
            images: per image a (3, H, W) float RGB tensor in [0, 1]; sizes may differ.
            targets: per image ``"boxes"`` (k, 4) float x1, y1, x2, y2 in pixels of the image and
                ``"labels"`` (k,) int64 in 1..K (0 is background); k = 0 is an image of background.
        Returns:
            ``loss_objectness``, ``loss_rpn_box_reg`` (RPN) and ``loss_classifier``, ``loss_box_reg``
            (box head), each a 0-d tensor.
        """
        check_images(images)
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        _, head_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **head_losses}

    def set_training_sampling(self, *, rpn_proposals: int, roi_batch_size: int) -> None:
        """How many proposals training keeps: the RPN's per image after NMS (its pre-NMS count
        follows, as torchvision's defaults keep them equal), and the box head's sample per image.

        The box head's cost grows with ``roi_batch_size`` (its first layer is 12,544 x 1,024): a CPU
        run lowers both; the report's setting is the libraries' default (2,000 and 512).
        """
        # torchvision keeps these counts in dicts keyed by mode; there is no setter.
        self.rpn._pre_nms_top_n["training"] = rpn_proposals
        self.rpn._post_nms_top_n["training"] = rpn_proposals
        self.roi_heads.fg_bg_sampler.batch_size_per_image = roi_batch_size

    @property
    def roi_feature_dim(self) -> int:
        """See `ObjectDetector.roi_feature_dim`: the backbone's (FPN's) output channels."""
        return int(self.backbone.out_channels)

    @property
    def input_short_side(self) -> int:
        """See `ObjectDetector.input_short_side` (the transform's smallest ``min_size``)."""
        min_size = self.transform.min_size
        return int(min(min_size)) if isinstance(min_size, (tuple, list)) else int(min_size)

    def _image_features(self, images: list[Tensor]) -> tuple[ImageList, OrderedDict[str, Tensor]]:
        """Resize, normalise and batch the images, then run the backbone (with FPN).

        Returns:
            ``(image_list, features)``: image_list.tensors is (B, 3, H', W') padded, image_list.image_sizes
            the per-image resized (h, w); features maps level names to (B, 256, h_l, w_l).
        """
        image_list, _ = self.transform(images)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return image_list, features

    def _pool_normalised(
        self,
        features: OrderedDict[str, Tensor],
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """Box-head representation at normalised boxes, mapped into the resized image coordinates.

        Both `detect` and `features_at` go through here, so equal boxes give equal features.
        """
        counts = [int(b.shape[0]) for b in boxes]
        reference = next(iter(features.values()))
        if sum(counts) == 0:
            return [reference.new_zeros((0, self.record.feature_dim)) for _ in boxes]
        # Scale in float32 (pixel coordinates up to ~1333 lose whole pixels in fp16), then match the
        # features' device and dtype as RoIAlign requires.
        pixel_boxes = []
        for image_boxes, size in zip(boxes, image_sizes):
            image_boxes = image_boxes.to(device=reference.device, dtype=torch.float32)
            pixel_boxes.append((image_boxes * pixel_scale(size, image_boxes)).to(reference.dtype))
        pooled = self.roi_heads.box_roi_pool(features, pixel_boxes, image_sizes)  # (N, 256, 7, 7)
        if self.feature == ROI:
            return list(pooled.mean(dim=(2, 3)).split(counts))  # (N, 256): RoIAlign over its bins
        representation = self.roi_heads.box_head(pooled)  # (N, Cd)
        return list(representation.split(counts))

    @torch.no_grad()
    def detect(self, images: list[Tensor], topk: int) -> list[Detections]:
        """See `ObjectDetector.detect`."""
        check_images(images)
        if not images:
            return []
        image_list, features = self._image_features(images)
        image_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        proposals, _ = self.rpn(image_list, features)
        self.roi_heads.detections_per_img = max(DEFAULT_DETECTIONS_PER_IMAGE, topk)
        # Final detections in resized-image pixels (roi_heads clips them to each image).
        results, _ = self.roi_heads(features, proposals, image_list.image_sizes)

        kept = [
            top_detections(result["boxes"], result["scores"], result["labels"], size, topk)
            for result, size in zip(results, image_sizes)
        ]
        box_features = self._pool_normalised(features, [boxes for boxes, _, _ in kept], image_sizes)
        return [
            Detections(boxes=boxes, scores=scores, labels=labels, features=feats)
            for (boxes, scores, labels), feats in zip(kept, box_features)
        ]

    @torch.no_grad()
    def features_at(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """See `ObjectDetector.features_at`."""
        check_images(images)
        check_boxes(images, boxes)
        if not images:
            return []
        image_list, features = self._image_features(images)
        image_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        return self._pool_normalised(features, [b.to(torch.float32) for b in boxes], image_sizes)


class DetectorFactory(Protocol):
    def __call__(
        self,
        checkpoint: Path | None,
        *,
        score_thresh: float,
        num_classes: int | None,
        min_size: int | None,
        max_size: int | None,
    ) -> ObjectDetector: ...


@dataclass(frozen=True)
class _DetectorEntry:
    record: DetectorRecord
    factory: DetectorFactory


_DETECTORS: Registry[_DetectorEntry] = Registry("detector")


def register_detector(record: DetectorRecord) -> Callable[[DetectorFactory], DetectorFactory]:
    """Decorator registering a detector factory under ``record.name``.

    The factory is called as ``factory(checkpoint_path_or_None, *, score_thresh, num_classes,
    min_size, max_size)`` and loads the checkpoint itself (detector families differ in how).

    Raises:
        ValueError: the name is already registered.
    """

    def decorator(factory: DetectorFactory) -> DetectorFactory:
        _DETECTORS.add(record.name, _DetectorEntry(record=record, factory=factory))
        return factory

    return decorator


def list_detectors() -> list[str]:
    """Names of all registered detectors, sorted (``detectron2`` only where it is installed)."""
    return _DETECTORS.names()


def get_detector_record(name: str) -> DetectorRecord:
    """The record of a registered detector.

    Raises:
        UnknownModelError: not registered.
    """
    return _DETECTORS.get(name).record


def build_detector(
    spec: str,
    *,
    score_thresh: float = 0.05,
    num_classes: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    feature: str = BOX_HEAD,
) -> tuple[ObjectDetector, DetectorRecord]:
    """Build a registered detector, optionally from a local checkpoint.

    Args:
        spec: ``"NAME"`` (random init; fine for tests) or ``"NAME:/local/path"``; detectron2 takes
            ``"detectron2[:CONFIG][:WEIGHTS]"`` (see `featstore.models.detectron2_rcnn`).
        score_thresh: minimum score of a final detection.
        num_classes: classes incl. background; default: from the checkpoint, else 91 (COCO).
        min_size: short side the detector resizes images to (None: the model's default).
        max_size: cap on the long side after resizing (None: the model's default).
        feature: the per-box feature it returns, ``box-head`` or ``roi`` (`DET_FEATURES`).

    Returns:
        ``(detector, record)``; a CPU module in eval mode. The record's feature_dim is the built
        model's for that feature (for detectron2 it depends on the config).

    Raises:
        UnknownModelError: unknown name.
        CheckpointError: missing file, keys that do not fit, or num_classes contradicting the checkpoint.
    """
    name, checkpoint = parse_model_spec(spec)
    entry = _DETECTORS.get(name)
    detector = entry.factory(
        checkpoint, score_thresh=score_thresh, num_classes=num_classes, min_size=min_size, max_size=max_size
    )
    detector.use_feature(feature)
    return detector.eval(), detector.record


# ---------------------------------------------------------------------------------------------------
# torchvision Faster R-CNN family

_CLS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"

TorchvisionBuilder = Callable[..., FasterRCNN]


def _build_torchvision(
    builder: TorchvisionBuilder,
    record: DetectorRecord,
    checkpoint: Path | None,
    *,
    score_thresh: float,
    num_classes: int | None,
    min_size: int | None,
    max_size: int | None,
) -> TorchvisionFasterRCNN:
    state_dict = read_state_dict(checkpoint) if checkpoint is not None else None
    if state_dict is not None and _CLS_SCORE_KEY in state_dict:
        stored_classes = int(state_dict[_CLS_SCORE_KEY].shape[0])
        if num_classes is not None and num_classes != stored_classes:
            raise CheckpointError(
                f"num_classes={num_classes} contradicts checkpoint {str(checkpoint)!r}, "
                f"whose classifier has {stored_classes} classes"
            )
        num_classes = stored_classes
    size_kwargs = {
        key: value for key, value in (("min_size", min_size), ("max_size", max_size)) if value is not None
    }
    # weights=None and weights_backbone=None: building must never trigger a download.
    model = builder(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes or COCO_NUM_CLASSES,
        box_score_thresh=score_thresh,
        **size_kwargs,
    )
    detector = TorchvisionFasterRCNN(model=model, record=record)
    if state_dict is not None:
        detector.load_report = apply_state_dict(
            detector, state_dict, source=repr(str(checkpoint)), model_name=record.name
        )
        detector.checkpoint = checkpoint
    return detector


def _register_torchvision(record: DetectorRecord, builder: TorchvisionBuilder) -> None:
    def factory(
        checkpoint: Path | None,
        *,
        score_thresh: float,
        num_classes: int | None,
        min_size: int | None,
        max_size: int | None,
    ) -> ObjectDetector:
        return _build_torchvision(
            builder,
            record,
            checkpoint,
            score_thresh=score_thresh,
            num_classes=num_classes,
            min_size=min_size,
            max_size=max_size,
        )

    register_detector(record)(factory)


_register_torchvision(
    DetectorRecord(
        name="fasterrcnn_resnet50_fpn",
        feature_dim=1024,
        description="torchvision Faster R-CNN ResNet-50 FPN; TwoMLPHead representation (1024)",
    ),
    fasterrcnn_resnet50_fpn,
)
_register_torchvision(
    DetectorRecord(
        name="fasterrcnn_resnet50_fpn_v2",
        feature_dim=1024,
        description="torchvision Faster R-CNN ResNet-50 FPN v2; 4conv1fc head representation (1024)",
    ),
    fasterrcnn_resnet50_fpn_v2,
)
_register_torchvision(
    DetectorRecord(
        name="fasterrcnn_mobilenet_v3_large_320_fpn",
        feature_dim=1024,
        description="torchvision Faster R-CNN MobileNetV3-Large 320 FPN (fast, low-res); TwoMLPHead (1024)",
    ),
    fasterrcnn_mobilenet_v3_large_320_fpn,
)
