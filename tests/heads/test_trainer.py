"""The trainer on real (small) imported stores: determinism, resume, divergence, data modes, learning."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from featstore.store.schema import StoreError
from featstore.training.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    HISTORY_NAME,
    METRICS_NAME,
    PREDICTIONS_NAME,
    RESUME_STATE_NAME,
    RUN_FILES,
    run_folder_files,
)
from heads.metric_registry import metric_values
from heads.models import MissingFieldsError
from heads.trainer import (
    TrainConfig,
    TrainingError,
    evaluate_run,
    lr_at,
    predict_selection,
    train,
)
from tests.helpers.stores import make_planted_store, make_store_without_detections

TRAIN = "participant_id <= 'P25'"
VAL = "participant_id > 'P25'"

# One thread here as in the killed subprocess below: the same reduction order, bitwise-equal results.
pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> TrainConfig:
    base = dict(model="saoa", train_where=TRAIN, val_where=VAL, epochs=2, batch_size=32, lr=0.05, seed=3)
    return TrainConfig(**{**base, **overrides})


TOPK_KEYS = ("verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5")
CLASS_KEYS = ("verb_precision", "verb_recall", "noun_precision", "noun_recall", "action_precision", "action_recall")


def test_run_directory_contract(planted_store: Path, tmp_path: Path) -> None:
    metrics = train(planted_store, tmp_path / "run", _config(), progress=False)
    run = tmp_path / "run"
    assert run_folder_files(run) == RUN_FILES["heads"].expected(validated=True)  # exactly: no temporaries
    assert json.loads((run / METRICS_NAME).read_text()) == metrics
    # No class has >100 training samples here, so there are no many-shot classes: top-k only.
    assert set(metric_values(metrics)) == set(TOPK_KEYS)
    # Besides the metrics: the I3D scheme's switch and the many-shot list used (issue 23), the warnings.
    assert set(metrics) - set(TOPK_KEYS) == {"normalize", "many_shot_actions", "warnings"}
    assert all(0.0 <= metrics[key] <= 100.0 for key in TOPK_KEYS)
    config = json.loads((run / CONFIG_NAME).read_text())
    assert (config["n_train"], config["n_val"]) == (240, 240)
    # Relative to the run (both lie below the session's temporary folder), and absolute beside it.
    assert (run / config["store"]).resolve() == planted_store.resolve() and not Path(config["store"]).is_absolute()
    assert config["store_resolved"] == str(planted_store.resolve()) and len(config["manifest_sha256"]) == 64
    assert config["model"] == "saoa" and config["data_mode"] == "preload"
    dims = {name: value for name, value in config["dims"].items() if name != "field_shapes"}
    assert dims == {"verb_dim": 32, "noun_dim": 32, "det_dim": 32, "n_global": 60, "n_local": 40}
    assert ["verb.global", [32]] in config["dims"]["field_shapes"]  # every field's shape (the `vectors` head)
    table = pq.read_table(run / PREDICTIONS_NAME)
    assert table.column_names == ["uid", "verb_logits", "noun_logits", "verb_class", "noun_class", "verb_top5",
                                  "noun_top5", "action_top5"]
    assert table.num_rows == 240 and len(table.column("verb_logits")[0]) == 125
    assert len(table.column("noun_logits")[0]) == 352


def test_official_class_lists_give_the_class_aware_metrics(planted_store: Path, tmp_path: Path,
                                                           epic55_dir: Path) -> None:
    metrics = train(planted_store, tmp_path / "run", _config(epochs=1, meta_dir=str(epic55_dir)), progress=False)
    assert set(metric_values(metrics)) == set(TOPK_KEYS) | set(CLASS_KEYS)
    assert all(0.0 <= metrics[key] <= 100.0 for key in CLASS_KEYS)
    assert json.loads((tmp_path / "run" / CONFIG_NAME).read_text())["class_lists"] == "official"


@pytest.mark.slow  # four trainings, one in a subprocess
def test_same_seed_same_result_and_resume_after_kill(planted_store: Path, tmp_path: Path) -> None:
    config = _config(epochs=3)
    straight = train(planted_store, tmp_path / "a", config, progress=False)
    again = train(planted_store, tmp_path / "b", config, progress=False)
    assert straight == again
    script = (
        "import os, signal, sys, torch\n"
        "torch.set_num_threads(1)  # the same reduction order as this process: bitwise-equal results\n"
        "from heads.trainer import TrainConfig, train\n"
        f"config = TrainConfig(**{config.to_json()!r})\n"
        "def die(epoch):\n"
        "    if epoch == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"train({str(planted_store)!r}, {str(tmp_path / 'c')!r}, config, progress=False, after_epoch=die)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "c" / HISTORY_NAME).read_text())[-1]["epoch"] == 2
    with pytest.raises(TrainingError, match="--resume"):
        train(planted_store, tmp_path / "c", config, progress=False)
    resumed = train(planted_store, tmp_path / "c", config, resume=True, progress=False)
    assert resumed == straight
    a = pq.read_table(tmp_path / "a" / PREDICTIONS_NAME).to_pydict()
    c = pq.read_table(tmp_path / "c" / PREDICTIONS_NAME).to_pydict()
    assert a == c


def test_diverging_loss_names_epoch_and_step(planted_store: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"at epoch 1, step \d+"):
        train(planted_store, tmp_path / "run", _config(model="global", lr=1e12), progress=False)


def test_store_lacking_fields_is_refused_with_their_names(tmp_path: Path) -> None:
    from featstore.store.importer import import_npz
    from featstore.samples.annotations import (
        generate_segments,
        write_epic55_annotations,
    )
    from featstore.samples.features import feature_shapes, write_feature_npzs

    segments = generate_segments(8, num_verbs=3, num_nouns=3)
    annotations = write_epic55_annotations(tmp_path / "a.csv", segments)
    shapes = {k: v for k, v in feature_shapes(verb_dim=4, noun_dim=4).items() if k in ("verb.global", "noun.global")}
    import_npz(tmp_path / "store", annotations, write_feature_npzs(tmp_path / "npz", segments, shapes=shapes),
               progress=False)
    with pytest.raises(MissingFieldsError, match="det.global.feat") as err:
        train(tmp_path / "store", tmp_path / "run", _config(), progress=False)
    assert "verb.map" in str(err.value) and "det.local.box" in str(err.value)
    # The baseline needs only the global features.
    train(tmp_path / "store", tmp_path / "run", _config(model="global", epochs=1), progress=False)


def test_streaming_mode_gives_the_same_result_as_preloading(planted_store: Path, tmp_path: Path) -> None:
    preload = train(planted_store, tmp_path / "p", _config(epochs=1), progress=False)
    messages = []
    stream = train(planted_store, tmp_path / "s", _config(epochs=1, memory_budget_gb=1e-6), progress=False,
                   log=messages.append)
    assert any("stream mode" in m for m in messages)
    assert json.loads((tmp_path / "s" / CONFIG_NAME).read_text())["data_mode"] == "stream"
    for key in metric_values(preload):
        assert stream[key] == pytest.approx(preload[key], abs=1e-6), key


def test_lr_steps_drop_tenfold() -> None:
    config = TrainConfig(lr=1e-3, lr_steps=(11,), epochs=15)
    assert [round(lr_at(config, e), 8) for e in (0, 9, 10, 14)] == [1e-3, 1e-3, 1e-4, 1e-4]


def test_eval_and_predict_reproduce_the_run(planted_store: Path, tmp_path: Path) -> None:
    metrics = train(planted_store, tmp_path / "run", _config(epochs=1), progress=False)
    assert evaluate_run(tmp_path / "run") == pytest.approx(metric_values(metrics))
    preds, labels = predict_selection(tmp_path / "run", where=VAL)
    saved = pq.read_table(tmp_path / "run" / PREDICTIONS_NAME)
    assert list(preds.uids) == saved.column("uid").to_pylist()
    np.testing.assert_allclose(preds.verb_logits, np.array(saved.column("verb_logits").to_pylist()), atol=1e-5)


def test_a_finished_run_keeps_its_weights_not_its_resume_state(planted_store: Path, tmp_path: Path) -> None:
    import torch

    metrics = train(planted_store, tmp_path / "half", _config(epochs=1), progress=False, half_checkpoint=True,
                    keep_resume_state=True)
    run = tmp_path / "half"
    assert run_folder_files(run) == RUN_FILES["heads"].expected(validated=True, resume_state=True)
    weights = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert set(weights) == {"model", "half"}  # the weights only: no optimiser, no history
    assert {t.dtype for t in weights["model"].values() if t.is_floating_point()} == {torch.float16}
    # Evaluated from the half-precision weights (cast back to float32): the run's metrics, to fp16's precision.
    assert evaluate_run(run) == pytest.approx(metric_values(metrics), abs=5.0)
    (run / RESUME_STATE_NAME).unlink()  # as a run not asked to keep it
    assert train(planted_store, run, _config(epochs=1), resume=True, progress=False) == metrics  # nothing to do
    with pytest.raises(TrainingError, match="cannot be extended to 2"):
        train(planted_store, run, _config(epochs=2), resume=True, progress=False)


def test_warnings_say_when_the_store_has_no_detections_and_the_head_is_at_chance(tmp_path: Path) -> None:
    store = make_store_without_detections(tmp_path / "data", 48)
    lines: list[str] = []
    metrics = train(store, tmp_path / "run", _config(epochs=1), progress=False, log=lines.append)
    warnings = metrics["warnings"]
    assert json.loads((tmp_path / "run" / METRICS_NAME).read_text())["warnings"] == warnings
    assert any("only 0 of 4800 detection slots" in w for w in warnings)
    assert any(w.startswith("verb top-1") and "at chance" in w for w in warnings)
    assert sum(line.startswith("WARNING: ") for line in lines) == len(warnings)  # said loudly, too


def test_a_project_moved_whole_still_evaluates_and_a_moved_store_is_given_with_store(tmp_path: Path) -> None:
    project = tmp_path / "project"
    store = make_planted_store(project / "data", 48)
    metrics = train(store, project / "runs" / "saoa", _config(epochs=1), progress=False)
    assert json.loads((project / "runs" / "saoa" / CONFIG_NAME).read_text())["store"] == "../../data/store"
    moved = tmp_path / "moved"
    shutil.copytree(project, moved)  # a copy, then the original gone: a move to new files
    shutil.rmtree(project)
    assert evaluate_run(moved / "runs" / "saoa") == pytest.approx(metric_values(metrics))
    # The store alone moved elsewhere: the run names it no more, --store does.
    elsewhere = tmp_path / "stores" / "planted"
    shutil.copytree(moved / "data" / "store", elsewhere)
    shutil.rmtree(moved / "data")
    with pytest.raises(StoreError, match="is not a feature store"):
        evaluate_run(moved / "runs" / "saoa")
    assert evaluate_run(moved / "runs" / "saoa", store_path=elsewhere) == pytest.approx(metric_values(metrics))
