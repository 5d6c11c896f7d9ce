"""`featstore build` run for real on generated EPIC-layout JPEG frames (random-weight models, CPU)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from cli.featstore_cli import main
from featstore.frames import EpicJpegFrames
from featstore.samples.damage import corrupt_jpeg
from featstore.sampling import SamplingConfig, plan_segment
from tests.featstore.test_extraction import FPS, N_FRAMES, make_epic_dataset

DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _build(store: Path, annotations: Path, frames: Path, *extra: object, size: int = 32) -> Result:
    return _invoke(
        "build", store, "--annotations", annotations, "--frames", frames,
        "--verb-backbone", "r3d_18", "--noun-backbone", "r3d_18", "--detector", DETECTOR,
        "--det-score-thresh", "0", "--det-min-size", "64", "--det-max-size", "128",
        "--clip-frames", "8", "--clip-stride", "2", "--size", size, "--no-progress", *extra,
    )


def _query(store: Path, sql: str) -> list[dict]:
    result = _invoke("query", store, sql, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_build_writes_the_documented_fields_and_box_rows(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=4)
    store = tmp_path / "store"
    result = _build(store, annotations, frames, "--workers", "2", "--batch-size", "2", size=112)
    assert result.exit_code == 0, result.output
    assert "built 4, already stored 0, failed 0 of 4 segments" in result.output
    assert "RANDOM WEIGHTS" in result.output  # CliRunner mixes stderr into output

    info = json.loads(_invoke("info", store, "--json").output)
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

    counts = _query(store, 'select uid, "set", count(*) as n from boxes group by all order by all')
    assert counts == [{"uid": f"s{i}", "set": s, "n": n} for i in range(4) for s, n in (("global", 60), ("local", 40))]
    # Padded slots are masked, never silently zero-filled: s0's window starts before frame 1.
    padded = _query(store, "select count(*) as n from boxes where not valid and score = 0 and frame is null "
                           "and uid = 's0'")
    assert padded[0]["n"] >= 10
    assert _query(store, "select count(*) as n from boxes where valid and (score <= 0 or frame is null)") == [{"n": 0}]

    again = _build(store, annotations, frames, "--workers", "0", size=112)
    assert again.exit_code == 0 and "built 0, already stored 4, failed 0" in again.output


def test_corrupt_jpeg_fails_its_segment_only(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=4)
    sampling = SamplingConfig(clip_frames=8, clip_stride=2, size=32)
    plans = {uid: plan_segment(start, stop, fps=FPS, n_frames=N_FRAMES, config=sampling)
             for uid, start, stop in (("s0", 20, 80), ("s2", 80, 140))}  # the two segments of P01_01
    others = set(plans["s0"].clip_frames) | set(plans["s0"].detection_frames)
    frame = next(f for f in plans["s2"].clip_frames if f not in others)
    bad = EpicJpegFrames(frames).frame_path("P01", "P01_01", frame)
    kept = tmp_path / "kept.jpg"
    shutil.copy(bad, kept)
    corrupt_jpeg(bad, "truncate")

    store = tmp_path / "store"
    result = _build(store, annotations, frames, "--workers", "1")
    assert result.exit_code == 1
    assert "built 3, already stored 0, failed 1 of 4 segments" in result.output
    assert "failed s2: " in result.output and bad.name in result.output
    failed = _query(store, "select uid, status, error from segments where status = 'failed'")
    assert [row["uid"] for row in failed] == ["s2"] and str(bad) in failed[0]["error"]
    assert _query(store, "select count(*) as n from boxes where uid = 's2'") == [{"n": 0}]

    shutil.copy(kept, bad)  # the file is fixed: a rerun retries the failed segment only
    result = _build(store, annotations, frames, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "built 1, already stored 3, failed 0" in result.output
    assert _query(store, "select status, count(*) as n from segments group by 1") == [{"status": "ok", "n": 4}]


def test_build_usage_errors(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=1)
    both = _invoke("build", tmp_path / "s", "--annotations", annotations, "--frames", frames, "--videos", frames,
                   "--verb-backbone", "r3d_18", "--noun-backbone", "r3d_18", "--detector", DETECTOR)
    assert both.exit_code == 2 and "exactly one of --frames" in both.output
    boxes = tmp_path / "b.csv"
    boxes.write_text("video_id,frame,x1,y1,x2,y2,score\n")
    no_detector = _invoke("build", tmp_path / "s", "--annotations", annotations, "--frames", frames,
                          "--verb-backbone", "r3d_18", "--noun-backbone", "r3d_18", "--boxes", boxes)
    assert no_detector.exit_code == 2 and "--detector" in no_detector.output
    unknown = _invoke("build", tmp_path / "s", "--annotations", annotations, "--frames", frames,
                      "--verb-backbone", "no_such_net", "--noun-backbone", "r3d_18", "--detector", DETECTOR)
    assert unknown.exit_code == 1 and "no_such_net" in unknown.output and "Traceback" not in unknown.output
