"""Data-parallel training under torchrun gives the one-process result for the same effective batch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.heads_cli import main as heads_main
from heads.metric_registry import metric_values
from tests.helpers.torchrun import torchrun_cli

# A training under torchrun, in subprocesses (CI runs it). The one-process reference trains here, on
# one thread like each rank (`one_thread`): a third process would only add its imports.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TRAIN = "participant_id <= 'P25'"
VAL = "participant_id > 'P25'"


def _train_args(store: Path, out: Path) -> list[str]:
    return ["train", str(store), "--model", "saoa", "--train-where", TRAIN, "--val-where", VAL, "--epochs", "2",
            "--batch-size", "32", "--lr", "0.05", "--seed", "1", "--no-progress", "--out", str(out)]


def test_two_process_torchrun_matches_one_process(planted_store: Path, tmp_path: Path) -> None:
    single = CliRunner().invoke(heads_main, _train_args(planted_store, tmp_path / "one"))
    assert single.exit_code == 0, single.output
    torchrun_cli("cli.heads_cli", _train_args(planted_store, tmp_path / "two"), timeout=300)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metric_values(two) == pytest.approx(metric_values(one), abs=1e-6)
    assert {k: v for k, v in two.items() if k not in metric_values(two)} == {k: v for k, v in one.items() if k not in metric_values(one)}
    logits_one = np.array(pq.read_table(tmp_path / "one" / "predictions.parquet").column("verb_logits").to_pylist())
    logits_two = np.array(pq.read_table(tmp_path / "two" / "predictions.parquet").column("verb_logits").to_pylist())
    # Summation order differs across ranks: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(logits_two, logits_one, atol=1e-4, rtol=1e-4)
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
