"""Scoring predictions against labels: picks the dataset's metrics, class lists and action prior.

Shared by `heads train` (each epoch), `heads eval`, `heads score` and `heads fuse`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from featstore.annotations import NUM_CLASSES
from heads.actions import lfb_action_prior
from heads.metrics import epic55_metrics, epic100_metrics
MANY_SHOT_MIN = 100  # "more than 100 training samples" (DESIGN section 6)


@dataclass(frozen=True)
class ClassSets:
    """The class lists metrics need; a stand-in for ``EpicMeta`` when no official lists are at hand."""

    dataset: str
    many_shot_verbs: frozenset = frozenset()
    many_shot_nouns: frozenset = frozenset()
    many_shot_actions: frozenset = frozenset()
    tail_verbs: frozenset = frozenset()
    tail_nouns: frozenset = frozenset()
    unseen_participants: frozenset = frozenset()
    source: str = "derived"
    extra: dict[str, Any] = field(default_factory=dict)


def many_shot_from_training(verb_labels: np.ndarray, noun_labels: np.ndarray, dataset: str) -> ClassSets:
    """Many-shot classes counted on a training selection (the DESIGN definition, for custom splits).

    Verbs / nouns with more than 100 training samples; actions whose verb and noun are both
    many-shot and which occur in training.
    """
    verbs, verb_counts = np.unique(verb_labels, return_counts=True)
    nouns, noun_counts = np.unique(noun_labels, return_counts=True)
    many_verbs = frozenset(int(v) for v, c in zip(verbs, verb_counts) if c > MANY_SHOT_MIN)
    many_nouns = frozenset(int(n) for n, c in zip(nouns, noun_counts) if c > MANY_SHOT_MIN)
    pairs = {(int(v), int(n)) for v, n in zip(verb_labels, noun_labels)}
    actions = frozenset(p for p in pairs if p[0] in many_verbs and p[1] in many_nouns)
    return ClassSets(dataset, many_verbs, many_nouns, actions, source="counted on the training selection")


def load_class_sets(meta_dir: str | os.PathLike | None, dataset: str):
    """The official lists from ``meta_dir`` (an ``EpicMeta``), or None when that folder lacks them."""
    if meta_dir is None or not Path(meta_dir).is_dir():
        return None
    from featstore.annotations import load_meta

    try:
        return load_meta(meta_dir, dataset)
    except Exception:  # noqa: BLE001 - a folder without the lists simply has none
        return None


def action_prior_for(kind: str, train_verbs: np.ndarray | None, train_nouns: np.ndarray | None,
                     num_verbs: int, num_nouns: int) -> np.ndarray | None:
    """``lfb``: P(noun | verb) counted on the training labels; ``none``: no re-weighting."""
    if kind == "none":
        return None
    if kind != "lfb":
        raise ValueError(f"unknown action prior {kind!r}; use 'lfb' or 'none'")
    if train_verbs is None or len(train_verbs) == 0:
        raise ValueError("the lfb action prior needs training labels (--action-prior-from or a training selection)")
    return lfb_action_prior(np.asarray(train_verbs), np.asarray(train_nouns), num_verbs, num_nouns)


def score(
    verb_logits: np.ndarray,
    noun_logits: np.ndarray,
    verb_labels: np.ndarray,
    noun_labels: np.ndarray,
    *,
    dataset: str,
    class_sets: Any,
    participants: Iterable[str] | None = None,
    prior: np.ndarray | None = None,
    train_pairs: set[tuple[int, int]] | None = None,
) -> dict[str, float]:
    """The metrics.json numbers of one set of predictions.

    Args:
        verb_logits: (N, V); noun_logits: (N, Nn); labels (N,).
        dataset: 'epic55' or 'epic100'.
        class_sets: ``EpicMeta`` or ``ClassSets`` (many-shot for epic55, tail/unseen for epic100).
        participants: (N,) participant ids, for the EPIC-100 unseen-participant metrics.
        prior: (V, Nn) action prior or None.
        train_pairs: (verb, noun) pairs seen in training (restricts many-shot actions).
    Returns:
        metric name -> value (percent); class-aware metrics only where their class lists are non-empty.
    """
    if dataset == "epic55":
        metrics = epic55_metrics(verb_logits, noun_logits, verb_labels, noun_labels, meta=class_sets,
                                 train_pairs=train_pairs, prior=prior)
    elif dataset == "epic100":
        unseen = np.array([p in class_sets.unseen_participants for p in (participants or [])], dtype=bool)
        if unseen.shape[0] != len(verb_labels):
            unseen = np.zeros(len(verb_labels), dtype=bool)
        metrics = epic100_metrics(verb_logits, noun_logits, verb_labels, noun_labels,
                                  tail_verbs=class_sets.tail_verbs, tail_nouns=class_sets.tail_nouns,
                                  unseen_mask=unseen, prior=prior)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; use epic55 or epic100")
    # Metrics over an empty class set or subset (no many-shot class, no tail or unseen segment) are
    # undefined: left out of metrics.json rather than written as NaN.
    return {k: float(v) for k, v in metrics.items() if not math.isnan(v)}
