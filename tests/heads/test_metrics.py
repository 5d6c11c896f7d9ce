"""Metrics: hand-computed cases, and equality with transcriptions of the official evaluations
(`official_epic55_metrics`, `official_epic100_metrics`: tests/helpers/official_epic.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from heads.actions import action_scores, lfb_action_prior
from heads.metrics import (
    chance_top1,
    confusion_matrix,
    group_top1,
    mean_class_accuracy,
    per_class_accuracy,
    action_topk_accuracy,
    class_precision_recall,
    epic55_metrics,
    epic100_metrics,
    topk_accuracy,
)
from tests.helpers.official_epic import (
    official_epic55_metrics,
    official_epic100_metrics,
)


@dataclass(frozen=True)
class Meta:
    many_shot_verbs: frozenset[int]
    many_shot_nouns: frozenset[int]
    many_shot_actions: frozenset[tuple[int, int]]


def _tricky_predictions(seed: int, n: int, num_verbs: int, num_nouns: int) -> tuple[np.ndarray, ...]:
    """Rounded logits (ties), classes never predicted, and classes absent from the ground truth."""
    rng = np.random.default_rng(seed)
    verb_labels = rng.integers(0, num_verbs - 10, n)  # the last 10 verbs never occur
    noun_labels = rng.integers(0, num_nouns - 30, n)
    # Logits that lean towards the label, so accuracy and precision are not trivially ~0.
    verb_logits = rng.normal(size=(n, num_verbs)) * 1.5
    noun_logits = rng.normal(size=(n, num_nouns)) * 1.5
    verb_logits[np.arange(n), verb_labels] += rng.random(n) * 6
    noun_logits[np.arange(n), noun_labels] += rng.random(n) * 6
    verb_logits, noun_logits = np.round(verb_logits), np.round(noun_logits)
    verb_logits[:, 1] = -20.0  # verb 1 occurs but is never predicted
    noun_logits[:, 2] = -20.0
    verb_logits[: n // 10] = 0.0  # fully tied rows
    return verb_logits, noun_logits, verb_labels, noun_labels


# ---------------------------------------------------------------- hand-computed


def test_topk_accuracy_hand_computed_with_ties() -> None:
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    # Ties rank the higher class index first: rows rank [1, 0, 2], [1, 2, 0], [2, 1, 0].
    assert topk_accuracy(scores, np.array([1, 2, 0]), ks=(1, 2, 3)) == pytest.approx((100 / 3, 200 / 3, 100.0))
    assert topk_accuracy(scores, np.array([0, 1, 2]), ks=(1,)) == pytest.approx((200 / 3,))


def test_action_topk_accuracy_hand_computed() -> None:
    pairs = np.array([[[0, 1], [1, 1], [2, 0]], [[3, 3], [0, 0], [1, 1]]])
    got = action_topk_accuracy(pairs, np.array([1, 1]), np.array([1, 0]), ks=(1, 2, 3))
    assert got == pytest.approx((0.0, 50.0, 50.0))


def test_class_precision_recall_hand_computed() -> None:
    predicted = np.array([0, 0, 1, 2, 2, 5])
    labels = np.array([0, 1, 1, 2, 3, 3])
    # classes 0..4: 4 is absent from the ground truth (dropped); 3 is present, never predicted.
    # 0: P 1/2 R 1/1; 1: P 1/1 R 1/2; 2: P 1/2 R 1/1; 3: P 0 R 0/2. Class 5 is predicted but is
    # not one of the classes: it counts nowhere, though segment 5 is a miss for class 3.
    precision, recall = class_precision_recall(predicted, labels, [0, 1, 2, 3, 4])
    assert precision == pytest.approx((0.5 + 1 + 0.5 + 0) / 4 * 100)
    assert recall == pytest.approx((1 + 0.5 + 1 + 0) / 4 * 100)
    # Precision counts every prediction of a class, also on segments of other classes.
    assert class_precision_recall(np.array([0, 0]), np.array([0, 9]), [0]) == pytest.approx((50.0, 100.0))
    nan_p, nan_r = class_precision_recall(predicted, labels, [7, 8])
    assert np.isnan(nan_p) and np.isnan(nan_r)


def test_epic55_metrics_hand_computed() -> None:
    # 3 segments, 3 verbs, 2 nouns; logits chosen so softmaxes are easy to order.
    verb_logits = np.array([[3.0, 1.0, 0.0], [0.0, 3.0, 1.0], [3.0, 0.0, 1.0]])
    noun_logits = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    verb_labels, noun_labels = np.array([0, 2, 0]), np.array([0, 0, 0])
    meta = Meta(frozenset({0, 1, 2}), frozenset({0, 1}), frozenset({(0, 0), (2, 0), (1, 1)}))
    m = epic55_metrics(verb_logits, noun_logits, verb_labels, noun_labels, meta=meta)
    assert m["verb_top1"] == pytest.approx(200 / 3)  # predictions 0, 1, 0
    assert m["verb_top5"] == pytest.approx(100.0)
    assert m["noun_top1"] == pytest.approx(200 / 3)  # predictions 0, 0, 1
    assert m["action_top1"] == pytest.approx(100 / 3)  # (0,0) right, (1,0) wrong, (0,1) wrong
    assert m["action_top5"] == pytest.approx(100.0)  # all 6 pairs are ranked
    # verbs present: 0, 2 (1 is many-shot but absent). 0: P 2/2 R 2/2; 2: never predicted, P 0 R 0.
    assert m["verb_precision"] == pytest.approx(50.0) and m["verb_recall"] == pytest.approx(50.0)
    # nouns present: 0 only. Predicted 0 twice, both right: P 1, R 2/3.
    assert m["noun_precision"] == pytest.approx(100.0) and m["noun_recall"] == pytest.approx(200 / 3)
    # actions present and many-shot: (0,0), (2,0). (0,0): predicted once (right), P 1, R 1/2.
    # (2,0): never predicted: P 0, R 0.
    assert m["action_precision"] == pytest.approx(50.0) and m["action_recall"] == pytest.approx(25.0)
    # Restricting many-shot actions to pairs seen in training drops (2,0).
    m = epic55_metrics(verb_logits, noun_logits, verb_labels, noun_labels, meta=meta, train_pairs={(0, 0), (1, 1)})
    assert m["action_precision"] == pytest.approx(100.0) and m["action_recall"] == pytest.approx(50.0)
    # A prior that forbids (0,0) moves segment 0's top action to (0,1).
    prior = np.ones((3, 2))
    prior[0, 0] = 0.0
    m = epic55_metrics(verb_logits, noun_logits, verb_labels, noun_labels, meta=meta, prior=prior)
    assert m["action_top1"] == 0.0


def test_epic100_metrics_hand_computed() -> None:
    verb_logits = np.array([[3.0, 1.0], [0.0, 3.0], [3.0, 0.0], [0.0, 1.0]])
    noun_logits = np.array([[2.0, 0.0, 1.0], [2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0]])
    verb_labels, noun_labels = np.array([0, 1, 1, 1]), np.array([0, 0, 1, 2])
    m = epic100_metrics(verb_logits, noun_logits, verb_labels, noun_labels,
                        tail_verbs=[0], tail_nouns=[2], unseen_mask=np.array([False, True, True, False]))
    assert m["verb_top1"] == pytest.approx(75.0)  # predictions 0, 1, 0, 1
    assert m["noun_top1"] == pytest.approx(100.0)  # predictions 0, 0, 1, 2
    assert m["action_top1"] == pytest.approx(75.0)
    assert m["verb_top5"] == m["noun_top5"] == m["action_top5"] == 100.0
    assert m["tail_verb_top1"] == 100.0  # segment 0
    assert m["tail_noun_top1"] == 100.0  # segment 3
    assert m["tail_action_top1"] == 100.0  # segments 0 and 3 (verb or noun tail)
    assert m["unseen_verb_top1"] == 50.0 and m["unseen_noun_top1"] == 100.0 and m["unseen_action_top1"] == 50.0
    m = epic100_metrics(verb_logits, noun_logits, verb_labels, noun_labels,
                        tail_verbs=[], tail_nouns=[], unseen_mask=np.zeros(4, dtype=bool))
    assert np.isnan(m["tail_verb_top1"]) and np.isnan(m["unseen_action_top1"])


# ---------------------------------------------------------------- equal to the official logic


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_epic55_metrics_equal_the_official_computation(seed: int, with_prior: bool) -> None:
    num_verbs, num_nouns, n = 125, 352, 400
    verb_logits, noun_logits, verb_labels, noun_labels = _tricky_predictions(seed, n, num_verbs, num_nouns)
    rng = np.random.default_rng(seed + 100)
    train_verbs, train_nouns = rng.integers(0, num_verbs, 3000), rng.integers(0, num_nouns - 30, 3000)
    train_verbs[:400], train_nouns[:400] = verb_labels, noun_labels  # the val pairs are mostly seen
    counts = pd.Series(list(zip(train_verbs, train_nouns))).value_counts()
    verb_counts, noun_counts = np.bincount(train_verbs, minlength=num_verbs), np.bincount(train_nouns, minlength=num_nouns)
    # Many-shot: frequent classes, including the never-predicted verb 1 / noun 2 and classes
    # absent from the ground truth (the last verbs/nouns).
    many_verbs = set(np.nonzero(verb_counts > 24)[0].tolist()) | {1, num_verbs - 1, num_verbs - 3}
    many_nouns = set(np.nonzero(noun_counts > 9)[0].tolist()) | {2, num_nouns - 1}
    many_actions = {(int(v), int(n_)) for (v, n_) in counts.index if v in many_verbs and n_ in many_nouns}
    meta = Meta(frozenset(many_verbs), frozenset(many_nouns), frozenset(many_actions))
    prior = lfb_action_prior(train_verbs, train_nouns, num_verbs, num_nouns) if with_prior else None

    ours = epic55_metrics(verb_logits, noun_logits, verb_labels, noun_labels, meta=meta, prior=prior)
    official = official_epic55_metrics(
        verb_logits, noun_logits, verb_labels, noun_labels,
        np.array(sorted(many_verbs)), np.array(sorted(many_nouns)), sorted(many_actions), prior,
    )
    for task in ("verb", "noun", "action"):
        assert ours[f"{task}_top1"] == pytest.approx(100 * official["accuracy"][task][0], abs=1e-6)
        assert ours[f"{task}_top5"] == pytest.approx(100 * official["accuracy"][task][1], abs=1e-6)
        assert ours[f"{task}_precision"] == pytest.approx(100 * official["precision"][task], abs=1e-6)
        assert ours[f"{task}_recall"] == pytest.approx(100 * official["recall"][task], abs=1e-6)
    assert 0 < ours["action_precision"] < 100 and 0 < ours["verb_top1"] < 100  # not a degenerate case


@pytest.mark.parametrize("seed", [0, 1])
def test_epic100_metrics_equal_the_official_computation(seed: int) -> None:
    num_verbs, num_nouns, n = 97, 300, 300
    rng = np.random.default_rng(seed)
    verb_labels, noun_labels = rng.integers(0, num_verbs, n), rng.integers(0, num_nouns, n)
    # Continuous logits: the official global softmax (scipy, no axis) rounds differently from the
    # per-row one, so exactly tied products could order differently; without ties they cannot.
    verb_logits, noun_logits = rng.normal(size=(n, num_verbs)) * 2, rng.normal(size=(n, num_nouns)) * 2
    verb_logits[np.arange(n), verb_labels] += 3 * rng.random(n)
    noun_logits[np.arange(n), noun_labels] += 3 * rng.random(n)
    tail_verbs, tail_nouns = np.arange(60, 97), np.arange(150, 300)
    unseen = rng.random(n) < 0.2
    ours = epic100_metrics(verb_logits, noun_logits, verb_labels, noun_labels,
                           tail_verbs=tail_verbs, tail_nouns=tail_nouns, unseen_mask=unseen)
    official = official_epic100_metrics(verb_logits, noun_logits, verb_labels, noun_labels, tail_verbs, tail_nouns, unseen)
    for task in ("verb", "noun", "action"):
        assert ours[f"{task}_top1"] == pytest.approx(100 * official["all"][task][0], abs=1e-6)
        assert ours[f"{task}_top5"] == pytest.approx(100 * official["all"][task][1], abs=1e-6)
        assert ours[f"tail_{task}_top1"] == pytest.approx(100 * official["tail"][task][0], abs=1e-6)
        assert ours[f"unseen_{task}_top1"] == pytest.approx(100 * official["unseen"][task][0], abs=1e-6)


def test_epic55_metric_keys_and_action_scores_consistency() -> None:
    verb_logits, noun_logits, verb_labels, noun_labels = _tricky_predictions(5, 50, 20, 40)
    meta = Meta(frozenset(range(5)), frozenset(range(8)), frozenset({(0, 0), (1, 1)}))
    m = epic55_metrics(verb_logits, noun_logits, verb_labels, noun_labels, meta=meta)
    assert set(m) == {
        "verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5",
        "verb_precision", "verb_recall", "noun_precision", "noun_recall", "action_precision", "action_recall",
    }
    pairs, _ = action_scores(verb_logits, noun_logits)
    assert (m["action_top1"], m["action_top5"]) == action_topk_accuracy(pairs, verb_labels, noun_labels)


def test_official_many_shot_actions_are_many_shot_seen_pairs(epic55_dir: Path) -> None:
    """DESIGN section 6's definition reproduces `EPIC_many_shot_actions.csv` exactly."""
    train = pd.read_csv(epic55_dir / "EPIC_train_action_labels.csv")
    verbs = set(pd.read_csv(epic55_dir / "EPIC_many_shot_verbs.csv")["verb_class"])
    nouns = set(pd.read_csv(epic55_dir / "EPIC_many_shot_nouns.csv")["noun_class"])
    actions = pd.read_csv(epic55_dir / "EPIC_many_shot_actions.csv")
    official = set(zip(actions["verb_class"], actions["noun_class"]))
    verb_counts, noun_counts = train["verb_class"].value_counts(), train["noun_class"].value_counts()
    assert verbs == set(verb_counts[verb_counts > 100].index)
    assert nouns == set(noun_counts[noun_counts > 100].index)
    seen = set(zip(train["verb_class"], train["noun_class"]))
    assert official == {p for p in seen if p[0] in verbs and p[1] in nouns}


# ------------------------------------------------------------------------------------------------
# beyond Table 1: per class, per participant, and chance


def test_chance_is_the_better_of_the_majority_class_and_a_uniform_guess() -> None:
    train = np.array([0, 0, 0, 1, 2])  # class 0 most frequent; three training classes
    assert chance_top1(train, np.array([0, 1, 1, 2])) == pytest.approx(100 / 3)  # uniform beats 25 %
    assert chance_top1(train, np.array([0, 0, 0, 1])) == pytest.approx(75.0)  # always class 0
    assert chance_top1(np.array([1, 1, 2, 2]), np.array([2, 2, 2, 0])) == pytest.approx(75.0)  # ties: the best
    assert np.isnan(chance_top1(np.array([], dtype=np.int64), np.array([0])))


def test_per_class_numbers_hand_computed() -> None:
    scores = np.array([[3.0, 2, 1], [1, 3, 2], [1, 2, 3], [3, 2, 1]])  # top-1: 0, 1, 2, 0
    labels = np.array([0, 0, 2, 1])
    assert confusion_matrix(scores.argmax(1), labels, 3).tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    # class 0: 2 segments, 1 top-1 hit, 1 top-2 hit (row 1 ranks 1, 2 first); class 1: 1, 0, 1; class 2: 1, 1, 1
    assert per_class_accuracy(scores, labels, (1, 2)) == {0: (2, 1, 1), 1: (1, 0, 1), 2: (1, 1, 1)}
    assert mean_class_accuracy(scores, labels) == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    assert mean_class_accuracy(scores, labels, k=2) == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert group_top1(scores.argmax(1), labels, ["P02", "P01", "P01", "P02"]) == {"P01": (2, 50.0),
                                                                                    "P02": (2, 50.0)}
