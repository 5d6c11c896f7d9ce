"""Scoring inputs: class sets counted or read, the prior, the dataset's metrics, one assembling function."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featstore.samples.annotations import generate_segments, write_epic55_annotations
from heads.actions import lfb_action_prior
from heads.evaluation import (
    MANY_SHOT_MIN,
    ClassSets,
    ScoringContext,
    ScoringError,
    TrainingLabels,
    action_prior_for,
    labels_from_file,
    load_class_sets,
    many_shot_from_training,
    score,
    scoring_context,
)
from heads.metrics import epic55_metrics, epic100_metrics


def _logits(n: int, num_verbs: int, num_nouns: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    verbs, nouns = rng.integers(0, num_verbs, n), rng.integers(0, num_nouns, n)
    verb_logits, noun_logits = rng.normal(size=(n, num_verbs)), rng.normal(size=(n, num_nouns))
    verb_logits[np.arange(n), verbs] += 2.0
    noun_logits[np.arange(n), nouns] += 2.0
    return verb_logits, noun_logits, verbs, nouns


def test_many_shot_classes_counted_on_training_labels() -> None:
    # verb 0: 101 samples (many-shot), verb 1: exactly 100 (not: "more than 100"), noun 5: 201.
    verbs = np.array([0] * 101 + [1] * 100)
    nouns = np.array([5] * 201)
    sets = many_shot_from_training(verbs, nouns, "epic55")
    assert MANY_SHOT_MIN == 100
    assert sets.many_shot_verbs == {0} and sets.many_shot_nouns == {5}
    assert sets.many_shot_actions == {(0, 5)}  # (1, 5) is seen but verb 1 is not many-shot
    assert sets.source == "counted on the training selection" and sets.dataset == "epic55"


def test_official_class_lists_load_and_a_folder_without_them_gives_none(epic55_dir: Path, epic100_dir: Path,
                                                                        tmp_path: Path) -> None:
    meta = load_class_sets(epic55_dir, "epic55")
    assert (meta.num_verbs, meta.num_nouns) == (125, 352) and len(meta.many_shot_verbs) > 0
    meta100 = load_class_sets(epic100_dir, "epic100")
    assert (meta100.num_verbs, meta100.num_nouns) == (97, 300) and meta100.tail_verbs
    assert load_class_sets(tmp_path, "epic55") is None
    assert load_class_sets(None, "epic55") is None
    assert load_class_sets(tmp_path / "missing", "epic55") is None


def test_action_prior_kinds() -> None:
    verbs, nouns = np.array([0, 0, 1]), np.array([1, 1, 2])
    assert action_prior_for("none", verbs, nouns, 2, 3) is None
    np.testing.assert_array_equal(action_prior_for("lfb", verbs, nouns, 2, 3), lfb_action_prior(verbs, nouns, 2, 3))
    with pytest.raises(ValueError, match="unknown action prior 'other'"):
        action_prior_for("other", verbs, nouns, 2, 3)
    with pytest.raises(ValueError, match="needs training labels"):
        action_prior_for("lfb", np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2, 3)


def test_score_picks_the_dataset_metrics_and_drops_undefined_ones() -> None:
    verb_logits, noun_logits, verbs, nouns = _logits(60, 10, 12)
    no_classes = ClassSets("epic55")
    metrics = score(verb_logits, noun_logits, verbs, nouns, dataset="epic55", class_sets=no_classes)
    # No many-shot class: precision / recall are undefined (NaN) and left out, not written as NaN.
    assert set(metrics) == {"verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5"}
    assert metrics == pytest.approx({k: v for k, v in epic55_metrics(verb_logits, noun_logits, verbs, nouns,
                                                                      meta=no_classes).items() if not np.isnan(v)})
    tails = ClassSets("epic100", tail_verbs=frozenset({1, 2}), tail_nouns=frozenset({3}),
                      unseen_participants=frozenset({"P30"}))
    participants = ["P30" if i % 3 == 0 else "P01" for i in range(60)]
    metrics100 = score(verb_logits, noun_logits, verbs, nouns, dataset="epic100", class_sets=tails,
                       participants=participants)
    expected = epic100_metrics(verb_logits, noun_logits, verbs, nouns, tail_verbs={1, 2}, tail_nouns={3},
                               unseen_mask=np.array([p == "P30" for p in participants]))
    assert metrics100 == pytest.approx(expected)
    # Without participants no segment is unseen: those metrics are undefined and left out.
    assert "unseen_verb_top1" not in score(verb_logits, noun_logits, verbs, nouns, dataset="epic100",
                                           class_sets=tails)
    with pytest.raises(ValueError, match="unknown dataset"):
        score(verb_logits, noun_logits, verbs, nouns, dataset="epic42", class_sets=no_classes)


def test_scoring_context_rules(epic55_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    training = TrainingLabels(rng.integers(0, 125, 5000), rng.integers(0, 352, 5000))
    # Official lists when the folder has them; class counts from them unless the predictions say otherwise.
    official = scoring_context("epic55", meta_dir=epic55_dir, training=training)
    assert official.class_sets.many_shot_verbs and getattr(official.class_sets, "source", "official") == "official"
    assert (official.num_verbs, official.num_nouns) == (125, 352)
    np.testing.assert_array_equal(official.prior, lfb_action_prior(training.verbs, training.nouns, 125, 352))
    assert official.train_pairs == frozenset(zip(training.verbs.tolist(), training.nouns.tolist()))
    # No lists: counted on the training labels; no prior asked: none, but the pairs stay.
    counted = scoring_context("epic55", meta_dir=tmp_path, training=training, action_prior="none")
    assert counted.class_sets.source == "counted on the training selection" and counted.prior is None
    assert counted.train_pairs == official.train_pairs
    # No training labels at all: no prior, no pairs, class lists counted on the scored labels.
    scored = np.array([7] * 101), np.array([9] * 101)
    alone = scoring_context("epic55", scored_verbs=scored[0], scored_nouns=scored[1], num_verbs=10, num_nouns=12)
    assert alone.prior is None and alone.train_pairs is None and alone.class_sets.many_shot_verbs == {7}
    assert (alone.num_verbs, alone.num_nouns) == (10, 12)
    with pytest.raises(ScoringError, match="unknown dataset"):
        scoring_context("epic42")
    # A training label outside the predictions' classes is named with where the labels came from.
    with pytest.raises(ScoringError, match="action prior from somewhere.csv: verb labels must lie in"):
        scoring_context("epic55", training=TrainingLabels(np.array([50]), np.array([1]), "somewhere.csv"),
                        num_verbs=10, num_nouns=12)


def test_the_context_scores_like_score() -> None:
    verb_logits, noun_logits, verbs, nouns = _logits(80, 10, 12, seed=3)
    training = TrainingLabels(verbs[:40], nouns[:40])
    context = scoring_context("epic55", training=training, num_verbs=10, num_nouns=12)
    assert isinstance(context, ScoringContext)
    direct = score(verb_logits, noun_logits, verbs, nouns, dataset="epic55", class_sets=context.class_sets,
                   prior=lfb_action_prior(verbs[:40], nouns[:40], 10, 12),
                   train_pairs=set(zip(verbs[:40].tolist(), nouns[:40].tolist())))
    assert context.score(verb_logits, noun_logits, verbs, nouns) == direct


def test_labels_from_file_leaves_out_scored_segments(tmp_path: Path) -> None:
    segments = generate_segments(30, num_verbs=4, num_nouns=5, seed=2)
    path = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    from featstore.epic.annotations import read_segments

    table = read_segments(path)
    uids = table.column("uid").to_pylist()
    labels = labels_from_file(path, scored=uids[:10] + ["not-in-the-file"])
    assert (labels.excluded, len(labels)) == (10, 20)
    np.testing.assert_array_equal(labels.verbs, table.column("verb_class").to_numpy()[10:])
    assert labels.record() == {"from": str(path.resolve()), "excluded_scored_segments": 10, "counted": 20}
    with pytest.raises(ScoringError, match="every one of its 30 segments is being scored"):
        labels_from_file(path, scored=uids)
