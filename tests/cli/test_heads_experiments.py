"""`heads ablate`, `heads fuse`, `heads submit`, run for real on a small imported store and the real test files."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from cli.heads_cli import main
from heads.predictions import Predictions, read_predictions, write_predictions
from heads.submission import timestamp_uids

TOPK = ("verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5")

GRID = """\
[base]
train_where = "participant_id <= 'P25'"
val_where = "participant_id > 'P25'"
epochs = 1
lr = 0.05

[[run]]
name = "saoa"
model = "saoa"

[[run]]
name = "saoa-no-gating"
model = "saoa"
no_gating = true

[[run]]
name = "global"
model = "global"
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_the_commands_are_registered_with_help() -> None:
    for name in ("ablate", "fuse", "submit"):
        result = _invoke(name, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_ablate_then_fuse_two_of_its_runs(planted_store: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "ablation"
    result = _invoke("ablate", planted_store, "--grid", grid, "--out", out, "--parallel", 3)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == 3 and table.column("name").to_pylist() == ["saoa", "saoa-no-gating", "global"]
    assert table.column("status").to_pylist() == ["ok"] * 3
    assert set(TOPK) <= set(table.column_names)
    assert all(0 <= v <= 100 for v in table.column("action_top1").to_pylist())
    assert json.loads(table.column("switches")[1].as_py()) == {"gating": False}
    markdown = (out / "results.md").read_text()
    assert "| saoa-no-gating | saoa | no gating | 1 |" in markdown and "| global | global | - | 1 |" in markdown
    assert "| saoa-no-gating |" in result.output  # the table is printed too
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("saoa", "saoa-no-gating", "global"):
        assert (out / name / "metrics.json").is_file() and (out / name / "predictions.parquet").is_file()

    again = _invoke("ablate", planted_store, "--grid", grid, "--out", out)
    assert again.exit_code == 0 and "0 trained, 3 already finished" in again.output

    fused = tmp_path / "fused"
    result = _invoke("fuse", out / "saoa", out / "global", "--out", fused, "--weights", "2,1")
    assert result.exit_code == 0, result.output
    metrics = json.loads((fused / "metrics.json").read_text())
    assert set(TOPK) <= set(metrics) and json.loads(result.stdout) == metrics
    predictions = read_predictions(fused / "predictions.parquet")
    assert len(predictions.uids) == 240 and predictions.verb_logits.shape == (240, 125)
    assert json.loads((fused / "fusion.json").read_text())["weights"] == pytest.approx([2 / 3, 1 / 3])


def test_ablate_reports_a_failed_run_with_exit_status_1(planted_store: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text('[[run]]\nname = "typo"\nmodel = "saoaa"\n')
    result = CliRunner().invoke(main, ["ablate", str(planted_store), "--grid", str(grid), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "1 run(s) failed: typo" in result.output
    assert "unknown head 'saoaa'" in (tmp_path / "o" / "results.md").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[run]]\nname = "a"\nlearning_rate = 1\n')
    result = CliRunner().invoke(main, ["ablate", str(planted_store), "--grid", str(bad), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and "unknown key 'learning_rate'" in result.output


def test_fuse_refuses_inputs_without_shared_segments(tmp_path: Path) -> None:
    for name, uids in (("a", ("1", "2")), ("b", ("3",))):
        zeros = Predictions(uids, np.zeros((len(uids), 125), np.float32), np.zeros((len(uids), 352), np.float32))
        write_predictions(tmp_path / f"{name}.parquet", zeros)
    result = CliRunner().invoke(main, ["fuse", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
                                       "--out", str(tmp_path / "f")])
    assert result.exit_code == 1 and "share no segment" in result.output


@pytest.mark.slow  # every EPIC-55 test segment
def test_submit_epic55_zip_holds_every_test_segment(epic55_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, test_set in (("s1", "epic55-s1"), ("s2", "epic55-s2")):
        uids = timestamp_uids(epic55_dir, test_set)
        write_predictions(tmp_path / f"{name}.parquet", Predictions(
            uids, rng.normal(size=(len(uids), 125)).astype(np.float32),
            rng.normal(size=(len(uids), 352)).astype(np.float32)))
    out = tmp_path / "submission.zip"
    result = _invoke("submit", "--format", "epic55", "--seen", tmp_path / "s1.parquet", "--unseen",
                     tmp_path / "s2.parquet", "--meta-dir", epic55_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert "seen.json: 8047 segments, unseen.json: 2929 segments" in result.output
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == ["seen.json", "unseen.json"]
        seen = json.loads(archive.read("seen.json"))
        unseen = json.loads(archive.read("unseen.json"))
    assert set(seen["results"]) == set(timestamp_uids(epic55_dir, "epic55-s1"))
    assert set(unseen["results"]) == set(timestamp_uids(epic55_dir, "epic55-s2"))
    first = next(iter(unseen["results"].values()))
    assert (len(first["verb"]), len(first["noun"]), len(first["action"])) == (125, 352, 100)

    wrong = CliRunner().invoke(main, ["submit", "--format", "epic55", "--seen", str(tmp_path / "s1.parquet"),
                                      "--unseen", str(tmp_path / "s1.parquet"), "--meta-dir", str(epic55_dir),
                                      "--out", str(tmp_path / "wrong.zip")])
    assert wrong.exit_code == 1 and "unseen (S2) predictions do not match the test set" in wrong.output
    usage = CliRunner().invoke(main, ["submit", "--format", "epic100", "--seen", str(tmp_path / "s1.parquet"),
                                      "--meta-dir", str(epic55_dir), "--out", str(tmp_path / "x.zip")])
    assert usage.exit_code == 2 and "takes --test" in usage.output
