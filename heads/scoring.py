"""`heads score`: score any predictions file against an annotation file.

With ``action_prior_from``, the LFB action prior is counted on that file's rows *except* the
segments being scored: a segment never informs its own prior (scoring EPIC-55's validation
participants with the whole training file would otherwise count their own pairs). The metrics
object then carries an ``action_prior`` entry saying where the prior was counted and how many
scored segments were left out.

Many-shot actions are the official list intersected with the pairs of the training split whenever
that split is known: ``train_split`` / ``train_where`` select it from the annotation file, and a run
directory given as the predictions brings its own training selection. ``many_shot_actions`` in the
metrics says which list was used (``heads.evaluation``); the prior option does not change it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from heads.evaluation import ScoringError, TrainingLabels, labels_from_file, scoring_context
from heads.predictions import Predictions, PredictionsError, read_predictions

__all__ = ["score_file", "run_training_split"]


def score_file(
    predictions: str | os.PathLike | Predictions,
    annotations: str | os.PathLike,
    *,
    dataset: str | None = None,
    meta_dir: str | os.PathLike | None = None,
    action_prior_from: str | os.PathLike | None = None,
    train_split: str | None = None,
    train_where: str | None = None,
    training: TrainingLabels | None = None,
    store_path: str | os.PathLike | None = None,
    per_class: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Metrics of the predictions on the segments they contain.

    Args:
        predictions: a predictions Parquet file or run directory (or loaded ``Predictions``).
        annotations: the labelled annotation file the uids come from.
        dataset: epic55 | epic100; detected from the annotation file when None.
        meta_dir: folder with the class, many-shot, tail and unseen lists (default: the annotation's folder).
        action_prior_from: training annotations to count the LFB prior on, leaving out the predicted
            segments (none when not given).
        train_split: a named split of ``annotations`` that the predictions' model was trained on
            (``featstore.epic.splits``), ANDed with ``train_where``; its pairs restrict the many-shot actions.
        train_where: a DuckDB ``WHERE`` over the annotation columns selecting that split.
        training: that split's labels when already known (e.g. a fused run's); used when neither
            option is given. Without any of the three, a run directory's own training selection.
        store_path: that run directory's store when it is not where the run recorded it.
        per_class: also write the per-class, confusion and per-participant tables into this folder
            (`heads.class_report`); their mean class accuracies join the returned metrics.
    Returns:
        The metrics.json object: metric -> percent, ``many_shot_actions`` (EPIC-55: the list used, its
        size and source), plus ``action_prior`` (``from``, ``excluded_scored_segments``, ``counted``)
        when ``action_prior_from`` is given.
    """
    from featstore.epic.annotations import read_segments
    from featstore.epic.splits import resolve_selection

    preds = predictions if isinstance(predictions, Predictions) else read_predictions(predictions)
    table = read_segments(annotations)
    dataset = dataset or table.column("dataset")[0].as_py()
    rows = {uid: i for i, uid in enumerate(table.column("uid").to_pylist())}
    unknown = [u for u in preds.uids if u not in rows]
    if unknown:
        raise PredictionsError(f"{len(unknown)} predicted uid(s) are not in {annotations}, e.g. {', '.join(unknown[:5])}")
    index = np.array([rows[u] for u in preds.uids], dtype=np.int64)
    verbs = table.column("verb_class").to_numpy(zero_copy_only=False)[index]
    nouns = table.column("noun_class").to_numpy(zero_copy_only=False)[index]
    if np.isnan(np.asarray(verbs, dtype=float)).any() or np.isnan(np.asarray(nouns, dtype=float)).any():
        raise PredictionsError(f"{annotations} has no labels for some predicted segments (a test set?)")
    verbs, nouns = verbs.astype(np.int64), nouns.astype(np.int64)
    participants = np.asarray(table.column("participant_id").to_pylist(), dtype=object)[index].tolist()
    if train_split is not None or train_where is not None:
        try:
            where = resolve_selection(train_split, train_where)
        except ValueError as err:
            raise ScoringError(str(err)) from err
        training = labels_from_file(annotations, where=where, purpose="the training split's pairs")
    elif training is None and not isinstance(predictions, Predictions):
        training = run_training_split(predictions, store_path=store_path)
    prior_labels = None if action_prior_from is None else labels_from_file(action_prior_from, scored=preds.uids)
    context = scoring_context(dataset, meta_dir=meta_dir or Path(annotations).parent, training=training,
                              action_prior="lfb" if prior_labels is not None else "none",
                              num_verbs=preds.verb_logits.shape[1], num_nouns=preds.noun_logits.shape[1],
                              scored_verbs=verbs, scored_nouns=nouns, prior_labels=prior_labels)
    metrics: dict[str, Any] = context.score(preds.verb_logits, preds.noun_logits, verbs, nouns,
                                            participants=participants)
    metrics.update(context.records())
    if prior_labels is not None:
        metrics["action_prior"] = prior_labels.record()
    if per_class is not None:
        from heads.class_report import class_names, write_class_report

        report = write_class_report(per_class, preds, verbs, nouns, participants=participants, prior=context.prior,
                                    names=class_names(dataset, meta_dir=meta_dir, annotations=annotations))
        metrics.update({k: v for k, v in report.summary.items() if "_mean_class_" in k})
    return metrics


def run_training_split(path: str | os.PathLike, *,
                       store_path: str | os.PathLike | None = None) -> TrainingLabels | None:
    """The training selection of the run directory ``path`` (its store's labels), or None.

    None when ``path`` is not a run directory, or its store can no longer be opened: the split is then
    unknown and the many-shot record says so (``restricted_to`` null).
    """
    path = Path(path)
    from featstore.store.schema import StoreError
    from featstore.training.engine import TrainingError
    from featstore.training.run_folder import CONFIG_NAME

    if not (path.is_dir() and (path / CONFIG_NAME).is_file()):
        return None
    from heads.trainer import run_training_labels

    try:
        return run_training_labels(path, store_path=store_path)
    except (OSError, StoreError, KeyError, ValueError, TrainingError):
        return None
