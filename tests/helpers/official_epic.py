"""Transcriptions of the official EPIC-Kitchens scoring and evaluation code: the oracles that
tests/heads/test_actions.py and tests/heads/test_metrics.py compare `heads.actions` and
`heads.metrics` with.

Scoring: our own rewrite of the logic of epic-kitchens/epic-kitchens-55-lib
`epic_kitchens/scoring.py` (`top_scores`, `softmax`, `compute_action_scores`,
`_scores_dict_to_ranks`) and of how `epic_kitchens/metrics.py` (`compute_metrics`) turns the action
scores into `{action_id: score}` dicts and ranks. They keep its per-segment structure (dicts, Python
loops) so they share no code path with `heads.actions`. The one change: numpy's default `argsort`
is unstable, so the official order of equal scores is unspecified; these use `kind="stable"`, which
is the tie rule `heads.actions` documents.

Metrics: `official_epic55_metrics` rewrites the logic of epic-kitchens-55-lib
`epic_kitchens/metrics.py` (`compute_metrics`, `compute_class_aware_metrics`,
`compute_class_agnostic_metrics`, `topk_accuracy`, `precision_recall`, which calls sklearn's
`precision_recall_fscore_support(average=None, labels=classes)`; sklearn is not installed here, so
its per-class precision/recall is written out as a loop). `official_epic100_metrics` rewrites
epic-kitchens/C1-Action-Recognition `evaluate.py` + `utils/metrics.py` (`compute_metrics`). Both
use stable sorts and return fractions, as the originals.
"""
from __future__ import annotations

import numpy as np
import scipy.special

ACTION_VERB_MULTIPLIER = 1000  # official action id = verb * 1000 + noun


def official_top_scores(scores: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(scores, kind="stable")[..., ::-1][:, :top_k]
    return idx, scores[np.arange(len(scores)).reshape(-1, 1), idx]


def official_softmax(x: np.ndarray) -> np.ndarray:
    max_x = np.max(x, axis=1).reshape((-1, 1))
    exp_x = np.exp(x - max_x)
    return exp_x / np.sum(exp_x, axis=1).reshape((-1, 1))


def official_compute_action_scores(
    verb_scores: np.ndarray, noun_scores: np.ndarray, top_k: int = 100, action_priors: np.ndarray | None = None,
    softmax_fn=official_softmax,
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    top_verbs, top_verb_scores = official_top_scores(verb_scores, top_k)
    top_nouns, top_noun_scores = official_top_scores(noun_scores, top_k)
    matrix = softmax_fn(top_verb_scores)[:, :, None] * softmax_fn(top_noun_scores)[:, None, :]
    if action_priors is not None:
        matrix = matrix * action_priors[top_verbs[:, :, None], top_nouns[:, None, :]]
    n = matrix.shape[0]
    flat = matrix.reshape(n, -1)
    ranks = np.argsort(flat, axis=-1, kind="stable")[:, ::-1][:, :top_k]
    verb_idx, noun_idx = np.unravel_index(ranks, matrix.shape[1:])
    segments = np.arange(n).reshape(-1, 1)
    return (top_verbs[segments, verb_idx], top_nouns[segments, noun_idx]), flat[segments, ranks]


def official_action_dicts(verbs: np.ndarray, nouns: np.ndarray, scores: np.ndarray) -> list[dict[int, float]]:
    return [
        {int(v) * ACTION_VERB_MULTIPLIER + int(n): s for v, n, s in zip(seg_v, seg_n, seg_s)}
        for seg_v, seg_n, seg_s in zip(verbs, nouns, scores)
    ]


def official_dict_ranks(dicts: list[dict[int, float]]) -> np.ndarray:
    ranks = []
    for scores in dicts:
        class_ids = np.array(list(scores.keys()))
        values = np.array([scores[c] for c in class_ids])
        ranks.append(class_ids[np.argsort(values, kind="stable")[::-1]])
    return np.array(ranks)


def official_action_ranks(
    verb_scores: np.ndarray, noun_scores: np.ndarray, top_k: int = 100, action_priors: np.ndarray | None = None,
    softmax_fn=official_softmax,
) -> tuple[np.ndarray, list[dict[int, float]]]:
    """Ranked action ids `(N, A)` as the official evaluation sees them, and the score dicts."""
    (verbs, nouns), scores = official_compute_action_scores(verb_scores, noun_scores, top_k, action_priors, softmax_fn)
    dicts = official_action_dicts(verbs, nouns, scores)
    return official_dict_ranks(dicts), dicts


# ---------------------------------------------------------------- metrics


def official_scores_to_ranks(scores: np.ndarray) -> np.ndarray:
    return np.argsort(scores, axis=-1, kind="stable")[:, ::-1]


def official_topk_accuracy(rankings: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    tp = rankings[:, : max(ks)] == labels.reshape(-1, 1)
    return [tp[:, :k].max(1).mean() for k in ks]


def sklearn_precision_recall(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None)[:2]`, zero_division -> 0."""
    precision, recall = [], []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        predicted = np.sum(y_pred == c)
        actual = np.sum(y_true == c)
        precision.append(tp / predicted if predicted else 0.0)
        recall.append(tp / actual if actual else 0.0)
    return np.array(precision), np.array(recall)


def official_precision_recall(rankings: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_pred = rankings[:, 0]
    assert np.all(np.isin(classes, np.unique(labels)))  # the official code raises otherwise
    return sklearn_precision_recall(labels, y_pred, classes)


def official_epic55_metrics(
    verb_scores: np.ndarray, noun_scores: np.ndarray, verb_labels: np.ndarray, noun_labels: np.ndarray,
    many_shot_verbs: np.ndarray, many_shot_nouns: np.ndarray, many_shot_actions: list[tuple[int, int]],
    action_priors: np.ndarray | None = None,
) -> dict:
    action_labels = verb_labels * ACTION_VERB_MULTIPLIER + noun_labels
    many_shot_action_ids = np.array([v * ACTION_VERB_MULTIPLIER + n for v, n in many_shot_actions])
    action_ranks, _ = official_action_ranks(verb_scores, noun_scores, 100, action_priors)
    ranks = {"verb": official_scores_to_ranks(verb_scores), "noun": official_scores_to_ranks(noun_scores),
             "action": action_ranks}
    accuracy = {
        "verb": official_topk_accuracy(ranks["verb"], verb_labels),
        "noun": official_topk_accuracy(ranks["noun"], noun_labels),
        "action": official_topk_accuracy(ranks["action"], action_labels),
    }
    # _exclude_non_existent_classes: many-shot classes intersected with the ground truth.
    classes = {
        "verb": np.intersect1d(many_shot_verbs, np.unique(verb_labels)),
        "noun": np.intersect1d(many_shot_nouns, np.unique(noun_labels)),
        "action": np.intersect1d(many_shot_action_ids, np.unique(action_labels)),
    }
    labels = {"verb": verb_labels, "noun": noun_labels, "action": action_labels}
    precision, recall = {}, {}
    for task in ("verb", "noun", "action"):
        p, r = official_precision_recall(ranks[task], labels[task], classes[task])
        precision[task], recall[task] = p.mean(), r.mean()
    return {"accuracy": accuracy, "precision": precision, "recall": recall}


def official_epic100_metrics(
    verb_scores: np.ndarray, noun_scores: np.ndarray, verb_labels: np.ndarray, noun_labels: np.ndarray,
    tail_verbs: np.ndarray, tail_nouns: np.ndarray, unseen: np.ndarray,
) -> dict:
    action_labels = verb_labels * ACTION_VERB_MULTIPLIER + noun_labels
    # evaluate.py: compute_action_scores(top_n=100) with scipy's softmax over the whole array.
    action_ranks, _ = official_action_ranks(verb_scores, noun_scores, 100, softmax_fn=lambda x: scipy.special.softmax(x))
    ranks = {"verb": official_scores_to_ranks(verb_scores), "noun": official_scores_to_ranks(noun_scores),
             "action": action_ranks}
    labels = {"verb": verb_labels, "noun": noun_labels, "action": action_labels}
    out = {"all": {t: official_topk_accuracy(ranks[t], labels[t], (1, 5)) for t in labels}}
    out["unseen"] = {t: official_topk_accuracy(ranks[t][unseen], labels[t][unseen], (1,)) for t in labels}
    tail_verb = np.isin(verb_labels, tail_verbs)
    tail_noun = np.isin(noun_labels, tail_nouns)
    tail_idx = {"verb": tail_verb, "noun": tail_noun, "action": tail_verb | tail_noun}
    out["tail"] = {t: official_topk_accuracy(ranks[t][tail_idx[t]], labels[t][tail_idx[t]], (1,)) for t in labels}
    return out
