"""The tiny EPIC-layout dataset and build settings that the extraction, `featstore build` and
reliability tests share.

Models are randomly initialised (nothing is downloaded): r3d_18 for both backbones, the MobileNet
Faster R-CNN with score threshold 0 (so random weights still detect) at a small input size, 8-frame
clips at a 32-pixel short side. `small_config` (Python) and `tiny_build_flags` (CLI) spell the same
settings.
"""
from __future__ import annotations

from pathlib import Path

from featstore.extract.config import BuildConfig
from featstore.samples.annotations import (
    SegmentLabel,
    write_epic55_annotations,
    write_video_info,
)
from featstore.samples.frames import write_jpeg_video
from featstore.epic.sampling import SamplingConfig

HEIGHT, WIDTH = 90, 160  # generated frame size
N_FRAMES = 300  # frames per generated video (5 s at 60 fps: detection windows run past both ends)
FPS = 60.0
DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"
SMALL = SamplingConfig(clip_frames=8, clip_stride=2, size=32)
VIDEOS = (("P01", "P01_01"), ("P02", "P02_01"))


def make_epic_dataset(root: Path, *, n_segments: int = 6, flow: bool = False) -> tuple[Path, Path]:
    """EPIC-layout JPEG frames of two videos, an EPIC-55 annotation file and its video info.

    Segment i (uid ``s{i}``) is 61 frames long, in video i % 2, starting at 20 + 60 * (i // 2): the
    first ones sit at the videos' start, so their detection windows run past it (padded slots).

    Args:
        root: the folder to write in (``frames/``, ``EPIC_train_action_labels.csv``,
            ``EPIC_video_info.csv``).
        n_segments: how many segments (at most 8 fit in the two 300-frame videos).
        flow: also write flow frames (``u``/``v``) for each video.
    Returns:
        (frames root, annotation file).
    """
    frames = root / "frames"
    for seed, (participant, video) in enumerate(VIDEOS):
        write_jpeg_video(frames, participant, video, N_FRAMES, height=HEIGHT, width=WIDTH, seed=seed)
        if flow:
            write_jpeg_video(frames, participant, video, N_FRAMES, height=HEIGHT, width=WIDTH, seed=seed,
                             modality="flow")
    segments = [
        SegmentLabel(f"s{i}", *VIDEOS[i % 2], 20 + 60 * (i // 2), 80 + 60 * (i // 2), i % 3, i % 4)
        for i in range(n_segments)
    ]
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments, fps=FPS)
    write_video_info(root / "EPIC_video_info.csv", [(video, WIDTH, HEIGHT, N_FRAMES) for _, video in VIDEOS], fps=FPS)
    return frames, annotations


def small_config(store: Path, annotations: Path, frames: Path | None, **overrides) -> BuildConfig:
    """A `BuildConfig` at the tiny settings, in-process (``workers=0``), three segments a batch.

    Args:
        store, annotations, frames: the build's paths (``frames`` None with ``videos_dir=`` given).
        overrides: any other `BuildConfig` field.
    """
    values = dict(
        store=store, annotations=annotations, frames_root=frames, verb_backbone="r3d_18", noun_backbone="r3d_18",
        detector=DETECTOR, det_score_thresh=0.0, det_min_size=64, det_max_size=128, sampling=SMALL,
        workers=0, batch_size=3, progress=False,
    )
    values.update(overrides)
    return BuildConfig(**values)


def tiny_build_flags(*, size: int = SMALL.size, detector: str = DETECTOR) -> list[str]:
    """The `featstore build` options of `small_config`'s models and sampling (short side ``size``)."""
    return ["--verb-backbone", "r3d_18", "--noun-backbone", "r3d_18", "--detector", detector,
            "--det-score-thresh", "0", "--det-min-size", "64", "--det-max-size", "128",
            "--clip-frames", str(SMALL.clip_frames), "--clip-stride", str(SMALL.clip_stride), "--size", str(size)]


def invoke_featstore(*args: object):
    """``featstore ARGS...`` through click's test runner (exceptions propagate); returns its Result."""
    from click.testing import CliRunner

    from cli.featstore_cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tiny_build(store: Path, annotations: Path, frames: Path, *extra: object, size: int = 32,
               detector: str = DETECTOR):
    """``featstore build`` of the tiny dataset at `tiny_build_flags`, without progress bars."""
    return invoke_featstore("build", store, "--annotations", annotations, "--frames", frames,
                            *tiny_build_flags(size=size, detector=detector), "--no-progress", *extra)
