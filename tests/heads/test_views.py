"""Training on temporal views (docs/views.md): one view per segment per epoch, evaluation on view 0."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from featstore.store.reader import FeatureStore
from featstore.store.transform import copy_store
from heads.grid import parse_grid
from heads.trainer import HeadTrainable, TrainConfig, train
from heads.views import TrainingViews, resolve_view_mode
from tests.helpers.views import make_planted_views_store

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN, VAL = "participant_id <= 'P25'", "participant_id >= 'P26'"


def _config(**overrides) -> TrainConfig:
    values = dict(model="saoa", train_where=TRAIN, val_where=VAL, epochs=3, batch_size=16, lr=0.05, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def views_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_planted_views_store(tmp_path_factory.mktemp("planted-views"), 48, views=4)


def test_the_mode_follows_the_store_unless_given() -> None:
    assert resolve_view_mode(None, 4) == "random" and resolve_view_mode(None, 1) == "first"
    assert resolve_view_mode("first", 4) == "first"
    with pytest.raises(ValueError, match="views must be one of"):
        resolve_view_mode("all", 4)


def test_the_record_says_what_was_drawn_each_epoch() -> None:
    views = TrainingViews.of([f"u{i}" for i in range(40)], [4] * 30 + [1] * 10, mode="random", seed=0,
                             store_views=4, stored_counts=[4] * 30 + [1] * 10)
    record = views.record(3)
    assert record["store_views"] == 4 and record["segments_with_views"] == 30 and record["views_held"] == 130
    assert [sum(e["per_view"]) for e in record["epochs"]] == [40, 40, 40]
    assert record["epochs"][0]["changed"] is None and record["epochs"][1]["changed"] > 0
    assert (views.draw(1)[30:] == 0).all()
    first = TrainingViews.of(["a"], [1], mode="first", seed=0, store_views=4, stored_counts=[4])
    assert first.draw(5).tolist() == [0] and "epochs" not in first.record(3)


def _drawn_rows(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Capture each epoch's rows (the features' row numbers the trainer reads)."""
    epochs: list[tuple] = []
    original = HeadTrainable.epoch_batches

    def spy(self, epoch, world):
        batches = original(self, epoch, world)
        epochs.append((self.run, torch.cat(list(batches.chunks)).tolist()))
        return batches

    monkeypatch.setattr(HeadTrainable, "epoch_batches", spy)
    return epochs


def test_each_epoch_reads_one_view_of_every_segment_and_evaluation_reads_view_zero(
        views_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = _drawn_rows(monkeypatch)
    metrics = train(views_store, tmp_path / "run", _config(), progress=False, log=lambda _: None)
    run = epochs[0][0]
    keys = run.train.views.keys
    drawn = []
    for _, rows in epochs:
        read = [keys[row] for row in rows]
        uids = [key.split("/")[0] for key in read]
        assert sorted(uids) == sorted(run.train.labels.uids)  # every segment once, at one of its views
        drawn.append({key.split("/")[0]: key for key in read})
    changed = sum(drawn[0][uid] != drawn[1][uid] for uid in drawn[0])
    assert changed > 0 and {key for d in drawn for key in d.values() if "/v" in key}  # other views than 0
    record = metrics["views"]
    assert record["mode"] == "random" and record["store_views"] == 4 and record["evaluation"].startswith("view 0")
    for epoch, d in zip(record["epochs"], drawn):
        views = [int(key.split("/v")[1]) if "/v" in key else 0 for key in d.values()]
        assert epoch["per_view"] == np.bincount(views, minlength=4).tolist()
    assert record["epochs"][1]["changed"] == changed
    assert run.val.views.keys == run.val.labels.uids  # validation: each segment's view 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["views"] == record


@pytest.mark.slow  # four short runs
def test_streaming_gives_the_preloaded_run_and_first_gives_the_one_view_store(
        views_store: Path, tmp_path: Path) -> None:
    quiet = {"progress": False, "log": lambda _: None}
    preloaded = train(views_store, tmp_path / "preload", _config(), **quiet)
    streamed = train(views_store, tmp_path / "stream", _config(memory_budget_gb=1e-6), **quiet)
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["data_mode"] == "stream"
    assert streamed == preloaded
    # --views first on the store with views is the store of its view 0s, exactly.
    copy_store(views_store, tmp_path / "first-views", where="view = 0", progress=False)
    assert FeatureStore.open(tmp_path / "first-views").max_views == 1
    one_view = train(tmp_path / "first-views", tmp_path / "one", _config(), **quiet)
    first = train(views_store, tmp_path / "first", _config(views="first"), **quiet)
    scores = [key for key, value in one_view.items() if isinstance(value, float)]
    assert scores and {k: first[k] for k in scores} == {k: one_view[k] for k in scores}
    assert pq.read_table(tmp_path / "first" / "predictions.parquet").equals(
        pq.read_table(tmp_path / "one" / "predictions.parquet"))
    assert first["views"]["mode"] == "first" and "views" not in one_view
    # ... and other than training on the drawn views.
    assert not pq.read_table(tmp_path / "first" / "predictions.parquet").equals(
        pq.read_table(tmp_path / "preload" / "predictions.parquet"))


def test_views_is_a_grid_setting_and_a_train_option() -> None:
    grid = parse_grid({"base": {"epochs": 1}, "run": [{"name": "random", "model": "saoa"},
                                                      {"name": "first", "model": "saoa", "views": "first"}]})
    assert [run.config.views for run in grid.runs] == [None, "first"]
    from click.testing import CliRunner

    from cli.heads_cli import main

    assert "--views [random|first]" in CliRunner().invoke(main, ["train", "--help"]).output


@pytest.mark.slow  # a grid trained grouped, and each run alone
def test_a_grid_of_views_trained_grouped_equals_each_run_trained_alone(views_store: Path, tmp_path: Path) -> None:
    from heads.ablation import run_grid

    base = {"model": "saoa", "train_where": TRAIN, "val_where": VAL, "epochs": 2, "batch_size": 16, "lr": 0.05}
    grid = parse_grid({"base": base, "run": [{"name": "random", "seeds": [0, 1]},
                                             {"name": "first", "views": "first", "seed": 0}]})
    results = run_grid(views_store, grid, tmp_path / "grid", parallel=3, log=lambda _: None)
    assert not results.failed
    modes = results.table.column("views").to_pylist()
    assert modes == [None, None, "first"]  # the grid's setting, as results.parquet records it
    for run in grid.runs:
        solo = train(views_store, tmp_path / "solo" / run.name, run.config, progress=False, log=lambda _: None)
        grouped = json.loads((tmp_path / "grid" / run.name / "metrics.json").read_text())
        assert grouped == solo, run.name
