"""`featstore build` against the models' pure forward on the same batches.

Inputs are generated EPIC-layout JPEG folders (``featstore.samples.frames.write_jpeg_video``) at EPIC's
released frame size, an EPIC-55 annotation file, the video info file, and (``--boxes``) a boxes file
with five boxes on every frame. The transformer rows (Omnivore's Swin-B, AVION's ViT) run backbones
only, no detector. Segments follow each other within a video, as in EPIC, so the
detection windows of neighbouring segments share frames (the service detects a shared frame once;
the reference runs exactly the frames the service ran).
"""
from __future__ import annotations

import contextlib
import csv
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import (
    Context,
    Result,
    compare,
    load_average,
    spread,
    synchronize,
)
from featstore.epic.metadata import NUM_CLASSES
from featstore.samples.annotations import (
    SegmentLabel,
    write_epic55_annotations,
    write_video_info,
)
from featstore.samples.frames import write_jpeg_video
from featstore.store.reader import FeatureStore

FPS = 60.0


@dataclass(frozen=True)
class ExtractSetup:
    """What one extraction benchmark builds with."""

    name: str
    segments: int
    videos: int
    frame_hw: tuple[int, int]
    backbone: str
    detector: str | None  # None: backbones only
    use_boxes: bool
    clip_frames: int
    clip_stride: int
    size: int
    batch_size: int
    workers: int
    det_min_size: int | None
    det_max_size: int | None
    repeats: int
    device: str
    noun_backbone: str | None = None  # None: the verb backbone's spec (its outputs are reused)
    clip_sampling: str = "centred"
    amp: str = "fp16"  # autocast dtype on CUDA (BuildConfig.amp)
    verb_map: str | None = None  # --map; None: the build's default

    def describe(self) -> str:
        h, w = self.frame_hw
        boxes = "--boxes (given boxes, no proposals)" if self.use_boxes else "detecting"
        detector = f"{self.detector} {boxes}" if self.detector else "no detector"
        backbones = (f"{self.backbone} as verb and noun backbone" if self.noun_backbone is None
                     else f"{self.backbone} as verb and {self.noun_backbone} as noun backbone")
        sampling = "segments" if self.clip_sampling == "segments" else f"stride {self.clip_stride}"
        map_mode = f", --map {self.verb_map}" if self.verb_map else ""
        amp = f", {self.amp} autocast" if self.device == "cuda" else ""
        return (f"{self.segments} segments in {self.videos} videos of {h}x{w} JPEG frames, "
                f"{self.clip_frames}x{self.size} clips ({sampling}), {backbones}, {detector}{map_mode}, "
                f"batch {self.batch_size}, {self.workers} decode workers, device {self.device}{amp}")


@dataclass(frozen=True)
class Dataset:
    frames: Path
    annotations: Path
    boxes: Path | None
    rows: list[SegmentLabel]
    n_frames: int  # frames of every video


def _write_video(args: tuple[Path, str, str, int, int, int, int]) -> None:
    root, participant, video, n_frames, height, width, seed = args
    write_jpeg_video(root, participant, video, n_frames, height=height, width=width, seed=seed)


def make_dataset(root: Path, setup: ExtractSetup, *, processes: int = 1) -> Dataset:
    """JPEG frames, annotations, video info and a boxes file for ``setup.segments`` segments.

    Each video holds ``ceil(segments / videos)`` consecutive segments of 77 frames (1.28 s) starting
    3 s in, and runs 3 s past the last one, so most detection windows (6 s) are full. 77 frames is
    not a multiple of the 30-frame detection step, so neighbouring segments' detection grids do not
    line up and share few frames (EPIC's segments start anywhere).
    """
    height, width = setup.frame_hw
    per_video = -(-setup.segments // setup.videos)
    segment_frames = 77
    first = int(3 * FPS)
    n_frames = first + per_video * segment_frames + int(3 * FPS)
    videos = [(f"P{i + 1:02d}", f"P{i + 1:02d}_01") for i in range(setup.videos)]
    jobs = [(root / "frames", p, v, n_frames, height, width, i) for i, (p, v) in enumerate(videos)]
    if processes > 1:
        with ProcessPoolExecutor(min(processes, len(jobs))) as pool:
            list(pool.map(_write_video, jobs))
    else:
        for job in jobs:
            _write_video(job)
    rows = []
    num_verbs, num_nouns = NUM_CLASSES["epic55"]
    for i in range(setup.segments):
        participant, video = videos[i % setup.videos]
        k = i // setup.videos
        start = first + k * segment_frames
        rows.append(SegmentLabel(f"e{i:05d}", participant, video, start, start + segment_frames - 1, i % num_verbs,
                                 i % num_nouns))
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", rows, fps=FPS)
    write_video_info(root / "EPIC_video_info.csv", [(video, width, height, n_frames) for _, video in videos], fps=FPS)
    boxes = None
    if setup.use_boxes:
        boxes = root / "boxes.csv"
        rng = np.random.default_rng(0)
        with open(boxes, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["video_id", "frame", "x1", "y1", "x2", "y2", "score", "label"])
            for _, video in videos:
                for frame in range(1, n_frames + 1):
                    for k in range(5):
                        x, y = rng.uniform(0, 0.7, 2)
                        w, h = rng.uniform(0.1, 0.3, 2)
                        writer.writerow([video, frame, f"{x:.4f}", f"{y:.4f}", f"{min(x + w, 1):.4f}",
                                         f"{min(y + h, 1):.4f}", f"{0.9 - 0.1 * k:.2f}", k])
    return Dataset(root / "frames", annotations, boxes, rows, n_frames)


def build_config(setup: ExtractSetup, data: Dataset, store: Path):
    from featstore.extract.config import BuildConfig

    return BuildConfig(
        store=store, annotations=data.annotations, frames_root=data.frames, verb_backbone=setup.backbone,
        noun_backbone=setup.noun_backbone or setup.backbone, detector=setup.detector, boxes=data.boxes,
        boxes_coords="normalized", det_score_thresh=0.0, det_min_size=setup.det_min_size,
        det_max_size=setup.det_max_size, sampling=_sampling(setup), verb_map=setup.verb_map, amp=setup.amp,
        batch_size=setup.batch_size, workers=setup.workers, device=setup.device, progress=False,
    )


def _sampling(setup: ExtractSetup):
    from featstore.epic.sampling import SamplingConfig

    return SamplingConfig(clip_frames=setup.clip_frames, clip_stride=setup.clip_stride, size=setup.size,
                          clip_sampling=setup.clip_sampling)


class ComputeTimer:
    """Wall time the build's main process spends inside the model calls (their outputs are copied to the
    host at the end of each call, so the time includes the device's work)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "ComputeTimer":
        from featstore.extract import service as extraction

        for name in ("run_backbones", "run_detector"):
            original = getattr(extraction, name, None)
            if original is None:
                continue

            def timed(*args, _original=original, **kwargs):
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started

            setattr(extraction, name, timed)
            self._patched.append((extraction, name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in self._patched:
            setattr(module, name, original)

    @property
    def works(self) -> bool:
        return len(self._patched) == 2


def run_build(setup: ExtractSetup, data: Dataset, store: Path) -> tuple[float, float, float | None]:
    """One `featstore build` into a fresh store.

    Returns:
        (the service's own segments/s, wall seconds, share of its loop spent inside model calls or None).
    """
    from featstore.extract.service import build_store

    with ComputeTimer() as timer:
        started = time.perf_counter()
        report = build_store(build_config(setup, data, store))
        wall = time.perf_counter() - started
    if report.failed:
        raise RuntimeError(f"build failed for {len(report.failed)} segments, e.g. {report.failed[0]}")
    share = timer.seconds / report.seconds if timer.works and report.seconds > 0 else None
    return report.segments_per_second, wall, share


@dataclass
class _Batch:
    clips: torch.Tensor  # (B, 3, T, H, W) float in [0, 1], channels-last strides as in the service
    images: list[torch.Tensor]  # distinct detection frames, (3, h, w) float in [0, 1], likewise
    boxes: list[torch.Tensor]  # per image (k, 4) normalised (``--boxes``), else unused


def predecode(setup: ExtractSetup, store_path: Path, data: Dataset, detector: Any, device: torch.device) -> list[_Batch]:
    """The service's batches, decoded ahead: same segments per batch, same order, same frames.

    Frames come from the same files through the same reader, resizing and sampling plans the
    service uses (``open_frame_source``, ``resize_frames``, ``plan_segment``); a detection frame
    shared by segments of a batch is kept once, and with ``--boxes`` only frames that have boxes
    are kept, as the service does.
    """
    from featstore.epic.boxes import PrecomputedBoxes
    from featstore.epic.frames import open_frame_source
    from featstore.epic.sampling import plan_segment
    from featstore.extract.decode import resize_frames

    store = FeatureStore.open(store_path)
    input_size = tuple(int(v) for v in store.manifest["provenance"]["input_size"])
    sampling = _sampling(setup)
    source = open_frame_source(frames_root=data.frames, fps_by_video={r.video_id: FPS for r in data.rows})
    given = (PrecomputedBoxes.read(data.boxes, coords="normalized", videos={r.video_id for r in data.rows})
             if data.boxes is not None else None)
    image_hw = _detector_image_size(setup, detector) if detector is not None else None
    ordered = sorted(data.rows, key=lambda r: (r.video_id, r.start_frame, r.uid))  # the service's order

    # The service's layouts: its clips are stacked (B, T, H, W, C) uint8 and permuted to
    # (B, C, T, H, W) on the device, its frames (h, w, 3) permuted to (3, h, w); both stay in that
    # memory layout (channels last) when cast to float, and convolutions run at different speeds on
    # different layouts, so the reference gets exactly those tensors.
    def clips_on_device(clips: list[np.ndarray]) -> torch.Tensor:
        stacked = torch.from_numpy(np.ascontiguousarray(np.stack(clips)))  # (B, T, H, W, C) uint8
        return stacked.to(device).permute(0, 4, 1, 2, 3).float().div_(255.0)

    def image_on_device(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float().div_(255.0)

    batches = []
    for lo in range(0, len(ordered), setup.batch_size):
        clips, images, boxes, seen = [], [], [], set()
        for row in ordered[lo:lo + setup.batch_size]:
            plan = plan_segment(row.start_frame, row.stop_frame, fps=FPS, n_frames=data.n_frames, config=sampling)
            clip = source.read(row.participant_id, row.video_id, list(plan.clip_frames))
            clips.append(resize_frames(clip, *input_size))
            for frame in plan.detection_frames if detector is not None else ():
                if (row.video_id, frame) in seen:
                    continue
                found = None
                if given is not None:
                    found = given.frame(row.video_id, frame, topk=sampling.det_topk, frame_size=setup.frame_hw)
                    if found is None:
                        continue
                seen.add((row.video_id, frame))
                image = source.read(row.participant_id, row.video_id, [frame])
                images.append(image_on_device(resize_frames(image, *image_hw)[0]))
                boxes.append(torch.from_numpy(found[0]).to(device) if found is not None else None)
        batches.append(_Batch(clips_on_device(clips), images, boxes))
    return batches


def _detector_image_size(setup: ExtractSetup, detector: Any) -> tuple[int, int]:
    """The size the service hands frames to the detector at: the source frame, shrunk in the decode
    workers to the detector's own short side when larger (it would resize them to that anyway)."""
    from featstore.extract.plan import input_size_for

    height, width = setup.frame_hw
    min_size = getattr(getattr(detector, "transform", None), "min_size", None)
    if min_size:
        short = int(min(min_size)) if isinstance(min_size, (tuple, list)) else int(min_size)
        if min(height, width) > short:
            return input_size_for(height, width, short)
    return height, width


def pure_forward(setup: ExtractSetup, store_path: Path, data: Dataset) -> tuple[Callable[[], None], int, str]:
    """The models alone on pre-decoded device tensors, in the service's batches.

    The models are the service's: built with the same seed (the service seeds each build with
    ``BuildConfig.seed`` = 0), so random weights detect the same boxes. The verb backbone runs once
    per batch (the noun spec is the same, so the service reuses its outputs); the detector pools
    features at the given boxes (``--boxes``) or detects, in chunks of 16 frames as the service does.

    Returns:
        (a callable running every batch once, segments per call, a description of the batches).
    """
    from featstore.extract.config import AMP_DTYPES
    from featstore.models import build_backbone, build_detector

    device = torch.device(setup.device)
    noun_backbone = detector = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone, _ = build_backbone(setup.backbone)
        if setup.noun_backbone is not None and setup.noun_backbone != setup.backbone:
            torch.manual_seed(0)
            noun_backbone, _ = build_backbone(setup.noun_backbone)
        if setup.detector is not None:
            torch.manual_seed(0)
            detector, _ = build_detector(setup.detector, score_thresh=0.0, min_size=setup.det_min_size,
                                         max_size=setup.det_max_size)
    for model in (backbone, noun_backbone, detector):
        if model is not None:
            model.to(device).eval()
    batches = predecode(setup, store_path, data, detector, device)
    det_chunk = 16  # BuildConfig.det_batch_size default
    sync = synchronize(device)

    def forward_all() -> None:
        autocast = (torch.autocast(device_type="cuda", dtype=AMP_DTYPES[setup.amp]) if device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            for batch in batches:
                backbone(batch.clips)
                if noun_backbone is not None:
                    noun_backbone(batch.clips)
                for lo in range(0, len(batch.images), det_chunk):
                    if setup.use_boxes:
                        detector.features_at(batch.images[lo:lo + det_chunk], batch.boxes[lo:lo + det_chunk])
                    else:
                        detector.detect(batch.images[lo:lo + det_chunk], 5)
        if sync is not None:
            sync()

    total = sum(len(b.clips) for b in batches)
    frames = sum(len(b.images) for b in batches)
    _, _, _, height, width = batches[0].clips.shape
    detail = f"{len(batches)} batches, "
    if detector is not None:
        detail += f"{frames} distinct detection frames ({frames / total:.1f} per segment), "
    detail += f"clip input {height}x{width}"
    return forward_all, total, detail


def extract_pipeline(ctx: Context, wanted: set[str]) -> list[Result]:
    sizes = ctx.sizes
    setup = ExtractSetup(
        name="extract_pipeline_vs_forward", segments=sizes.extract_segments, videos=2, frame_hw=sizes.frame_hw,
        backbone="r3d_18", detector=sizes.detector, use_boxes=True, clip_frames=sizes.clip_frames, clip_stride=2,
        size=sizes.clip_size, batch_size=sizes.extract_batch, workers=sizes.extract_workers,
        det_min_size=sizes.det_min_size, det_max_size=sizes.det_max_size, repeats=sizes.extract_repeats,
        device="cpu",
    )
    return [_extract(ctx, setup, goal=">= 0.85")]


def _extract(ctx: Context, setup: ExtractSetup, *, goal: str, processes: int = 1,
             unit: str = "segments/s") -> Result:
    """A warm-up build and forward pass, then builds and forward passes in turns (shared-machine drift
    hits both alike); every build goes into a fresh store."""
    root = ctx.workspace.path(setup.name)
    rates, ref_rates, shares = [], [], []
    try:
        data = make_dataset(root / "data", setup, processes=processes)
        rate, wall, _ = run_build(setup, data, root / "store-warmup")
        ctx.log(f"  build warm-up: {rate:.2f} {unit} (wall {wall:.1f} s)")
        forward_all, total, detail = pure_forward(setup, root / "store-warmup", data)
        forward_all()  # warm-up
        for repeat in range(setup.repeats):
            rate, wall, share = run_build(setup, data, root / f"store{repeat}")
            ctx.workspace.remove(f"{setup.name}/store{repeat}")
            started = time.perf_counter()
            forward_all()
            ref_rate = total / (time.perf_counter() - started)
            rates.append(rate)
            ref_rates.append(ref_rate)
            if share is not None:
                shares.append(share)
            ctx.log(f"  round {repeat + 1}: build {rate:.2f} {unit} (wall {wall:.1f} s), "
                    f"forward only {ref_rate:.2f} {unit}")
    finally:
        ctx.workspace.remove(setup.name)
    ours, ref = float(np.median(rates)), float(np.median(ref_rates))
    waits = (f"; the main process is inside model calls {100 * float(np.median(shares)):.0f} % of the loop, so the "
             f"{'GPU' if setup.device == 'cuda' else 'compute'} waits ~{100 * (1 - float(np.median(shares))):.0f} %"
             if shares else "")
    notes = (f"{setup.describe()}; {detail}; ours = the service's {unit} (BuildReport: decode, models, "
             f"slots, LMDB writes), into a fresh store each time; reference = the same models (same seed) on the "
             f"same frames, decoded beforehand and already on the device as float tensors in the service's "
             f"layout, in the same batches; a warm-up of each, then {setup.repeats} rounds of one build and one "
             f"forward pass, medians; samples ours {spread(rates)}, reference {spread(ref_rates)}{waits}; "
             f"torch threads {torch.get_num_threads()}; load average {load_average()}")
    return compare(setup.name, ours, ref, unit=unit, goal=goal, notes=notes)


def gpu_extract(ctx: Context, wanted: set[str]) -> list[Result]:
    """`featstore build` with r3d_50 64x256 and the ResNet-50 FPN Faster R-CNN (detecting) on CUDA."""
    import os

    sizes = ctx.sizes
    cores = os.cpu_count() or 4
    quick = sizes.quick
    setup = ExtractSetup(
        name="gpu_extract_r3d50_frcnn", segments=4 if quick else 96, videos=2 if quick else 4,
        frame_hw=(90, 160) if quick else (256, 456), backbone="r3d_50",
        detector="fasterrcnn_mobilenet_v3_large_320_fpn" if quick else "fasterrcnn_resnet50_fpn",
        use_boxes=False, clip_frames=8 if quick else 64, clip_stride=2, size=32 if quick else 256,
        batch_size=2 if quick else 8, workers=1 if quick else max(2, cores - 2),
        det_min_size=64 if quick else None, det_max_size=128 if quick else None,
        repeats=1 if quick else 2, device=ctx.device,
    )
    return [_extract(ctx, setup, goal="report", processes=1 if quick else min(cores, setup.videos))]


def extract_transformers(ctx: Context, wanted: set[str]) -> list[Result]:
    """`featstore build` with both transformer families at a tiny size on the CPU: Omnivore's Swin-B as the
    verb backbone and AVION's ViT-B as the noun backbone (both run on each clip), no detector."""
    sizes = ctx.sizes
    setup = ExtractSetup(
        name="extract_transformers_vs_forward", segments=sizes.extract_segments, videos=2, frame_hw=sizes.frame_hw,
        backbone="omnivore_swinb_epic", noun_backbone="avion_vitb", detector=None, use_boxes=False,
        clip_frames=sizes.clip_frames, clip_stride=4, size=32,
        batch_size=sizes.extract_batch, workers=sizes.extract_workers, det_min_size=None, det_max_size=None,
        repeats=sizes.extract_repeats, device="cpu", verb_map="time-mean",
    )
    return [_extract(ctx, setup, goal=">= 0.95", unit="clips/s")]


def _gpu_transformer_setup(ctx: Context, name: str, backbone: str, *, clip_frames: int, clip_stride: int,
                           clip_sampling: str, batch_size: int) -> ExtractSetup:
    """A CUDA transformer row in bf16 (`--gpu-smoke`: tiny, on the CPU). Batches of 32 clips fit 78 GB
    with room to spare by estimate (inference keeps one block's activations, well under 1 GB a clip;
    attention runs in torch's memory-efficient / flash kernels); unmeasured: no GPU was lent."""
    import os

    quick = ctx.sizes.quick
    cores = os.cpu_count() or 4
    return ExtractSetup(
        name=name, segments=4 if quick else 192, videos=2 if quick else 4, frame_hw=(90, 160) if quick else (256, 456),
        backbone=backbone, detector=None, use_boxes=False, clip_frames=8 if quick else clip_frames,
        clip_stride=clip_stride, size=32 if quick else 224, batch_size=2 if quick else batch_size,
        workers=1 if quick else max(2, cores - 2), det_min_size=None, det_max_size=None, repeats=1 if quick else 2,
        device=ctx.device, clip_sampling=clip_sampling, amp="bf16", verb_map="time-mean",
    )


def gpu_extract_omnivore(ctx: Context, wanted: set[str]) -> list[Result]:
    """`featstore build` with Omnivore's Swin-B (its record: 32 frames, stride 4, short side 224) on CUDA, bf16."""
    setup = _gpu_transformer_setup(ctx, "gpu_extract_omnivore_swinb", "omnivore_swinb_epic", clip_frames=32,
                                   clip_stride=4, clip_sampling="centred", batch_size=32)
    return [_extract(ctx, setup, goal=">= 0.95", unit="clips/s", processes=1 if ctx.sizes.quick else 4)]


def gpu_extract_avion(ctx: Context, wanted: set[str]) -> list[Result]:
    """`featstore build` with AVION's ViT-L/14 (its record: 16 segments, short side 224) on CUDA, bf16."""
    setup = _gpu_transformer_setup(ctx, "gpu_extract_avion_vitl", "avion_vitl", clip_frames=16, clip_stride=2,
                                   clip_sampling="segments", batch_size=32)
    return [_extract(ctx, setup, goal=">= 0.95", unit="clips/s", processes=1 if ctx.sizes.quick else 4)]
