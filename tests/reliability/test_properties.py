"""Property-based checks of the annotation parser on damaged files, and of sampling plans together
with the detection slots they fill.

Already covered elsewhere, and not repeated here:
tests/featstore/epic/test_annotations.py::test_read_segments_round_trips_valid_tables (valid files of
every kind read back exactly) and tests/featstore/epic/test_sampling.py::test_plan_properties (clip
length, clip frames inside the video, detection frames recomputed independently, shared frames).
"""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featstore.epic.annotations import AnnotationError, read_segments
from featstore.extract.plan import FrameDetections, detection_slots
from featstore.epic.sampling import SamplingConfig, plan_segment

HEADER = ["uid", "participant_id", "video_id", "narration", "start_frame", "stop_frame", "verb_class", "noun_class"]
INT_COLUMNS = ["start_frame", "stop_frame", "verb_class", "noun_class"]
NOT_INTEGERS = ["x", "1.5", "1e3", "0x1F", "++1", "NaN", "inf", "3 4", "two", "1_000"]


@st.composite
def valid_rows(draw: st.DrawFn) -> list[dict[str, str]]:
    n = draw(st.integers(2, 8))
    uids = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n, unique=True))
    rows = []
    for uid in uids:
        participant = f"P{draw(st.integers(1, 40)):02d}"
        start = draw(st.integers(0, 10**6))
        rows.append({
            "uid": str(uid), "participant_id": participant, "video_id": f"{participant}_{draw(st.integers(1, 30)):02d}",
            "narration": draw(st.sampled_from(["open door", "take cup, then plate", "\"quoted\"", ""])),
            "start_frame": str(start), "stop_frame": str(start + draw(st.integers(0, 5000))),
            "verb_class": str(draw(st.integers(0, 124))), "noun_class": str(draw(st.integers(0, 351))),
        })
    return rows


@st.composite
def damaged_files(draw: st.DrawFn) -> tuple[list[str], list[dict[str, str]], int | None, str, str]:
    """A valid EPIC-55 file with one defect, and where the parser must say it is:
    (header, rows, 1-based row or None, column, words in the message)."""
    rows = draw(valid_rows())
    header = list(HEADER)
    i = draw(st.integers(0, len(rows) - 1))
    row = rows[i]
    kind = draw(st.sampled_from(["not an integer", "empty frame", "negative", "start after stop", "duplicate uid",
                                 "bad participant", "video of another participant", "missing column"]))
    if kind == "not an integer":
        column = draw(st.sampled_from(INT_COLUMNS))
        row[column] = draw(st.sampled_from(NOT_INTEGERS))
        return header, rows, i + 1, column, "expected an integer"
    if kind == "empty frame":
        column = draw(st.sampled_from(["start_frame", "stop_frame"]))
        row[column] = ""
        return header, rows, i + 1, column, "empty cell"
    if kind == "negative":
        column = draw(st.sampled_from(["verb_class", "noun_class", "start_frame"]))
        row[column] = str(-draw(st.integers(1, 10**6)))
        return header, rows, i + 1, column, "negative value"
    if kind == "start after stop":
        row["start_frame"] = str(int(row["stop_frame"]) + draw(st.integers(1, 1000)))
        return header, rows, i + 1, "start_frame", "> stop_frame"
    if kind == "duplicate uid":
        j = draw(st.integers(0, len(rows) - 1).filter(lambda j: j != i))
        first, second = sorted((i, j))
        rows[second]["uid"] = rows[first]["uid"]
        return header, rows, second + 1, "uid", f"duplicate uid {rows[first]['uid']!r}"
    if kind == "bad participant":
        row["participant_id"] = draw(st.sampled_from(["P1", "p01", "Person1", "P001", "01", "PXX"]))
        return header, rows, i + 1, "participant_id", "does not look like P##"
    if kind == "video of another participant":
        other = "P99" if row["participant_id"] != "P99" else "P98"
        row["video_id"] = f"{other}_01"
        return header, rows, i + 1, "video_id", "does not start with participant_id"
    column = draw(st.sampled_from(["uid", "participant_id", "video_id", "start_frame", "stop_frame", "verb_class",
                                   "noun_class"]))
    header.remove(column)
    return header, rows, None, column, "missing"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_files())
def test_a_damaged_annotation_file_is_an_error_naming_file_row_and_column(case) -> None:
    header, rows, row, column, words = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "EPIC_train_action_labels.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        with pytest.raises(AnnotationError) as raised:
            read_segments(path)
    err = raised.value
    assert str(err).startswith(str(path))
    assert (err.row, err.column) == (row, column), str(err)
    assert words in str(err)


configs = st.builds(
    SamplingConfig,
    clip_frames=st.integers(1, 64),
    clip_stride=st.integers(1, 4),
    det_fps=st.sampled_from([1.0, 2.0, 4.0]),
    det_global_seconds=st.sampled_from([0.0, 2.0, 3.5, 6.0]),
    det_local_seconds=st.sampled_from([0.0, 1.0, 4.0]),
    det_topk=st.integers(1, 6),
)


@st.composite
def planned_segments(draw: st.DrawFn):
    n_frames = draw(st.integers(1, 3000))
    start = draw(st.integers(1, n_frames))
    stop = draw(st.integers(start, start + 1000))  # annotations may run past the video's end
    fps = draw(st.sampled_from([25.0, 29.97, 50.0, 59.94, 60.0]))
    config = draw(configs)
    plan = plan_segment(start, stop, fps=fps, n_frames=n_frames, config=config)
    # Detections on a random subset of the frames the plan asks for, 0 to topk + 2 boxes each.
    detections = {}
    for frame in plan.detection_frames:
        k = draw(st.integers(0, config.det_topk + 2))
        if draw(st.booleans()) and k:
            scores = np.sort(np.asarray(draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=k, max_size=k)),
                                        dtype=np.float32))[::-1]
            detections[frame] = FrameDetections(
                boxes=np.tile(np.array([[0.1, 0.2, 0.5, 0.6]], np.float32), (k, 1)), scores=scores,
                labels=np.arange(k, dtype=np.int64), features=np.full((k, 3), frame, np.float32))
    return n_frames, config, plan, detections


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planned_segments())
def test_plans_stay_inside_the_video_and_slot_masks_match_the_boxes(case) -> None:
    n_frames, config, plan, detections = case
    assert len(plan.clip_frames) == config.clip_frames
    assert all(1 <= f <= n_frames for f in plan.clip_frames)
    assert all(1 <= f <= n_frames for f in plan.detection_frames)
    for box_set, frames, n_window in (("global", plan.global_frames, config.n_global_frames),
                                      ("local", plan.local_frames, config.n_local_frames)):
        assert len(frames) == n_window  # a window has its length even where it runs past the video
        tensors, rows = detection_slots(box_set, frames, detections, topk=config.det_topk, feature_dim=3)
        n_slots = n_window * config.det_topk
        feat, box, score = (tensors[f"det.{box_set}.{leaf}"] for leaf in ("feat", "box", "score"))
        assert feat.shape == (n_slots, 3) and box.shape == (n_slots, 4) and score.shape == (n_slots,)
        assert all(len(values) == n_slots for values in rows.values())
        valid = np.array(rows["valid"], dtype=bool)
        # The mask is the score: a valid slot has a positive score, a padded one is all zeros.
        assert np.array_equal(valid, score > 0)
        assert not feat[~valid].any() and not box[~valid].any()
        for slot in range(n_slots):
            frame, rank = frames[slot // config.det_topk], slot % config.det_topk
            found = detections.get(frame) if frame is not None else None
            expected_valid = found is not None and rank < len(found)
            assert valid[slot] == expected_valid
            if expected_valid:
                assert rows["frame"][slot] == frame and 1 <= frame <= n_frames
                assert feat[slot, 0] == frame and rows["label"][slot] == rank
            else:
                assert rows["frame"][slot] is None and rows["label"][slot] is None
