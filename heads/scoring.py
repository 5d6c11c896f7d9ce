"""`heads score`: score any predictions file against an annotation file.

With ``action_prior_from``, the LFB action prior is counted on that file's rows *except* the
segments being scored: a segment never informs its own prior (scoring EPIC-55's validation
participants with the whole training file would otherwise count their own pairs). The metrics
object then carries an ``action_prior`` entry saying where the prior was counted and how many
scored segments were left out.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from heads.evaluation import labels_from_file, scoring_context
from heads.predictions import Predictions, PredictionsError, read_predictions

__all__ = ["score_file"]


def score_file(
    predictions: str | os.PathLike | Predictions,
    annotations: str | os.PathLike,
    *,
    dataset: str | None = None,
    meta_dir: str | os.PathLike | None = None,
    action_prior_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Metrics of the predictions on the segments they contain.

    Args:
        predictions: a predictions Parquet file or run directory (or loaded ``Predictions``).
        annotations: the labelled annotation file the uids come from.
        dataset: epic55 | epic100; detected from the annotation file when None.
        meta_dir: folder with the class, many-shot, tail and unseen lists (default: the annotation's folder).
        action_prior_from: training annotations to count the LFB prior on, leaving out the predicted
            segments (none when not given).
    Returns:
        The metrics.json object: metric -> percent, plus ``action_prior`` (``from``,
        ``excluded_scored_segments``, ``counted``) when ``action_prior_from`` is given.
    """
    from featstore.epic.annotations import read_segments

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
    training = None if action_prior_from is None else labels_from_file(action_prior_from, scored=preds.uids)
    context = scoring_context(dataset, meta_dir=meta_dir or Path(annotations).parent, training=training,
                              action_prior="lfb" if training is not None else "none",
                              num_verbs=preds.verb_logits.shape[1], num_nouns=preds.noun_logits.shape[1],
                              scored_verbs=verbs, scored_nouns=nouns)
    metrics: dict[str, Any] = context.score(preds.verb_logits, preds.noun_logits, verbs, nouns,
                                            participants=participants)
    if training is not None:
        metrics["action_prior"] = training.record()
    return metrics
