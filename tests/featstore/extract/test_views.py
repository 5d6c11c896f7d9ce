"""`featstore build --views K` (docs/views.md): K temporal views of each training segment, one of the others.

The demo's own build on a small demo sample (8 training segments of P01-P02, 4 held out of P26),
built once per module through the CLI; the detector / backbone call counts on the tiny dataset of
the other extraction tests.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from featstore.epic.sampling import plan_segment
from featstore.extract.service import build_store, estimate_build
from featstore.store.reader import FeatureStore
from tests.helpers.tiny_build import invoke_featstore, make_epic_dataset, small_config
from tests.helpers.views import TRAIN_SEGMENTS, VAL_SEGMENTS, views_build_argv, views_sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def views_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("views-build")
    sample = views_sample(root / "sample")
    store = root / "store"
    built = invoke_featstore("build", *views_build_argv(sample, store))
    assert built.exit_code == 0, built.output
    return {"sample": sample, "store": store, "output": built.output}


@pytest.mark.slow  # the module's store: a build of the demo sample (~6 s)
def test_training_segments_get_four_views_and_held_out_ones_one(views_store: dict) -> None:
    store = views_store["store"]
    result = invoke_featstore("query", store, "select view, count(*) as n from segments group by view order by view",
                              "--format", "json")
    assert json.loads(result.output) == [{"view": 0, "n": TRAIN_SEGMENTS + VAL_SEGMENTS}] + [
        {"view": v, "n": TRAIN_SEGMENTS} for v in (1, 2, 3)]
    per_participant = invoke_featstore("query", store, "select participant_id, max(view) + 1 as views from segments "
                                       "group by 1 order by 1", "--format", "json")
    assert json.loads(per_participant.output) == [{"participant_id": "P01", "views": 4},
                                                  {"participant_id": "P02", "views": 4},
                                                  {"participant_id": "P26", "views": 1}]
    verify = invoke_featstore("verify", store, "--no-progress")
    assert verify.exit_code == 0 and "12 segments (36 views) verified" in verify.output
    assert "built 12 (36 views)" in views_store["output"]


@pytest.mark.slow
def test_each_view_records_its_clip_and_window_centre(views_store: dict) -> None:
    opened = FeatureStore.open(views_store["store"])
    rows = opened.segments(view=None).to_pylist()
    provenance = opened.manifest["provenance"]
    sampling, fps = provenance["sampling"], 8.0
    for row in rows:
        assert row["start_frame"] <= row["clip_center"] <= row["stop_frame"]
        # The windows stay on the segment's detection grid, within half a step of the clip's centre.
        assert abs(row["window_center"] - row["clip_center"]) <= fps / sampling["det_fps"] / 2
        assert row["clip_start_frame"] <= row["clip_center"] <= row["clip_stop_frame"]
        if row["view"] == 0:
            assert row["clip_center"] == row["window_center"] == (row["start_frame"] + row["stop_frame"] + 1) // 2
    centres = Counter((row["uid"], row["clip_center"]) for row in rows if row["view"] > 0)
    assert len(centres) > TRAIN_SEGMENTS  # drawn centres differ within segments
    # Every view has its own box rows, and its own tensors under its key.
    boxes = opened.boxes().select(["uid", "view"]).to_pylist()
    per_view = Counter((b["uid"], b["view"]) for b in boxes)
    assert set(per_view) == {(row["uid"], row["view"]) for row in rows}
    uid = next(row["uid"] for row in rows if row["view"] == 3)
    assert opened.view_counts([uid]) == [4] and opened.max_views == 4
    assert (opened.read(uid, ["verb.global"], view=3)["verb.global"] !=
            opened.read(uid, ["verb.global"], view=0)["verb.global"]).any()
    assert provenance["views"]["count"] == 4 and provenance["build_signature"]["views"]["count"] == 4


@pytest.mark.slow
def test_info_tells_bytes_per_view_and_in_all(views_store: dict) -> None:
    info = invoke_featstore("info", views_store["store"])
    assert "views       36 views of 12 segments (view 0: 12, view 1: 8, view 2: 8, view 3: 8)" in info.output
    assert "per view in LMDB" in info.output and "MiB of views in all" in info.output
    summary = FeatureStore.open(views_store["store"]).info()
    assert summary["views"]["total"] == 36 and summary["views"]["bytes_per_view"] > 0


@pytest.mark.slow
def test_views_where_is_a_checked_selection(views_store: dict, tmp_path: Path) -> None:
    sample = views_store["sample"]
    refused = invoke_featstore("build", *views_build_argv(
        sample, tmp_path / "s", "--views-where", "true) union all select * from segments where (true"))
    assert refused.exit_code != 0 and "--views-where" in refused.output
    assert not (tmp_path / "s").exists()


def test_the_detector_sees_each_distinct_frame_once_and_the_backbone_each_distinct_clip_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featstore.extract import service

    frames, annotations = make_epic_dataset(tmp_path, n_segments=2)
    seen = {"frames": 0, "clips": 0}
    build_models = service.build_models

    def counting(config, sampling):
        models = build_models(config, sampling)
        detect = models.detector.detect

        def counted(images, topk):
            seen["frames"] += len(images)
            return detect(images, topk)

        models.detector.detect = counted
        models.verb.register_forward_hook(lambda module, inputs, output: seen.__setitem__(
            "clips", seen["clips"] + inputs[0].shape[0]))
        return models

    config = small_config(tmp_path / "store", annotations, frames, views=4, batch_size=64)
    # The dry run tells the size first; it builds the models but runs none.
    estimate = estimate_build(config)
    assert (estimate.segments, estimate.with_views, estimate.total_views) == (2, 2, 8)
    assert "KiB per view x 8 views" in estimate.summary()
    monkeypatch.setattr(service, "build_models", counting)
    report = build_store(config)
    assert report.built == 2 and report.views == 8
    opened = FeatureStore.open(tmp_path / "store")
    rows = opened.segments(view=None).to_pylist()
    distinct_frames, distinct_clips = set(), set()
    fps = 60.0
    for row in rows:
        plan = plan_segment(row["start_frame"], row["stop_frame"], fps=fps, n_frames=300, config=config.sampling,
                            clip_center=row["clip_center"],
                            window_steps=round((row["window_center"] - (row["start_frame"] + row["stop_frame"] + 1)
                                                // 2) / (fps / config.sampling.det_fps)))
        distinct_frames |= {(row["video_id"], f) for f in plan.detection_frames}
        distinct_clips.add((row["uid"], plan.clip_frames))
    per_view_frames = sum(len(plan_segment(r["start_frame"], r["stop_frame"], fps=fps, n_frames=300,
                                           config=config.sampling).detection_frames) for r in rows)
    assert seen["frames"] == len(distinct_frames) < per_view_frames
    assert seen["clips"] == len(distinct_clips) <= len(rows)
    assert {name: (spec.dtype, spec.shape) for name, spec in opened.fields.items()} == estimate.fields
    assert opened.info()["views"]["total"] == estimate.total_views


@pytest.mark.slow
def test_heads_train_on_the_store_draws_views_and_evaluates_on_view_zero(views_store: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli.heads_cli import main as heads_main
    from tests.helpers.views import TRAIN_WHERE, VAL_WHERE

    run = tmp_path / "run"
    result = CliRunner().invoke(heads_main, [
        "train", str(views_store["store"]), "--model", "saoa", "--train-where", TRAIN_WHERE, "--val-where", VAL_WHERE,
        "--epochs", "3", "--batch-size", "4", "--lr", "0.03", "--normalize", "--out", str(run), "--no-progress"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((run / "metrics.json").read_text())["views"]
    assert record["mode"] == "random" and record["store_views"] == 4 and record["segments_with_views"] == TRAIN_SEGMENTS
    assert [sum(e["per_view"]) for e in record["epochs"]] == [TRAIN_SEGMENTS] * 3
    assert all(e["changed"] > 0 for e in record["epochs"][1:])
    config = json.loads((run / "config.json").read_text())
    assert config["n_train"] == TRAIN_SEGMENTS and config["n_val"] == VAL_SEGMENTS and config["views"] is None
