"""A store and a run never share a folder: each writer refuses the other kind, naming it."""
from __future__ import annotations

from pathlib import Path

import pytest

from featstore.io.folders import RUN_MARKERS, folder_kind, other_kind_refusal
from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec, StoreError
from featstore.training.run_folder import CHECKPOINT_NAME, CONFIG_NAME, LEGACY_NAMES, RESUME_STATE_NAME, RunFolder, holds_run
from featstore.training.engine import TrainingError

FIELDS = {"verb.global": FieldSpec("float16", (4,))}


def test_the_run_markers_are_the_run_folders_own_names(tmp_path: Path) -> None:
    names = {CONFIG_NAME, CHECKPOINT_NAME, RESUME_STATE_NAME, *LEGACY_NAMES}
    assert set(RUN_MARKERS) == names
    for i, name in enumerate(sorted(names)):
        (tmp_path / str(i) / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / str(i) / name).write_bytes(b"")
        assert holds_run(tmp_path / str(i)) and folder_kind(tmp_path / str(i)) == "run", name


def test_each_kind_is_known_by_its_files(tmp_path: Path) -> None:
    assert folder_kind(tmp_path / "absent") is None and folder_kind(tmp_path) is None
    FeatureStore.create(tmp_path / "store", fields=FIELDS)
    assert folder_kind(tmp_path / "store") == "store"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    assert folder_kind(tmp_path / "run") == "run"
    assert other_kind_refusal(tmp_path / "run", "run") is None
    assert "holds a training run; a feature store cannot be written into it" in other_kind_refusal(
        tmp_path / "run", "store")


def test_a_run_into_a_store_and_a_store_into_a_run_are_refused_before_writing(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "store", fields=FIELDS).path
    before = sorted(p.name for p in store.iterdir())
    for resume in (False, True):
        with pytest.raises(TrainingError, match="holds a feature store; a training run cannot be written"):
            RunFolder.check(store, resume=resume, error=TrainingError)
    assert sorted(p.name for p in store.iterdir()) == before
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(StoreError, match="holds a training run; a feature store cannot be written"):
        FeatureStore.create(run, fields=FIELDS)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
