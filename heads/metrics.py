"""EPIC-Kitchens metrics as pure functions over arrays (DESIGN section 6). All results are percent.

Sources followed (read for their logic, rewritten here):
- EPIC-55: epic-kitchens/epic-kitchens-55-lib `epic_kitchens/metrics.py` (`compute_metrics`,
  `compute_class_agnostic_metrics`, `topk_accuracy`, `precision_recall`) and
  `epic_kitchens/scoring.py` (`compute_action_scores`, `scores_to_ranks`).
- EPIC-100: epic-kitchens/C1-Action-Recognition `evaluate.py`, `utils/metrics.py`,
  `utils/scoring.py`.

What they do, and so what we do:
- Rankings are `argsort(scores)[..., ::-1]`; top-k accuracy asks whether the label is in the first
  k. Ties follow `heads.actions.rank_classes` (the same expression with a stable sort).
- Action accuracy uses the 100 best pairs of `heads.actions.action_scores` (top-100 verbs x
  top-100 nouns, each softmaxed); a ground-truth pair outside them is a miss.
- EPIC-55 precision / recall: sklearn's per-class precision and recall of the *top-1* prediction,
  restricted to the many-shot classes that occur in the evaluated ground truth, then the
  unweighted mean. Precision counts every segment predicted as the class (also segments whose
  label is not many-shot); a class never predicted has precision 0.
- EPIC-100: top-1/5 over all segments; top-1 over segments whose verb (noun) is a tail class, and
  over segments whose verb *or* noun is a tail class for actions; top-1 over segments of unseen
  participants. No action prior in the official EPIC-100 evaluation (optional here).

Where the official code would fail (an empty subset) or return NaN (no many-shot class present),
these functions return NaN.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from heads.actions import action_scores, rank_classes

__all__ = [
    "ManyShotMeta",
    "topk_accuracy",
    "action_topk_accuracy",
    "class_precision_recall",
    "epic55_metrics",
    "epic100_metrics",
    "chance_top1",
    "confusion_matrix",
    "per_class_accuracy",
    "mean_class_accuracy",
    "group_top1",
]


class ManyShotMeta(Protocol):
    """What `epic55_metrics` needs to know about a dataset: its many-shot classes."""

    many_shot_verbs: frozenset[int]
    many_shot_nouns: frozenset[int]
    many_shot_actions: frozenset[tuple[int, int]]


def _percent(hits: np.ndarray) -> float:
    return float(hits.mean() * 100.0) if hits.size else float("nan")


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> tuple[float, ...]:
    """Top-k accuracy for each k.

    Args:
        scores: `(N, K)` class scores (logits or probabilities; only the ranking matters).
        labels: `(N,)` true classes.
        ks: the k values.

    Returns:
        One percentage (0-100) per k; NaN for an empty input.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels).reshape(-1)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"expected (N, K) scores and (N,) labels, got {scores.shape} and {labels.shape}")
    ks = tuple(int(k) for k in ks)
    ranks = rank_classes(scores)[:, : max(ks)]  # (N, maxk)
    hits = ranks == labels[:, None]  # (N, maxk)
    return tuple(_percent(hits[:, :k].any(axis=1)) for k in ks)


def action_topk_accuracy(
    action_pairs: np.ndarray, verb_labels: np.ndarray, noun_labels: np.ndarray, ks: Iterable[int] = (1, 5)
) -> tuple[float, ...]:
    """Top-k action accuracy from ranked pairs (as returned by `heads.actions.action_scores`).

    Args:
        action_pairs: `(N, A, 2)` `(verb, noun)` pairs, best first.
        verb_labels: `(N,)`.
        noun_labels: `(N,)`.
        ks: the k values.

    Returns:
        One percentage per k; NaN for an empty input.
    """
    action_pairs = np.asarray(action_pairs)
    verb_labels = np.asarray(verb_labels).reshape(-1)
    noun_labels = np.asarray(noun_labels).reshape(-1)
    ks = tuple(int(k) for k in ks)
    top = action_pairs[:, : max(ks)]  # (N, maxk, 2)
    hits = (top[..., 0] == verb_labels[:, None]) & (top[..., 1] == noun_labels[:, None])  # (N, maxk)
    return tuple(_percent(hits[:, :k].any(axis=1)) for k in ks)


def class_precision_recall(
    predicted: np.ndarray, labels: np.ndarray, classes: Iterable[Any]
) -> tuple[float, float]:
    """Mean per-class precision and recall of top-1 predictions over `classes` present in `labels`.

    As the EPIC-55 evaluation (sklearn `precision_recall_fscore_support(average=None)` over the
    many-shot classes intersected with the ground truth, then `.mean()`): a class never predicted
    has precision 0; classes absent from `labels` are dropped (their recall is undefined).

    Args:
        predicted: `(N,)` top-1 predicted class ids (any comparable scalar ids, e.g. ints).
        labels: `(N,)` true class ids.
        classes: the classes to average over (e.g. the many-shot ones).

    Returns:
        `(precision, recall)` in percent; NaN, NaN when none of `classes` occurs in `labels`.
    """
    predicted = np.asarray(predicted).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} differ in length")
    present = np.intersect1d(np.asarray(list(classes)), labels)  # sorted, unique
    if present.size == 0:
        return float("nan"), float("nan")

    def index_in_present(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Position of each value in `present` and whether it is there at all.
        pos = np.minimum(np.searchsorted(present, values), present.size - 1)
        return pos, present[pos] == values

    pred_pos, pred_in = index_in_present(predicted)
    label_pos, label_in = index_in_present(labels)
    predicted_count = np.bincount(pred_pos[pred_in], minlength=present.size)  # all segments
    label_count = np.bincount(label_pos[label_in], minlength=present.size)  # >= 1 for each class
    correct = label_in & (predicted == labels)
    true_positive = np.bincount(label_pos[correct], minlength=present.size)
    precision = np.divide(
        true_positive, predicted_count, out=np.zeros(present.size), where=predicted_count > 0
    )
    recall = true_positive / label_count
    return float(precision.mean() * 100.0), float(recall.mean() * 100.0)


def _logit_arrays(
    verb_logits: Any, noun_logits: Any, verb_labels: Any, noun_labels: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    verb_logits = np.asarray(verb_logits, dtype=np.float64)
    noun_logits = np.asarray(noun_logits, dtype=np.float64)
    verb_labels = np.asarray(verb_labels, dtype=np.int64).reshape(-1)
    noun_labels = np.asarray(noun_labels, dtype=np.int64).reshape(-1)
    n = len(verb_labels)
    shapes_ok = verb_logits.ndim == noun_logits.ndim == 2
    if not (shapes_ok and len(verb_logits) == len(noun_logits) == len(noun_labels) == n):
        raise ValueError(
            f"expected (N, V) / (N, N_nouns) logits and (N,) labels; got {verb_logits.shape}, "
            f"{noun_logits.shape}, {verb_labels.shape}, {noun_labels.shape}"
        )
    return verb_logits, noun_logits, verb_labels, noun_labels


def epic55_metrics(
    verb_logits: np.ndarray,
    noun_logits: np.ndarray,
    verb_labels: np.ndarray,
    noun_labels: np.ndarray,
    *,
    meta: ManyShotMeta,
    train_pairs: set[tuple[int, int]] | None = None,
    prior: np.ndarray | None = None,
) -> dict[str, float]:
    """The EPIC-55 action recognition metrics.

    Args:
        verb_logits: `(N, V)` verb scores.
        noun_logits: `(N, N_nouns)` noun scores.
        verb_labels: `(N,)`.
        noun_labels: `(N,)`.
        meta: the many-shot verb, noun and action sets (official: `EPIC_many_shot_*.csv`).
        train_pairs: the `(verb, noun)` pairs of the training split actually used; when given,
            many-shot actions are restricted to those that occur in it (DESIGN section 6: both
            parts many-shot *and* seen in training). The official list already satisfies this
            for the full EPIC-55 training set.
        prior: optional `(V, N_nouns)` action prior multiplied into the action scores.

    Returns:
        `verb_top1, verb_top5, noun_top1, noun_top5, action_top1, action_top5, verb_precision,
        verb_recall, noun_precision, noun_recall, action_precision, action_recall`, percent.
    """
    verb_logits, noun_logits, verb_labels, noun_labels = _logit_arrays(
        verb_logits, noun_logits, verb_labels, noun_labels
    )
    num_nouns = noun_logits.shape[1]
    pairs, _ = action_scores(verb_logits, noun_logits, prior=prior)  # (N, 100, 2)

    out: dict[str, float] = {}
    out["verb_top1"], out["verb_top5"] = topk_accuracy(verb_logits, verb_labels, (1, 5))
    out["noun_top1"], out["noun_top5"] = topk_accuracy(noun_logits, noun_labels, (1, 5))
    out["action_top1"], out["action_top5"] = action_topk_accuracy(pairs, verb_labels, noun_labels, (1, 5))

    many_shot_actions = set(meta.many_shot_actions)
    if train_pairs is not None:
        many_shot_actions &= set(train_pairs)
    # Pairs as one integer id (verb * N_nouns + noun) so the action case is the same computation.
    action_classes = [v * num_nouns + n for v, n in many_shot_actions if 0 <= n < num_nouns]
    out["verb_precision"], out["verb_recall"] = class_precision_recall(
        rank_classes(verb_logits)[:, 0], verb_labels, sorted(meta.many_shot_verbs)
    )
    out["noun_precision"], out["noun_recall"] = class_precision_recall(
        rank_classes(noun_logits)[:, 0], noun_labels, sorted(meta.many_shot_nouns)
    )
    out["action_precision"], out["action_recall"] = class_precision_recall(
        pairs[:, 0, 0] * num_nouns + pairs[:, 0, 1], verb_labels * num_nouns + noun_labels, action_classes
    )
    return out


def epic100_metrics(
    verb_logits: np.ndarray,
    noun_logits: np.ndarray,
    verb_labels: np.ndarray,
    noun_labels: np.ndarray,
    *,
    tail_verbs: Iterable[int],
    tail_nouns: Iterable[int],
    unseen_mask: np.ndarray,
    prior: np.ndarray | None = None,
) -> dict[str, float]:
    """The EPIC-100 action recognition metrics (C1-Action-Recognition `evaluate.py`).

    Args:
        verb_logits: `(N, 97)` verb scores.
        noun_logits: `(N, 300)` noun scores.
        verb_labels: `(N,)`.
        noun_labels: `(N,)`.
        tail_verbs: tail verb classes (`EPIC_100_tail_verbs.csv`).
        tail_nouns: tail noun classes (`EPIC_100_tail_nouns.csv`).
        unseen_mask: `(N,)` bool, True for segments of unseen participants
            (`EPIC_100_unseen_participant_ids_{validation,test}.csv`).
        prior: optional action prior (not part of the official evaluation).

    Returns:
        `verb_top1, verb_top5, noun_top1, noun_top5, action_top1, action_top5, tail_verb_top1,
        tail_noun_top1, tail_action_top1, unseen_verb_top1, unseen_noun_top1, unseen_action_top1`,
        percent; a subset with no segment gives NaN.
    """
    verb_logits, noun_logits, verb_labels, noun_labels = _logit_arrays(
        verb_logits, noun_logits, verb_labels, noun_labels
    )
    unseen_mask = np.asarray(unseen_mask, dtype=bool).reshape(-1)
    if unseen_mask.shape != verb_labels.shape:
        raise ValueError(f"unseen_mask must have shape {verb_labels.shape}, got {unseen_mask.shape}")
    pairs, _ = action_scores(verb_logits, noun_logits, prior=prior)  # (N, 100, 2)

    verb_hits = rank_classes(verb_logits)[:, :5] == verb_labels[:, None]  # (N, 5)
    noun_hits = rank_classes(noun_logits)[:, :5] == noun_labels[:, None]
    action_hits = (pairs[:, :5, 0] == verb_labels[:, None]) & (pairs[:, :5, 1] == noun_labels[:, None])

    tail_verb = np.isin(verb_labels, np.asarray(list(tail_verbs), dtype=np.int64))
    tail_noun = np.isin(noun_labels, np.asarray(list(tail_nouns), dtype=np.int64))
    tail_action = tail_verb | tail_noun  # an action is tail if its verb or its noun is

    out: dict[str, float] = {}
    for task, hits in (("verb", verb_hits), ("noun", noun_hits), ("action", action_hits)):
        out[f"{task}_top1"] = _percent(hits[:, 0])
        out[f"{task}_top5"] = _percent(hits.any(axis=1))
    out["tail_verb_top1"] = _percent(verb_hits[tail_verb, 0])
    out["tail_noun_top1"] = _percent(noun_hits[tail_noun, 0])
    out["tail_action_top1"] = _percent(action_hits[tail_action, 0])
    out["unseen_verb_top1"] = _percent(verb_hits[unseen_mask, 0])
    out["unseen_noun_top1"] = _percent(noun_hits[unseen_mask, 0])
    out["unseen_action_top1"] = _percent(action_hits[unseen_mask, 0])
    return out


# ------------------------------------------------------------------------------------------------
# what a paper reports besides Table 1, and the floor a run must beat


def chance_top1(train_labels: np.ndarray, eval_labels: np.ndarray) -> float:
    """Top-1 (%) a classifier reaches without looking at its input: the better of always answering the
    training labels' most frequent class and a uniform guess among the training classes.

    A run at or below it has learnt nothing (a head over empty detections, a diverged stage 1).

    Args:
        train_labels: `(M,)` training classes.
        eval_labels: `(N,)` classes of the evaluated segments.
    Returns:
        Percent; NaN when either is empty.
    """
    train_labels = np.asarray(train_labels, dtype=np.int64).reshape(-1)
    eval_labels = np.asarray(eval_labels, dtype=np.int64).reshape(-1)
    if not train_labels.size or not eval_labels.size:
        return float("nan")
    classes, counts = np.unique(train_labels, return_counts=True)
    majority = classes[np.flatnonzero(counts == counts.max())]  # every class tied for most frequent
    best_constant = max(_percent(eval_labels == c) for c in majority)
    return max(best_constant, 100.0 / len(classes))


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`(K, K)` int64 counts: row = true class, column = top-1 predicted class.

    Args:
        predicted: `(N,)` predicted classes in ``[0, K)``.
        labels: `(N,)` true classes in ``[0, K)``.
        num_classes: K.
    """
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} differ in length")
    flat = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(scores: np.ndarray, labels: np.ndarray,
                       ks: Iterable[int] = (1, 5)) -> dict[int, tuple[int, ...]]:
    """Per true class: its segment count and its top-k hits (the numerators of per-class recall@k).

    Args:
        scores: `(N, K)` class scores.
        labels: `(N,)` true classes.
        ks: the k values.
    Returns:
        class -> ``(n, hits@k1, hits@k2, ...)`` for each class present in ``labels``, in class order.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    ks = tuple(int(k) for k in ks)
    ranks = rank_classes(np.asarray(scores))[:, : max(ks)]  # (N, maxk)
    hits = ranks == labels[:, None]
    out: dict[int, tuple[int, ...]] = {}
    for cls in np.unique(labels).tolist():
        rows = labels == cls
        out[int(cls)] = (int(rows.sum()), *(int(hits[rows, :k].any(axis=1).sum()) for k in ks))
    return out


def mean_class_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Mean over the classes present in ``labels`` of each class's top-k accuracy (%): every class
    counts once however many segments it has (EPIC-100's anticipation reports its top-5 form).

    Returns:
        Percent; NaN for an empty input.
    """
    counts = per_class_accuracy(scores, labels, (k,))
    if not counts:
        return float("nan")
    return float(np.mean([hits / n for n, hits in counts.values()]) * 100.0)


def group_top1(predicted: np.ndarray, labels: np.ndarray, groups: Sequence[Any]) -> dict[Any, tuple[int, float]]:
    """Top-1 accuracy per group (a participant, a video): ``group -> (segments, percent)``, groups sorted.

    Args:
        predicted: `(N,)` top-1 predictions (class ids, or action ids).
        labels: `(N,)` true ids.
        groups: `(N,)` the group of each segment.
    """
    predicted = np.asarray(predicted).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    groups = np.asarray(list(groups), dtype=object)
    if not (len(predicted) == len(labels) == len(groups)):
        raise ValueError(f"{len(predicted)} predictions, {len(labels)} labels and {len(groups)} groups")
    out = {}
    for group in sorted(set(groups.tolist()), key=str):
        rows = groups == group
        out[group] = (int(rows.sum()), _percent(predicted[rows] == labels[rows]))
    return out
