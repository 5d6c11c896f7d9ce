"""Training and validation clips of annotated segments, decoded in DataLoader workers.

A clip is planned by `featstore.epic.sampling.plan_segment` (the build's sampling: ``clip_frames``
frames ``clip_stride`` apart, clamped into the video) and read by the build's frame sources
(`featstore.epic.frames`: EPIC JPEG folders, flow u/v folders, PyAV video files). Training centres the
clip on a frame drawn uniformly inside the segment (report 3.1), resizes its short side to a
length drawn in ``scale_range`` and takes one random ``crop`` x ``crop`` window, the same for every
frame of the clip; validation takes the build's centre clip, resizes the short side to
``test_size`` and takes the centre crop.

TSN / TSM backbones (``clip_sampling="segments"``) take one snippet from each of ``clip_frames``
equal parts of the segment instead: training draws each snippet's start uniformly inside its part
(TSN's training rule, `training_snippet_frames`), validation takes the build's middle snippets
(its test rule); a flow snippet's ``snippet_frames`` frames are stacked as channels
(`featstore.epic.frames.stack_snippets`) after the crop, exactly as the build stacks them. Augmentation runs on uint8 frames before any float
conversion (4x less memory traffic); the float conversion and the backbone record's normalisation
happen on the device (`VideoBackbone.forward`).

Every random draw of a sample comes from a generator seeded by (seed, epoch, segment index), never
from global state: which worker decodes a sample, or whether the run was resumed, changes nothing.
A segment whose frames cannot be read becomes a `Clip` with its ``error`` instead of an exception,
so that one corrupt JPEG costs one sample of one epoch; `FailureLog` counts them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from featstore.epic.frames import FrameError, FrameSource, resize_short_side, stack_snippets
from featstore.epic.sampling import SamplingConfig, plan_segment
from finetune.config import FinetuneError

__all__ = [
    "Clip",
    "ClipBatch",
    "ClipDataset",
    "EpochBatchSampler",
    "FailureLog",
    "TooManyFailures",
    "centre_crop",
    "collate_clips",
    "random_crop",
    "sample_rng",
    "training_centre",
    "training_snippet_frames",
]

# Streams of one sample's generator: the same (seed, epoch, index) gives the same draws, and the
# order of clip sampling never depends on a shuffle's draws.
_SAMPLE_STREAM, _ORDER_STREAM = 0, 1


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's random draws (clip centre, scale, crop).

    Args:
        seed: the run's seed (>= 0).
        epoch: 0-based epoch.
        index: the segment's position in its dataset.
    Returns:
        A generator that depends on these three numbers only.
    """
    return np.random.default_rng([seed, _SAMPLE_STREAM, epoch, index])


def training_centre(start_frame: int, stop_frame: int, rng: np.random.Generator) -> int:
    """A clip centre drawn uniformly among the segment's frames (report 3.1).

    Args:
        start_frame, stop_frame: the segment's first and last frame (1-based, inclusive).
        rng: the sample's generator.
    Returns:
        A frame in ``[start_frame, stop_frame]``.
    """
    return int(rng.integers(start_frame, stop_frame + 1))


def training_snippet_frames(start_frame: int, stop_frame: int, *, segments: int, snippet_frames: int,
                            stride: int, n_frames: int | None, rng: np.random.Generator) -> list[int]:
    """TSN's training sampling: one snippet at a random place in each of ``segments`` equal parts.

    The rule of the EPIC TSN loader (``TsnDataset._sample_indices``): with n frames and a snippet
    spanning L = (snippet_frames - 1) * stride + 1 of them, ``avg = (n - L + 1) // segments``; the
    k-th snippet starts at ``k * avg + randint(avg)``. A segment too short for that draws sorted
    starts among its ``n - L + 1`` positions when it has more than ``segments`` of them, else starts
    every snippet at its first frame.

    Args:
        start_frame, stop_frame: the segment (1-based, inclusive).
        segments: snippets per clip (the clip's samples).
        snippet_frames: frames per snippet; stride: frames between them.
        n_frames: the video's frame count (frames past it repeat the last one), or None.
        rng: the sample's generator.
    Returns:
        ``segments * snippet_frames`` frame indices, sample-major (the order `plan_segment` uses).
    """
    span = (snippet_frames - 1) * stride + 1
    positions = stop_frame - start_frame + 1 - span + 1
    average = positions // segments
    if average > 0:
        offsets = np.arange(segments) * average + rng.integers(0, average, size=segments)
    elif positions > segments:
        offsets = np.sort(rng.choice(positions, size=segments, replace=False))
    else:
        offsets = np.zeros(segments, dtype=np.int64)
    last = n_frames if n_frames is not None else np.inf
    return [int(min(max(start_frame + int(offset) + j * stride, 1), last))
            for offset in offsets for j in range(snippet_frames)]


def _crop_at(frames: np.ndarray, top: int, left: int, crop: int) -> np.ndarray:
    return np.ascontiguousarray(frames[:, top:top + crop, left:left + crop])


def random_crop(frames: np.ndarray, *, scale_range: tuple[int, int], crop: int,
                rng: np.random.Generator) -> np.ndarray:
    """Training augmentation: a random short-side resize, then one random square crop for all frames.

    Args:
        frames: uint8 (T, H, W, C).
        scale_range: (low, high) short side, drawn uniformly (inclusive), ``low >= crop``.
        crop: side of the square crop.
        rng: the sample's generator.
    Returns:
        uint8 (T, crop, crop, C).
    """
    low, high = scale_range
    resized = resize_short_side(frames, int(rng.integers(low, high + 1)))  # (T, H', W', C)
    height, width = resized.shape[1:3]
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    return _crop_at(resized, top, left, crop)


def centre_crop(frames: np.ndarray, *, size: int, crop: int) -> np.ndarray:
    """Validation transform: short side resized to ``size``, then the centre ``crop`` x ``crop``.

    Args:
        frames: uint8 (T, H, W, C).
        size: short side after resizing, ``>= crop``.
        crop: side of the square crop.
    Returns:
        uint8 (T, crop, crop, C).
    """
    resized = resize_short_side(frames, size)  # (T, H', W', C)
    height, width = resized.shape[1:3]
    return _crop_at(resized, (height - crop) // 2, (width - crop) // 2, crop)


@dataclass
class Clip:
    """One sample as a worker returns it: its frames, or why they could not be read.

    Attributes:
        index: the segment's position in the dataset.
        epoch: the epoch it was drawn for.
        frames: uint8 (T, crop, crop, C), None when it failed.
        label: the target class.
        centre: the frame the clip is centred on (None when planning failed).
        error: why the segment could not be read, or None.
    """

    index: int
    epoch: int
    label: int
    frames: Tensor | None = None
    centre: int | None = None
    error: str | None = None


@dataclass
class ClipBatch:
    """A batch as the training loop gets it: the readable clips stacked, the failed ones named.

    Attributes:
        epoch: the epoch it belongs to.
        clips: uint8 (B, T, crop, crop, C) of the readable samples; None when none was readable.
        labels: int64 (B,) their target classes.
        indices: (B,) their segment indices.
        failed: (index, reason) of the samples that could not be read.
    """

    epoch: int
    clips: Tensor | None
    labels: Tensor
    indices: list[int]
    failed: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        """Readable clips in the batch."""
        return len(self.indices)

    def pin_memory(self) -> "ClipBatch":
        # Called by the DataLoader's pin thread on CUDA: page-locked buffers make the copy to the
        # device asynchronous while the previous step computes.
        return ClipBatch(epoch=self.epoch, clips=None if self.clips is None else self.clips.pin_memory(),
                         labels=self.labels.pin_memory(), indices=self.indices, failed=self.failed)


def collate_clips(items: list[Clip]) -> ClipBatch:
    """Stack the readable clips of a batch (in the worker, so the main process receives one tensor)."""
    good = [item for item in items if item.error is None]
    epoch = items[0].epoch if items else -1
    return ClipBatch(
        epoch=epoch,
        clips=torch.stack([item.frames for item in good]) if good else None,  # type: ignore[misc]
        labels=torch.tensor([item.label for item in good], dtype=torch.int64),
        indices=[item.index for item in good],
        failed=[(item.index, str(item.error)) for item in items if item.error is not None],
    )


class ClipDataset(torch.utils.data.Dataset):
    """Clips of segments; indexed by ``(epoch, index)`` keys, as `EpochBatchSampler` yields them.

    Picklable (DataLoader workers each hold a copy). The key carries the epoch so that every draw is
    a function of (seed, epoch, index) even with persistent workers.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        source: FrameSource,
        target: str,
        clip_frames: int,
        clip_stride: int,
        crop: int,
        train: bool,
        scale_range: tuple[int, int] = (224, 288),
        test_size: int = 256,
        fallback_fps: float | None = None,
        seed: int = 0,
        clip_sampling: str = "centred",
        snippet_frames: int = 1,
    ) -> None:
        """
        Args:
            rows: segment rows (``featstore.epic.annotations.read_segments`` columns), labelled.
            source: where frames come from.
            target: ``"verb"`` or ``"noun"``: which label a clip carries.
            clip_frames, clip_stride: the clip (the build's sampling).
            crop: side of the square crop.
            train: random centre, scale and crop; else the centre clip, ``test_size``, centre crop.
            scale_range: training short side range.
            test_size: validation short side.
            fallback_fps: frame rate when the source knows none (as `featstore build --fps`).
            seed: the run's seed.
            clip_sampling: the backbone's (its record's): ``"centred"`` or ``"segments"`` (TSN / TSM).
            snippet_frames: frames per clip sample stacked as channels (TSN / TSM flow: 5).
        """
        self.rows = [dict(row) for row in rows]
        self.source = source
        self.label_column = f"{target}_class"
        self.sampling = SamplingConfig(clip_frames=clip_frames, clip_stride=clip_stride, size=test_size,
                                       clip_sampling=clip_sampling, snippet_frames=snippet_frames)
        self.crop = crop
        self.train = train
        self.scale_range = scale_range
        self.test_size = test_size
        self.fallback_fps = fallback_fps
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> Clip:
        epoch, index = key
        row = self.rows[index]
        label = int(row[self.label_column])
        try:
            return self._read(epoch, index, row, label)
        except (FrameError, OSError) as err:
            # A bad input (missing / corrupt / truncated file) skips this sample only; the message
            # names the file or the video.
            return Clip(index=index, epoch=epoch, label=label, error=str(err))

    def _read(self, epoch: int, index: int, row: Mapping[str, Any], label: int) -> Clip:
        participant, video = str(row["participant_id"]), str(row["video_id"])
        start, stop = int(row["start_frame"]), int(row["stop_frame"])
        fps = self.source.fps(video) or self.fallback_fps
        if fps is None:
            return Clip(index=index, epoch=epoch, label=label, error=(
                f"no frame rate for video {video}: it is not in the video info file and frame folders "
                "carry none; give --fps or --video-info"))
        rng = sample_rng(self.seed, epoch, index)
        n_frames = self.source.n_frames(participant, video)
        segments = self.sampling.clip_sampling == "segments"
        if self.train and not segments:
            centre = training_centre(start, stop, rng)
            start = stop = centre  # a one-frame segment: the build's clip centred on the drawn frame
        try:
            plan = plan_segment(start, stop, fps=float(fps), n_frames=n_frames, config=self.sampling)
        except ValueError as err:  # e.g. a segment that starts past the video's last frame
            return Clip(index=index, epoch=epoch, label=label, error=f"cannot sample video {video}: {err}")
        clip_frames = list(plan.clip_frames)
        if self.train and segments:
            clip_frames = training_snippet_frames(start, stop, segments=self.sampling.clip_frames,
                                                  snippet_frames=self.sampling.snippet_frames,
                                                  stride=self.sampling.clip_stride, n_frames=n_frames, rng=rng)
        frames = self.source.read(participant, video, clip_frames)  # (T * L, H, W, C) uint8
        if self.train:
            frames = random_crop(frames, scale_range=self.scale_range, crop=self.crop, rng=rng)
        else:
            frames = centre_crop(frames, size=self.test_size, crop=self.crop)
        frames = stack_snippets(frames, self.sampling.snippet_frames)  # (T, crop, crop, L * C)
        return Clip(index=index, epoch=epoch, label=label, frames=torch.from_numpy(frames), centre=plan.clip_center)


class EpochBatchSampler:
    """Batches of ``(epoch, index)`` keys: a seeded permutation per epoch (or file order), cut into batches.

    Under data parallelism every process iterates the same global batches and takes its share
    (``batch[rank::world_size]``), so the global batch, and what each epoch trains on, do not depend
    on the number of processes. `set_epoch` chooses the epoch; the sampler runs in the main process,
    so it works with persistent workers.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        """
        Args:
            n: samples in the dataset.
            batch_size: samples per global batch (the last one may be smaller).
            shuffle: a permutation per epoch (training) or file order (validation).
            seed: the run's seed.
            rank, world_size: this process's share of every batch.
        """
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield the batches of 0-based ``epoch``."""
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """(n,) sample indices of an epoch, in training order."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(self.n)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches of sample indices (every process's share together)."""
        order = self.order(epoch)
        return [order[lo:lo + self.batch_size] for lo in range(0, self.n, self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self.global_batches(epoch):
            yield [(epoch, int(index)) for index in batch[self.rank::self.world_size]]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class TooManyFailures(FinetuneError):
    """More segments of an epoch could not be read than the run allows."""


@dataclass
class FailureLog:
    """The segments a run could not read: every one with its epoch and reason, counted per epoch.

    Attributes:
        max_fraction: share of an epoch's segments that may fail before the run stops.
        entries: ``{"uid", "epoch" (1-based), "phase" ('train' | 'val'), "reason"}`` dicts.
    """

    max_fraction: float = 0.01
    entries: list[dict[str, Any]] = field(default_factory=list)
    items: str = "segments"  # what is read, for messages ('images' for a detector)
    period: str = "epoch"  # what the counts are per ('round' of iterations for a detector)

    def add(self, *, uid: str, epoch: int, phase: str, reason: str) -> None:
        """Record one unreadable segment (``epoch`` 0-based; stored 1-based as the logs count)."""
        self.entries.append({"uid": uid, "epoch": epoch + 1, "phase": phase, "reason": reason})

    def count(self, epoch: int, phase: str) -> int:
        """Failures of 0-based ``epoch`` in ``phase``."""
        return sum(1 for entry in self.entries if entry["epoch"] == epoch + 1 and entry["phase"] == phase)

    def check(self, epoch: int, phase: str, total: int) -> None:
        """Stop the run when more than ``max_fraction`` of the ``total`` segments of an epoch failed.

        Called after every batch (the count only grows, so an epoch that will fail stops as soon as
        it is certain) and at the end of each epoch.

        Raises:
            TooManyFailures: naming the count, the limit and the first reasons.
        """
        failed = self.count(epoch, phase)
        if total and failed > self.max_fraction * total:
            these = [entry for entry in self.entries if entry["epoch"] == epoch + 1 and entry["phase"] == phase]
            shown = "; ".join(f"{entry['uid']}: {entry['reason']}" for entry in these[:5])
            more = f"; ... and {len(these) - 5} more" if len(these) > 5 else ""
            raise TooManyFailures(
                f"{failed} of {total} {phase} {self.items} of {self.period} {epoch + 1} could not be read, more than the "
                f"{self.max_fraction:.1%} allowed (--max-failed-fraction): {shown}{more}")
