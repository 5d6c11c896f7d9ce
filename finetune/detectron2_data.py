"""EPIC objects as detectron2 datasets, and the loader `finetune.detectron2_training` trains from.

The images of an `featstore.epic.objects.ObjectLabels` whose files open become detectron2's standard
dataset dicts (boxes ``XYXY_ABS``, ``category_id`` the ground truth's own class id), registered in
``DatasetCatalog`` / ``MetadataCatalog`` (``thing_classes``) under a name of the run's and removed
when it ends. The training loader reads them through a ``DatasetMapper`` (ResizeShortestEdge, random
horizontal flip) and a seeded ``TrainingSampler``; an image that fails to decode there is skipped
(`SkippingMapper`), one that does not open at all is reported before training (`readable_images`).
detectron2 is imported inside the functions, so this module imports without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from featstore.epic.objects import ImageLayout, ObjectImage

__all__ = [
    "SkippingMapper",
    "dataset_dicts",
    "readable_images",
    "register_dataset",
    "train_loader",
    "unregister_datasets",
]


def readable_images(layout: ImageLayout, images: Sequence[ObjectImage], phase: str, failures: list[dict[str, Any]]
                    ) -> list[tuple[ObjectImage, Path, int, int]]:
    """The images whose files open, with their (height, width); the others go to ``failures``."""
    from PIL import Image, UnidentifiedImageError

    kept = []
    for image in images:
        path = layout.path(image)
        try:
            with Image.open(path) as handle:
                width, height = handle.size
        except (OSError, UnidentifiedImageError) as err:
            failures.append({"file": str(path), "video_id": image.video_id, "frame": image.frame, "phase": phase,
                             "reason": f"{type(err).__name__}: {err}"})
            continue
        kept.append((image, path, height, width))
    return kept


def dataset_dicts(records: Sequence[tuple[ObjectImage, Path, int, int]]) -> list[dict[str, Any]]:
    """detectron2's standard dataset dicts (boxes XYXY_ABS, ``category_id`` = the class id)."""
    from detectron2.structures import BoxMode

    return [
        {"file_name": str(path), "height": height, "width": width, "image_id": f"{image.video_id}/{image.frame}",
         "annotations": [{"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(label),
                          "iscrowd": 0}
                         for box, label in zip(image.boxes.tolist(), image.labels.tolist())]}
        for image, path, height, width in records
    ]


def register_dataset(name: str, dicts: list[dict[str, Any]], class_names: Sequence[str]) -> None:
    """Register ``dicts`` as detectron2 dataset ``name`` whose ``thing_classes`` are ``class_names``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(class_names))


def unregister_datasets(names: Sequence[str]) -> None:
    """Remove the datasets ``names`` from detectron2's catalogs (those not registered are passed over)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


class SkippingMapper:
    """A ``DatasetMapper`` that answers None for an image that fails to decode (the loader then draws another)."""

    def __init__(self, mapper: Any) -> None:
        self.mapper = mapper

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.mapper(dataset_dict)
        except OSError:
            return None


def train_loader(dataset_name: str, *, min_size: int, max_size: int, image_format: str, batch_size: int,
                 workers: int, seed: int) -> Any:
    """detectron2's training loader over a registered dataset: resized, flipped, in a seeded endless order.

    Args:
        dataset_name: a dataset registered with `register_dataset`.
        min_size: the short side the images are resized to.
        max_size: the longest the long side may become.
        image_format: the model's input format (``cfg.INPUT.FORMAT``, e.g. ``"BGR"``).
        batch_size: images per batch (over all ranks).
        workers: DataLoader worker processes.
        seed: the sampler's seed.
    Returns:
        The loader ``build_detection_train_loader`` makes: lists of detectron2 input dicts.
    """
    from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader, transforms
    from detectron2.data.samplers import TrainingSampler

    augmentations = [transforms.ResizeShortestEdge((min_size,), max_size, "choice"),
                     transforms.RandomFlip(horizontal=True, vertical=False)]
    mapper = DatasetMapper(is_train=True, augmentations=augmentations, image_format=image_format)
    dataset = DatasetCatalog.get(dataset_name)
    return build_detection_train_loader(dataset=dataset, mapper=SkippingMapper(mapper),
                                        sampler=TrainingSampler(len(dataset), shuffle=True, seed=seed),
                                        total_batch_size=batch_size, num_workers=workers,
                                        aspect_ratio_grouping=False)
