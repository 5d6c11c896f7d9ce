"""`heads runs` and `heads inspect`, run for real on runs of a small imported store."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.heads_cli import main

TRAIN = "participant_id <= 'P25'"
VAL = "participant_id > 'P25'"

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(planted_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("global", ("--model", "global")), ("saoa-seed1", ("--model", "saoa", "--seed", "1"))):
        result = CliRunner().invoke(main, ["train", str(planted_store), *extra, "--train-where", TRAIN, "--val-where",
                                           VAL, "--epochs", "1", "--lr", "0.05", "--no-progress", "--out",
                                           str(root / name)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root


def test_runs_tables_every_run_sorted_in_each_format(runs: Path) -> None:
    result = _invoke("runs", runs, "--sort", "seed:desc", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(Path(r["run"]).name, r["model"], r["seed"]) for r in rows] == [("saoa-seed1", "saoa", "1"),
                                                                           ("global", "global", "0")]
    metrics = json.loads((runs / "global" / "metrics.json").read_text())
    assert float(rows[1]["action_top1"]) == pytest.approx(metrics["action_top1"])
    markdown = _invoke("runs", runs).stdout
    assert markdown.startswith("| run | kind | model | switches | store |") and markdown.count("| heads |") == 2
    assert len(json.loads(_invoke("runs", runs, "--format", "json").stdout)) == 2
    bad = CliRunner().invoke(main, ["runs", str(runs), "--sort", "nope"])
    assert bad.exit_code == 1 and "cannot sort by 'nope'" in bad.output


def test_inspect_shows_a_segment_and_the_run_s_top5(runs: Path) -> None:
    import pyarrow.parquet as pq

    uid = pq.read_table(runs / "global" / "predictions.parquet").column("uid")[0].as_py()
    result = _invoke("inspect", runs / "global", uid)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"segment    {uid}") and lines[1].startswith("narration  verb")
    assert "verb top-5:" in lines and "action top-5:" in lines and len(lines) == 3 + 3 * 6 + 1
    missing = CliRunner().invoke(main, ["inspect", str(runs / "global"), "no-such-uid"])
    assert missing.exit_code == 1 and "is not in" in missing.output
