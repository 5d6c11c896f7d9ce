"""`heads train` SIGKILLed at exact I/O points and at a seeded random time, then `--resume`d.

Three epochs of SAOA on a small planted-signal store. A run saves a checkpoint after each epoch
(``torch.save`` calls 1-3) and renames, in order: config.json (1), then per epoch last.pt and
history.json (2-7), then predictions.parquet (8), metrics.json (9) and curves.png (10); its one
Parquet write is the predictions (a resumed run counts from its own start). Whatever the kills,
``--resume`` must end with exactly the files of an uninterrupted run: the same metrics,
predictions, history and final weights.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.reliability import faults
from tests.reliability.invariants import assert_same_run
from tests.reliability.workloads import train_command

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


def test_train_killed_at_each_io_point_in_turn_resumes_to_the_uninterrupted_result(
        train_reference: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for i, (fault, moment, epoch) in enumerate(KILL_CHAIN):
        extra = ("--resume",) if i else ()
        killed = faults.run(train_command(train_reference["store"], out, *extra), fault=fault, seed=i)
        assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
        # What a reader takes for the checkpoint is always a whole one.
        assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == epoch, moment
    _resume_and_check(out, train_reference)


def test_train_killed_from_outside_at_a_seeded_random_time_resumes_to_the_same_result(
        train_reference: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    delay = random.Random(5).uniform(0.75, 1.0) * train_reference["seconds"]
    outcome = faults.run_killed_after(train_command(train_reference["store"], out), delay)
    assert faults.killed(outcome) or outcome.returncode == 0, faults.describe(outcome)
    _resume_and_check(out, train_reference)
