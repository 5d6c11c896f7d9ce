"""Every trainer SIGKILLed half-way through writing a checkpoint, then ``--resume``d, ends with exactly
the run folder of `featstore.training.run_folder` (the contract's files, no temporary left).

`heads train` in detail: three epochs of SAOA on a small planted-signal store. A run saves a
checkpoint after each epoch (``torch.save`` calls 1-3, then the weights, 4) and renames, in order:
config.json (1), then per epoch last.pt, history.json and history.csv (2-10), then
predictions.parquet (11), metrics.json (12), curves.png (13) and checkpoint.pt (14), and deletes
the resume state last; its one Parquet write is the predictions (a resumed run counts from its own
start). Whatever the kills, ``--resume`` must end with exactly the files of an uninterrupted run:
the same metrics, predictions, history and final weights.

Then one kill per backend at tiny settings (seconds each): `heads train`, `featstore finetune`,
`featstore finetune-detector` with a torchvision detector and with detectron2 (where installed).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.training.run_folder import METRICS_NAME, RESUME_STATE_NAME, RUN_FILES, run_folder_files
from tests.finetune.conftest import TRAIN_WHERE as CLIP_TRAIN_WHERE
from tests.finetune.conftest import VAL_WHERE as CLIP_VAL_WHERE
from tests.finetune.conftest import make_small_epic
from tests.helpers.stores import make_planted_store
from tests.reliability import faults
from tests.reliability.invariants import assert_same_run
from tests.reliability.workloads import TRAIN_WHERE, VAL_WHERE, train_command

# Training killed at each I/O point and resumed, in subprocesses: a minute or more (CI runs them).
pytestmark = pytest.mark.slow

# Killed in turn in one run directory, each run resuming the last: (fault, what dies, the epoch of the
# checkpoint that must be there, whole, afterwards).
KILL_CHAIN = [
    ("torch.save:2:kill-during", "half-way through writing the epoch-2 checkpoint", 1),
    # The resumed run renames config.json (1), then the epoch-2 checkpoint (2).
    ("os.replace:2:kill", "the epoch-2 checkpoint complete under its temporary name, not renamed", 1),
    ("parquet.write:1:kill-during", "training done, half-way through predictions.parquet", 3),
]


def _resume_and_check(out: Path, reference: dict) -> None:
    resumed = faults.run(train_command(reference["store"], out, "--resume"))
    assert resumed.returncode == 0, faults.describe(resumed)
    assert_same_run(out, reference["run"])
    assert run_folder_files(out) == RUN_FILES["heads"].expected(validated=True)


def test_train_killed_at_each_io_point_in_turn_resumes_to_the_uninterrupted_result(
        train_reference: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for i, (fault, moment, epoch) in enumerate(KILL_CHAIN):
        extra = ("--resume",) if i else ()
        killed = faults.run(train_command(train_reference["store"], out, *extra), fault=fault, seed=i)
        assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
        # What a reader takes for the checkpoint is always a whole one.
        assert torch.load(out / RESUME_STATE_NAME, weights_only=False)["epoch"] == epoch, moment
    _resume_and_check(out, train_reference)


def test_train_killed_from_outside_at_a_seeded_random_time_resumes_to_the_same_result(
        train_reference: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Half to nine tenths of an uninterrupted run: past the first checkpoint, before the run's end (with
    # the commands forked, `faults.warm_up`, that is in its predictions, metrics and curves).
    delay = random.Random(5).uniform(0.5, 0.9) * train_reference["seconds"]
    outcome = faults.run_killed_after(train_command(train_reference["store"], out), delay)
    assert faults.killed(outcome) or outcome.returncode == 0, faults.describe(outcome)
    _resume_and_check(out, train_reference)


# ------------------------------------------------------------------------------------------------
# one kill per backend: half-way through the second resume state, then --resume


def _killed_mid_checkpoint_then_resumed(argv: list[str], out: Path, fault: str, trainer: str) -> None:
    """Run ``argv`` with ``fault`` (a ``torch.save:N:kill-during`` on the second round's resume state),
    check what the kill left, resume, and check the folder is exactly the contract's."""
    killed = faults.run(argv, fault=fault, seed=1)
    assert faults.killed(killed), f"the fault never fired: {faults.describe(killed)}"
    left = run_folder_files(out)
    assert any(Path(name).name.endswith(".tmp") for name in left), left  # the torn write's temporary
    first_round = torch.load(out / RESUME_STATE_NAME, map_location="cpu", weights_only=False)  # whole
    assert len(first_round["history"]) == 1
    resumed = faults.run([*argv, "--resume"])
    assert resumed.returncode == 0, faults.describe(resumed)
    assert "resum" in resumed.stderr, faults.describe(resumed)  # continued from the first round
    assert run_folder_files(out) == RUN_FILES[trainer].expected(validated=True)


def test_heads_train_killed_mid_checkpoint_resumes_to_exactly_the_contract_files(tmp_path: Path) -> None:
    store = make_planted_store(tmp_path / "data", 48)
    out = tmp_path / "run"
    argv = faults.command("heads", "train", store, "--model", "global", "--train-where", TRAIN_WHERE,
                          "--val-where", VAL_WHERE, "--epochs", "2", "--batch-size", "16", "--out", out,
                          "--no-progress")
    _killed_mid_checkpoint_then_resumed(argv, out, "torch.save:2:kill-during", "heads")


def test_featstore_finetune_killed_mid_checkpoint_resumes_to_exactly_the_contract_files(tmp_path: Path) -> None:
    data = make_small_epic(tmp_path / "data")
    out = tmp_path / "run"
    argv = faults.command("featstore", "finetune", out, "--annotations", data.annotations, "--frames", data.frames,
                          "--backbone", "mc3_18", "--target", "verb", "--recipe", "r50-3d", "--clip-frames", "4",
                          "--clip-stride", "2", "--crop", "32", "--scale-range", "32,40", "--test-size", "32",
                          "--epochs", "2", "--batch-size", "3", "--lr", "0.01", "--train-where", CLIP_TRAIN_WHERE,
                          "--val-where", CLIP_VAL_WHERE, "--limit", "3", "--num-classes", "4", "--workers", "0",
                          "--no-progress")
    # torch.save per epoch: the resume state (1, 3), then the checkpoint `featstore build` loads (2, 4).
    _killed_mid_checkpoint_then_resumed(argv, out, "torch.save:3:kill-during", "backbone")


PATTERN = "{video_id}/{frame:04d}.jpg"


def _write_object_images(root: Path) -> Path:
    """Four 64 x 80 images per video (P01_01 train, P26_01 validation), a red square of class 1 and a
    blue one of class 2 in each; their boxes file."""
    from PIL import Image

    rows = ["video_id,frame,x1,y1,x2,y2,score,label"]
    rng = np.random.default_rng(0)
    for video in ("P01_01", "P26_01"):
        (root / video).mkdir(parents=True)
        for frame in range(1, 5):
            image = rng.integers(0, 40, size=(64, 80, 3)).astype(np.uint8)
            red, blue = (4 + 3 * frame, 6, 24 + 3 * frame, 26), (40, 30 + frame, 70, 60 + frame)
            for (x1, y1, x2, y2), colour in ((red, (220, 20, 20)), (blue, (20, 20, 220))):
                image[y1:y2, x1:x2] = colour
            Image.fromarray(image).save(root / video / f"{frame:04d}.jpg", quality=95)
            rows += [f"{video},{frame},{','.join(map(str, red))},1,1", f"{video},{frame},{','.join(map(str, blue))},1,2"]
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root / "boxes.csv"


def _detector_command(images: Path, out: Path, detector: str, *extra: str) -> list[str]:
    """Two iterations of two images, a round (validation, resume state, checkpoint) after each."""
    return faults.command("featstore", "finetune-detector", out, "--objects", images / "boxes.csv", "--images", images,
                          "--image-pattern", PATTERN, "--detector", detector, "--num-classes", "3", "--iterations",
                          "2", "--eval-every", "1", "--batch-size", "2", "--lr", "0.01", "--lr-steps", "2",
                          "--warmup-iterations", "1", "--min-size", "48", "--max-size", "64", "--workers", "0",
                          "--no-progress", *extra)


def test_finetune_detector_killed_mid_checkpoint_resumes_to_exactly_the_contract_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _write_object_images(images)
    out = tmp_path / "run"
    argv = _detector_command(images, out, "fasterrcnn_mobilenet_v3_large_320_fpn", "--roi-batch-size", "16",
                             "--rpn-proposals", "50")
    # torch.save per round: the resume state (1, 3), then the checkpoint `featstore build` loads (2, 4).
    _killed_mid_checkpoint_then_resumed(argv, out, "torch.save:3:kill-during", "detector")


DETECTOR_KILL_POINTS = [
    ("torch.save:1:kill", "the first round validated, its resume state not written"),
    ("torch.save:2:kill-during", "half-way through the first round's checkpoint"),
    ("torch.save:4:kill-after", "the last checkpoint written, the final metrics not"),
]


@pytest.mark.parametrize("fault, moment", DETECTOR_KILL_POINTS, ids=[f for f, _ in DETECTOR_KILL_POINTS])
def test_finetune_detector_killed_at_an_io_point_resumes_with_each_round_once(
        tmp_path: Path, fault: str, moment: str) -> None:
    images = tmp_path / "images"
    _write_object_images(images)
    out = tmp_path / "run"
    argv = _detector_command(images, out, "fasterrcnn_mobilenet_v3_large_320_fpn", "--roi-batch-size", "16",
                             "--rpn-proposals", "50")
    killed = faults.run(argv, fault=fault, seed=2)
    assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
    resumed = faults.run([*argv, "--resume"])
    assert resumed.returncode == 0, faults.describe(resumed)
    assert run_folder_files(out) == RUN_FILES["detector"].expected(validated=True)
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["complete"] is True
    rounds = [entry["iteration"] for entry in metrics["history"]]
    assert rounds == [1, 2], rounds  # nothing lost, nothing doubled


# detectron2's smallest setting that trains on a CPU in seconds (its R-FPN at depth 18, GroupNorm).
DETECTRON2_YAML = """_BASE_: {base}
MODEL:
  RESNETS: {{DEPTH: 18, RES2_OUT_CHANNELS: 64, NORM: GN, STRIDE_IN_1X1: false}}
  BACKBONE: {{FREEZE_AT: 0}}
  FPN: {{NORM: GN}}
  RPN: {{BATCH_SIZE_PER_IMAGE: 64, PRE_NMS_TOPK_TRAIN: 300, POST_NMS_TOPK_TRAIN: 100, PRE_NMS_TOPK_TEST: 100,
        POST_NMS_TOPK_TEST: 50}}
  ROI_HEADS: {{BATCH_SIZE_PER_IMAGE: 32}}
"""


def test_detectron2_killed_mid_checkpoint_resumes_to_exactly_the_contract_files(tmp_path: Path) -> None:
    pytest.importorskip("detectron2")
    from importlib.resources import files

    base = Path(str(files("detectron2") / "model_zoo" / "configs" / "COCO-Detection" / "faster_rcnn_R_50_FPN_3x.yaml"))
    config = tmp_path / "small.yaml"
    config.write_text(DETECTRON2_YAML.format(base=base))
    images = tmp_path / "images"
    _write_object_images(images)
    out = tmp_path / "run"
    argv = _detector_command(images, out, f"detectron2:{config}")
    # torch.save per round: the checkpoint `featstore build` loads (1, 3), then the resume state (2, 4).
    _killed_mid_checkpoint_then_resumed(argv, out, "torch.save:4:kill-during", "detectron2")
