"""`featstore demo --quick` end to end: sample, build, train, report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.featstore_cli import main
from featstore.store import FeatureStore


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    result = CliRunner().invoke(main, ["demo", str(out), "--quick", "--epochs", "5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_demo_writes_a_verified_store_runs_and_a_results_table(demo_dir: tuple[Path, str]) -> None:
    out, printed = demo_dir
    store = FeatureStore.open(out / "store")
    assert store.verify() == []
    info = store.info()
    assert info["segments"] == {"ok": 36, "failed": 0}
    assert {"verb.global", "verb.map", "noun.global", "det.global.feat", "det.local.box"} <= set(info["fields"])
    for head in ("saoa", "global"):
        run = out / "runs" / head
        assert (run / "curves.png").is_file() and (run / "predictions.parquet").is_file()
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0 <= metrics["verb_top1"] <= 100 and 0 <= metrics["noun_top1"] <= 100
    assert "saoa" in printed and "chance" in printed and str(out / "store") in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"saoa", "global"}


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["demo", str(tmp_path), "--quick"])
    assert result.exit_code == 1 and "not a featstore demo folder" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"
