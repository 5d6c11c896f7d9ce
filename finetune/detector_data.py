"""The detector's training data: images with their boxes, and the batches of each iteration.

What `finetune.detector` trains on, decoded in DataLoader workers:

- `ObjectImageDataset`: one image and its boxes per key ``(iteration, index)``; training flips it
  horizontally with a probability of 1/2 drawn from (seed, iteration, index), so a resumed run draws
  what an uninterrupted one draws; an unreadable image becomes a failure marker
  (`finetune.clips.FailureLog` counts it) instead of an exception;
- `IterationBatchSampler`: the global batch of every iteration from seeded permutations of the
  images (one per pass), this rank's share under torchrun;
- `collate_detections`: the readable images of an iteration as one `DetectionBatch`, the others named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from featstore.epic.objects import ImageLayout, ObjectImage

__all__ = [
    "DetectionBatch",
    "IterationBatchSampler",
    "ObjectImageDataset",
    "collate_detections",
    "read_image",
]

_FLIP_STREAM, _ORDER_STREAM = 0, 1


def read_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB.

    Raises:
        OSError: a missing, truncated or undecodable file (the message names it).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    except (UnidentifiedImageError, ValueError, SyntaxError) as err:  # PIL's ways of saying "corrupt"
        raise OSError(f"cannot decode image {path}: {err}") from err


@dataclass
class _DetectionImage:
    index: int
    image: torch.Tensor | None = None  # (3, H, W) uint8
    boxes: torch.Tensor | None = None  # (k, 4) float32 pixels
    labels: torch.Tensor | None = None  # (k,) int64, 1..K (0: background)
    error: str | None = None


@dataclass
class DetectionBatch:
    """One step's images as the trainer gets them: the readable ones, and the failed ones named.

    Attributes:
        iteration: the 0-based iteration it belongs to.
        images: (3, H, W) uint8 per readable image.
        targets: ``{"boxes", "labels"}`` per readable image (labels 1..K).
        indices: their image indices.
        failed: (index, reason) of the unreadable ones.
    """

    iteration: int
    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]
    indices: list[int]
    failed: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def collate_detections(items: list[tuple[int, _DetectionImage]]) -> DetectionBatch:
    """A DataLoader's ``collate_fn``: one iteration's ``(iteration, image)`` items as one `DetectionBatch`."""
    iteration = items[0][0] if items else -1
    good = [sample for _, sample in items if sample.error is None]
    return DetectionBatch(
        iteration=iteration,
        images=[sample.image for sample in good],  # type: ignore[misc]
        targets=[{"boxes": sample.boxes, "labels": sample.labels} for sample in good],  # type: ignore[dict-item]
        indices=[sample.index for sample in good],
        failed=[(sample.index, str(sample.error)) for _, sample in items if sample.error is not None],
    )


class ObjectImageDataset(torch.utils.data.Dataset):
    """Images and their ground truth, indexed by ``(iteration, index)`` keys (picklable for workers).

    Args:
        images: the records (`featstore.epic.objects.ObjectImage`).
        layout: where their files are.
        train: flip horizontally with probability 1/2, drawn from (seed, iteration, index).
        seed: the run's seed.
    """

    def __init__(self, images: Sequence[ObjectImage], *, layout: ImageLayout, train: bool, seed: int = 0) -> None:
        self.images = list(images)
        self.layout = layout
        self.train = train
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, _DetectionImage]:
        iteration, index = key
        record = self.images[index]
        try:
            pixels = read_image(self.layout.path(record))  # (H, W, 3)
        except OSError as err:
            return iteration, _DetectionImage(index=index, error=str(err))
        image = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) uint8
        boxes = torch.from_numpy(np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)).clone()
        width = image.shape[2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.shape[1])
        if self.train and np.random.default_rng([self.seed, _FLIP_STREAM, iteration, index]).random() < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        labels = torch.as_tensor(np.asarray(record.labels, dtype=np.int64) + 1)  # 0 is background
        return iteration, _DetectionImage(index=index, image=image.contiguous(), boxes=boxes, labels=labels)


class IterationBatchSampler:
    """The keys of iterations ``[start, stop)``: each global batch the next ``batch_size`` images of
    seeded permutations (a new one per pass over the images), this rank's share of it.

    The images of an iteration depend on (seed, iteration) only, so a resumed run, or one with
    another number of processes, sees the same global batches.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start = self.stop = 0
        self._orders: dict[int, np.ndarray] = {}

    def set_range(self, start: int, stop: int) -> None:
        """Make the next iteration yield iterations ``start`` to ``stop - 1``."""
        self.start, self.stop = start, stop

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of pass ``epoch`` over the images."""
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(self.n)}
        return self._orders[epoch]

    def global_batch(self, iteration: int) -> list[int]:
        """Image indices of one iteration's global batch."""
        positions = range(iteration * self.batch_size, (iteration + 1) * self.batch_size)
        return [int(self.order(p // self.n)[p % self.n]) for p in positions]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start, self.stop):
            yield [(iteration, index) for index in self.global_batch(iteration)[self.rank::self.world_size]]

    def __len__(self) -> int:
        return self.stop - self.start
