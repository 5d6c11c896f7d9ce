"""Object detectors for the detection features: torchvision Faster R-CNNs and a detectron2 adapter.

Per-box features follow the paper (report 3.1, after LFB): the box head's representation RoI-pooled
on the *final* detections, not on the proposals that produced them. The detector runs as usual to
get its final boxes (after score threshold and NMS), the boxes are expressed in the model's resized
image coordinates, and the box RoI pooler plus box head run once more at exactly those boxes. The
``--boxes`` path (`ObjectDetector.features_at`) uses the same pooling on given boxes and skips the
proposals, so both paths give identical features for identical boxes.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
_DEFAULT_DETECTIONS_PER_IMAGE = 100


@dataclass(frozen=True)
class DetectorRecord:
    """What a registered detector produces.

    Attributes:
        name: registry name (recorded in the store manifest).
        feature_dim: Cd, the per-box feature size (box head representation).
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
        labels: (k,) int64 class indices of the detector's label space.
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

    # Set by the builder when weights came from a checkpoint.
    load_report: LoadReport | None = None

    def __init__(self, *, record: DetectorRecord) -> None:
        super().__init__()
        self.record = record

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


def _check_images(images: list[Tensor]) -> None:
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: expected (3, H, W), got {tuple(image.shape)}")


def _check_boxes(images: list[Tensor], boxes: list[Tensor]) -> None:
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box tensors")
    for index, image_boxes in enumerate(boxes):
        if image_boxes.dim() != 2 or image_boxes.shape[-1] != 4:
            raise ValueError(f"boxes of image {index}: expected (k, 4), got {tuple(image_boxes.shape)}")


def _scale(image_size: tuple[int, int], like: Tensor) -> Tensor:
    """(4,) multiplier from normalised x1, y1, x2, y2 to pixels of an (H, W) image."""
    height, width = image_size
    return like.new_tensor([width, height, width, height])


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
            pixel_boxes.append((image_boxes * _scale(size, image_boxes)).to(reference.dtype))
        pooled = self.roi_heads.box_roi_pool(features, pixel_boxes, image_sizes)  # (N, 256, 7, 7)
        representation = self.roi_heads.box_head(pooled)  # (N, Cd)
        return list(representation.split(counts))

    @torch.no_grad()
    def detect(self, images: list[Tensor], topk: int) -> list[Detections]:
        """See `ObjectDetector.detect`."""
        _check_images(images)
        if not images:
            return []
        image_list, features = self._image_features(images)
        image_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        proposals, _ = self.rpn(image_list, features)
        self.roi_heads.detections_per_img = max(_DEFAULT_DETECTIONS_PER_IMAGE, topk)
        # Final detections in resized-image pixels (roi_heads clips them to each image).
        results, _ = self.roi_heads(features, proposals, image_list.image_sizes)

        normalised_boxes: list[Tensor] = []
        kept: list[tuple[Tensor, Tensor]] = []
        for result, size in zip(results, image_sizes):
            # NMS output is already score-ordered; sort again so topk never depends on that detail.
            order = torch.argsort(result["scores"], descending=True, stable=True)[:topk]
            boxes = result["boxes"][order].to(torch.float32) / _scale(size, result["boxes"].to(torch.float32))
            normalised_boxes.append(boxes.clamp_(0.0, 1.0))
            kept.append((result["scores"][order], result["labels"][order].to(torch.int64)))
        box_features = self._pool_normalised(features, normalised_boxes, image_sizes)
        return [
            Detections(boxes=boxes, scores=scores, labels=labels, features=feats)
            for boxes, (scores, labels), feats in zip(normalised_boxes, kept, box_features)
        ]

    @torch.no_grad()
    def features_at(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """See `ObjectDetector.features_at`."""
        _check_images(images)
        _check_boxes(images, boxes)
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
    """Names of all registered detectors, sorted (``detectron2`` only when it is importable)."""
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
) -> tuple[ObjectDetector, DetectorRecord]:
    """Build a registered detector, optionally from a local checkpoint.

    Args:
        spec: ``"NAME"`` (random init; fine for tests) or ``"NAME:/local/path"``.
        score_thresh: minimum score of a final detection.
        num_classes: classes incl. background; default: from the checkpoint, else 91 (COCO).
        min_size: short side the detector resizes images to (None: the model's default).
        max_size: cap on the long side after resizing (None: the model's default).

    Returns:
        ``(detector, record)``; a CPU module in eval mode. The record's feature_dim is the built
        model's (for detectron2 it depends on the config).

    Raises:
        UnknownModelError: unknown name.
        CheckpointError: missing file, keys that do not fit, or num_classes contradicting the checkpoint.
    """
    name, checkpoint = parse_model_spec(spec)
    entry = _DETECTORS.get(name)
    detector = entry.factory(
        checkpoint, score_thresh=score_thresh, num_classes=num_classes, min_size=min_size, max_size=max_size
    )
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


# ---------------------------------------------------------------------------------------------------
# detectron2 (optional: registered only when importable; it is not installable from package registries)

try:  # pragma: no cover - exercised only where detectron2 is installed
    import detectron2  # noqa: F401

    _HAVE_DETECTRON2 = True
except ImportError:
    _HAVE_DETECTRON2 = False


class Detectron2Detector(ObjectDetector):  # pragma: no cover - needs detectron2
    """Adapter for a detectron2 `GeneralizedRCNN` (e.g. an EPIC-Kitchens / Visual Genome Faster R-CNN).

    Supports ``StandardROIHeads`` (FPN / C5 box heads: features = ``box_head`` output) and
    ``Res5ROIHeads`` (C4: features = res5 output averaged over the RoI, 2048-d). Images are resized
    here (detectron2 models expect pre-resized input), shortest edge to ``INPUT.MIN_SIZE_TEST``
    capped by ``INPUT.MAX_SIZE_TEST``, and fed in the channel order and 0-255 range of ``INPUT.FORMAT``.

    Args:
        model: a built detectron2 model with weights loaded.
        record: the registry record (its feature_dim is replaced with the model's).
        min_size: shortest edge after resizing.
        max_size: cap on the longest edge after resizing.
        input_format: ``"BGR"`` or ``"RGB"``.
    """

    def __init__(
        self, *, model: nn.Module, record: DetectorRecord, min_size: int, max_size: int, input_format: str
    ) -> None:
        roi_heads = model.roi_heads
        if hasattr(roi_heads, "box_head"):
            feature_dim = int(roi_heads.box_head.output_shape.channels)
        else:
            feature_dim = int(roi_heads.res5[-1].out_channels)
        super().__init__(record=replace(record, feature_dim=feature_dim))
        self.model = model
        self.min_size = min_size
        self.max_size = max_size
        self.input_format = input_format

    def _prepare(self, images: list[Tensor]) -> list[dict[str, object]]:
        batched: list[dict[str, object]] = []
        for image in images:
            height, width = image.shape[-2:]
            scale = self.min_size / min(height, width)
            if max(height, width) * scale > self.max_size:
                scale = self.max_size / max(height, width)
            new_size = (int(round(height * scale)), int(round(width * scale)))
            resized = torch.nn.functional.interpolate(
                image[None].float(), size=new_size, mode="bilinear", align_corners=False
            )[0]
            pixels = resized.clamp(0.0, 1.0) * 255.0
            if self.input_format == "BGR":
                pixels = pixels.flip(0)
            batched.append({"image": pixels, "height": new_size[0], "width": new_size[1]})
        return batched

    def _features(self, images: list[Tensor]) -> tuple[list[tuple[int, int]], dict[str, Tensor], object]:
        batched = self._prepare(images)
        image_list = self.model.preprocess_image(batched)
        features = self.model.backbone(image_list.tensor)
        return [tuple(size) for size in image_list.image_sizes], features, image_list

    def _pool_normalised(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        from detectron2.structures import Boxes

        counts = [int(b.shape[0]) for b in boxes]
        if sum(counts) == 0:
            reference = next(iter(features.values()))
            return [reference.new_zeros((0, self.record.feature_dim)) for _ in boxes]
        pixel_boxes = [Boxes(b.float() * _scale(size, b.float())) for b, size in zip(boxes, image_sizes)]
        roi_heads = self.model.roi_heads
        if hasattr(roi_heads, "box_head"):
            pooled = roi_heads.box_pooler([features[name] for name in roi_heads.box_in_features], pixel_boxes)
            representation = roi_heads.box_head(pooled)
        else:
            in_features = [features[name] for name in roi_heads.in_features]
            pooled = roi_heads._shared_roi_transform(in_features, pixel_boxes)
            representation = pooled.mean(dim=(2, 3))
        return list(representation.flatten(1).split(counts))

    @torch.no_grad()
    def detect(self, images: list[Tensor], topk: int) -> list[Detections]:
        _check_images(images)
        if not images:
            return []
        image_sizes, features, image_list = self._features(images)
        proposals, _ = self.model.proposal_generator(image_list, features, None)
        predictor = self.model.roi_heads.box_predictor
        predictor.test_topk_per_image = max(_DEFAULT_DETECTIONS_PER_IMAGE, topk)
        instances, _ = self.model.roi_heads(image_list, features, proposals, None)
        normalised_boxes: list[Tensor] = []
        kept: list[tuple[Tensor, Tensor]] = []
        for found, size in zip(instances, image_sizes):
            order = torch.argsort(found.scores, descending=True, stable=True)[:topk]
            boxes = found.pred_boxes.tensor[order].float() / _scale(size, found.pred_boxes.tensor.float())
            normalised_boxes.append(boxes.clamp_(0.0, 1.0))
            kept.append((found.scores[order], found.pred_classes[order].to(torch.int64)))
        box_features = self._pool_normalised(features, normalised_boxes, image_sizes)
        return [
            Detections(boxes=boxes, scores=scores, labels=labels, features=feats)
            for boxes, (scores, labels), feats in zip(normalised_boxes, kept, box_features)
        ]

    @torch.no_grad()
    def features_at(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        _check_images(images)
        _check_boxes(images, boxes)
        if not images:
            return []
        image_sizes, features, _ = self._features(images)
        return self._pool_normalised(features, [b.float() for b in boxes], image_sizes)


def _detectron2_paths(checkpoint: Path) -> tuple[Path, Path]:  # pragma: no cover - needs detectron2
    """(config, weights) from ``model_final.pth`` (config.yaml beside it, as detectron2 training
    writes) or from a config .yaml whose MODEL.WEIGHTS is a local file."""
    if checkpoint.suffix in (".yaml", ".yml"):
        return checkpoint, Path()
    return checkpoint.parent / "config.yaml", checkpoint


if _HAVE_DETECTRON2:  # pragma: no cover - needs detectron2

    @register_detector(
        DetectorRecord(
            name="detectron2",
            feature_dim=1024,
            description="detectron2 Faster R-CNN from local config + weights (detectron2:/path/model_final.pth)",
        )
    )
    def _build_detectron2(
        checkpoint: Path | None,
        *,
        score_thresh: float,
        num_classes: int | None,
        min_size: int | None,
        max_size: int | None,
    ) -> ObjectDetector:
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        if checkpoint is None:
            raise CheckpointError(
                "the detectron2 adapter needs a local model: detectron2:/path/model_final.pth (with config.yaml "
                "beside it) or detectron2:/path/config.yaml whose MODEL.WEIGHTS is a local file"
            )
        config_path, weights_path = _detectron2_paths(checkpoint)
        if not config_path.is_file():
            raise CheckpointError(f"detectron2 config not found: {str(config_path)!r}")
        cfg = get_cfg()
        cfg.merge_from_file(str(config_path))
        if weights_path == Path():
            weights_path = Path(cfg.MODEL.WEIGHTS)
        if not weights_path.is_file():
            raise CheckpointError(
                f"detectron2 weights not found: {str(weights_path)!r}. featstore never downloads weights; "
                "pass the local path of model_final.pth"
            )
        cfg.MODEL.WEIGHTS = str(weights_path)
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_thresh
        if num_classes is not None:
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        model = build_model(cfg)
        DetectionCheckpointer(model).load(str(weights_path))
        return Detectron2Detector(
            model=model,
            record=get_detector_record("detectron2"),
            min_size=min_size or int(cfg.INPUT.MIN_SIZE_TEST),
            max_size=max_size or int(cfg.INPUT.MAX_SIZE_TEST),
            input_format=str(cfg.INPUT.FORMAT),
        )
