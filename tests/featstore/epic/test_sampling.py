"""Sampling plans: hand-computed frame indices, video edges, and properties over random segments."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featstore.epic.sampling import SamplingConfig, SegmentPlan, plan_segment

DEFAULT = SamplingConfig()


def test_default_config_counts() -> None:
    assert DEFAULT.n_global_frames == 12
    assert DEFAULT.n_local_frames == 8
    assert DEFAULT.n_global_slots == 60
    assert DEFAULT.n_local_slots == 40


def test_config_round_trips_through_dict() -> None:
    config = SamplingConfig(clip_frames=32, clip_stride=4, size=128)
    assert SamplingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        SamplingConfig.from_dict({**config.to_dict(), "crop": 224})


@pytest.mark.parametrize(
    "kwargs", [{"clip_frames": 0}, {"clip_stride": 0}, {"det_fps": 0.0}, {"det_topk": 0}, {"size": 0}]
)
def test_config_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_plan_60fps_middle_of_video() -> None:
    # Centre (1000 + 1200) / 2 = 1100. Clip: 1100 - 63 .. 1100 + 63 at stride 2.
    # Detection step = 60 / 2 = 30 frames; global offsets (k - 5.5) * 30 = -165 .. 165,
    # local offsets (k - 3.5) * 30 = -105 .. 105.
    plan = plan_segment(1000, 1200, fps=60.0, n_frames=10_000, config=DEFAULT)
    assert plan.clip_center == 1100
    assert plan.clip_frames == (
        1037, 1039, 1041, 1043, 1045, 1047, 1049, 1051, 1053, 1055, 1057, 1059, 1061, 1063, 1065, 1067,
        1069, 1071, 1073, 1075, 1077, 1079, 1081, 1083, 1085, 1087, 1089, 1091, 1093, 1095, 1097, 1099,
        1101, 1103, 1105, 1107, 1109, 1111, 1113, 1115, 1117, 1119, 1121, 1123, 1125, 1127, 1129, 1131,
        1133, 1135, 1137, 1139, 1141, 1143, 1145, 1147, 1149, 1151, 1153, 1155, 1157, 1159, 1161, 1163,
    )  # fmt: skip
    assert plan.global_frames == (935, 965, 995, 1025, 1055, 1085, 1115, 1145, 1175, 1205, 1235, 1265)
    assert plan.local_frames == (995, 1025, 1055, 1085, 1115, 1145, 1175, 1205)
    # Local is a subset of global: 12 distinct frames to detect, not 20.
    assert plan.detection_frames == plan.global_frames


def test_plan_50fps_half_frame_centre_and_steps() -> None:
    # Centre (500 + 701) / 2 = 600.5 -> 601 (halves round up). Clip 601 - 63 .. 601 + 63.
    # Step = 50 / 2 = 25 frames; global offsets (k - 5.5) * 25 = -137.5, -112.5, ..., 137.5
    # rounded halves up -> -137, -112, -87, -62, -37, -12, 13, 38, 63, 88, 113, 138 (all 25 apart).
    plan = plan_segment(500, 701, fps=50.0, n_frames=10_000, config=DEFAULT)
    assert plan.clip_center == 601
    assert plan.clip_frames == tuple(range(538, 665, 2))
    assert plan.clip_frames[:4] == (538, 540, 542, 544) and plan.clip_frames[-1] == 664
    assert plan.global_frames == (464, 489, 514, 539, 564, 589, 614, 639, 664, 689, 714, 739)
    assert plan.local_frames == (514, 539, 564, 589, 614, 639, 664, 689)
    assert plan.detection_frames == plan.global_frames


def test_plan_at_video_start_clamps_clip_and_masks_detections() -> None:
    # Centre (1 + 60) / 2 = 30.5 -> 31; clip 31 - 63 = -32 .. 94: the 17 frames -32..0 become 1.
    plan = plan_segment(1, 60, fps=60.0, n_frames=1000, config=DEFAULT)
    assert plan.clip_center == 31
    assert plan.clip_frames == (1,) * 17 + tuple(range(2, 95, 2))
    # 31 + (-165, -135, -105, -75, -45, -15, 15, 45, ...): the first five fall before frame 1.
    assert plan.global_frames == (None, None, None, None, None, 16, 46, 76, 106, 136, 166, 196)
    assert plan.local_frames == (None, None, None, 16, 46, 76, 106, 136)
    assert plan.detection_frames == (16, 46, 76, 106, 136, 166, 196)


def test_plan_at_video_end_clamps_clip_and_masks_detections() -> None:
    # Centre (950 + 1000) / 2 = 975; clip 912 .. 1038: the 19 frames 1002..1038 become 1000.
    plan = plan_segment(950, 1000, fps=60.0, n_frames=1000, config=DEFAULT)
    assert plan.clip_center == 975
    assert plan.clip_frames == tuple(range(912, 1001, 2)) + (1000,) * 19
    assert plan.global_frames == (810, 840, 870, 900, 930, 960, 990, None, None, None, None, None)
    assert plan.local_frames == (870, 900, 930, 960, 990, None, None, None)


def test_plan_unknown_length_clamps_only_at_start() -> None:
    plan = plan_segment(950, 1000, fps=60.0, n_frames=None, config=DEFAULT)
    assert plan.clip_frames == tuple(range(912, 1039, 2))
    assert plan.global_frames == (810, 840, 870, 900, 930, 960, 990, 1020, 1050, 1080, 1110, 1140)
    start = plan_segment(1, 60, fps=60.0, n_frames=None, config=DEFAULT)
    assert start.clip_frames[:17] == (1,) * 17
    assert start.global_frames[:5] == (None,) * 5


def test_plan_r2plus1d_clip_and_odd_span() -> None:
    # 32 frames at stride 4: span 124, centre 1100 -> 1038 .. 1162.
    plan = plan_segment(1000, 1200, fps=60.0, n_frames=None, config=SamplingConfig(clip_frames=32, clip_stride=4))
    assert plan.clip_frames == tuple(range(1038, 1163, 4))
    # 4 frames at stride 1: offsets -1.5, -0.5, 0.5, 1.5 round halves up to -1, 0, 1, 2.
    plan = plan_segment(100, 100, fps=60.0, n_frames=None, config=SamplingConfig(clip_frames=4, clip_stride=1))
    assert plan.clip_frames == (99, 100, 101, 102)


def test_parity_mismatch_shifts_local_grid_onto_global() -> None:
    # 6 s and 3.5 s at 2 fps: 12 and 7 frames. Centred, local would sit between global frames;
    # shifted half a step (15 frames at 60 fps) it lands on them.
    config = SamplingConfig(det_local_seconds=3.5)
    plan = plan_segment(1000, 1200, fps=60.0, n_frames=None, config=config)
    assert plan.local_frames == (1025, 1055, 1085, 1115, 1145, 1175, 1205)
    assert set(plan.local_frames) <= set(plan.global_frames)


@pytest.mark.parametrize(
    ("start", "stop", "n_frames"), [(0, 10, None), (10, 9, None), (2000, 2100, 1000)]
)
def test_plan_rejects_bad_segments(start: int, stop: int, n_frames: int | None) -> None:
    with pytest.raises(ValueError):
        plan_segment(start, stop, fps=60.0, n_frames=n_frames, config=DEFAULT)


def test_plan_rejects_bad_fps() -> None:
    with pytest.raises(ValueError, match="fps"):
        plan_segment(1, 10, fps=0.0, n_frames=None, config=DEFAULT)


def _publisher_test_offsets(n_frames: int, segments: int, snippet: int) -> list[int]:
    """C1-Action-Recognition-TSN-TRN-TSM TsnDataset._get_test_indices, transcribed (numpy-free)."""
    tick = (n_frames - snippet + 1) / float(segments)
    return [int(tick / 2.0 + tick * x) for x in range(segments)]


@pytest.mark.parametrize(("start", "stop"), [(100, 179), (1, 8), (5000, 5333), (20, 81), (7, 7000)])
def test_segment_sampling_is_tsn_test_sampling(start: int, stop: int) -> None:
    config = SamplingConfig(clip_frames=8, clip_sampling="segments")
    plan = plan_segment(start, stop, fps=60.0, n_frames=None, config=config)
    assert plan.clip_frames == tuple(start + o for o in _publisher_test_offsets(stop - start + 1, 8, 1))
    assert plan.clip_center == (start + stop + 1) // 2, "detection windows stay centred on the segment"


def test_segment_sampling_by_hand_and_stacked_snippets() -> None:
    # 80 frames, 8 segments: tick 10, the middle of each: 100 + 5, 15, ..., 75.
    config = SamplingConfig(clip_frames=8, clip_sampling="segments")
    assert plan_segment(100, 179, fps=60.0, n_frames=None, config=config).clip_frames == tuple(range(105, 180, 10))
    # Flow: 5 frames 2 apart per snippet (span 9): tick (80 - 9 + 1) / 8 = 9, offsets 4, 13, ..., 67;
    # sample-major, so snippet k is frames 4k..4k+4 of the plan.
    flow = SamplingConfig(clip_frames=8, clip_stride=2, clip_sampling="segments", snippet_frames=5)
    frames = plan_segment(100, 179, fps=60.0, n_frames=None, config=flow).clip_frames
    assert len(frames) == 40
    assert frames[:5] == (104, 106, 108, 110, 112) and frames[5:10] == (113, 115, 117, 119, 121)
    assert frames[-5:] == (167, 169, 171, 173, 175)
    # The EPIC flow files hold RGB frame 2f and 2f + 1 as flow frame f: a snippet is 5 consecutive files.
    assert [f // 2 for f in frames[:5]] == [52, 53, 54, 55, 56]


def test_segment_sampling_short_segments_and_video_end() -> None:
    # A segment shorter than a snippet: every snippet starts at its first frame (TsnDataset's fallback).
    flow = SamplingConfig(clip_frames=4, clip_stride=2, clip_sampling="segments", snippet_frames=3)
    assert plan_segment(10, 12, fps=60.0, n_frames=None, config=flow).clip_frames == (10, 12, 14) * 4
    # Frames past the end are clamped to the last frame, as the centred clips are.
    assert plan_segment(10, 12, fps=60.0, n_frames=13, config=flow).clip_frames == (10, 12, 13) * 4


def test_stacked_snippets_need_segment_sampling() -> None:
    with pytest.raises(ValueError, match="segments"):
        SamplingConfig(snippet_frames=5)
    with pytest.raises(ValueError, match="clip_sampling"):
        SamplingConfig(clip_sampling="random")
    with pytest.raises(ValueError, match="snippet_frames"):
        SamplingConfig(clip_sampling="segments", snippet_frames=0)


def test_configs_of_old_manifests_get_the_new_fields_defaulted() -> None:
    old = {k: v for k, v in DEFAULT.to_dict().items() if k not in ("clip_sampling", "snippet_frames")}
    assert SamplingConfig.from_dict(old) == DEFAULT


configs = st.builds(
    SamplingConfig,
    clip_frames=st.integers(1, 80),
    clip_stride=st.integers(1, 6),
    det_fps=st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0]),
    det_global_seconds=st.sampled_from([0.0, 2.0, 3.5, 4.0, 6.0, 8.0]),
    det_local_seconds=st.sampled_from([0.0, 1.0, 2.5, 4.0, 6.0]),
    det_topk=st.integers(1, 10),
)


@st.composite
def segments(draw: st.DrawFn) -> tuple[int, int, float, int | None]:
    known = draw(st.booleans())
    n_frames = draw(st.integers(1, 5000)) if known else None
    start = draw(st.integers(1, n_frames if n_frames is not None else 5000))
    stop = draw(st.integers(start, start + 1500))  # annotations may run past the last frame
    fps = draw(st.sampled_from([25.0, 29.97, 30.0, 48.0, 50.0, 59.94, 60.0, 90.0]))
    return start, stop, fps, n_frames


@settings(max_examples=200, deadline=None)
@given(segment=segments(), config=configs)
def test_plan_properties(segment: tuple[int, int, float, int | None], config: SamplingConfig) -> None:
    start, stop, fps, n_frames = segment
    plan = plan_segment(start, stop, fps=fps, n_frames=n_frames, config=config)
    upper = n_frames if n_frames is not None else float("inf")

    assert isinstance(plan, SegmentPlan)
    assert len(plan.clip_frames) == config.clip_frames
    assert all(1 <= f <= upper for f in plan.clip_frames)
    assert list(plan.clip_frames) == sorted(plan.clip_frames)
    assert start <= plan.clip_center <= stop
    assert len(plan.global_frames) == config.n_global_frames
    assert len(plan.local_frames) == config.n_local_frames

    # Independent float recomputation of each detection frame: the k-th of M sits at
    # (k - (M-1)/2 + shift) steps from the centre, shift = 1/2 for the shorter window when the
    # window lengths differ in parity. None exactly where that frame is outside the video.
    step = fps / config.det_fps
    n_global, n_local = config.n_global_frames, config.n_local_frames
    parity = (n_global - n_local) % 2
    for window, m, shift in ((plan.global_frames, n_global, parity / 2 if n_global < n_local else 0.0),
                             (plan.local_frames, n_local, parity / 2 if n_local <= n_global else 0.0)):
        for k, frame in enumerate(window):
            expected = math.floor(plan.clip_center + (k - (m - 1) / 2 + shift) * step + 0.5 + 1e-6)
            if 1 <= expected <= upper:
                assert frame == expected
            else:
                assert frame is None
        present = [f for f in window if f is not None]
        assert present == sorted(set(present))  # step >= 6 frames here: never a repeat

    # The shorter window lies on the longer one's grid, so its frames are all shared
    # (wherever both are inside the video).
    shorter, longer = sorted((plan.local_frames, plan.global_frames), key=len)
    assert {f for f in shorter if f is not None} <= {f for f in longer if f is not None}

    detection = plan.detection_frames
    assert list(detection) == sorted(set(detection))
    assert set(detection) == {f for f in plan.global_frames + plan.local_frames if f is not None}


def test_resampling_at_60_fps_spans_the_same_seconds_in_every_epic55_video(epic55_dir) -> None:
    """Issue 23: "The videos are decoded at 60 FPS". EPIC-55's videos are not all at ~60 fps (9 of its
    432: 29.97, 47.95, 90); with `resample_fps=60` a 64 x 2 clip spans 126 / 60 s in each (to a frame),
    where counting the video's own frames makes it twice as long at 29.97 fps."""
    from featstore.epic.metadata import read_video_info

    rates = read_video_info(epic55_dir / "EPIC_video_info.csv")
    assert len(rates) == 432
    assert sum(1 for fps in rates.values() if abs(fps - 60) > 1) == 9
    config = SamplingConfig(resample_fps=60.0)
    own_frames = SamplingConfig()
    for video, fps in rates.items():
        plan = plan_segment(50_000, 50_600, fps=fps, n_frames=None, config=config)
        span = (plan.clip_frames[-1] - plan.clip_frames[0]) / fps
        assert abs(span - 126 / 60) <= 1 / fps, (video, fps, span)
        assert plan.clip_center == 50_300 and len(plan.clip_frames) == 64
        steps = [b - a for a, b in zip(plan.clip_frames, plan.clip_frames[1:])]
        assert all(abs(step - 2 * fps / 60) <= 1 for step in steps), (video, steps)
        if abs(fps - 60) > 1:  # without resampling the span follows the video's rate
            unresampled = plan_segment(50_000, 50_600, fps=fps, n_frames=None, config=own_frames)
            assert (unresampled.clip_frames[-1] - unresampled.clip_frames[0]) / fps != pytest.approx(span, abs=0.05)
    # At exactly 60 fps it is the plain rule, frame for frame.
    assert (plan_segment(1000, 1200, fps=60.0, n_frames=5000, config=config)
            == plan_segment(1000, 1200, fps=60.0, n_frames=5000, config=own_frames))
    with pytest.raises(ValueError, match="centred"):
        SamplingConfig(resample_fps=60.0, clip_sampling="segments", clip_frames=8)
    with pytest.raises(ValueError, match="resize"):
        SamplingConfig(resize="crop")
