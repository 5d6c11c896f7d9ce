"""Small generated EPIC-layout datasets for the stage-1 tests, and a one-thread torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from featstore.samples.annotations import (
    SegmentLabel,
    write_epic55_annotations,
    write_video_info,
)
from featstore.samples.frames import write_jpeg_video
from finetune.config import FinetuneConfig, make_config
from tests.helpers.detection import write_object_images

HEIGHT, WIDTH = 48, 64  # generated frames: short side 48
N_FRAMES = 100
FPS = 60.0
# Two training participants and one validation participant (the LFB split's sides of P25).
VIDEOS = (("P01", "P01_01"), ("P02", "P02_01"), ("P26", "P26_01"))
SEGMENT_FRAMES = 20
TRAIN_WHERE = "participant_id <= 'P25'"
VAL_WHERE = "participant_id >= 'P26'"


@dataclass(frozen=True)
class SmallEpic:
    root: Path
    frames: Path
    annotations: Path
    segments: tuple[SegmentLabel, ...]

    def frame_file(self, segment: SegmentLabel, frame: int) -> Path:
        return self.frames / segment.participant_id / "rgb_frames" / segment.video_id / f"frame_{frame:010d}.jpg"


def make_small_epic(root: Path, *, flow: bool = False) -> SmallEpic:
    """Three videos of 100 frames (48 x 64), three 20-frame segments each (10 frames apart: no clip of one
    reaches another): 6 training, 3 validation."""
    frames = root / "frames"
    segments = []
    for seed, (participant, video) in enumerate(VIDEOS):
        write_jpeg_video(frames, participant, video, N_FRAMES, height=HEIGHT, width=WIDTH, seed=seed)
        if flow:
            write_jpeg_video(frames, participant, video, N_FRAMES, height=HEIGHT, width=WIDTH, seed=seed,
                             modality="flow")
        for k in range(3):
            i = len(segments)
            start = 5 + 30 * k
            segments.append(SegmentLabel(f"s{i}", participant, video, start, start + SEGMENT_FRAMES - 1, i % 3, i % 4))
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments, fps=FPS)
    write_video_info(root / "EPIC_video_info.csv", [(video, WIDTH, HEIGHT, N_FRAMES) for _, video in VIDEOS], fps=FPS)
    return SmallEpic(root=root, frames=frames, annotations=annotations, segments=tuple(segments))


def small_config(data: SmallEpic, out: Path, **overrides: Any) -> FinetuneConfig:
    """mc3_18 (the smallest registered 3D ResNet: small checkpoints) on 8 x 32 px clips, 2 epochs."""
    values: dict[str, Any] = dict(
        out=out, annotations=data.annotations, frames_root=data.frames, backbone="mc3_18", target="verb",
        recipe="r50-3d", clip_frames=8, clip_stride=2, crop=32, scale_range=(32, 40), test_size=32, epochs=2,
        lr=0.01, lr_steps=(2,), batch_size=3, train_where=TRAIN_WHERE, val_where=VAL_WHERE, workers=0,
        num_classes=4, progress=False,
    )
    values.update(overrides)
    return make_config(**values)


@pytest.fixture(scope="session")
def small_epic(tmp_path_factory: pytest.TempPathFactory) -> SmallEpic:
    return make_small_epic(tmp_path_factory.mktemp("small-epic"))


@pytest.fixture(autouse=True)
def _every_test_on_one_thread(one_thread: None) -> None:
    """Every stage-1 test runs on one thread (tests/conftest.py `one_thread`): the same thread count in
    every run keeps CPU results comparable (resume == uninterrupted), and the cores are shared."""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """`write_object_images` once per module."""
    root = tmp_path_factory.mktemp("images")
    write_object_images(root)
    return root
