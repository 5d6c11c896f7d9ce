"""Model zoo of the extraction service: video backbones and object detectors, each in a registry.

Importing this package registers every model: the family modules below register their builders at
import time (timm style), so `list_backbones()` / `list_detectors()` are complete after
``import featstore.models``.
"""
from featstore.models.backbones import (
    BackboneRecord,
    VideoBackbone,
    backbone_map_shape,
    build_backbone,
    get_backbone_record,
    list_backbones,
    load_backbone_checkpoint,
    register_backbone,
)
from featstore.models.checkpoints import (
    CONVERT_COMMAND,
    CheckpointError,
    ConvertReport,
    LoadReport,
    apply_state_dict,
    convert_checkpoint,
    file_sha256,
    load_checkpoint,
    parse_model_spec,
    read_state_dict,
)
from featstore.models.detectors import (
    Detections,
    DetectorRecord,
    ObjectDetector,
    build_detector,
    get_detector_record,
    list_detectors,
    register_detector,
)
from featstore.models.registry import Registry, UnknownModelError

# Imported for their registrations.
from featstore.models import video_resnet as video_resnet  # noqa: E402  isort: skip
from featstore.models import resnet3d as resnet3d  # noqa: E402  isort: skip
from featstore.models import i3d as i3d  # noqa: E402  isort: skip
from featstore.models import slowfast as slowfast  # noqa: E402  isort: skip
from featstore.models import tsn as tsn  # noqa: E402  isort: skip
from featstore.models import swin3d as swin3d  # noqa: E402  isort: skip
from featstore.models import spacetime_vit as spacetime_vit  # noqa: E402  isort: skip
from featstore.models import detectron2_rcnn as detectron2_rcnn  # noqa: E402  isort: skip  (when installed)

__all__ = [
    "BackboneRecord",
    "CONVERT_COMMAND",
    "CheckpointError",
    "ConvertReport",
    "Detections",
    "DetectorRecord",
    "ObjectDetector",
    "LoadReport",
    "Registry",
    "UnknownModelError",
    "VideoBackbone",
    "apply_state_dict",
    "backbone_map_shape",
    "build_backbone",
    "build_detector",
    "convert_checkpoint",
    "file_sha256",
    "get_backbone_record",
    "get_detector_record",
    "list_backbones",
    "list_detectors",
    "load_backbone_checkpoint",
    "load_checkpoint",
    "parse_model_spec",
    "read_state_dict",
    "register_backbone",
    "register_detector",
]
