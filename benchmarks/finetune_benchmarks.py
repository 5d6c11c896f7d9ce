"""Stage 1 (`featstore finetune`): the real fine-tune loop against its compute alone.

``finetune_loop_vs_step``: clips/s of `finetune.backbone.finetune` (JPEG frames decoded in
DataLoader workers, scale and crop augmentation on uint8, the float conversion, forward, backward,
SGD step) over clips/s of forward + backward + step of the same model on clips already in memory,
in batches of the same size. The loop's rate is the run's own per-epoch figure (``clips_per_s`` in
its metrics.json history: from the epoch's first batch request to its last step), taken over the
epochs after the first (the first warms the allocator and the page cache, and starts the decode
workers, which persist across epochs).
The inputs are generated EPIC-layout JPEG folders at EPIC's released frame size.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Context, Result, compare, load_average, spread, synchronize
from featstore.epic.metadata import NUM_CLASSES
from featstore.samples.annotations import SegmentLabel, write_epic55_annotations, write_video_info
from featstore.samples.frames import write_jpeg_video

FPS = 60.0
SEGMENT_FRAMES = 45  # a short EPIC segment (0.75 s): room for the clip's centre to be drawn


@dataclass(frozen=True)
class LoopSetup:
    """What one fine-tune benchmark trains."""

    name: str
    backbone: str
    segments: int  # training clips per epoch
    frame_hw: tuple[int, int]
    clip_frames: int
    clip_stride: int
    crop: int
    scale_range: tuple[int, int]
    batch_size: int
    workers: int
    epochs: int  # the first is not timed
    device: str
    amp: str = "off"

    def describe(self) -> str:
        h, w = self.frame_hw
        return (f"{self.backbone} {self.clip_frames}x{self.crop} (stride {self.clip_stride}, short side drawn in "
                f"{list(self.scale_range)}), batch {self.batch_size}, {self.segments} clips an epoch from {h}x{w} "
                f"JPEG frames, {self.workers} decode workers, device {self.device}, amp {self.amp}")


def make_dataset(root: Path, setup: LoopSetup) -> Path:
    """JPEG frames, an EPIC-55 annotation file and the video info file; returns the annotation file."""
    height, width = setup.frame_hw
    videos = 2
    per_video = -(-setup.segments // videos)
    n_frames = per_video * SEGMENT_FRAMES + 2 * setup.clip_frames * setup.clip_stride
    rows = []
    num_verbs, num_nouns = NUM_CLASSES["epic55"]
    for v in range(videos):
        participant, video = f"P{v + 1:02d}", f"P{v + 1:02d}_01"
        write_jpeg_video(root / "frames", participant, video, n_frames, height=height, width=width, seed=v)
        for k in range(per_video):
            if len(rows) < setup.segments:
                start = setup.clip_frames * setup.clip_stride + k * SEGMENT_FRAMES
                i = len(rows)
                rows.append(SegmentLabel(f"f{i:05d}", participant, video, start, start + SEGMENT_FRAMES - 1,
                                         i % num_verbs, i % num_nouns))
    write_video_info(root / "EPIC_video_info.csv",
                     [(f"P{v + 1:02d}_01", width, height, n_frames) for v in range(videos)], fps=FPS)
    return write_epic55_annotations(root / "EPIC_train_action_labels.csv", rows, fps=FPS)


def loop_rate(setup: LoopSetup, annotations: Path, out: Path) -> tuple[float, list[float]]:
    """The fine-tune loop's clips/s (median over the epochs after the first) and every epoch's rate."""
    from finetune.backbone import finetune
    from finetune.config import make_config

    low, high = setup.scale_range
    config = make_config(
        out=out, annotations=annotations, frames_root=annotations.parent / "frames", backbone=setup.backbone,
        target="verb", recipe="r2plus1d-34", epochs=setup.epochs, batch_size=setup.batch_size,
        clip_frames=setup.clip_frames, clip_stride=setup.clip_stride, crop=setup.crop, scale_range=(low, high),
        test_size=low, workers=setup.workers, device=setup.device, amp=setup.amp, progress=False,
        lr_steps=(), lr=1e-3)
    finetune(config, log=lambda _line: None)
    history = json.loads((out / "metrics.json").read_text())["history"]
    rates = [entry["clips_per_s"] for entry in history]
    return statistics.median(rates[1:] or rates), rates


def step_rate(setup: LoopSetup, steps: int, *, rounds: int = 2) -> tuple[float, list[float]]:
    """clips/s of forward + backward + SGD step on clips already on the device (median of rounds)."""
    from finetune.model import build_video_classifier

    device = torch.device(setup.device)
    model, _record, _init = build_video_classifier(setup.backbone, num_classes=NUM_CLASSES["epic55"][0])
    model = model.to(device)
    use_cl = device.type == "cuda"
    if use_cl:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    shape = (setup.batch_size, 3, setup.clip_frames, setup.crop, setup.crop)
    clips = torch.rand(shape, generator=generator).to(device)
    if use_cl:
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, NUM_CLASSES["epic55"][0], (setup.batch_size,), generator=generator).to(device)
    dtype = torch.bfloat16 if setup.amp == "bf16" else torch.float16

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and setup.amp != "off"):
            loss = F.cross_entropy(model(clips), labels)
        loss.backward()
        optimizer.step()

    sync = synchronize(device) or (lambda: None)
    one_step()  # warm-up
    rates = []
    for _ in range(rounds):
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync()
        rates.append(steps * setup.batch_size / (time.perf_counter() - started))
    return statistics.median(rates), rates


def _measure(ctx: Context, setup: LoopSetup, *, goal: str) -> Result:
    root = ctx.workspace.path(setup.name)
    annotations = make_dataset(root / "data", setup)
    ctx.log(f"   {setup.describe()}")
    ours, loop_rates = loop_rate(setup, annotations, root / "run")
    steps = max(1, setup.segments // setup.batch_size)
    reference, step_rates = step_rate(setup, steps)
    notes = (f"{setup.describe()}; ours: the run's clips/s per epoch after the first ({spread(loop_rates)} over "
             f"all {len(loop_rates)}); reference: {steps} steps on one batch in memory, median of 2 rounds "
             f"({spread(step_rates)}); torch threads {torch.get_num_threads()}; load average {load_average()}")
    return compare(setup.name, ours, reference, unit="clips/s", goal=goal, notes=notes)


def finetune_loop(ctx: Context, wanted: set[str]) -> list[Result]:
    """CPU: r3d_18 at 8x112 (quick: 4x16 on small frames, a smoke test of the code)."""
    quick = ctx.sizes.quick
    setup = LoopSetup(
        name="finetune_loop_vs_step", backbone="r3d_18", segments=4 if quick else 24,
        frame_hw=(45, 80) if quick else (256, 456), clip_frames=4 if quick else 8, clip_stride=2,
        crop=16 if quick else 112, scale_range=(16, 20) if quick else (128, 160), batch_size=2 if quick else 8,
        workers=1 if quick else 2, epochs=2, device="cpu")
    return [_measure(ctx, setup, goal=">= 0.85")]


def gpu_finetune(ctx: Context, wanted: set[str]) -> list[Result]:
    """CUDA (prepared for an H200): r3d_50 at 64x224, batch 8, bf16; --gpu-smoke runs it small on the CPU."""
    quick = ctx.sizes.quick
    cores = os.cpu_count() or 4
    setup = LoopSetup(
        # --gpu-smoke: 32 crops, batch 4 (at 16 x 16 and batch 2 r3d_50's last BatchNorm sees too few values: NaN)
        name="gpu_finetune_r3d50_loop_vs_step", backbone="r3d_50", segments=8 if quick else 128,
        frame_hw=(90, 160) if quick else (256, 456), clip_frames=4 if quick else 64, clip_stride=2,
        crop=32 if quick else 224, scale_range=(32, 40) if quick else (224, 288), batch_size=4 if quick else 8,
        workers=1 if quick else max(2, cores - 2), epochs=2 if quick else 3, device=ctx.device, amp="bf16")
    return [_measure(ctx, setup, goal="report" if quick else ">= 0.85")]
