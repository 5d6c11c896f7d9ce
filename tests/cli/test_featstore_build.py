"""`featstore build` run for real on generated EPIC-layout JPEG frames (random-weight models, CPU)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from featstore.epic.frames import EpicJpegFrames
from featstore.samples.damage import corrupt_jpeg
from featstore.epic.sampling import plan_segment
from tests.helpers.tiny_build import (
    DETECTOR,
    FPS,
    N_FRAMES,
    SMALL,
    invoke_featstore,
    make_epic_dataset,
    tiny_build,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _query(store: Path, sql: str) -> list[dict]:
    result = invoke_featstore("query", store, sql, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_build_writes_the_documented_fields_and_box_rows(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=4)
    store = tmp_path / "store"
    result = tiny_build(store, annotations, frames, "--workers", "2", "--batch-size", "2", size=112)
    assert result.exit_code == 0, result.output
    assert "built 4, already stored 0, failed 0 of 4 segments" in result.output
    assert "RANDOM WEIGHTS" in result.output  # CliRunner mixes stderr into output

    info = _assert_detection_store_contract(store, n_segments=4, feature_dim=1024)
    shapes = {name: spec["shape"] for name, spec in info["fields"].items()}
    assert shapes == {  # the default --map none: verb.local and no map
        "verb.global": [512], "verb.local": [40, 512], "noun.global": [512],
        "det.global.feat": [60, 1024], "det.global.box": [60, 4], "det.global.score": [60],
        "det.local.feat": [40, 1024], "det.local.box": [40, 4], "det.local.score": [40],
    }
    assert info["manifest"]["derived"]["verb.local"]["pool"] == "avg"
    assert info["manifest"]["provenance"]["map"] == "none"
    assert info["manifest"]["provenance"]["verb_map_shape"] == [512, 1, 7, 13]
    assert info["fields"]["det.global.box"]["dtype"] == "float32"
    assert info["segments"] == {"ok": 4, "failed": 0}
    provenance = info["manifest"]["provenance"]
    assert provenance["input_size"] == [112, 199] and provenance["clip_frames"] == 8
    assert provenance["size"] == 112 and provenance["clip_stride"] == 2 and provenance["modality"] == "rgb"
    assert provenance["detector"]["name"] == DETECTOR and provenance["detector"]["checkpoint_sha256"] is None
    assert isinstance(provenance["command"], str)  # under CliRunner it is the test runner's command line

    again = tiny_build(store, annotations, frames, "--workers", "0", size=112)
    assert again.exit_code == 0 and "built 0, already stored 4, failed 0" in again.output


def _assert_detection_store_contract(store: Path, *, n_segments: int, feature_dim: int) -> dict:
    """What every detector's store holds (DESIGN section 3): the det.* fields at 60 / 40 slots, a
    boxes row per slot, boxes normalised to [0, 1], real detections with a positive score and a
    frame, padded slots masked. Returns `featstore info --json`."""
    info = json.loads(invoke_featstore("info", store, "--json").output)
    shapes = {name: spec["shape"] for name, spec in info["fields"].items() if name.startswith("det.")}
    assert shapes == {
        "det.global.feat": [60, feature_dim], "det.global.box": [60, 4], "det.global.score": [60],
        "det.local.feat": [40, feature_dim], "det.local.box": [40, 4], "det.local.score": [40],
    }
    assert info["fields"]["det.global.box"]["dtype"] == "float32"
    assert info["segments"] == {"ok": n_segments, "failed": 0}

    counts = _query(store, 'select uid, "set", count(*) as n from boxes group by all order by all')
    assert counts == [{"uid": f"s{i}", "set": s, "n": n}
                      for i in range(n_segments) for s, n in (("global", 60), ("local", 40))]
    # Padded slots are masked, never silently zero-filled: s0's window starts before frame 1.
    padded = _query(store, "select count(*) as n from boxes where not valid and score = 0 and frame is null "
                           "and uid = 's0'")
    assert padded[0]["n"] >= 10
    assert _query(store, "select count(*) as n from boxes where valid and (score <= 0 or frame is null)") == [{"n": 0}]
    valid = _query(store, "select count(*) as n, min(least(x1, y1)) as lo, max(greatest(x2, y2)) as hi, "
                          "bool_and(x2 >= x1 and y2 >= y1) as ordered from boxes where valid")[0]
    assert valid["n"] > 0 and 0 <= valid["lo"] and valid["hi"] <= 1 and valid["ordered"]
    return info


def test_build_with_a_detectron2_model_zoo_config(tmp_path: Path) -> None:
    pytest.importorskip("detectron2")
    from featstore.models import build_detector, file_sha256

    # A zoo-format .pkl of a random model, so that the manifest must hash the weights file (the spec
    # also names a config, which is no file to hash).
    torch.manual_seed(0)
    model = build_detector("detectron2")[0].model
    weights = tmp_path / "model_final.pkl"
    with open(weights, "wb") as handle:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "test"}, handle)
    spec = f"detectron2:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml:{weights}"

    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=2)
    store = tmp_path / "store"
    result = tiny_build(store, annotations, frames, "--workers", "0", detector=spec)
    assert result.exit_code == 0, result.output
    assert "built 2, already stored 0, failed 0 of 2 segments" in result.output
    info = _assert_detection_store_contract(store, n_segments=2, feature_dim=1024)
    detector = info["manifest"]["provenance"]["detector"]
    assert detector["name"] == "detectron2" and detector["spec"] == spec
    assert detector["checkpoint_sha256"] == file_sha256(weights) and detector["weights"] == "checkpoint"


@pytest.mark.slow  # two builds; the fast loop has tests/reliability/test_hostile_input.py's damaged frames
def test_corrupt_jpeg_fails_its_segment_only(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=4)
    plans = {uid: plan_segment(start, stop, fps=FPS, n_frames=N_FRAMES, config=SMALL)
             for uid, start, stop in (("s0", 20, 80), ("s2", 80, 140))}  # the two segments of P01_01
    others = set(plans["s0"].clip_frames) | set(plans["s0"].detection_frames)
    frame = next(f for f in plans["s2"].clip_frames if f not in others)
    bad = EpicJpegFrames(frames).frame_path("P01", "P01_01", frame)
    kept = tmp_path / "kept.jpg"
    shutil.copy(bad, kept)
    corrupt_jpeg(bad, "truncate")

    store = tmp_path / "store"
    result = tiny_build(store, annotations, frames, "--workers", "1")
    assert result.exit_code == 1
    assert "built 3, already stored 0, failed 1 of 4 segments" in result.output
    assert "failed s2: " in result.output and bad.name in result.output
    failed = _query(store, "select uid, status, error from segments where status = 'failed'")
    assert [row["uid"] for row in failed] == ["s2"] and str(bad) in failed[0]["error"]
    assert _query(store, "select count(*) as n from boxes where uid = 's2'") == [{"n": 0}]

    shutil.copy(kept, bad)  # the file is fixed: a rerun retries the failed segment only
    result = tiny_build(store, annotations, frames, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "built 1, already stored 3, failed 0" in result.output
    assert _query(store, "select status, count(*) as n from segments group by 1") == [{"status": "ok", "n": 4}]


def test_build_usage_errors(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=1)
    both = invoke_featstore("build", tmp_path / "s", "--annotations", annotations, "--frames", frames, "--videos", frames,
                   "--verb-backbone", "r3d_18", "--noun-backbone", "r3d_18", "--detector", DETECTOR)
    assert both.exit_code == 2 and "exactly one of --frames" in both.output
    boxes = tmp_path / "b.csv"
    boxes.write_text("video_id,frame,x1,y1,x2,y2,score\n")
    no_detector = invoke_featstore("build", tmp_path / "s", "--annotations", annotations, "--frames", frames,
                          "--verb-backbone", "r3d_18", "--noun-backbone", "r3d_18", "--boxes", boxes)
    assert no_detector.exit_code == 2 and "--detector" in no_detector.output
    unknown = invoke_featstore("build", tmp_path / "s", "--annotations", annotations, "--frames", frames,
                      "--verb-backbone", "no_such_net", "--noun-backbone", "r3d_18", "--detector", DETECTOR)
    assert unknown.exit_code == 1 and "no_such_net" in unknown.output and "Traceback" not in unknown.output


@pytest.mark.slow
def test_build_takes_clip_and_normalisation_from_the_verb_backbone_record(tmp_path: Path) -> None:
    """No clip flags: TSM flow samples 8 segments of 5 stacked (u, v) pairs, as its record says; the
    manifest says where each value came from."""
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=2, flow=True)
    store = tmp_path / "store"
    result = invoke_featstore(
        "build", store, "--annotations", annotations, "--frames", frames, "--modality", "flow",
        "--verb-backbone", "tsm_r50", "--noun-backbone", "tsn_r50", "--detector", DETECTOR,
        "--det-score-thresh", "0", "--det-min-size", "64", "--det-max-size", "128", "--det-topk", "2",
        "--size", "32", "--workers", "0", "--no-progress",
    )
    assert result.exit_code == 0, result.output
    provenance = json.loads(invoke_featstore("info", store, "--json").output)["manifest"]["provenance"]
    assert provenance["sampling"]["clip_frames"] == 8 and provenance["sampling"]["clip_sampling"] == "segments"
    assert provenance["snippet_frames"] == 5 and provenance["in_channels"] == 10
    assert provenance["sampling_sources"]["clip_frames"] == "backbone:tsm_r50"
    assert provenance["sampling_sources"]["size"] == provenance["sampling_sources"]["det_topk"] == "flag"
    assert provenance["sampling_sources"]["det_fps"] == "default"
    assert provenance["sampling_notes"] == [], "TSN's record asks for the same clip"
    info = json.loads(invoke_featstore("info", store, "--json").output)
    assert provenance["verb_map_shape"] == [2048, 8, 1, 2]  # the map itself is not kept (--map none)
    assert info["fields"]["verb.local"]["shape"] == [16, 2048]
    assert info["fields"]["det.local.feat"]["shape"] == [16, 1024]  # 8 local frames x top 2


def test_build_says_when_the_noun_record_asks_for_another_clip(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=1)
    store = tmp_path / "store"
    result = invoke_featstore(
        "build", store, "--annotations", annotations, "--frames", frames,
        "--verb-backbone", "r3d_18", "--noun-backbone", "tsn_r50", "--detector", DETECTOR,
        "--det-score-thresh", "0", "--det-min-size", "64", "--det-max-size", "128",
        "--size", "32", "--workers", "0", "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "WARNING: the noun backbone tsn_r50 runs on the verb backbone r3d_18's clip" in result.output
    provenance = json.loads(invoke_featstore("info", store, "--json").output)["manifest"]["provenance"]
    assert provenance["sampling"]["clip_frames"] == 16 and provenance["sampling_sources"]["clip_stride"] == "backbone:r3d_18"
    (note,) = provenance["sampling_notes"]
    assert "clip_sampling segments" in note and "clip_frames 8" in note


def test_roi_features_square_frames_and_resampled_clips_are_built_and_recorded(tmp_path: Path) -> None:
    """Issue 23: `--det-feature roi` stores the RoIAlign output (the MobileNet FPN's 256 channels),
    `--resize square` the report's R(2+1)D-34 input without cropping, `--resample-fps` clips by time;
    the manifest records all three, and a rerun with other values is refused."""
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=2)
    store = tmp_path / "store"
    result = tiny_build(store, annotations, frames, "--workers", "0", "--det-feature", "roi", "--resize", "square",
                        "--resample-fps", "30")
    assert result.exit_code == 0, result.output
    info = _assert_detection_store_contract(store, n_segments=2, feature_dim=256)
    provenance = info["manifest"]["provenance"]
    assert provenance["detector"]["feature"] == "roi" and provenance["detector"]["feature_dim"] == 256
    assert provenance["input_size"] == [32, 32] and provenance["resize"] == "square"
    assert provenance["resample_fps"] == 30.0 and provenance["sampling"]["resample_fps"] == 30.0
    refused = tiny_build(store, annotations, frames, "--workers", "0", "--resize", "square", "--resample-fps", "30")
    assert refused.exit_code != 0 and "detector_feature" in refused.output
