"""Scoring predictions against labels: picks the dataset's metrics, class lists and action prior.

``scoring_context`` is the one place that assembles what scoring needs besides the predictions and
their labels (the dataset's class counts, the class lists, the LFB action prior and the training
pairs).

Many-shot actions have one definition for every command, whatever the prior: the official list
(``EPIC_many_shot_actions.csv``; counted lists where a folder lacks it) intersected with the
(verb, noun) pairs of the training split in use whenever that split is known (a run's training
selection; `heads score` / `heads fuse` with ``--train`` / ``--train-where``, or a run directory as
input). The prior may be counted elsewhere (``--action-prior-from``) without changing that list.
``ScoringContext.records`` says which list was used (``many_shot_actions`` in metrics.json). `heads score` calls it directly; `heads train` (each epoch), `heads eval` and `heads fuse`
through ``heads.trainer.run_scoring``, which adds a run's store and settings. `heads submit` scores
nothing: it only takes its prior's training labels from ``labels_from_file``, which reads them
from an annotation file and leaves out the segments being scored (a segment never informs its own
prior).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable

import numpy as np

from featstore.epic.metadata import NUM_CLASSES
from heads.actions import lfb_action_prior
from heads.metrics import epic55_metrics, epic100_metrics

MANY_SHOT_MIN = 100  # "more than 100 training samples" (DESIGN section 6)


class ScoringError(ValueError):
    """Scoring inputs that do not fit (an unknown dataset, a prior file without usable labels)."""


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
    from featstore.epic.metadata import load_meta

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


@dataclass(frozen=True)
class TrainingLabels:
    """The (verb, noun) labels a prior and derived class lists are counted on.

    Attributes:
        verbs: (M,) int64 verb classes.
        nouns: (M,) int64 noun classes.
        source: where they came from: an annotation file's absolute path, or ``training selection``.
        excluded: rows of the source left out because they are segments being scored.
    """

    verbs: np.ndarray
    nouns: np.ndarray
    source: str = "training selection"
    excluded: int = 0

    def __len__(self) -> int:
        return len(self.verbs)

    @property
    def pairs(self) -> frozenset[tuple[int, int]]:
        return frozenset(zip(self.verbs.tolist(), self.nouns.tolist()))

    def record(self) -> dict[str, Any]:
        """The ``action_prior`` entry of a metrics.json object: where it was counted, on how many rows."""
        return {"from": self.source, "excluded_scored_segments": int(self.excluded), "counted": len(self)}


def prior_note(record: dict[str, Any]) -> str:
    """One line for an ``action_prior`` entry: where the prior was counted, what was left out."""
    return (f"action prior: counted on {record['counted']} segment(s) of {record['from']}; "
            f"{record['excluded_scored_segments']} scored segment(s) left out (a segment never informs its own prior)")


def labels_from_file(path: str | os.PathLike, *, scored: Collection[str] = (), where: str | None = None,
                     purpose: str = "the action prior") -> TrainingLabels:
    """Training labels from an annotation file, without the rows of segments being scored.

    Scored segments must never inform their own prior: scoring EPIC-55's validation participants
    against a prior counted on the whole training file would count their own (verb, noun) pairs.

    Args:
        path: an annotation file (``featstore.epic.annotations.read_segments`` formats).
        scored: uids of the segments being scored; their rows are left out.
        where: a DuckDB ``WHERE`` over the file's segment columns selecting the training split
            (``featstore.epic.splits.resolve_selection``), or None for every row.
        purpose: what the labels are for, in messages.
    Returns:
        The remaining labels, with how many rows were left out; ``source`` names the file (and the
        selection).
    Raises:
        ScoringError: a remaining row has no label (a test file), no row remains, or a bad ``where``.
    """
    from featstore.epic.annotations import read_segments
    from featstore.epic.splits import select_segments

    table = read_segments(path)
    if where is not None:
        try:
            table = select_segments(table, where)
        except ValueError as err:
            raise ScoringError(f"{path}: {err}") from err
        if table.num_rows == 0:
            raise ScoringError(f"{path}: the training split ({where}) selects no segment")
    uids = table.column("uid").to_pylist()
    scored = set(scored)
    keep = np.array([u not in scored for u in uids], dtype=bool)
    excluded = int((~keep).sum())
    verbs = np.asarray(table.column("verb_class").to_numpy(zero_copy_only=False), dtype=float)[keep]
    nouns = np.asarray(table.column("noun_class").to_numpy(zero_copy_only=False), dtype=float)[keep]
    if np.isnan(verbs).any() or np.isnan(nouns).any():
        raise ScoringError(f"{path} has segments without verb/noun labels (a test file?); {purpose} "
                           "needs training labels")
    if not keep.any():
        raise ScoringError(
            f"{path}: every one of its {len(uids)} segments is being scored, so none is left to count "
            f"{purpose} on (scored segments never inform their own prior); give the training annotations "
            "of other segments, or no action prior")
    source = str(Path(path).resolve()) + ("" if where is None else f" where {where}")
    return TrainingLabels(verbs.astype(np.int64), nouns.astype(np.int64), source, excluded)


@dataclass(frozen=True)
class ScoringContext:
    """Everything scoring needs besides the predictions and their labels.

    Attributes:
        dataset: ``epic55`` or ``epic100``.
        num_verbs: V, the verb classes of the predictions.
        num_nouns: Nn.
        class_sets: ``EpicMeta`` (official lists) or ``ClassSets`` (counted).
        prior: (V, Nn) action prior, or None.
        train_pairs: (verb, noun) pairs of the training split in use, or None when it is not known.
        training: the training split's labels (the pairs, and any counted class lists), or None.
        prior_labels: the labels the prior was counted on when not the training split's, or None.
    """

    dataset: str
    num_verbs: int
    num_nouns: int
    class_sets: Any
    prior: np.ndarray | None = None
    train_pairs: frozenset[tuple[int, int]] | None = None
    training: TrainingLabels | None = None
    prior_labels: TrainingLabels | None = None

    def many_shot_actions(self) -> frozenset[tuple[int, int]]:
        """The many-shot actions scoring uses: the class list's, restricted to the training pairs when known."""
        listed = frozenset(getattr(self.class_sets, "many_shot_actions", frozenset()))
        return listed if self.train_pairs is None else listed & self.train_pairs

    def records(self) -> dict[str, Any]:
        """What metrics.json records about this scoring besides the numbers.

        Returns:
            For EPIC-55, ``many_shot_actions``: ``size`` (actions in the list used), ``listed`` (in the
            class list before the restriction), ``source`` (the list's), ``restricted_to`` (the
            training split whose pairs it was intersected with, or None when unknown). Empty for
            EPIC-100 (no many-shot metrics).
        """
        if self.dataset != "epic55":
            return {}
        source = getattr(self.class_sets, "source", None)
        if source is None:  # an EpicMeta: the official lists
            source = "official EPIC_many_shot_actions.csv"
        listed = frozenset(getattr(self.class_sets, "many_shot_actions", frozenset()))
        return {"many_shot_actions": {
            "size": len(self.many_shot_actions()), "listed": len(listed), "source": source,
            "restricted_to": None if self.train_pairs is None or self.training is None else
            f"the {len(self.train_pairs)} (verb, noun) pairs of {self.training.source}"}}

    def score(self, verb_logits: np.ndarray, noun_logits: np.ndarray, verb_labels: np.ndarray,
              noun_labels: np.ndarray, participants: Iterable[str] | None = None) -> dict[str, float]:
        """``score`` with this context: (N, V), (N, Nn) logits and (N,) labels -> metric -> percent."""
        return score(verb_logits, noun_logits, verb_labels, noun_labels, dataset=self.dataset,
                     class_sets=self.class_sets, participants=participants, prior=self.prior,
                     train_pairs=None if self.train_pairs is None else set(self.train_pairs))


def scoring_context(
    dataset: str,
    *,
    meta_dir: str | os.PathLike | None = None,
    training: TrainingLabels | None = None,
    action_prior: str = "lfb",
    num_verbs: int | None = None,
    num_nouns: int | None = None,
    scored_verbs: np.ndarray | None = None,
    scored_nouns: np.ndarray | None = None,
    prior_labels: TrainingLabels | None = None,
) -> ScoringContext:
    """Assemble the class lists, the action prior and the training pairs of a scoring.

    Rules, the same for every command:

    - class lists: the official ones in ``meta_dir`` when it has them; else many-shot classes counted
      on ``training``; else (no training split) counted on the scored labels;
    - many-shot actions: the list's, restricted to the pairs of ``training`` when given (never to
      the prior's labels: the definition does not depend on where the prior was counted);
    - class counts: ``num_verbs`` / ``num_nouns`` when given (the predictions' widths), else the
      official lists', else the dataset's (``NUM_CLASSES``);
    - prior: ``action_prior`` (``lfb`` or ``none``) counted on ``training``; ``prior_labels``, when
      given, are counted instead (with ``lfb``); no labels, no prior.

    Args:
        dataset: ``epic55`` or ``epic100``.
        meta_dir: folder of the class / many-shot / tail / unseen lists, or None.
        training: the training split in use (a run's training selection, or ``labels_from_file``
            with its selection), or None when it is not known.
        action_prior: ``lfb`` or ``none``.
        num_verbs: V of the predictions, if known.
        num_nouns: Nn of the predictions, if known.
        scored_verbs: (N,) labels being scored, for counted class lists without training labels.
        scored_nouns: (N,).
        prior_labels: labels to count the prior on instead of ``training`` (``--action-prior-from``).
    Returns:
        The context.
    """
    if dataset not in NUM_CLASSES:
        raise ScoringError(f"unknown dataset {dataset!r}; use epic55 or epic100")
    meta = load_class_sets(meta_dir, dataset)
    default_verbs, default_nouns = (meta.num_verbs, meta.num_nouns) if meta is not None else NUM_CLASSES[dataset]
    num_verbs = default_verbs if num_verbs is None else int(num_verbs)
    num_nouns = default_nouns if num_nouns is None else int(num_nouns)
    if meta is not None:
        class_sets = meta
    elif training is not None:
        class_sets = many_shot_from_training(training.verbs, training.nouns, dataset)
    else:
        class_sets = many_shot_from_training(np.asarray(scored_verbs if scored_verbs is not None else []),
                                             np.asarray(scored_nouns if scored_nouns is not None else []), dataset)
    train_pairs = None if training is None else training.pairs
    counted_on = prior_labels if prior_labels is not None else training
    if prior_labels is not None:
        action_prior = "lfb"
    if counted_on is None:
        if action_prior not in ("lfb", "none"):
            raise ScoringError(f"unknown action prior {action_prior!r}; use 'lfb' or 'none'")
        return ScoringContext(dataset, num_verbs, num_nouns, class_sets, None, train_pairs, training)
    try:
        prior = action_prior_for(action_prior, counted_on.verbs, counted_on.nouns, num_verbs, num_nouns)
    except ValueError as err:
        raise ScoringError(f"action prior from {counted_on.source}: {err}") from err
    return ScoringContext(dataset, num_verbs, num_nouns, class_sets, prior, train_pairs, training, prior_labels)
