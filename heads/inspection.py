"""`heads inspect RUN UID`: one segment as a trained run sees it, to check a prediction by eye.

The segment's narration, participant, video and labels come from the run's store; its logits from
the run's ``predictions.parquet`` when the segment is there (the validation selection), else from the
run's weights (`heads.trainer.predict_selection`); the top-5 verbs, nouns and actions are ranked as the
metrics rank them (actions by `heads.actions.action_scores` with the run's action prior), with
readable names from the class lists (`heads.class_report.class_names`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from featstore.store.reader import FeatureStore
from featstore.training.run_folder import CONFIG_NAME, PREDICTIONS_NAME
from heads import data as head_data
from heads.actions import action_scores, rank_classes, softmax
from heads.class_report import ClassNames, class_names
from heads.predictions import Predictions, PredictionsError, read_predictions
from heads.trainer import (
    TrainConfig,
    TrainingError,
    default_meta_dir,
    predict_selection,
    run_scoring,
    run_store,
)

__all__ = ["Ranked", "SegmentInspection", "inspect_segment"]

TOP = 5


@dataclass(frozen=True)
class Ranked:
    """One ranked answer: its class (or ``(verb, noun)``), name, score and whether it is the label."""

    rank: int
    classes: tuple[int, ...]
    name: str
    score: float
    correct: bool


@dataclass(frozen=True)
class SegmentInspection:
    """What `inspect_segment` found about one segment.

    Attributes:
        uid: the segment.
        segment: its store row (participant, video, frames, narration, labels).
        label: ``{"verb": (id, name), "noun": (id, name)}``; an id is None where unlabelled.
        top: ``verb`` / ``noun`` / ``action`` -> the top-5, best first (softmax probabilities; action
            scores as the metrics rank them).
        source: where the logits came from (the run's predictions file, or its weights).
        names: where the class names came from.
    """

    uid: str
    segment: dict[str, Any]
    label: dict[str, tuple[int | None, str]]
    top: dict[str, tuple[Ranked, ...]]
    source: str
    names: str

    def format(self) -> str:
        """The report as text, one section per task, a ``*`` marking the label."""
        row = self.segment
        lines = [f"segment    {self.uid}  ({row.get('participant_id')}, video {row.get('video_id')}, frames "
                 f"{row.get('start_frame')}-{row.get('stop_frame')})",
                 f"narration  {row.get('narration') or '-'}"]
        label = ", ".join(f"{task} {name}" + ("" if class_id is None else f" ({class_id})")
                          for task, (class_id, name) in self.label.items())
        lines.append(f"label      {label}")
        for task, ranked in self.top.items():
            lines.append(f"{task} top-{len(ranked)}:")
            for item in ranked:
                mark = "*" if item.correct else " "
                ids = ",".join(str(c) for c in item.classes)
                lines.append(f"  {mark} {item.rank}. {item.name:<30} ({ids})  {item.score:.3g}")
        lines.append(f"(logits from {self.source}; names from {self.names}; * = the label)")
        return "\n".join(lines)


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def inspect_segment(run_dir: str | os.PathLike, uid: str, *, store_path: str | os.PathLike | None = None,
                    meta_dir: str | os.PathLike | None = None, device: str | None = None,
                    log: Callable[[str], None] = head_data.default_log) -> SegmentInspection:
    """One segment's narration, label and the run's top-5 verbs, nouns and actions.

    Args:
        run_dir: a trained run.
        uid: the segment (EPIC-55 ``uid`` / EPIC-100 ``narration_id``).
        store_path: the run's store when it is not where the run recorded it.
        meta_dir: class lists for the names (default: the run's, else the store's annotation folder).
        device: where to predict when the segment is not in the run's predictions.
        log: one-line messages.
    Raises:
        TrainingError: the segment is not in the store.
    """
    run_dir = Path(run_dir)
    recorded = json.loads((run_dir / CONFIG_NAME).read_text())
    store = FeatureStore.open(run_store(run_dir, recorded, store=store_path))
    table = store.segments(f"uid = {_quoted(uid)}")
    if table.num_rows == 0:
        raise TrainingError(f"segment {uid!r} is not in {store.path}")
    segment = table.slice(0, 1).to_pylist()[0]

    predictions = None
    source = str(run_dir / PREDICTIONS_NAME)
    try:
        stored = read_predictions(run_dir / PREDICTIONS_NAME)
        if uid in stored.uids:
            predictions = stored.subset([uid])
    except PredictionsError:
        pass
    if predictions is None:
        predictions, _ = predict_selection(run_dir, store_path=store.path, where=f"uid = {_quoted(uid)}",
                                           device=device, log=log)
        source = f"the run's weights on {store.path}"

    config = TrainConfig.from_json(recorded)
    dataset = recorded.get("dataset") or "epic55"
    scoring = run_scoring(store, config, dataset=dataset, num_verbs=predictions.verb_logits.shape[1],
                          num_nouns=predictions.noun_logits.shape[1])
    names = class_names(dataset, meta_dir=meta_dir or config.meta_dir or default_meta_dir(store),
                        annotations=(store.manifest.get("provenance") or {}).get("annotations"))
    return _inspection(uid, segment, predictions, names, scoring.prior, source)


def _inspection(uid: str, segment: dict[str, Any], predictions: Predictions, names: ClassNames,
                prior: np.ndarray | None, source: str) -> SegmentInspection:
    verb, noun = segment.get("verb_class"), segment.get("noun_class")
    label = {"verb": (verb, names.name("verb", verb) if verb is not None else "unlabelled"),
             "noun": (noun, names.name("noun", noun) if noun is not None else "unlabelled")}
    top: dict[str, tuple[Ranked, ...]] = {}
    for task, logits, truth in (("verb", predictions.verb_logits, verb), ("noun", predictions.noun_logits, noun)):
        probabilities = softmax(logits.astype(np.float64))[0]
        top[task] = tuple(Ranked(rank, (int(c),), names.name(task, c), float(probabilities[c]), c == truth)
                          for rank, c in enumerate(rank_classes(logits)[0, :TOP].tolist(), start=1))
    pairs, scores = action_scores(predictions.verb_logits, predictions.noun_logits, prior=prior)  # (1, A, 2)
    top["action"] = tuple(
        Ranked(rank, (int(v), int(n)), f"{names.name('verb', v)} {names.name('noun', n)}", float(score),
               (v, n) == (verb, noun))
        for rank, ((v, n), score) in enumerate(zip(pairs[0, :TOP].tolist(), scores[0, :TOP].tolist()), start=1))
    return SegmentInspection(uid, segment, label, top, source, names.source)
