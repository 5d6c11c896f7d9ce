"""Detector stage 1 (torchvision): data, sampler, a tiny run's folder and golden loss, resume, failures,
bad inputs, torchrun, and the "Done when" on the demo sample."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featstore.models import CheckpointError, build_detector, read_state_dict
from featstore.training.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    CURVES_NAME,
    FAILURES_NAME,
    LOG_NAME,
    METRICS_NAME,
    PER_CLASS_AP_NAME,
    PREDICTION_IMAGES_NAME,
    RESUME_STATE_NAME,
)
from finetune.clips import TooManyFailures
from finetune.detector import detector_warnings, finetune_detector
from finetune.detector_config import DetectorFinetuneError, make_detector_config
from tests.helpers.detection import OBJECT_IMAGE_PATTERN as PATTERN
from tests.helpers.detection import moved_object_hits
from tests.helpers.threads import torch_threads
from tests.helpers.torchrun import torchrun_cli

DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"


def tiny(images: Path, out: Path, **settings):
    values = dict(out=out, objects=images / "boxes.csv", images=images, detector=DETECTOR, image_pattern=PATTERN,
                  iterations=4, eval_every=2, batch_size=2, lr=0.01, warmup_iterations=1, lr_steps=(3,),
                  min_size=64, max_size=80, roi_batch_size=16, rpn_proposals=50, workers=0, progress=False,
                  num_classes=3)
    values.update(settings)
    return make_detector_config(**values)


@pytest.fixture(scope="module")
def uninterrupted(images: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    with torch_threads(1):  # as the tests that compare with it (module fixtures set up before `one_thread`)
        finetune_detector(tiny(images, out), log=lambda _: None)
    return out


# The mean training loss of each round (iterations 1-2 and 3-4) of the tiny seeded run, pinned: the seeded
# init, the images' order and flips, the losses, the warm-up, SGD and the lr step all feed these numbers,
# so a silent numeric change anywhere among them fails here. Measured on one thread; two threads differ
# by ~1e-5 (relative), torch's reductions in another order.
GOLDEN_ROUND_LOSSES = (2.1609647274017334, 2.058301091194153)


def test_a_detector_that_finds_nothing_is_warned_about() -> None:
    assert detector_warnings({"map_50": 0.0}, n_val=8)[0].startswith("mAP@0.5 is 0.00 % on the 8 held-out images")
    assert detector_warnings({"map_50": 12.0}, n_val=8) == []
    assert detector_warnings({"map_50": None}, n_val=0) == []  # no validation: nothing to say


def test_golden_loss_of_the_tiny_seeded_run(uninterrupted: Path) -> None:
    history = json.loads((uninterrupted / METRICS_NAME).read_text())["history"]
    assert [entry["loss"] for entry in history] == pytest.approx(GOLDEN_ROUND_LOSSES, rel=1e-4)


def test_a_run_writes_its_folder_and_build_loads_the_checkpoint(uninterrupted: Path) -> None:
    for name in (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, PER_CLASS_AP_NAME,
                 PREDICTION_IMAGES_NAME, CURVES_NAME, FAILURES_NAME, LOG_NAME):
        assert (uninterrupted / name).is_file(), name
    assert not (uninterrupted / RESUME_STATE_NAME).exists()  # deleted when the run finished
    metrics = json.loads((uninterrupted / METRICS_NAME).read_text())
    assert metrics["complete"] and metrics["iterations_done"] == 4 and isinstance(metrics["warnings"], list)
    assert [entry["iteration"] for entry in metrics["history"]] == [2, 4]
    assert all(0.0 <= entry["map_50"] <= 100.0 for entry in metrics["history"])
    config = json.loads((uninterrupted / CONFIG_NAME).read_text())
    assert "warm" in config["warmup"] and config["data"]["n_val_images"] == 8
    payload = torch.load(uninterrupted / CHECKPOINT_NAME, weights_only=True)
    assert payload["classes"]["num_classes"] == 3 and payload["finetune"]["kind"] == "detector"
    detector, _ = build_detector(f"{DETECTOR}:{uninterrupted / CHECKPOINT_NAME}", min_size=64, max_size=80)
    assert detector.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background, from the file
    assert detector.load_report.loaded == len(read_state_dict(uninterrupted / CHECKPOINT_NAME))


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(images: Path, uninterrupted: Path, tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop(rounds: int) -> None:
        if rounds == 1:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        finetune_detector(tiny(images, out), log=lambda _: None, after_round=stop)
    with pytest.raises(DetectorFinetuneError, match="--resume"):
        finetune_detector(tiny(images, out), log=lambda _: None)
    with pytest.raises(DetectorFinetuneError, match="lr: run has 0.01"):
        finetune_detector(tiny(images, out, resume=True, lr=0.02), log=lambda _: None)
    finetune_detector(tiny(images, out, resume=True), log=lambda _: None)
    ours, theirs = (read_state_dict(path / CHECKPOINT_NAME) for path in (out, uninterrupted))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert "resuming" in (out / LOG_NAME).read_text()


@pytest.mark.slow
def test_unreadable_training_images_are_listed_or_stop_the_run(images: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    (copy / "P01_01" / "0002.jpg").write_bytes(b"broken")
    out = tmp_path / "tolerant"
    finetune_detector(tiny(copy, out, max_failed_fraction=0.5, iterations=8, eval_every=8), log=lambda _: None)
    failures = json.loads((out / FAILURES_NAME).read_text())
    assert failures and {entry["uid"] for entry in failures} == {"P01_01/2"}
    with pytest.raises(TooManyFailures, match="train images of round 1 could not be read"):
        finetune_detector(tiny(copy, tmp_path / "strict", max_failed_fraction=0.0, iterations=8, eval_every=8),
                          log=lambda _: None)


@pytest.mark.slow
def test_an_init_checkpoint_drops_another_predictor_and_names_what_does_not_fit(images: Path, tmp_path: Path) -> None:
    coco, _ = build_detector(DETECTOR)  # 91 COCO classes
    coco.save_checkpoint(tmp_path / "coco.pt")
    out = tmp_path / "from-coco"
    finetune_detector(tiny(images, out, iterations=0, detector=f"{DETECTOR}:{tmp_path / 'coco.pt'}"),
                      log=lambda _: None)
    assert "box predictor (91 classes) was dropped" in (out / LOG_NAME).read_text()
    other, _ = build_detector("fasterrcnn_resnet50_fpn")
    other.save_checkpoint(tmp_path / "r50.pt")
    with pytest.raises(CheckpointError, match="unexpected|missing|shape"):
        finetune_detector(tiny(images, tmp_path / "bad", detector=f"{DETECTOR}:{tmp_path / 'r50.pt'}"),
                          log=lambda _: None)


def test_labels_outside_the_classes_are_refused(images: Path, tmp_path: Path) -> None:
    with pytest.raises(DetectorFinetuneError, match="class 2, outside the 2 classes"):
        finetune_detector(tiny(images, tmp_path / "run", num_classes=2), log=lambda _: None)


# The "Done when" on the demo's quick sample: its boxes.csv is the ground truth, every 4th of its frames
# the images (288 training images of P01-P03, 96 validation images of P26). MobileNetV3 from random
# weights at short side 240, where the sample's objects (27 x 18 px on average in the 96 x 128 frames)
# meet the model's smallest anchors (32 px); 32 sampled proposals an image for the box head; one thread.
# The trained detector, loaded from its checkpoint as `featstore build` loads it, then runs on the
# detection frames of each validation segment (those of the demo's build). Random weights give mAP@0.5 0
# and no detection at all (every score under the 0.05 threshold). Measured (seeds 0-4, one thread):
# mAP@0.5 31.1, 20.7, 27.1, 15.5, 38.8; hits 10, 5, 10, 2, 7 of 16 (the top 3 detections of 2 frames
# must hold the moved object: it lags mAP at this length). Shorter runs are not safe: 80 iterations
# gave mAP@0.5 8.0 and 2 hits, 100 at short side 160 gave 5.6.
DONE_WHEN_ITERATIONS = 100
DONE_WHEN_MIN_MAP_50 = 5.0  # percent on the held-out participant
DONE_WHEN_MIN_HITS = 2  # validation segments (of 16) with a detection at IoU >= 0.5 on the moved object


@pytest.mark.slow  # 100 iterations of 4 images at 240 x 320 on one thread (about a minute)
def test_done_when_mobilenet_learns_the_demo_objects(tmp_path: Path) -> None:
    from featstore.samples.kitchens import QUICK_SAMPLE, generate_sample

    sample = generate_sample(tmp_path / "sample", QUICK_SAMPLE, seed=0)
    out = tmp_path / "run"
    config = make_detector_config(
        out=out, objects=sample.boxes, images=sample.frames, detector=DETECTOR, image_pattern="rgb-frames",
        where="frame % 4 = 0", iterations=DONE_WHEN_ITERATIONS, eval_every=DONE_WHEN_ITERATIONS, batch_size=4,
        lr=0.02, warmup_iterations=20, lr_steps=(int(0.8 * DONE_WHEN_ITERATIONS),), min_size=240, max_size=320,
        roi_batch_size=32, rpn_proposals=150, workers=0, progress=False)
    with torch_threads(1):
        metrics = finetune_detector(config, log=lambda line: None)
        assert metrics["map_50"] >= DONE_WHEN_MIN_MAP_50, metrics
        detector, _ = build_detector(f"{DETECTOR}:{out / CHECKPOINT_NAME}", min_size=240, max_size=320)
        hits, n_validation = moved_object_hits(detector, sample)
    assert hits >= DONE_WHEN_MIN_HITS, (hits, n_validation)


@pytest.mark.slow  # two processes, each building and training the small detector
def test_two_torchrun_processes_train_one_detector(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune-detector", str(out), "--objects", str(images / "boxes.csv"), "--images", str(images),
            "--image-pattern", PATTERN, "--detector", DETECTOR, "--num-classes", "3", "--iterations", "4",
            "--eval-every", "2", "--batch-size", "4", "--lr", "0.01", "--warmup-iterations", "1", "--min-size", "64",
            "--max-size", "80", "--roi-batch-size", "16", "--rpn-proposals", "50", "--workers", "0", "--no-progress"]
    torchrun_cli("cli.featstore_cli", args)
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["complete"] and [entry["iteration"] for entry in metrics["history"]] == [2, 4]
    assert all(entry["map_50"] is not None for entry in metrics["history"])  # the main process validated
    assert json.loads((out / CONFIG_NAME).read_text())["settings"]["world_size"] == 2
    build_detector(f"{DETECTOR}:{out / CHECKPOINT_NAME}", min_size=64, max_size=80)
