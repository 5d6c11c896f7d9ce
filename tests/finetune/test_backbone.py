"""Stage-1 runs on tiny generated frames: the run folder, resume equals an uninterrupted run, unreadable
segments skipped and listed (or the run stopped), NaN losses named, runs that must not be overwritten.

mc3_18 (the registered 3D ResNet with the smallest checkpoints) on 8-frame, 32-pixel clips of 48 x 64
frames: 6 training and 3 validation segments, batches of 3, 2 epochs, on the CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featstore.models import build_backbone
from featstore.samples.damage import corrupt_jpeg
from featstore.training.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    FAILURES_NAME,
    LOG_NAME,
    METRICS_NAME,
    RUN_FILES,
    run_folder_files,
)
from finetune.backbone import finetune, select_training_data
from finetune.config import FinetuneError
from tests.finetune.conftest import make_small_epic, small_config
from tests.helpers.threads import torch_threads
from tests.helpers.torchrun import torchrun_cli

TIMING_KEYS = ("seconds", "clips_per_s")


class Interrupt(Exception):
    pass


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


def checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    return {**{f"backbone.{k}": v for k, v in payload["state_dict"].items()},
            **{f"classifier.{k}": v for k, v in payload["classifier"].items()}}


@pytest.fixture(scope="module")
def uninterrupted(small_epic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    with torch_threads(1):  # as the tests that compare with it (module fixtures set up before `one_thread`)
        finetune(small_config(small_epic, out), log=lambda _: None)
    return out


@pytest.mark.slow
def test_a_run_writes_its_folder(uninterrupted: Path) -> None:
    # Exactly the contract's files: no temporaries, nothing else.
    assert run_folder_files(uninterrupted) == RUN_FILES["backbone"].expected(validated=True)
    config = json.loads((uninterrupted / CONFIG_NAME).read_text())
    assert config["settings"]["backbone"] == "mc3_18" and config["recipe"]["name"] == "r50-3d"
    assert config["data"]["n_train"] == 6 and config["data"]["n_val"] == 3 and config["init"] is None
    metrics = json.loads((uninterrupted / METRICS_NAME).read_text())
    assert metrics["complete"] and [e["epoch"] for e in metrics["history"]] == [1, 2]
    assert [e["lr"] for e in metrics["history"]] == pytest.approx([0.01, 0.001])  # --lr-steps 2
    assert metrics["verb_top1"] == metrics["history"][-1]["verb_top1"] and 0 <= metrics["verb_top5"] <= 100
    # Training verbs 0, 1, 2, 0, 1, 2 (most frequent: 0, the first of the ties); validation 0, 1, 2.
    assert metrics["majority_top1"] == pytest.approx(100 / 3)
    # At chance (a third: three classes, each once) or above: said in `warnings` either way.
    assert (metrics["verb_top1"] <= 100 / 3 + 1e-6) == bool(metrics["warnings"])
    assert all(e["train_clips"] == 6 and e["val_clips"] == 3 and e["steps"] == 2 for e in metrics["history"])
    record = torch.load(uninterrupted / CHECKPOINT_NAME, weights_only=True)["finetune"]
    assert record["epoch"] == 2 and record["config"] == config
    backbone, _ = build_backbone(f"mc3_18:{uninterrupted / CHECKPOINT_NAME}")  # strictly
    assert "epoch 2" in (uninterrupted / LOG_NAME).read_text()


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(small_epic, uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"

    def stop_in_epoch_2(epoch: int, step: int) -> None:
        if epoch == 1 and step == 1:
            raise Interrupt

    # Other worker counts than the uninterrupted run: the samples do not depend on who decodes them.
    with pytest.raises(Interrupt):
        finetune(small_config(small_epic, out, workers=2), log=lambda _: None, after_step=stop_in_epoch_2)
    assert json.loads((out / METRICS_NAME).read_text())["epochs_done"] == 1
    with pytest.raises(FinetuneError, match="already holds a run; pass --resume"):
        finetune(small_config(small_epic, out), log=lambda _: None)
    with pytest.raises(FinetuneError, match=r"other settings.*lr: run has 0.01, now 0.02"):
        finetune(small_config(small_epic, out, lr=0.02, resume=True), log=lambda _: None)
    metrics = finetune(small_config(small_epic, out, workers=1, resume=True), log=lambda _: None)

    expected = json.loads((uninterrupted / METRICS_NAME).read_text())
    assert metrics == {k: expected[k] for k in ("verb_top1", "verb_top5")}
    got = json.loads((out / METRICS_NAME).read_text())
    assert without_timing(got["history"]) == without_timing(expected["history"])
    mine, theirs = checkpoint_tensors(out), checkpoint_tensors(uninterrupted)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.slow
def test_unreadable_segments_are_skipped_and_listed_or_stop_the_run(tmp_path: Path) -> None:
    data = make_small_epic(tmp_path / "data")
    bad_train, bad_val = data.segments[1], data.segments[7]
    for frame in range(bad_train.start_frame, bad_train.stop_frame + 1):  # in every clip it can draw
        corrupt_jpeg(data.frame_file(bad_train, frame), "truncate")
    for frame in range(bad_val.start_frame, bad_val.stop_frame + 1):
        corrupt_jpeg(data.frame_file(bad_val, frame), "garbage")

    out = tmp_path / "tolerant"
    finetune(small_config(data, out, max_failed_fraction=0.5), log=lambda _: None)
    failures = json.loads((out / FAILURES_NAME).read_text())
    assert [(f["uid"], f["epoch"], f["phase"]) for f in failures] == [
        (bad_train.uid, 1, "train"), (bad_val.uid, 1, "val"), (bad_train.uid, 2, "train"), (bad_val.uid, 2, "val")]
    assert "truncated JPEG" in failures[0]["reason"] and "not a JPEG" in failures[1]["reason"]
    history = json.loads((out / METRICS_NAME).read_text())["history"]
    assert [(e["train_clips"], e["train_failed"], e["val_clips"], e["val_failed"]) for e in history] == [(5, 1, 2, 1)] * 2
    assert f"skipped train segment {bad_train.uid}" in (out / LOG_NAME).read_text()

    # 1 of 6 is more than the default 1 %: the run stops in its first epoch and says why.
    with pytest.raises(FinetuneError, match=rf"1 of 6 train segments of epoch 1 could not be read, more than the "
                                            rf"1.0% allowed .*{bad_train.uid}: truncated JPEG"):
        finetune(small_config(data, tmp_path / "strict"), log=lambda _: None)


def test_a_nan_loss_stops_the_run_naming_epoch_and_step(small_epic, tmp_path: Path) -> None:
    backbone, _ = build_backbone("mc3_18")
    state = backbone.state_dict()
    state["stem.0.weight"] = torch.full_like(state["stem.0.weight"], float("nan"))
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(FinetuneError, match="loss is nan at epoch 1, step 1"):
        finetune(small_config(small_epic, tmp_path / "run", backbone=f"mc3_18:{tmp_path / 'broken.pt'}", epochs=1),
                 log=lambda _: None)


def test_selections_follow_build_and_heads_train(small_epic, tmp_path: Path) -> None:
    def uids(rows):
        return [row["uid"] for row in rows]

    chosen = select_training_data(small_config(small_epic, tmp_path / "a"))
    assert uids(chosen.train) == [f"s{i}" for i in range(6)] and uids(chosen.val) == ["s6", "s7", "s8"]
    assert chosen.dataset == "epic55" and chosen.num_classes == 4
    # No training selection: everything selected that is not validation; --where narrows both.
    chosen = select_training_data(small_config(small_epic, tmp_path / "b", train_where=None,
                                               where="participant_id <> 'P02'"))
    assert uids(chosen.train) == ["s0", "s1", "s2"] and uids(chosen.val) == ["s6", "s7", "s8"]
    chosen = select_training_data(small_config(small_epic, tmp_path / "c", limit=2, num_classes=None))
    assert uids(chosen.train) == ["s0", "s1"] and uids(chosen.val) == ["s6", "s7"] and chosen.num_classes == 125
    with pytest.raises(FinetuneError, match="s3: noun_class 3 is outside the classifier's 3 classes"):
        select_training_data(small_config(small_epic, tmp_path / "d", target="noun", num_classes=3))
    with pytest.raises(FinetuneError, match="selection .* names no column"):
        select_training_data(small_config(small_epic, tmp_path / "e", where="no_such_column = 1"))


def test_a_flow_run_trains_on_the_u_v_stacks_the_flow_build_reads(tmp_path: Path) -> None:
    data = make_small_epic(tmp_path / "data", flow=True)
    out = tmp_path / "flow"
    finetune(small_config(data, out, recipe="i3d-flow", backbone="mc3_18", epochs=1), log=lambda _: None)
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["settings"]["modality"] == "flow" and config["recipe"]["modality"] == "flow"
    backbone, _ = build_backbone(f"mc3_18:{out / CHECKPOINT_NAME}", in_channels=2)  # as featstore build --modality flow
    assert backbone.stem[0].in_channels == 2


def test_a_tsn_flow_run_takes_segments_of_stacked_snippets(tmp_path: Path) -> None:
    data = make_small_epic(tmp_path / "data", flow=True)
    out = tmp_path / "tsn-flow"
    config = small_config(data, out, recipe="i3d-flow", backbone="tsn_r50", clip_frames=2, clip_stride=1,
                          epochs=1, batch_size=2)
    assert (config.clip_sampling, config.snippet_frames, config.in_channels) == ("segments", 5, 10)
    finetune(config, log=lambda _: None)
    backbone, _ = build_backbone(f"tsn_r50:{out / CHECKPOINT_NAME}", in_channels=10)  # as the flow build loads it
    assert backbone.base_model.conv1.in_channels == 10


@pytest.mark.slow
def test_two_torchrun_processes_share_the_batches_and_gather_what_they_saw(tmp_path: Path) -> None:
    from tests.finetune.conftest import TRAIN_WHERE, VAL_WHERE

    data = make_small_epic(tmp_path / "data")
    bad = data.segments[2]
    for frame in range(bad.start_frame, bad.stop_frame + 1):
        corrupt_jpeg(data.frame_file(bad, frame), "zero")
    out = tmp_path / "run"
    args = ["finetune", str(out), "--annotations", str(data.annotations), "--frames", str(data.frames),
            "--backbone", "mc3_18", "--target", "verb", "--recipe", "r50-3d", "--clip-frames", "8", "--crop", "32",
            "--scale-range", "32,40", "--test-size", "32", "--epochs", "1", "--batch-size", "4", "--lr", "0.01",
            "--train-where", TRAIN_WHERE, "--val-where", VAL_WHERE, "--num-classes", "4", "--workers", "0",
            "--max-failed-fraction", "0.5", "--no-progress"]
    torchrun_cli("cli.featstore_cli", args)
    [entry] = json.loads((out / METRICS_NAME).read_text())["history"]
    # 6 training segments in batches of 4 shared by 2 processes: 2 steps each, one segment unreadable.
    assert (entry["train_clips"], entry["train_failed"], entry["steps"]) == (5, 1, 2)
    assert (entry["val_clips"], entry["val_failed"]) == (3, 0)  # each process scored its share
    failures = json.loads((out / FAILURES_NAME).read_text())
    assert [(f["uid"], f["phase"]) for f in failures] == [(bad.uid, "train")] and "empty" in failures[0]["reason"]
    build_backbone(f"mc3_18:{out / CHECKPOINT_NAME}")
