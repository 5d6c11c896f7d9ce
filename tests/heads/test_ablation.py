"""Grids of runs: failures and resuming, and grouped training equal to solo training (the format: test_grid.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from heads.ablation import ablate, run_grid
from heads.grid import parse_grid
from heads.metric_registry import table_metrics
from heads.predictions import read_predictions
from heads.trainer import train

TRAIN = "participant_id <= 'P25'"
VAL = "participant_id > 'P25'"
BASE = {"train_where": TRAIN, "val_where": VAL, "epochs": 1, "lr": 0.05, "batch_size": 32}


# One thread keeps the reduction order fixed, so solo and grouped runs compare bitwise.
pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(_: str) -> None:
    pass


def test_grid_records_failures_skips_finished_runs_and_flags_changed_ones(planted_store: Path, tmp_path: Path) -> None:
    grid = parse_grid({"base": BASE, "run": [
        {"name": "saoa", "seeds": [0, 1]},
        {"name": "global", "model": "global"},
        {"name": "unknown-model", "model": "no-such-head"},
        {"name": "bad-where", "model": "global", "val_where": "no_such_column = 1"},
    ]})
    out = tmp_path / "grid"
    first = run_grid(planted_store, grid, out, parallel=2, log=_quiet)
    assert set(first.trained) == {"saoa/seed0", "saoa/seed1", "global"}
    assert set(first.failed) == {"unknown-model", "bad-where"}
    assert "unknown head 'no-such-head'" in first.failed["unknown-model"]
    assert "no_such_column" in first.failed["bad-where"]

    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == 5
    rows = {row["name"]: row for row in table.to_pylist()}
    assert [rows[n]["status"] for n in ("saoa/seed0", "saoa/seed1", "global")] == ["ok"] * 3
    assert rows["unknown-model"]["status"] == "failed" and rows["unknown-model"]["action_top1"] is None
    assert {m.key for m in table_metrics()} <= set(table.column_names)
    assert {"model", "switches", "lr", "seed", "epochs", "train_where", "error"} <= set(table.column_names)
    metrics = json.loads((out / "saoa" / "seed1" / "metrics.json").read_text())
    assert rows["saoa/seed1"]["verb_top1"] == metrics["verb_top1"] and rows["saoa/seed1"]["seed"] == 1
    assert (out / "results.png").stat().st_size > 0
    markdown = (out / "results.md").read_text()
    assert "| Method | Model | Switches | Runs | Actions top-1 |" in markdown
    assert "| saoa | saoa | - | 2 |" in markdown and " ± " in markdown
    assert "| unknown-model | failed | " in markdown and "unknown head 'no-such-head'" in markdown

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name != "grid"}
    second = run_grid(planted_store, grid, out, parallel=2, log=_quiet)
    assert second.trained == () and set(second.skipped) == {"saoa/seed0", "saoa/seed1", "global"}
    assert set(second.failed) == {"unknown-model", "bad-where"}  # retried, failed again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no run directory was touched
    assert pq.read_table(out / "results.parquet").equals(table)

    changed = parse_grid({"base": {**BASE, "lr": 0.01}, "run": [{"name": "global", "model": "global"}]})
    third = run_grid(planted_store, changed, out, log=_quiet)
    assert third.trained == ()
    assert "holds a run with other settings (lr: recorded 0.05, grid 0.01)" in third.failed["global"]


@pytest.mark.slow  # a grid trained grouped and each run solo
def test_grouped_training_equals_solo_training(planted_store: Path, tmp_path: Path) -> None:
    base = {**BASE, "epochs": 2}
    grid = parse_grid({"base": base, "run": [
        {"name": "saoa", "seeds": [0, 3]},
        {"name": "sap", "model": "sap", "no_relation": True, "batch_size": 48},  # more steps than the others
        {"name": "global", "model": "global", "epochs": 3, "lr_steps": [2]},  # trains on after the others
    ]})
    results = ablate(planted_store, grid, tmp_path / "grid", parallel=4, log=_quiet)
    assert not results.failed and len(results.trained) == 4
    for run in grid.runs:
        solo_dir = tmp_path / "solo" / run.name
        solo = train(planted_store, solo_dir, run.config, progress=False, log=_quiet)
        grouped_dir = tmp_path / "grid" / run.name
        assert json.loads((grouped_dir / "metrics.json").read_text()) == solo, run.name
        grouped_preds, solo_preds = read_predictions(grouped_dir), read_predictions(solo_dir)
        assert np.array_equal(grouped_preds.verb_logits, solo_preds.verb_logits), run.name
        assert np.array_equal(grouped_preds.noun_logits, solo_preds.noun_logits), run.name
        strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
        assert strip(json.loads((grouped_dir / "history.json").read_text())) == \
            strip(json.loads((solo_dir / "history.json").read_text())), run.name


def test_interrupted_run_is_continued_to_the_uninterrupted_result(planted_store: Path, tmp_path: Path) -> None:
    grid = parse_grid({"base": {**BASE, "epochs": 2}, "run": [{"name": "global", "model": "global"}]})
    config = grid.runs[0].config

    def interrupt(epoch: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(planted_store, tmp_path / "grid" / "global", config, progress=False, log=_quiet, after_epoch=interrupt)
    assert not (tmp_path / "grid" / "global" / "metrics.json").exists()
    messages: list[str] = []
    results = run_grid(planted_store, grid, tmp_path / "grid", log=messages.append)
    assert results.trained == ("global",) and "global: resuming after epoch 1" in messages
    straight = train(planted_store, tmp_path / "straight", config, progress=False, log=_quiet)
    assert json.loads((tmp_path / "grid" / "global" / "metrics.json").read_text()) == straight
