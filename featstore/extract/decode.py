"""Decoding a build's segments (DataLoader workers): plan the frames, read them, resize the clip.

`SegmentFrames` decodes one segment per item: its sampling plan (`featstore.epic.sampling.plan_segment`,
or one plan per temporal view, `featstore.epic.views.plan_views`), the clips and the detection frames
read in one pass over the video (each distinct frame decoded and resized once), the clips resized to
the store's input size. The views of a segment share most frames: a clip two views have in common is
kept once (`DecodedSegment.clip_rows`), and the detection frames are the union of the views' windows. A bad input becomes a failed item (`DecodedSegment.error`), not an exception, so one
corrupt JPEG costs one segment. `collate_segments` stacks a batch's clips in the worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from featstore.epic.frames import FrameError, FrameSource, stack_snippets
from featstore.epic.sampling import SamplingConfig, SegmentPlan
from featstore.epic.views import plan_views
from featstore.extract.config import BuildError
from featstore.extract.plan import input_size_for, store_input_size

__all__ = ["DecodedBatch", "DecodedSegment", "SegmentFrames", "clip_batches", "collate_segments", "decoded_batches",
           "probe_input_size", "resize_frames"]


@dataclass
class DecodedSegment:
    """One segment's frames, ready for the models (or why they could not be read).

    Attributes:
        index: position in the build's to-do list.
        plan: the sampling plan of view 0 (None when planning failed).
        clip: uint8 (D, T, H, W, C): the segment's D distinct clips at the store's input size (D = 1
            without views); with stacked frames (TSN / TSM flow) T is the number of samples and C =
            snippet frames x channels.
        plans: the plan of each view (``plans[0] is plan``).
        clip_rows: for each view, its clip's row in ``clip`` (views with the same frames share one).
        det_frames: the distinct detection frames of every view, ascending.
        det_images: uint8 (F, h, w, 3) RGB frames for the detector, F = len(det_frames).
        source_size: (H, W) of the video's source RGB frames (to normalise pixel boxes).
        error: why the segment failed, or None.
    """

    index: int
    plan: SegmentPlan | None = None
    clip: Tensor | None = None
    plans: tuple[SegmentPlan, ...] = ()
    clip_rows: tuple[int, ...] = (0,)
    det_frames: tuple[int, ...] = ()
    det_images: Tensor | None = None
    source_size: tuple[int, int] | None = None
    error: str | None = None


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize frames to exactly (height, width) (bilinear, antialiased, like `resize_short_side`).

    Args:
        frames: uint8 (T, H0, W0, C).
        height, width: the output size.
    Returns:
        uint8 (T, height, width, C); the input itself when already that size.
    """
    t, h0, w0, _ = frames.shape
    if (h0, w0) == (height, width) or t == 0:
        return frames
    batch = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, C, H0, W0)
    resized = torch.nn.functional.interpolate(batch, size=(height, width), mode="bilinear",
                                              align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class SegmentFrames(torch.utils.data.Dataset):
    """Decodes one segment per item; picklable, so DataLoader workers each hold a copy."""

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        source: FrameSource,
        det_source: FrameSource | None,
        sampling: SamplingConfig,
        fallback_fps: float | None,
        input_size: tuple[int, int],
        det_short_side: int | None,
        views: Sequence[int] | None = None,
        views_seed: int = 0,
    ) -> None:
        """Args: the segments (to-do order), the frame sources, the sampling, the store's input size,
        the detector's short side; ``views``: each row's number of temporal views (None: one each),
        their centres drawn under ``views_seed`` (`featstore.epic.views.view_centres`)."""
        self.rows = [dict(row) for row in rows]
        self.views = [1] * len(self.rows) if views is None else [int(v) for v in views]
        if len(self.views) != len(self.rows):
            raise ValueError(f"{len(self.rows)} rows but {len(self.views)} view counts")
        self.views_seed = views_seed
        self.source = source
        self.det_source = det_source  # None: no detection frames are read
        self.sampling = sampling
        self.fallback_fps = fallback_fps
        self.input_size = input_size
        self.det_short_side = det_short_side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> DecodedSegment:
        row = self.rows[index]
        try:
            return self._decode(index, row)
        except (FrameError, OSError) as err:
            # A bad input (missing / corrupt / truncated file) fails this segment only; the message
            # names the file or video.
            return DecodedSegment(index=index, error=str(err))

    def _decode(self, index: int, row: Mapping[str, Any]) -> DecodedSegment:
        participant, video = str(row["participant_id"]), str(row["video_id"])
        fps = self.source.fps(video) or self.fallback_fps
        if fps is None:
            return DecodedSegment(index=index, error=(
                f"no frame rate for video {video}: it is not in the video info file and frame folders "
                "carry none; give --fps or --video-info"))
        n_frames = self.source.n_frames(participant, video)
        if self.det_source is not None and self.det_source is not self.source:
            # Flow clips, RGB detections: plan within what both can deliver.
            n_frames = min(n_frames, self.det_source.n_frames(participant, video))
        try:
            plans = plan_views(int(row["start_frame"]), int(row["stop_frame"]), fps=float(fps), n_frames=n_frames,
                               config=self.sampling, count=self.views[index], seed=self.views_seed,
                               uid=str(row["uid"]))
        except ValueError as err:  # e.g. a segment that starts past the video's last frame
            return DecodedSegment(index=index, error=f"cannot sample video {video}: {err}")
        plan = plans[0]
        # Views whose clips have the same frames share one clip (and one backbone pass).
        distinct: dict[tuple[int, ...], int] = {}
        clip_rows = tuple(distinct.setdefault(p.clip_frames, len(distinct)) for p in plans)
        det_frames = (tuple(sorted({f for p in plans for f in p.detection_frames}))
                      if self.det_source is not None else ())
        # Every distinct clip frame once: decoded once by the source, resized once here.
        clip_frames = sorted({f for frames in distinct for f in frames})
        n_clip = len(clip_frames)
        det_images = None
        if self.det_source is self.source:
            # One read: a video file is decoded in one forward pass over the clips and all windows.
            frames = self.source.read(participant, video, clip_frames + list(det_frames))
            unique, det_images = frames[:n_clip], frames[n_clip:]
        else:
            unique = self.source.read(participant, video, clip_frames)
            if det_frames:
                det_images = self.det_source.read(participant, video, list(det_frames))
        source_size = tuple(int(s) for s in (det_images if det_images is not None and len(det_images) else unique).shape[1:3])
        unique = resize_frames(unique, *self.input_size)
        at = {frame: i for i, frame in enumerate(clip_frames)}
        clip = np.stack([stack_snippets(unique[[at[f] for f in frames]], self.sampling.snippet_frames)
                         for frames in distinct])  # (D, T, H, W, C)
        det_tensor = None
        if det_images is not None and len(det_images):
            if self.det_short_side is not None and min(source_size) > self.det_short_side:
                det_images = resize_frames(det_images, *input_size_for(*source_size, self.det_short_side))
            det_tensor = torch.from_numpy(np.ascontiguousarray(det_images))
        return DecodedSegment(
            index=index,
            plan=plan,
            clip=torch.from_numpy(np.ascontiguousarray(clip)),
            plans=tuple(plans),
            clip_rows=clip_rows,
            det_frames=tuple(det_frames),
            det_images=det_tensor,
            source_size=source_size,  # type: ignore[arg-type]
        )


@dataclass
class DecodedBatch:
    """A batch as the main process gets it: the readable segments' clips stacked in the worker.

    Attributes:
        items: every segment of the batch, in to-do order; failed ones carry their error. The
            readable ones' clips have moved into ``clips`` (their ``clip`` is None).
        clips: uint8 (B, T, H, W, C): the distinct clips of the items without an error, item after
            item; None when all failed.
        first_rows: for each readable item (by its ``index``), the row of its first clip in ``clips``.
    """

    items: list[DecodedSegment]
    clips: Tensor | None
    first_rows: dict[int, int] | None = None

    def pin_memory(self) -> "DecodedBatch":
        # Called by the DataLoader's pin thread (CUDA builds): page-locked buffers make the copies
        # to the device asynchronous, while the main process computes the previous batch.
        for item in self.items:
            if item.det_images is not None:
                item.det_images = item.det_images.pin_memory()
        return DecodedBatch(items=self.items, clips=None if self.clips is None else self.clips.pin_memory(),
                            first_rows=self.first_rows)


def collate_segments(items: list[DecodedSegment]) -> DecodedBatch:
    """Stack the clips of a batch (in the worker, so the main process receives one tensor)."""
    good = [item for item in items if item.error is None]
    clips = torch.cat([item.clip for item in good]) if good else None  # type: ignore[misc]
    first_rows, row = {}, 0
    for item in good:
        first_rows[item.index] = row
        row += int(item.clip.shape[0])  # type: ignore[union-attr]
        item.clip = None
    return DecodedBatch(items=items, clips=clips, first_rows=first_rows)


def clip_batches(views: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive segments in batches of at most ``batch_size`` views (a segment of more views is a
    batch of its own): the decoded clips in flight, and one backbone forward, stay near the batch size.

    Args:
        views: each segment's number of views, in to-do order.
        batch_size: views per batch, >= 1.
    Returns:
        The batches' segment indices (without views: chunks of ``batch_size`` segments).
    """
    batches: list[list[int]] = []
    current: list[int] = []
    held = 0
    for index, count in enumerate(views):
        if current and held + count > batch_size:
            batches.append(current)
            current, held = [], 0
        current.append(index)
        held += count
    if current:
        batches.append(current)
    return batches


def decoded_batches(dataset: SegmentFrames, *, batch_size: int, workers: int,
                    pin_memory: bool) -> Iterator[DecodedBatch]:
    """Batches of decoded segments, decoded ahead by ``workers`` processes (0: in this process).

    Args:
        dataset: the segments to decode, in to-do order.
        batch_size: clips per batch: segments without temporal views, else consecutive segments
            whose views add up to at most this (`clip_batches`).
        workers: decode worker processes; they start with the iterator.
        pin_memory: page-locked batches, for asynchronous copies to a CUDA device.
    """
    if len(dataset) == 0:
        return iter(())
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=clip_batches(dataset.views, batch_size),
        num_workers=workers,
        collate_fn=collate_segments,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
    )
    return iter(loader)


def probe_input_size(rows: Sequence[Mapping[str, Any]], source: FrameSource,
                     sampling: SamplingConfig) -> tuple[tuple[int, int], str]:
    """The store's (H, W): the first readable video of the selection (sorted by uid), resized as
    ``sampling`` says (`featstore.extract.plan.store_input_size`).

    Returns:
        ((H, W), video_id it came from).
    Raises:
        BuildError: no video of the selection can be read (with the first reason).
    """
    first_error: str | None = None
    tried: set[str] = set()
    for row in rows:
        video = str(row["video_id"])
        if video in tried:
            continue
        tried.add(video)
        try:
            n_frames = source.n_frames(str(row["participant_id"]), video)
            frame = min(max(1, int(row["start_frame"])), n_frames) if n_frames else int(row["start_frame"])
            image = source.read(str(row["participant_id"]), video, [frame])  # (1, H0, W0, C)
        except (FrameError, OSError) as err:
            first_error = first_error or str(err)
            continue
        return store_input_size(int(image.shape[1]), int(image.shape[2]), sampling), video
    raise BuildError(f"no video of the selection could be read to size the store: {first_error}")
