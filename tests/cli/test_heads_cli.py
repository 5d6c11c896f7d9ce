"""The `heads` commands, run for real on small imported stores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.heads_cli import main
from featstore.epic.annotations import read_segments
from featstore.store.schema import FieldSpec
from featstore.store.reader import FeatureStore
from heads.metric_registry import metric_values
from heads.models import get_head
from tests.helpers.stores import make_planted_store

TRAIN = "participant_id <= 'P25'"
VAL = "participant_id > 'P25'"

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_every_command_has_help() -> None:
    for command in [[]] + [[name] for name in main.commands]:
        result = _invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output, command


def test_train_eval_predict_score_round_trip(planted_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _invoke("train", planted_store, "--model", "saoa", "--train-where", TRAIN, "--val-where", VAL,
                     "--epochs", "2", "--lr", "0.05", "--action-prior", "none", "--no-progress", "--out", run)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads(result.stdout) == metrics
    evaluated = _invoke("eval", run)
    assert json.loads(evaluated.stdout) == pytest.approx(metric_values(metrics))
    out = tmp_path / "val.parquet"
    assert _invoke("predict", run, "--where", VAL, "--out", out).exit_code == 0
    # `heads score` on the run's predictions against the annotation file gives the run's metrics.
    annotations = planted_store.parent / "annotations" / "EPIC_train_action_labels.csv"
    scored = _invoke("score", out, "--annotations", annotations, "--json")
    assert scored.exit_code == 0, scored.output
    assert metric_values(json.loads(scored.stdout)) == pytest.approx(metric_values(metrics), abs=1e-9)
    by_run = json.loads(_invoke("score", run, "--annotations", annotations, "--json").stdout)
    assert metric_values(by_run) == pytest.approx(metric_values(metrics))
    # A run directory brings its training split: the same many-shot list as the run's own.
    assert by_run["many_shot_actions"] == metrics["many_shot_actions"]


def test_switch_flags_reach_the_head_and_unknown_ones_are_refused(planted_store: Path, tmp_path: Path) -> None:
    result = _invoke("train", planted_store, "--model", "saoa", "--no-gating", "--no-relation", "--concat-global",
                     "--train-where", TRAIN, "--val-where", VAL, "--epochs", "1", "--no-progress", "--out",
                     tmp_path / "a")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    given = {"gating": False, "relation": False, "concat_global": True}
    # Every switch with its effective value (issue 23), and which the user gave.
    assert config["switches"] == {**get_head("saoa").switches(), **given}
    assert {name for name, source in config["switch_sources"].items() if source == "given"} == set(given)
    refused = _invoke("train", planted_store, "--model", "global", "--no-gating", "--train-where", TRAIN,
                      "--epochs", "1", "--no-progress", "--out", tmp_path / "b")
    assert refused.exit_code == 1 and "unknown switch(es) gating" in refused.output


def test_bad_selection_and_unknown_model_are_clear_errors(planted_store: Path, tmp_path: Path) -> None:
    result = _invoke("train", planted_store, "--model", "nope", "--out", tmp_path / "r", "--no-progress")
    # --model is a choice among the registered heads: click refuses the value and lists them.
    assert result.exit_code == 2 and "'nope' is not one of" in result.output and "'saoa'" in result.output
    result = _invoke("train", planted_store, "--model", "global", "--train-where", "participant_id = 'P99'",
                     "--out", tmp_path / "r", "--no-progress")
    assert result.exit_code == 1 and "holds no stored segments" in result.output
    result = _invoke("train", planted_store, "--model", "global", "--train", "epic55-nope", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "epic55-lfb-train" in result.output


@pytest.mark.slow  # a store of all 28,472 EPIC-55 training segments
def test_named_lfb_split_counts_on_a_store_of_all_epic55_training_segments(epic55_dir: Path, tmp_path: Path) -> None:
    """config.json shows 23,191 / 5,281 for the paper's validation protocol."""
    table = read_segments(epic55_dir / "EPIC_train_action_labels.csv")
    store = FeatureStore.create(tmp_path / "store", fields={"verb.global": FieldSpec("float16", (2,)),
                                                            "noun.global": FieldSpec("float16", (2,))},
                                provenance={"annotations": str(epic55_dir / "EPIC_train_action_labels.csv")})
    rng = np.random.default_rng(0)
    with store.writer(flush_every=5000) as writer:
        for row in table.to_pylist():
            writer.put(row, {"verb.global": rng.standard_normal(2), "noun.global": rng.standard_normal(2)})
    result = _invoke("train", tmp_path / "store", "--model", "global", "--train", "epic55-lfb-train",
                     "--val", "epic55-lfb-val", "--epochs", "1", "--batch-size", "512", "--no-progress",
                     "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["n_train"], config["n_val"]) == (23191, 5281)
    # The official class lists sit beside the annotation file: the class-aware metrics are there.
    assert config["class_lists"] == "official" and (config["num_verbs"], config["num_nouns"]) == (125, 352)
    assert "action_precision" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.slow
def test_acceptance_saoa_beats_global_on_nouns_and_sap_on_verbs(tmp_path: Path) -> None:
    """The issue's acceptance command on a planted-signal store, for each of the three heads."""
    store = make_planted_store(tmp_path, 960, seed=5)
    results = {}
    for model in ("saoa", "sap", "global"):
        result = _invoke("train", store, "--model", model, "--train-where", TRAIN, "--val-where", VAL,
                         "--epochs", "20", "--lr", "0.05", "--no-progress", "--out", tmp_path / model)
        assert result.exit_code == 0, result.output
        results[model] = json.loads((tmp_path / model / "metrics.json").read_text())
    chance = 100 / 6
    assert results["saoa"]["noun_top1"] > results["global"]["noun_top1"] + 30, results
    assert results["saoa"]["verb_top1"] > results["sap"]["verb_top1"] + 30, results
    assert results["global"]["noun_top1"] < chance + 12 and results["sap"]["verb_top1"] < chance + 12, results


def test_a_head_registered_later_brings_its_switches_to_heads_train(planted_store: Path, tmp_path: Path) -> None:
    """`heads train` reads --model and the switch flags from the head registry when it runs."""
    from heads.models import GlobalHead, all_switches, register_head, unregister_head

    received: dict = {}

    def scaled_global(*, dims, num_verbs: int, num_nouns: int, shrink_logits: bool = False,
                      logit_scale: float = 1.0) -> GlobalHead:
        """A test head: the global baseline with two switches of its own.

        Args:
            dims: feature sizes.
            num_verbs: V.
            num_nouns: N.
            shrink_logits: test switch, a boolean flag.
            logit_scale: test switch, a float option.
        """
        received.update(shrink_logits=shrink_logits, logit_scale=logit_scale)
        return GlobalHead(verb_dim=dims.verb_dim, noun_dim=dims.noun_dim, num_verbs=num_verbs, num_nouns=num_nouns)

    assert "shrink_logits" not in all_switches()
    register_head("test-scaled-global", description="a test head", fields=lambda **_: ("verb.global", "noun.global"))(
        scaled_global)
    try:
        help_text = _invoke("train", "--help").output
        assert "--shrink-logits / --no-shrink-logits" in help_text and "--logit-scale FLOAT" in help_text
        assert "test switch, a boolean flag" in help_text.replace("\n", " ").replace("  ", " ").lower()
        assert "test-scaled-global" in help_text
        result = _invoke("train", planted_store, "--model", "test-scaled-global", "--shrink-logits",
                         "--logit-scale", "0.5", "--train-where", TRAIN, "--epochs", "1", "--no-progress",
                         "--out", tmp_path / "run")
        assert result.exit_code == 0, result.output
        assert received == {"shrink_logits": True, "logit_scale": 0.5}
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert config["model"] == "test-scaled-global"
        assert config["switches"] == {"shrink_logits": True, "logit_scale": 0.5}
    finally:
        unregister_head("test-scaled-global")
    assert "--shrink-logits" not in _invoke("train", "--help").output
    refused = _invoke("train", planted_store, "--model", "global", "--shrink-logits", "--out", tmp_path / "b")
    assert refused.exit_code == 2 and "No such option '--shrink-logits'" in refused.output


def test_score_with_a_prior_file_leaves_out_the_scored_segments_and_says_so(planted_store: Path,
                                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _invoke("train", planted_store, "--model", "global", "--train-where", TRAIN, "--val-where", VAL,
                   "--epochs", "1", "--no-progress", "--out", run).exit_code == 0
    annotations = planted_store.parent / "annotations" / "EPIC_train_action_labels.csv"
    scored = _invoke("score", run, "--annotations", annotations, "--action-prior-from", annotations, "--json")
    assert scored.exit_code == 0, scored.output
    metrics = json.loads(scored.stdout)
    record = {"from": str(annotations.resolve()), "excluded_scored_segments": 240, "counted": 240}
    assert metrics.pop("action_prior") == record
    # What is left of the file is the run's training selection: the run's own prior, its own metrics.
    assert metric_values(metrics) == pytest.approx(metric_values(json.loads((run / "metrics.json").read_text())))
    assert "240 scored segment(s) left out" in scored.stderr
    text = _invoke("score", run, "--annotations", annotations, "--action-prior-from", annotations)
    assert "action_top1" in text.stdout and "240 scored segment(s) left out" in text.stderr


def test_a_run_trains_again_from_its_config_bit_for_bit_and_options_override(planted_store: Path,
                                                                             tmp_path: Path) -> None:
    import torch

    first = tmp_path / "a"
    assert _invoke("train", planted_store, "--model", "saoa", "--no-gating", "--train-where", TRAIN, "--val-where",
                   VAL, "--epochs", "2", "--lr", "0.05", "--seed", "3", "--no-progress", "--out", first).exit_code == 0
    again = _invoke("train", "--config", first / "config.json", "--no-progress", "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == json.loads((first / "metrics.json").read_text())
    weights = [torch.load(run / "checkpoint.pt", weights_only=True)["model"] for run in (first, tmp_path / "b")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    recorded = [json.loads((run / "config.json").read_text()) for run in (first, tmp_path / "b")]
    assert recorded[0] == recorded[1]  # the same settings, switch sources and store
    # Options given override the recorded ones; the others (here --no-gating) stay.
    other = _invoke("train", "--config", first, "--seed", "4", "--epochs", "1", "--no-progress",
                    "--out", tmp_path / "c")
    assert other.exit_code == 0, other.output
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (config["seed"], config["epochs"], config["switches"]["gating"], config["lr"]) == (4, 1, False, 0.05)
    no_store = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "d")])
    assert no_store.exit_code == 2 and "give STORE, or --config" in no_store.output


def test_a_moved_project_evaluates_and_writes_per_class_tables(tmp_path: Path) -> None:
    import shutil

    project = tmp_path / "project"
    store = make_planted_store(project / "data", 48)
    tensorboard = project / "tb" / "a"
    assert _invoke("train", store, "--model", "global", "--train-where", TRAIN, "--val-where", VAL, "--epochs", "2",
                   "--lr", "0.05", "--no-progress", "--tensorboard", tensorboard, "--half-checkpoint", "--out",
                   project / "runs" / "a").exit_code == 0
    assert list(tensorboard.glob("events.out.tfevents.*"))
    metrics = json.loads((project / "runs" / "a" / "metrics.json").read_text())
    moved = tmp_path / "moved"
    shutil.copytree(project, moved)
    shutil.rmtree(project)
    evaluated = _invoke("eval", moved / "runs" / "a", "--per-class", moved / "per-class")
    assert evaluated.exit_code == 0, evaluated.output
    printed = json.loads(evaluated.stdout)
    assert metric_values(printed) == pytest.approx(metric_values(metrics), abs=5.0)  # from half-precision weights
    assert {"verb_mean_class_top1", "noun_mean_class_top5"} <= set(printed)
    assert (moved / "per-class" / "confusion_noun.png").is_file() and (moved / "per-class" / "per_participant.csv")
    shutil.copytree(moved / "data" / "store", tmp_path / "store")  # the store alone moves on
    shutil.rmtree(moved / "data" / "store")
    assert _invoke("eval", moved / "runs" / "a", "--store", tmp_path / "store").exit_code == 0
    annotations = moved / "data" / "annotations" / "EPIC_train_action_labels.csv"
    scored = _invoke("score", moved / "runs" / "a", "--annotations", annotations, "--store", tmp_path / "store",
                     "--per-class", moved / "scored")
    assert scored.exit_code == 0, scored.output
    assert "verb_mean_class_top1" in scored.stdout
    assert (moved / "scored" / "per_class_verb.csv").read_text().splitlines()[1].split(",")[1].startswith("verb")


def test_tensorboard_without_its_package_is_refused_before_anything_is_written(planted_store: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = CliRunner().invoke(main, ["train", str(planted_store), "--train-where", TRAIN, "--out",
                                       str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 1 and "pip install 'featstore[tensorboard]'" in result.output
    assert not (tmp_path / "run").exists()
