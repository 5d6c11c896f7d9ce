"""`featstore export`: the command on a real small store, and back through `featstore import`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cli.featstore_cli import main
from cli.featstore_export import EXPORT_FORMATS
from featstore.exports import list_export_formats
from featstore.store.reader import FeatureStore
from tests.helpers.stores import make_small_store


def test_the_choices_are_the_registry() -> None:
    assert list(EXPORT_FORMATS) == list_export_formats()


def test_export_then_import_gives_the_same_fields(tmp_path: Path) -> None:
    store = make_small_store(tmp_path, 16)
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(store), str(tmp_path / "out"), "--format", "rulstm-lmdb",
                                  "--fields", "verb.global", "--split", "epic55-lfb-train", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "exported 8 segments (verb.global)" in result.output and "--modalities global" in result.output
    result = runner.invoke(main, ["import", str(tmp_path / "back"), "--annotations",
                                  str(tmp_path / "annotations" / "EPIC_train_action_labels.csv"),
                                  "--from", str(tmp_path / "out"), "--format", "rulstm-lmdb", "--pool", "centre",
                                  "--no-check-dims", "--modalities", "global", "--no-progress"])
    assert result.exit_code == 1, result.output  # the val segments were not exported: failed, with the reason
    assert "imported 8" in result.output
    original, back = FeatureStore.open(store), FeatureStore.open(tmp_path / "back")
    uids = original.uids(split="epic55-lfb-train")
    assert np.array_equal(original.read_field(uids, "verb.global"), back.read_field(uids, "rulstm.global"))


def test_a_refusal_is_one_line(tmp_path: Path) -> None:
    store = make_small_store(tmp_path, 8)
    result = CliRunner().invoke(main, ["export", str(store), str(tmp_path / "out"), "--format", "rulstm-lmdb",
                                       "--fields", "det.global.box", "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: --format rulstm-lmdb holds one feature vector per key" in result.output
