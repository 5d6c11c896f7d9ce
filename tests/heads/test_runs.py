"""`heads runs`: every run folder below some folders in one table, read with DuckDB from config.json / metrics.json."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from heads.runs import RunsError, find_run_folders, format_runs, runs_table


def _run(folder: Path, config: dict, metrics: dict | None = None, *, file: str = "config.json") -> Path:
    folder.mkdir(parents=True)
    (folder / file).write_text(json.dumps(config))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "project" / "runs"
    _run(root / "saoa", {"model": "saoa", "switches": {"gating": True}, "store": "../../store", "seed": 0,
                         "epochs": 15}, {"verb_top1": 40.0, "action_top1": 10.0, "warnings": []})
    _run(root / "grid" / "saoa-no-gating", {"model": "saoa", "switches": {"gating": False}, "store": "../../../store",
                                            "seed": 1, "epochs": 15},
         {"verb_top1": 30.0, "action_top1": 12.5, "warnings": ["verb top-1 at chance"]})
    _run(root / "unfinished", {"model": "global", "switches": {}, "store": "/abs/store", "seed": 2, "epochs": 3})
    _run(root / "verbnet", {"settings": {"backbone": "r3d_18", "seed": 0, "epochs": 6, "annotations": "/a.csv"}},
         {"verb_top1": 70.0, "history": []})
    _run(root / "fused", {"inputs": ["a", "b"], "weights": [0.5, 0.5]}, {"verb_top1": 45.0}, file="fusion.json")
    (root / "notes").mkdir()  # not a run
    return root


def test_every_run_is_a_row_with_its_settings_and_metrics(runs: Path) -> None:
    assert [p.name for p in find_run_folders([runs])] == ["fused", "saoa-no-gating", "saoa", "unfinished", "verbnet"]
    table = runs_table([runs])
    assert table.columns == ("run", "kind", "model", "switches", "store", "seed", "epochs", "verb_top1",
                             "action_top1", "warnings", "finished")
    rows = {Path(row["run"]).name: row for row in table.rows}
    assert rows["saoa-no-gating"] | {"run": ""} == {
        "run": "", "kind": "heads", "model": "saoa", "switches": "no gating", "store": "../../../store", "seed": 1,
        "epochs": 15, "verb_top1": 30.0, "action_top1": 12.5, "warnings": 1, "finished": True}
    assert rows["saoa"]["switches"] == "-"
    assert rows["unfinished"]["finished"] is False and rows["unfinished"]["verb_top1"] is None
    assert (rows["verbnet"]["kind"], rows["verbnet"]["model"], rows["verbnet"]["epochs"]) == ("backbone", "r3d_18", 6)
    assert (rows["fused"]["kind"], rows["fused"]["model"]) == ("fusion", "fusion of 2")


def test_sorting_puts_the_best_metric_first_and_missing_values_last(runs: Path) -> None:
    by_action = [Path(r["run"]).name for r in runs_table([runs], sort="action_top1").rows]
    assert by_action[:2] == ["saoa-no-gating", "saoa"]
    assert [Path(r["run"]).name for r in runs_table([runs], sort="verb_top1:asc").rows][:2] == ["saoa-no-gating",
                                                                                               "saoa"]
    assert [r["seed"] for r in runs_table([runs], sort="seed").rows][:3] == [0, 0, 1]
    with pytest.raises(RunsError, match="cannot sort by 'accuracy'"):
        runs_table([runs], sort="accuracy")


def test_the_three_formats(runs: Path) -> None:
    table = runs_table([runs / "grid"])
    markdown = format_runs(table, "md").splitlines()
    assert markdown[0].startswith("| run | kind | model |") and "| no gating |" in markdown[2]
    assert "| 30.00 | 12.50 | 1 | yes |" in markdown[2]
    rows = list(csv.DictReader(io.StringIO(format_runs(table, "csv"))))
    assert rows[0]["verb_top1"] == "30.0" and rows[0]["model"] == "saoa"
    assert json.loads(format_runs(table, "json"))[0]["action_top1"] == 12.5


def test_a_folder_without_runs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RunsError, match="no run folder"):
        runs_table([tmp_path])
