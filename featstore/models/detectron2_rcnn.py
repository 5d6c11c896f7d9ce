"""detectron2 Faster R-CNNs as registered detectors (only where detectron2 is installed).

detectron2 is not on the package registries; install it from a wheel or from source (README). When
it is importable this module registers the detector ``detectron2``, named in a spec as

====================================  ==============================================================
spec                                  model
====================================  ==============================================================
``detectron2``                        `DEFAULT_CONFIG`, random weights (tests, smoke runs)
``detectron2:CONFIG``                 CONFIG, random weights
``detectron2:CONFIG:WEIGHTS``         CONFIG with WEIGHTS loaded
``detectron2:WEIGHTS``                WEIGHTS with the ``config.yaml`` beside it (the folder layout
                                      of a detectron2 training run: ``OUTPUT_DIR/config.yaml`` and
                                      ``model_final.pth``)
====================================  ==============================================================

CONFIG is a local yacs ``.yaml`` file or a config of detectron2's model zoo by its name there
(``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml``, read from the installed package, never fetched).
WEIGHTS is a local ``.pth`` (``{"model": state_dict, ...}`` as detectron2's checkpointer writes, or a
bare state dict) or a ``.pkl`` of detectron2's model zoo (a pickled ``{"model": {name: ndarray},
"__author__": ..., "matching_heuristics": ...}``). Weights come from the spec only: the config's
``MODEL.WEIGHTS`` (a ``detectron2://`` URL in the zoo configs) is ignored, so nothing is downloaded.

The weights are checked the way `featstore.models.checkpoints` checks every checkpoint: a file
whose keys or shapes do not fit the config's model fails with the keys that do not fit, where
detectron2's own checkpointer would only log a warning and leave those weights random.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

from featstore.io.atomic import atomic_write_text
from featstore.models.checkpoints import (
    CheckpointError,
    apply_state_dict,
    read_finetune_record,
    read_state_dict,
)
from featstore.models.detectors import (
    DEFAULT_DETECTIONS_PER_IMAGE,
    ROI,
    Detections,
    DetectorRecord,
    ObjectDetector,
    check_boxes,
    check_images,
    pixel_scale,
    register_detector,
    top_detections,
    write_state_dict,
)

__all__ = [
    "DEFAULT_CONFIG",
    "HAVE_DETECTRON2",
    "Detectron2Detector",
    "build_detectron2_detector",
    "parse_detectron2_spec",
    "read_detectron2_checkpoint",
    "resolve_detectron2_config",
]

HAVE_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
DEFAULT_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"
NAME = "detectron2"
# detectron2 writes the run's config here, beside its checkpoints.
CONFIG_BESIDE_WEIGHTS = "config.yaml"

_CONFIG_SUFFIXES = (".yaml", ".yml")
_WEIGHTS_SUFFIXES = (".pth", ".pt", ".pkl")
# A URL scheme in a spec (the spec went through Path, which folds '//' into '/').
_URL = re.compile(r"(^|:)(https?|ftp|s3|gs|manifold|detectron2):/", re.IGNORECASE)
_CLS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"
# Keys older checkpoints carry that detectron2 models no longer keep (non-persistent buffers, filled
# from the config); detectron2's checkpointer drops them too.
_OBSOLETE_PREFIXES = ("pixel_mean", "pixel_std", "proposal_generator.anchor_generator.cell_anchors")
# What a model-zoo .pkl may reference: numpy arrays and their dtypes, nothing that runs code.
_PICKLE_GLOBALS = frozenset(
    [(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")]
    + [(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")]
)


class Detectron2Detector(ObjectDetector):
    """A detectron2 ``GeneralizedRCNN`` behind the `ObjectDetector` interface.

    Supports ``StandardROIHeads`` (FPN box heads: features = ``box_head`` output, 1024 for the zoo
    FPN configs) and ``Res5ROIHeads`` (C4: features = the res5 output averaged over the RoI, 2048,
    as its own box predictor sees it). With ``use_feature("roi")`` the feature is the box pooler's
    RoIAlign output averaged over its bins instead (FPN: 256; C4: the res4 RoIAlign before res5, 1024). Images are resized here, as detectron2's predictor does:
    shortest edge to ``min_size`` capped by ``max_size`` (detectron2's rounding), bilinear with
    antialiasing (close to the PIL resize detectron2 trains with), then fed in the channel order and
    0-255 range of ``input_format``.

    Args:
        model: a built detectron2 model with its weights.
        record: the registry record (its feature_dim is replaced with the model's).
        min_size: shortest edge after resizing.
        max_size: cap on the longest edge after resizing.
        input_format: ``"BGR"`` or ``"RGB"`` (the config's ``INPUT.FORMAT``).
        config_yaml: the model's full config, written beside the weights by `save_checkpoint`.

    Attributes:
        class_names: class id -> name, from a checkpoint that carries them (a detectron2 stage-1
            run's ``checkpoint.pt``); None otherwise.
    """

    class_names: tuple[str, ...] | None = None

    def __init__(
        self,
        *,
        model: nn.Module,
        record: DetectorRecord,
        min_size: int,
        max_size: int,
        input_format: str,
        config_yaml: str,
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
        self.config_yaml = config_yaml

    @property
    def input_short_side(self) -> int:
        """See `ObjectDetector.input_short_side`."""
        return self.min_size

    @property
    def roi_feature_dim(self) -> int:
        """See `ObjectDetector.roi_feature_dim`: channels of the maps the box pooler reads."""
        roi_heads = self.model.roi_heads
        names = roi_heads.box_in_features if hasattr(roi_heads, "box_head") else roi_heads.in_features
        return int(self.model.backbone.output_shape()[names[0]].channels)

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """Write the weights to ``path`` and the config to ``config.yaml`` beside it (both atomically).

        Returns:
            ``"detectron2:path"``, the spec that rebuilds this detector.
        """
        path = Path(path)
        write_state_dict(path, self.model.state_dict())
        atomic_write_text(path.with_name(CONFIG_BESIDE_WEIGHTS), self.config_yaml)
        return f"{NAME}:{path}"

    def _preprocess(self, images: list[Tensor]) -> Any:
        """Resize, scale to 0-255 in the model's channel order, normalise and batch.

        Returns:
            A detectron2 ``ImageList``: ``tensor`` (B, 3, H', W') padded to the backbone's size
            divisibility, ``image_sizes`` the per-image resized (h, w).
        """
        from detectron2.data.transforms import ResizeShortestEdge

        batched = []
        for image in images:
            height, width = (int(d) for d in image.shape[-2:])
            new_size = ResizeShortestEdge.get_output_shape(height, width, self.min_size, self.max_size)
            pixels = image.float()
            if tuple(new_size) != (height, width):
                pixels = functional.interpolate(
                    pixels[None], size=new_size, mode="bilinear", align_corners=False, antialias=True
                )[0]
            pixels = pixels.clamp(0.0, 1.0) * 255.0
            if self.input_format == "BGR":
                pixels = pixels.flip(0)
            batched.append({"image": pixels})
        return self.model.preprocess_image(batched)

    def _pool_normalised(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Box features at normalised boxes, mapped into the resized images' pixels.

        Both `detect` and `features_at` go through here, so equal boxes give equal features.
        """
        from detectron2.structures import Boxes

        counts = [int(b.shape[0]) for b in boxes]
        if sum(counts) == 0:
            reference = next(iter(features.values()))
            return [reference.new_zeros((0, self.record.feature_dim)) for _ in boxes]
        device = next(iter(features.values())).device
        pixel_boxes = []
        for image_boxes, size in zip(boxes, image_sizes):
            image_boxes = image_boxes.to(device=device, dtype=torch.float32)
            pixel_boxes.append(Boxes(image_boxes * pixel_scale(size, image_boxes)))
        roi_heads = self.model.roi_heads
        if hasattr(roi_heads, "box_head"):
            pooled = roi_heads.box_pooler([features[name] for name in roi_heads.box_in_features], pixel_boxes)
            if self.feature == ROI:
                representation = pooled.mean(dim=(2, 3))  # (N, 256): RoIAlign over its bins
            else:
                representation = roi_heads.box_head(pooled)  # (N, Cd)
        else:
            pooled = roi_heads.pooler([features[name] for name in roi_heads.in_features], pixel_boxes)
            if self.feature == ROI:
                representation = pooled.mean(dim=(2, 3))  # (N, 1024): res4 RoIAlign, before res5
            else:
                representation = roi_heads.res5(pooled).mean(dim=(2, 3))  # (N, 2048)
        return list(representation.flatten(1).split(counts))

    @torch.no_grad()
    def detect(self, images: list[Tensor], topk: int) -> list[Detections]:
        """See `ObjectDetector.detect`."""
        check_images(images)
        if not images:
            return []
        image_list = self._preprocess(images)
        image_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        features = self.model.backbone(image_list.tensor)
        proposals, _ = self.model.proposal_generator(image_list, features, None)
        self.model.roi_heads.box_predictor.test_topk_per_image = max(DEFAULT_DETECTIONS_PER_IMAGE, topk)
        # Final detections in resized-image pixels (the box predictor clips them to each image).
        instances, _ = self.model.roi_heads(image_list, features, proposals, None)
        kept = []
        for found, size in zip(instances, image_sizes):
            # detectron2's postprocessing drops boxes that clipping left without area; so do we.
            found = found[found.pred_boxes.nonempty()]
            kept.append(top_detections(found.pred_boxes.tensor, found.scores, found.pred_classes, size, topk))
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
        image_list = self._preprocess(images)
        image_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        features = self.model.backbone(image_list.tensor)
        return self._pool_normalised(features, [b.float() for b in boxes], image_sizes)


# ---------------------------------------------------------------------------------------------------
# specs, configs and checkpoint files


def parse_detectron2_spec(text: str | None) -> tuple[str, Path | None]:
    """Split what follows ``detectron2:`` in a spec into a config and a weights file.

    Args:
        text: ``None`` (bare ``detectron2``), ``"CONFIG"``, ``"CONFIG:WEIGHTS"`` or ``"WEIGHTS"``
            (a ``.pth`` / ``.pt`` / ``.pkl`` file with ``config.yaml`` beside it).

    Returns:
        ``(config, weights)``: config as given (a local file or a model-zoo name; see
        `resolve_detectron2_config`), weights a local path or None for random weights.

    Raises:
        CheckpointError: more than one ``:``, or WEIGHTS alone without a ``config.yaml`` beside it.
    """
    if text is None:
        return DEFAULT_CONFIG, None
    parts = [part.strip() for part in str(text).split(":")]
    if len(parts) > 2 or not all(parts):
        url = " (weights must be a local file: featstore never downloads weights)" if _URL.search(text) else ""
        raise CheckpointError(
            f"bad detectron2 spec 'detectron2:{text}'{url}; expected detectron2:CONFIG, "
            "detectron2:CONFIG:WEIGHTS or detectron2:WEIGHTS (with config.yaml beside it)"
        )
    if len(parts) == 2:
        return parts[0], Path(parts[1]).expanduser()
    only = Path(parts[0]).expanduser()
    if only.suffix.lower() not in _WEIGHTS_SUFFIXES:
        return parts[0], None
    beside = only.parent / CONFIG_BESIDE_WEIGHTS
    if not beside.is_file():
        raise CheckpointError(
            f"detectron2 weights {str(only)!r} without a config: no {CONFIG_BESIDE_WEIGHTS} beside it; "
            f"name the config too: detectron2:CONFIG:{only} (CONFIG a local .yaml or a model-zoo name "
            f"such as {DEFAULT_CONFIG})"
        )
    return str(beside), only


def resolve_detectron2_config(config: str) -> Path:
    """The file of a config named in a spec: a local ``.yaml``, else one of detectron2's model zoo.

    Args:
        config: a local path, or a path under detectron2's ``model_zoo/configs`` (e.g.
            ``"COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"``), read from the installed package.

    Returns:
        The config file.

    Raises:
        CheckpointError: neither exists, or it is not a yacs ``.yaml`` (detectron2's ``.py``
            LazyConfigs are not supported).
    """
    local = Path(config).expanduser()
    if local.suffix.lower() not in _CONFIG_SUFFIXES:
        raise CheckpointError(
            f"detectron2 config {config!r} is not a .yaml file; only yacs configs (.yaml) are supported"
        )
    if local.is_file():
        return local
    zoo = Path(str(files("detectron2") / "model_zoo" / "configs")) / config
    if zoo.is_file():
        return zoo
    raise CheckpointError(
        f"detectron2 config {config!r} is neither a local file nor a config of detectron2's model zoo "
        f"(zoo names look like {DEFAULT_CONFIG!r})"
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers and refuses anything else (no code runs)."""

    def __init__(self, handle: Any, path: Path) -> None:
        # latin1: Detectron and early detectron2 files were pickled by Python 2.
        super().__init__(handle, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} references {module}.{name}; a detectron2 .pkl holds numpy "
                "arrays only, and featstore does not unpickle anything that could run code"
            )
        return super().find_class(module, name)


def read_detectron2_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], bool]:
    """Read a detectron2 checkpoint file into a flat state dict.

    Args:
        path: a ``.pkl`` of detectron2's model zoo (``{"model": {name: ndarray}, "__author__": ...}``,
            possibly with ``"matching_heuristics": True``), or anything `read_state_dict` reads (the
            ``.pth`` detectron2's checkpointer writes: ``{"model": state_dict, "iteration": ...}``).

    Returns:
        ``(state_dict, matching_heuristics)``: tensors on the CPU, and whether the file asks for its
        names to be matched to the model's by detectron2's suffix heuristics (files converted from
        other codebases, e.g. torchvision backbones).

    Raises:
        CheckpointError: missing or unreadable file, a pickle that references anything but numpy
            arrays, a Caffe2 / Detectron1 pickle (no ``"model"``), non-array values.
    """
    path = Path(path)
    if path.suffix.lower() != ".pkl":
        return read_state_dict(path), False
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file not found: {str(path)!r}. featstore never downloads weights; pass the local "
            "path of a checkpoint you already have"
        )
    try:
        with open(path, "rb") as handle:
            payload = _NumpyOnlyUnpickler(handle, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as error:
        raise CheckpointError(f"cannot read {str(path)!r} as a pickle ({type(error).__name__}: {error})") from error
    if not isinstance(payload, Mapping) or not isinstance(payload.get("model"), Mapping):
        raise CheckpointError(
            f"{str(path)!r} is not a detectron2 model-zoo file (a pickled dict with 'model'); Caffe2 / "
            "Detectron1 pickles are not supported: load it once with detectron2's DetectionCheckpointer "
            "and save model.state_dict() as a .pth"
        )
    state_dict: dict[str, Tensor] = {}
    for key, value in payload["model"].items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"checkpoint {str(path)!r}: 'model' entry {key!r} is a {type(value).__name__}, "
                                  "not a numpy array")
        state_dict[str(key)] = torch.from_numpy(np.ascontiguousarray(value))
    if not state_dict:
        raise CheckpointError(f"checkpoint {str(path)!r} contains no tensors")
    return state_dict, bool(payload.get("matching_heuristics", False))


# ---------------------------------------------------------------------------------------------------
# the builder


def build_detectron2_detector(
    checkpoint: Path | None,
    *,
    score_thresh: float,
    num_classes: int | None,
    min_size: int | None,
    max_size: int | None,
) -> Detectron2Detector:
    """Build a detectron2 model from a config and optionally load weights (the registry factory).

    Args:
        checkpoint: what followed ``detectron2:`` in the spec (see `parse_detectron2_spec`), or None.
        score_thresh: ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``.
        num_classes: classes incl. background (as for torchvision); default: from the weights, else
            the config's ``MODEL.ROI_HEADS.NUM_CLASSES`` + 1.
        min_size: shortest edge after resizing (default: the config's ``INPUT.MIN_SIZE_TEST``).
        max_size: cap on the longest edge (default: ``INPUT.MAX_SIZE_TEST``).

    Returns:
        A CPU `Detectron2Detector`.

    Raises:
        CheckpointError: bad spec, missing config or weights, weights that do not fit the config's
            model, or num_classes contradicting the weights.
    """
    import yaml  # a detectron2 dependency (via fvcore)
    from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    config, weights = parse_detectron2_spec(None if checkpoint is None else str(checkpoint))
    config_path = resolve_detectron2_config(config)
    cfg = get_cfg()
    try:
        # allow_unsafe=False: a config is data; never construct Python objects from YAML tags.
        cfg.merge_from_file(str(config_path), allow_unsafe=False)
    except (KeyError, ValueError, TypeError, yaml.YAMLError) as error:
        raise CheckpointError(f"detectron2 config {str(config_path)!r} cannot be used: {error}") from error
    cfg.MODEL.WEIGHTS = ""  # weights come from the spec only; the zoo configs name a URL here
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_thresh
    if min_size is not None:
        cfg.INPUT.MIN_SIZE_TEST = min_size
    if max_size is not None:
        cfg.INPUT.MAX_SIZE_TEST = max_size

    state_dict, heuristics = read_detectron2_checkpoint(weights) if weights is not None else (None, False)
    class_names = _stored_class_names(weights, state_dict)
    if state_dict is not None and _CLS_SCORE_KEY in state_dict:
        stored_classes = int(state_dict[_CLS_SCORE_KEY].shape[0])  # K + 1 (background last)
        if num_classes is not None and num_classes != stored_classes:
            raise CheckpointError(
                f"num_classes={num_classes} contradicts checkpoint {str(weights)!r}, "
                f"whose classifier has {stored_classes} classes (incl. background)"
            )
        num_classes = stored_classes
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes - 1  # detectron2 counts foreground classes only

    model = build_model(cfg)
    detector = Detectron2Detector(
        model=model,
        record=_RECORD,
        min_size=int(cfg.INPUT.MIN_SIZE_TEST),
        max_size=int(cfg.INPUT.MAX_SIZE_TEST),
        input_format=str(cfg.INPUT.FORMAT),
        config_yaml=cfg.dump(),
    )
    if state_dict is not None:
        if heuristics:
            state_dict = align_and_update_state_dicts(model.state_dict(), state_dict, c2_conversion=False)
        detector.load_report = apply_state_dict(
            model, state_dict, source=repr(str(weights)), ignore_prefixes=_OBSOLETE_PREFIXES, model_name=NAME
        )
        detector.checkpoint = weights
        detector.class_names = class_names
    return detector


def _stored_class_names(weights: Path | None, state_dict: Mapping[str, Tensor] | None) -> tuple[str, ...] | None:
    """The class names a stage-1 run's checkpoint carries (its ``finetune`` record), checked against its classifier.

    Raises:
        CheckpointError: names whose count (+ background) is not the classifier's class count.
    """
    if weights is None or weights.suffix.lower() == ".pkl":
        return None
    record = read_finetune_record(weights)
    if record is None or record.get("class_names") is None:
        return None
    names = tuple(str(name) for name in record["class_names"])
    stored = int(state_dict[_CLS_SCORE_KEY].shape[0]) if _CLS_SCORE_KEY in state_dict else None
    if stored is not None and stored != len(names) + 1:
        raise CheckpointError(f"checkpoint {str(weights)!r} names {len(names)} classes, but its classifier has "
                              f"{stored} (incl. background)")
    return names


_RECORD = DetectorRecord(
    name=NAME,
    feature_dim=1024,  # the zoo FPN configs' box head; the built model's own size replaces it
    description=f"detectron2 Faster R-CNN: detectron2[:CONFIG][:WEIGHTS] (default config {DEFAULT_CONFIG})",
)

if HAVE_DETECTRON2:
    register_detector(_RECORD)(build_detectron2_detector)
