"""Clips: where training and validation clips sit, seeded augmentation on uint8, failure markers."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import torch

from featstore.epic.frames import EpicJpegFrames
from featstore.epic.sampling import SamplingConfig, plan_segment
from featstore.samples.damage import corrupt_jpeg
from finetune.clips import (
    ClipDataset,
    EpochBatchSampler,
    FailureLog,
    TooManyFailures,
    centre_crop,
    collate_clips,
    random_crop,
    sample_rng,
    training_centre,
    training_snippet_frames,
)
from tests.finetune.conftest import make_small_epic


class PaintedSource:
    """A frame source whose frame i is filled with i % 251 (so the frames read can be told back)."""

    modality = "rgb"

    def __init__(self, n_frames: int = 1000, height: int = 40, width: int = 60) -> None:
        self.n = n_frames
        self.height, self.width = height, width
        self.reads: list[list[int]] = []

    def read(self, participant_id: str, video_id: str, frames: Sequence[int]) -> np.ndarray:
        self.reads.append(list(frames))
        values = np.array([f % 251 for f in frames], dtype=np.uint8)
        return np.broadcast_to(values[:, None, None, None], (len(frames), self.height, self.width, 3)).copy()

    def n_frames(self, participant_id: str, video_id: str) -> int:
        return self.n

    def fps(self, video_id: str) -> float:
        return 60.0


ROWS = [{"uid": f"u{i}", "participant_id": "P01", "video_id": "P01_01", "start_frame": 100 + 50 * i,
         "stop_frame": 130 + 50 * i, "verb_class": i % 3, "noun_class": i % 5} for i in range(6)]


def dataset(source, *, train: bool, seed: int = 0, **kwargs) -> ClipDataset:
    values = dict(target="verb", clip_frames=8, clip_stride=2, crop=32, scale_range=(32, 48), test_size=36,
                  seed=seed)
    values.update(kwargs)
    return ClipDataset(ROWS, source=source, train=train, **values)


def test_training_centres_are_uniform_inside_the_segment() -> None:
    draws = [training_centre(10, 14, sample_rng(0, 0, i)) for i in range(500)]
    assert set(draws) == {10, 11, 12, 13, 14}  # every frame of the segment, endpoints included
    counts = np.bincount(draws)[10:]
    assert counts.min() > 70  # about 100 each


def test_a_training_clip_is_the_builds_clip_around_a_frame_of_the_segment() -> None:
    source = PaintedSource()
    data = dataset(source, train=True)
    for epoch in range(3):
        for index, row in enumerate(ROWS):
            clip = data[(epoch, index)]
            assert row["start_frame"] <= clip.centre <= row["stop_frame"]
            expected = plan_segment(clip.centre, clip.centre, fps=60.0, n_frames=1000,
                                    config=SamplingConfig(clip_frames=8, clip_stride=2)).clip_frames
            assert source.reads[-1] == list(expected)
            assert clip.frames.shape == (8, 32, 32, 3) and clip.frames.dtype == torch.uint8
            assert clip.label == row["verb_class"]
    centres = {data[(epoch, 0)].centre for epoch in range(40)}
    assert len(centres) > 10  # a new draw each epoch


def test_a_validation_clip_is_the_centre_clip() -> None:
    source = PaintedSource()
    data = dataset(source, train=False)
    for epoch in (0, 5):
        for index, row in enumerate(ROWS):
            clip = data[(epoch, index)]
            plan = plan_segment(row["start_frame"], row["stop_frame"], fps=60.0, n_frames=1000,
                                config=SamplingConfig(clip_frames=8, clip_stride=2))
            assert clip.centre == plan.clip_center and source.reads[-1] == list(plan.clip_frames)
            assert clip.frames.shape == (8, 32, 32, 3)
    assert torch.equal(data[(0, 2)].frames, data[(7, 2)].frames)


def test_tsn_training_takes_one_random_snippet_inside_each_part() -> None:
    # 80 frames, 8 parts of 10: snippet k starts in [100 + 10k, 109 + 10k], one draw per part.
    starts = set()
    for i in range(200):
        frames = training_snippet_frames(100, 179, segments=8, snippet_frames=1, stride=1, n_frames=None,
                                         rng=sample_rng(0, 0, i))
        assert len(frames) == 8
        for k, frame in enumerate(frames):
            assert 100 + 10 * k <= frame <= 109 + 10 * k
        starts.add(frames[0])
    assert starts == set(range(100, 110))  # every position of the first part is drawn
    # Flow: 5 frames 2 apart per snippet (span 9): 72 positions, 9 per part; a snippet stays whole.
    frames = training_snippet_frames(100, 179, segments=8, snippet_frames=5, stride=2, n_frames=None,
                                     rng=sample_rng(1, 0, 0))
    assert len(frames) == 40
    for k in range(8):
        snippet = frames[5 * k:5 * k + 5]
        assert snippet == list(range(snippet[0], snippet[0] + 10, 2))
        assert 100 + 9 * k <= snippet[0] <= 108 + 9 * k


def test_tsn_training_of_short_segments_and_the_video_end() -> None:
    # 12 positions, 8 parts: average 1 -> every part's one position; 6 positions: sorted distinct draws.
    assert training_snippet_frames(1, 12, segments=8, snippet_frames=1, stride=1, n_frames=None,
                                   rng=sample_rng(0, 0, 0)) == [1, 2, 3, 4, 5, 6, 7, 8]
    frames = training_snippet_frames(1, 6, segments=4, snippet_frames=1, stride=1, n_frames=None,
                                     rng=sample_rng(0, 0, 0))
    assert frames == sorted(set(frames)) and set(frames) <= set(range(1, 7))
    # Fewer positions than parts: every snippet starts at the segment's first frame (clamped at the end).
    assert training_snippet_frames(10, 12, segments=3, snippet_frames=3, stride=2, n_frames=13,
                                   rng=sample_rng(0, 0, 0)) == [10, 12, 13] * 3


def test_tsn_flow_clips_stack_each_snippet_as_channels() -> None:
    source = PaintedSource()
    train = dataset(source, train=True, clip_sampling="segments", snippet_frames=5, clip_frames=4)
    clip = train[(0, 1)]
    assert clip.frames.shape == (4, 32, 32, 15)  # 4 samples, 5 stacked 3-channel frames each
    read = source.reads[-1]
    # channel l * C + c is channel c of the l-th frame of the sample (as featstore.epic.frames.stack_snippets)
    for sample in range(4):
        for frame in range(5):
            assert int(clip.frames[sample, 0, 0, 3 * frame]) == read[5 * sample + frame] % 251
    val = dataset(source, train=False, clip_sampling="segments", snippet_frames=5, clip_frames=4)
    row = ROWS[1]
    plan = plan_segment(row["start_frame"], row["stop_frame"], fps=60.0, n_frames=1000,
                        config=SamplingConfig(clip_frames=4, clip_stride=2, clip_sampling="segments",
                                              snippet_frames=5))
    assert val[(3, 1)].frames.shape == (4, 32, 32, 15) and source.reads[-1] == list(plan.clip_frames)


def test_augmentation_depends_on_seed_epoch_and_index_only() -> None:
    first, second = dataset(PaintedSource(), train=True), dataset(PaintedSource(), train=True)
    # Another access order (as other workers or a resumed run would take) gives the same samples.
    keys = [(epoch, index) for epoch in range(2) for index in range(len(ROWS))]
    a = {key: first[key] for key in keys}
    b = {key: second[key] for key in reversed(keys)}
    for key in keys:
        assert a[key].centre == b[key].centre and torch.equal(a[key].frames, b[key].frames)
    other_seed = dataset(PaintedSource(), train=True, seed=1)
    assert any(other_seed[key].centre != a[key].centre for key in keys)


def ramp_clip(t: int = 6, height: int = 50, width: int = 70) -> np.ndarray:
    """Frame k = a spatial pattern + 20 k: the same window of every frame differs by exactly 20 k."""
    y, x = np.mgrid[0:height, 0:width]
    pattern = ((y * 7 + x * 3) % 90).astype(np.int64)
    frames = np.stack([pattern + 20 * k for k in range(t)])[..., None].repeat(3, axis=-1)
    return frames.astype(np.uint8)  # max 89 + 100 < 256


def test_random_crop_takes_one_window_for_all_frames_on_uint8() -> None:
    frames = ramp_clip()
    sides = set()
    for i in range(30):
        out = random_crop(frames, scale_range=(32, 48), crop=32, rng=sample_rng(0, 0, i))
        assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
        assert frames.min() <= out.min() and out.max() <= frames.max()
        # Same window in every frame: frame k minus frame 0 is 20 k everywhere (resize rounding: +-1).
        for k in range(1, 6):
            assert np.abs(out[k].astype(int) - out[0].astype(int) - 20 * k).max() <= 1
        rng = sample_rng(0, 0, i)
        sides.add(int(rng.integers(32, 49)))
    assert len(sides) > 5 and min(sides) >= 32 and max(sides) <= 48


def test_centre_crop_resizes_the_short_side_then_takes_the_middle() -> None:
    frames = ramp_clip(height=40, width=80)  # already at short side 40: no resize
    out = centre_crop(frames, size=40, crop=32)
    assert out.shape == (6, 32, 32, 3)
    assert np.array_equal(out, frames[:, 4:36, 24:56])
    assert centre_crop(frames, size=64, crop=32).shape == (6, 32, 32, 3)


def test_sampler_orders_are_seeded_per_epoch_and_ranks_share_each_batch() -> None:
    sampler = EpochBatchSampler(10, 4, shuffle=True, seed=3)
    assert np.array_equal(sampler.order(0), EpochBatchSampler(10, 4, shuffle=True, seed=3).order(0))
    assert not np.array_equal(sampler.order(0), sampler.order(1))
    sampler.set_epoch(1)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2] and all(epoch == 1 for b in batches for epoch, _ in b)
    assert sorted(i for b in batches for _, i in b) == list(range(10))
    shares = []
    for rank in range(2):
        ranked = EpochBatchSampler(10, 4, shuffle=True, seed=3, rank=rank, world_size=2)
        ranked.set_epoch(1)
        shares.append(list(ranked))
    for global_batch, share0, share1 in zip(batches, *shares):
        assert sorted(share0 + share1) == sorted(global_batch) and not set(share0) & set(share1)
    assert [i for _, i in next(iter(EpochBatchSampler(5, 5, shuffle=False)))] == [0, 1, 2, 3, 4]


def test_an_unreadable_segment_is_a_failure_marker_naming_the_file(tmp_path) -> None:
    data = make_small_epic(tmp_path)
    bad = data.segments[1]
    plan = plan_segment(bad.start_frame, bad.stop_frame, fps=60.0, n_frames=100,
                        config=SamplingConfig(clip_frames=8, clip_stride=2))
    corrupt_jpeg(data.frame_file(bad, plan.clip_frames[3]), "truncate")
    rows = [{"uid": s.uid, "participant_id": s.participant_id, "video_id": s.video_id, "start_frame": s.start_frame,
             "stop_frame": s.stop_frame, "verb_class": s.verb_class} for s in data.segments[:3]]
    clips = ClipDataset(rows, source=EpicJpegFrames(data.frames), target="verb", clip_frames=8, clip_stride=2,
                        crop=32, train=False, test_size=32, fallback_fps=60.0)
    batch = collate_clips([clips[(0, i)] for i in range(3)])
    assert batch.indices == [0, 2] and batch.clips.shape == (2, 8, 32, 32, 3)
    assert batch.labels.tolist() == [rows[0]["verb_class"], rows[2]["verb_class"]]
    [(index, reason)] = batch.failed
    assert index == 1 and "truncated JPEG" in reason and "frame_" in reason
    assert collate_clips([clips[(0, 1)]]).clips is None


def test_failure_log_stops_above_the_allowed_share() -> None:
    log = FailureLog(max_fraction=0.01)
    log.add(uid="a", epoch=0, phase="train", reason="truncated JPEG: x.jpg")
    log.check(0, "train", 200)  # 1 of 200 is 0.5 %: goes on
    log.add(uid="b", epoch=0, phase="train", reason="missing frame file: y.jpg")
    log.check(0, "train", 200)  # 2 of 200 is 1 %: not more than 1 %
    log.add(uid="c", epoch=0, phase="train", reason="corrupt")
    with pytest.raises(TooManyFailures, match=r"3 of 200 train segments of epoch 1 .* a: truncated JPEG"):
        log.check(0, "train", 200)
    log.check(1, "train", 200)  # counted per epoch
    assert [entry["epoch"] for entry in log.entries] == [1, 1, 1]
