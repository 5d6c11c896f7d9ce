"""`heads score` on the real EPIC-55 labels: the action prior never counts the segments being scored."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from featstore.epic.annotations import read_segments
from heads.actions import lfb_action_prior
from heads.evaluation import ScoringError, score
from heads.metrics import epic55_metrics
from heads.predictions import Predictions, PredictionsError, write_predictions
from heads.scoring import score_file

TRAIN_FILE = "EPIC_train_action_labels.csv"


def _subset(source: Path, target: Path, keep) -> Path:
    """A copy of an annotation CSV with only the rows ``keep(row)`` accepts (same header)."""
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if keep(row)]
        fields = reader.fieldnames
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return target


@pytest.fixture(scope="module")
def validation_predictions(epic55_dir: Path) -> tuple[Predictions, np.ndarray, np.ndarray]:
    """Random-ish logits for the 5,281 segments of P26-P31 (a bit of signal on the true classes)."""
    table = read_segments(epic55_dir / TRAIN_FILE)
    val = table.filter(np.array([p > "P25" for p in table.column("participant_id").to_pylist()]))
    verbs = val.column("verb_class").to_numpy()
    nouns = val.column("noun_class").to_numpy()
    rng = np.random.default_rng(0)
    verb_logits = rng.normal(size=(len(verbs), 125)).astype(np.float32)
    noun_logits = rng.normal(size=(len(nouns), 352)).astype(np.float32)
    verb_logits[np.arange(len(verbs)), verbs] += 1.5
    noun_logits[np.arange(len(nouns)), nouns] += 1.5
    return Predictions(tuple(val.column("uid").to_pylist()), verb_logits, noun_logits), verbs, nouns


def _metrics_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("action_prior", "many_shot_actions")}


@pytest.mark.slow
def test_the_full_training_file_as_prior_equals_the_prior_of_p01_to_p25(
        epic55_dir: Path, tmp_path: Path, validation_predictions) -> None:
    """The issue's check at full size: all 5,281 segments of P26-P31, the whole training file as FILE."""
    predictions, verbs, nouns = validation_predictions
    assert len(predictions.uids) == 5281
    full = epic55_dir / TRAIN_FILE
    train_only = _subset(full, tmp_path / "p01_p25.csv", lambda row: row["participant_id"] <= "P25")
    with_full = score_file(predictions, full, action_prior_from=full)
    with_train = score_file(predictions, full, action_prior_from=train_only)
    assert _metrics_only(with_full) == _metrics_only(with_train)
    assert with_full["action_prior"] == {"from": str(full.resolve()), "excluded_scored_segments": 5281,
                                         "counted": 23191}
    assert with_train["action_prior"] == {"from": str(train_only.resolve()), "excluded_scored_segments": 0,
                                          "counted": 23191}

    # What the defect did: the prior counted on every row of the file (the scored ones included)
    # lifts the action accuracy of these predictions. The equality above would catch it coming back.
    from featstore.epic.metadata import load_meta

    table = read_segments(full)
    all_verbs, all_nouns = table.column("verb_class").to_numpy(), table.column("noun_class").to_numpy()
    leaky = score(predictions.verb_logits, predictions.noun_logits, verbs, nouns, dataset="epic55",
                  class_sets=load_meta(epic55_dir, "epic55"), prior=lfb_action_prior(all_verbs, all_nouns, 125, 352),
                  train_pairs=set(zip(all_verbs.tolist(), all_nouns.tolist())))
    assert leaky["action_top1"] > with_full["action_top1"] + 0.5, (leaky["action_top1"], with_full["action_top1"])
    assert with_full["verb_top1"] == leaky["verb_top1"]  # the prior touches actions only


def test_the_prior_leaves_out_scored_rows_and_refuses_a_file_of_nothing_else(
        epic55_dir: Path, tmp_path: Path, validation_predictions) -> None:
    predictions, verbs, nouns = validation_predictions
    scored = predictions.subset(predictions.uids[:600])
    names = set(scored.uids)
    full = epic55_dir / TRAIN_FILE
    train_only = _subset(full, tmp_path / "train.csv", lambda row: row["participant_id"] <= "P25")
    plus_scored = _subset(full, tmp_path / "train_and_scored.csv",
                          lambda row: row["participant_id"] <= "P25" or row["uid"] in names)
    only_scored = _subset(full, tmp_path / "scored.csv", lambda row: row["uid"] in names)
    reference = score_file(scored, full, action_prior_from=train_only, train_split="epic55-lfb-train")
    mixed = score_file(scored, full, action_prior_from=plus_scored, train_split="epic55-lfb-train")
    assert _metrics_only(mixed) == _metrics_only(reference)
    assert mixed["action_prior"] == {"from": str(plus_scored.resolve()), "excluded_scored_segments": 600, "counted": 23191}

    # The same numbers straight from the pure functions, with the official lists and the P01-P25 prior.
    from featstore.epic.metadata import load_meta

    train = read_segments(train_only)
    train_verbs, train_nouns = train.column("verb_class").to_numpy(), train.column("noun_class").to_numpy()
    direct = epic55_metrics(scored.verb_logits, scored.noun_logits, verbs[:600], nouns[:600],
                            meta=load_meta(epic55_dir, "epic55"), prior=lfb_action_prior(train_verbs, train_nouns,
                                                                                       125, 352),
                            train_pairs=set(zip(train_verbs.tolist(), train_nouns.tolist())))
    assert _metrics_only(mixed) == pytest.approx({k: v for k, v in direct.items() if not np.isnan(v)}, abs=1e-12)

    with pytest.raises(ScoringError, match="every one of its 600 segments is being scored"):
        score_file(scored, full, action_prior_from=only_scored)


def test_without_a_prior_file_there_is_no_prior_and_no_record(epic55_dir: Path, validation_predictions) -> None:
    predictions, verbs, nouns = validation_predictions
    scored = predictions.subset(predictions.uids[:600])
    metrics = score_file(scored, epic55_dir / TRAIN_FILE)
    assert "action_prior" not in metrics
    from featstore.epic.metadata import load_meta

    plain = epic55_metrics(scored.verb_logits, scored.noun_logits, verbs[:600], nouns[:600],
                           meta=load_meta(epic55_dir, "epic55"))
    assert _metrics_only(metrics) == pytest.approx({k: v for k, v in plain.items() if not np.isnan(v)}, abs=1e-12)


def test_bad_inputs_are_named(epic55_dir: Path, tmp_path: Path, validation_predictions) -> None:
    predictions, _, _ = validation_predictions
    stranger = Predictions(("no-such-uid",) + predictions.uids[:2], predictions.verb_logits[:3],
                           predictions.noun_logits[:3])
    with pytest.raises(PredictionsError, match="1 predicted uid.*no-such-uid"):
        score_file(stranger, epic55_dir / TRAIN_FILE)
    test_uids = tuple(read_segments(epic55_dir / "EPIC_test_s1_timestamps.csv").column("uid").to_pylist()[:3])
    unlabelled = Predictions(test_uids, predictions.verb_logits[:3], predictions.noun_logits[:3])
    with pytest.raises(PredictionsError, match="no labels"):
        score_file(unlabelled, epic55_dir / "EPIC_test_s1_timestamps.csv")
    write_predictions(tmp_path / "p.parquet", predictions.subset(predictions.uids[:5]))
    with pytest.raises(ScoringError, match="without verb/noun labels"):
        score_file(tmp_path / "p.parquet", epic55_dir / TRAIN_FILE,
                   action_prior_from=epic55_dir / "EPIC_test_s1_timestamps.csv")


def test_many_shot_actions_follow_the_training_split_whatever_the_prior(
        epic55_dir: Path, tmp_path: Path, validation_predictions) -> None:
    """Issue 23: one definition of many-shot actions, the official list intersected with the pairs of
    the training split in use whenever it is known; `--action-prior-from` does not change it."""
    predictions, _, _ = validation_predictions
    scored = predictions.subset(predictions.uids[:600])
    full = epic55_dir / TRAIN_FILE
    restricted = {"size": 777, "listed": 819, "source": "official EPIC_many_shot_actions.csv",
                  "restricted_to": f"the 2266 (verb, noun) pairs of {full.resolve()} where "
                                   "source = 'EPIC_train_action_labels' AND participant_id <= 'P25'"}
    with_prior = score_file(scored, full, action_prior_from=full, train_split="epic55-lfb-train")
    without_prior = score_file(scored, full, train_split="epic55-lfb-train")
    assert with_prior["many_shot_actions"] == without_prior["many_shot_actions"] == restricted
    # The same list gives the same class-aware action numbers when the prior does not move the top-1 pair.
    from featstore.epic.metadata import load_meta

    labels = predictions.subset(scored.uids)
    _, verbs, nouns = validation_predictions
    direct = epic55_metrics(labels.verb_logits, labels.noun_logits, verbs[:600], nouns[:600],
                            meta=load_meta(epic55_dir, "epic55"), train_pairs=_lfb_train_pairs(full))
    assert without_prior["action_recall"] == pytest.approx(direct["action_recall"], abs=1e-12)
    # A split that is not known is not guessed from the prior file: the official list as it is.
    unknown = score_file(scored, full, action_prior_from=full)
    assert unknown["many_shot_actions"] == {**restricted, "size": 819, "restricted_to": None}


def _lfb_train_pairs(path: Path) -> set[tuple[int, int]]:
    table = read_segments(path)
    keep = [p <= "P25" for p in table.column("participant_id").to_pylist()]
    verbs = np.asarray(table.column("verb_class").to_numpy())[keep]
    nouns = np.asarray(table.column("noun_class").to_numpy())[keep]
    return set(zip(verbs.tolist(), nouns.tolist()))
