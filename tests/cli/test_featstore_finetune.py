"""`featstore finetune` end to end: r3d_18 on 8-frame, 64-pixel clips of generated EPIC frames."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main
from featstore.models import build_backbone

from tests.finetune.conftest import TRAIN_WHERE, VAL_WHERE, make_small_epic


pytestmark = pytest.mark.usefixtures("one_thread")


def finetune_args(data, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(out), "--annotations", str(data.annotations), "--frames", str(data.frames),
            "--backbone", "r3d_18", "--target", "noun", "--recipe", "r50-3d", "--clip-frames", "8",
            "--clip-stride", "2", "--crop", "64", "--scale-range", "64,72", "--test-size", "64", "--epochs", "1",
            "--batch-size", "3", "--lr", "0.01", "--train-where", TRAIN_WHERE, "--val-where", VAL_WHERE,
            "--limit", "3", "--num-classes", "4", "--workers", "1", "--no-progress", *extra]


@pytest.mark.slow
def test_finetune_writes_a_run_folder_whose_checkpoint_the_build_loads(tmp_path: Path) -> None:
    data = make_small_epic(tmp_path / "data")
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(featstore_main, finetune_args(data, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"noun_top1", "noun_top5"}
    assert f"--noun-backbone r3d_18:{out / 'checkpoint.pt'}" in result.stderr
    for name in ("checkpoint.pt", "config.json", "metrics.json", "failures.json", "curves.png", "log.txt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert isinstance(config["settings"]["command"], str)  # sys.argv as typed (pytest's, under CliRunner)
    assert (config["settings"]["crop"], config["settings"]["scale_range"], config["settings"]["epochs"]) == (
        64, [64, 72], 1)
    assert config["settings"]["momentum"] == 0.9 and config["recipe"]["name"] == "r50-3d"  # the recipe's values
    assert config["data"]["n_train"] == 3 and config["data"]["n_val"] == 3
    build_backbone(f"r3d_18:{out / 'checkpoint.pt'}")  # loads strictly

    # A finished run: --resume has nothing left to train and reports the same metrics.
    again = runner.invoke(featstore_main, finetune_args(data, out, "--resume"), catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == metrics
    # Without --resume the run is not overwritten: one clear line, exit 1.
    refused = runner.invoke(featstore_main, finetune_args(data, out))
    assert refused.exit_code == 1 and "already holds a run; pass --resume" in refused.output
    assert "Traceback" not in refused.output


def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    data = make_small_epic(tmp_path / "data")
    runner = CliRunner()
    bad_range = runner.invoke(featstore_main, finetune_args(data, tmp_path / "a", "--scale-range", "64"))
    assert bad_range.exit_code == 2 and "expected LOW,HIGH" in bad_range.output
    too_small = runner.invoke(featstore_main, finetune_args(data, tmp_path / "b", "--scale-range", "32,40"))
    assert too_small.exit_code == 1 and "scale_range must be crop <= low <= high" in too_small.output
    no_recipe = runner.invoke(featstore_main, [a for a in finetune_args(data, tmp_path / "c") if a not in
                                               ("--recipe", "r50-3d")])
    assert no_recipe.exit_code == 1 and "no rgb recipe for backbone 'r3d_18'" in no_recipe.output
    missing_init = runner.invoke(featstore_main, finetune_args(data, tmp_path / "d", "--backbone",
                                                               f"r3d_18:{tmp_path / 'kinetics.pth'}"))
    assert missing_init.exit_code == 1 and "never downloads weights" in missing_init.output
    assert not (tmp_path / "d").exists()  # a refused run leaves no folder
    (tmp_path / "kinetics.pth").write_bytes(b"")
    twice = runner.invoke(featstore_main, finetune_args(data, tmp_path / "d", "--backbone",
                                                        f"r3d_18:{tmp_path / 'kinetics.pth'}", "--init",
                                                        str(tmp_path / "kinetics.pth")))
    assert twice.exit_code == 1 and "give the init checkpoint once" in twice.output
    empty = runner.invoke(featstore_main, finetune_args(data, tmp_path / "e", "--train-where", "participant_id = 'P99'"))
    assert empty.exit_code == 1 and "holds no segments" in empty.output
