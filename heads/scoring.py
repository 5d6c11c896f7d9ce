"""`heads score`: score any predictions file against an annotation file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from heads.evaluation import action_prior_for, load_class_sets, many_shot_from_training, score
from heads.predictions import Predictions, PredictionsError, read_predictions


def score_file(
    predictions: str | os.PathLike | Predictions,
    annotations: str | os.PathLike,
    *,
    dataset: str | None = None,
    meta_dir: str | os.PathLike | None = None,
    action_prior_from: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Metrics of the predictions on the segments they contain.

    Args:
        predictions: a predictions Parquet file or run directory (or loaded ``Predictions``).
        annotations: the labelled annotation file the uids come from.
        dataset: epic55 | epic100; detected from the annotation file when None.
        meta_dir: folder with the class, many-shot, tail and unseen lists (default: the annotation's folder).
        action_prior_from: training annotations to count the LFB prior on (none when not given).
    Returns:
        The metrics.json keys.
    """
    from featstore.annotations import read_segments

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
    meta = load_class_sets(meta_dir or Path(annotations).parent, dataset)
    num_verbs, num_nouns = preds.verb_logits.shape[1], preds.noun_logits.shape[1]
    prior, train_pairs = None, None
    if action_prior_from is not None:
        train = read_segments(action_prior_from)
        train_verbs = train.column("verb_class").to_numpy(zero_copy_only=False).astype(np.int64)
        train_nouns = train.column("noun_class").to_numpy(zero_copy_only=False).astype(np.int64)
        prior = action_prior_for("lfb", train_verbs, train_nouns, num_verbs, num_nouns)
        train_pairs = {(int(v), int(n)) for v, n in zip(train_verbs, train_nouns)}
    class_sets = meta if meta is not None else many_shot_from_training(verbs, nouns, dataset)
    return score(preds.verb_logits, preds.noun_logits, verbs, nouns, dataset=dataset, class_sets=class_sets,
                 participants=participants, prior=prior, train_pairs=train_pairs)
