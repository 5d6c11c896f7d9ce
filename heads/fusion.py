"""`heads fuse`: late fusion of several runs' (or predictions files') logits into one run-like folder.

Fusion is over the segments every input has, in the first input's order, with weights normalised to
sum 1 (equal by default):

- ``how="probs"`` (default): the weighted mean of each input's softmax probabilities,
  ``p = sum_i w_i softmax(l_i)``, stored as natural-log probabilities ``log p`` in the
  ``verb_logits`` / ``noun_logits`` columns. ``softmax(log p) == p``, so everything downstream that
  treats the columns as logits (top-k, action scores, the LFB prior, submissions) sees exactly the
  fused distribution. Fusing a run with itself gives the run's log-softmax: the same rankings and
  metrics, not the same numbers.
- ``how="logits"``: the weighted mean of the logits, ``sum_i w_i l_i``. Fusing a run with itself
  gives back its logits exactly (the sum is taken in float64).

Weights ``1, 0`` give the first input (exactly, for ``logits``; its log-softmax, for ``probs``).
Swapping inputs of equal weight changes nothing for two inputs (float addition commutes); with more
inputs the float64 sums may differ in the last bits before the cast to float32.

The output folder holds ``predictions.parquet``, ``fusion.json`` (inputs, weights, how, where labels
came from) and, where labels exist, ``metrics.json`` with the keys a run's has. Labels come from
``annotations`` when given (scored like ``heads score``), else from the first input that is a run
directory: its store, dataset, class lists and action prior (counted on its training selection), so
the metrics of a run fused with itself equal the run's own. A fused folder can itself be an input.

Many-shot actions are restricted to the pairs of the training split whenever it is known: the one
``train_split`` / ``train_where`` select from ``annotations``, else the first input run's training
selection; the prior option never changes them (``heads.evaluation``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featstore.io.atomic import atomic_write_json
from heads import data as head_data
from heads.evaluation import labels_from_file, prior_note
from heads.predictions import Predictions, read_predictions, write_predictions

__all__ = ["FusionError", "FusionResult", "FUSION_MODES", "parse_weights", "fuse_predictions", "fuse",
           "score_like_run", "comparison_table"]

FUSION_MODES = ("probs", "logits")


class FusionError(ValueError):
    """Inputs that cannot be fused (no shared segments, different class counts, bad weights)."""


@dataclass(frozen=True)
class FusionResult:
    """What ``fuse`` wrote.

    Attributes:
        predictions: the fused predictions (shared segments, the first input's order).
        metrics: the metrics.json object (with ``action_prior`` when counted from a file), or None
            where no labels were found.
        out: the output folder.
        label_source: where the labels came from (``fusion.json``'s ``label_source``), or None.
        inputs: each input and its metrics on the same segments, scored the same way (None where
            there are no labels), to compare the fusion with what it fused.
    """

    predictions: Predictions
    metrics: dict[str, Any] | None
    out: Path
    label_source: dict[str, Any] | None
    inputs: tuple[tuple[str, dict[str, Any] | None], ...] = ()


def parse_weights(text: str | Sequence[float] | None, n_inputs: int) -> np.ndarray:
    """Weights of ``n_inputs`` inputs, normalised to sum 1.

    Args:
        text: ``"w1,w2,..."``, a sequence of numbers, or None for equal weights.
        n_inputs: how many inputs there are.
    Returns:
        ``(n_inputs,)`` float64 summing to 1.
    """
    if text is None:
        return np.full(n_inputs, 1.0 / n_inputs)
    if isinstance(text, str):
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise FusionError(f"weights must be comma-separated numbers, got {text!r}") from None
    else:
        values = [float(v) for v in text]
    weights = np.asarray(values, dtype=np.float64)
    if len(weights) != n_inputs:
        raise FusionError(f"{len(weights)} weight(s) for {n_inputs} input(s); give one weight per input")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise FusionError(f"weights must be finite and non-negative, got {values}")
    if weights.sum() <= 0:
        raise FusionError("weights sum to 0; at least one input needs a positive weight")
    return weights / weights.sum()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _fuse_matrix(matrices: Sequence[np.ndarray], weights: np.ndarray, how: str) -> np.ndarray:
    """Fuse ``(N, K)`` float32 matrices; float64 inside, float32 out."""
    if how == "logits":
        fused = np.zeros(matrices[0].shape, dtype=np.float64)
        for weight, matrix in zip(weights, matrices):
            if weight:  # a zero weight drops the input (0 * inf would be NaN)
                fused += weight * matrix.astype(np.float64)
        return fused.astype(np.float32)
    probs = np.zeros(matrices[0].shape, dtype=np.float64)
    for weight, matrix in zip(weights, matrices):
        if weight:
            probs += weight * np.exp(_log_softmax(matrix.astype(np.float64)))
    # Probabilities that underflow to 0 get the smallest float64 instead of log(0) = -inf.
    return np.log(np.maximum(probs, np.finfo(np.float64).tiny)).astype(np.float32)


def fuse_predictions(inputs: Sequence[Predictions], *, weights: str | Sequence[float] | None = None,
                     how: str = "probs") -> Predictions:
    """Fuse predictions over the segments they share (see the module docstring).

    Args:
        inputs: two or more (one is allowed: it is just converted) predictions.
        weights: one per input, normalised to sum 1; None for equal weights.
        how: ``probs`` or ``logits``.
    Returns:
        The fused predictions, rows in the first input's order.
    """
    if how not in FUSION_MODES:
        raise FusionError(f"unknown fusion {how!r}; use one of {', '.join(FUSION_MODES)}")
    if not inputs:
        raise FusionError("nothing to fuse: give at least one input")
    w = parse_weights(weights, len(inputs))
    shapes = {(p.verb_logits.shape[1], p.noun_logits.shape[1]) for p in inputs}
    if len(shapes) != 1:
        listed = ", ".join(f"#{i + 1}: {p.verb_logits.shape[1]} verbs / {p.noun_logits.shape[1]} nouns"
                           for i, p in enumerate(inputs))
        raise FusionError(f"inputs have different class counts ({listed}); fuse predictions of one dataset")
    shared = set(inputs[0].uids)
    for other in inputs[1:]:
        shared &= set(other.uids)
    if not shared:
        raise FusionError("the inputs share no segment (no uid is in all of them)")
    uids = [u for u in inputs[0].uids if u in shared]
    aligned = [p if p.uids == tuple(uids) else p.subset(uids) for p in inputs]
    return Predictions(tuple(uids), _fuse_matrix([p.verb_logits for p in aligned], w, how),
                       _fuse_matrix([p.noun_logits for p in aligned], w, how))


def _label_source(path: Path) -> dict[str, Any] | None:
    """Where an input's labels can be found: a run directory, or what a fused folder recorded."""
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        recorded = json.loads((path / "config.json").read_text())
        if recorded.get("store"):
            return {"kind": "run", "path": str(path.resolve())}
    if (path / "fusion.json").is_file():
        return json.loads((path / "fusion.json").read_text()).get("label_source")
    return None


def score_like_run(predictions: Predictions, run_dir: str | os.PathLike, *,
                   action_prior_from: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Score predictions the way run ``run_dir`` scores its validation predictions.

    Same store labels, dataset, class lists (its meta_dir or the store's annotation folder, else
    counted on its training selection) and action prior (counted on its training selection, or on
    ``action_prior_from`` without the scored segments), so predictions equal to the run's own give
    the run's metrics.

    Args:
        predictions: the predictions to score (any segments of the run's store).
        run_dir: a run directory (config.json with the store).
        action_prior_from: training annotations to count the LFB prior on instead; the predicted
            segments' rows are left out (``heads.evaluation.labels_from_file``).
    Returns:
        The metrics (with an ``action_prior`` entry when ``action_prior_from`` is given), or None when
        some predicted segment is not in the run's store or has no label there (a test set).
    """
    from featstore.store.reader import FeatureStore
    from heads.trainer import TrainConfig, run_scoring, run_store

    recorded = json.loads((Path(run_dir) / "config.json").read_text())
    config = TrainConfig.from_json(recorded)
    store = FeatureStore.open(run_store(run_dir, recorded))
    labels = head_data.selection_labels(store, None)
    rows = {uid: i for i, uid in enumerate(labels.uids)}
    if any(u not in rows for u in predictions.uids):
        return None  # predictions of another store's segments: the run's store has no labels for them
    index = np.array([rows[u] for u in predictions.uids], dtype=np.int64)
    verbs, nouns = labels.verb.numpy()[index], labels.noun.numpy()[index]
    if (verbs < 0).any() or (nouns < 0).any():
        return None
    participants = np.asarray(labels.table.column("participant_id").to_pylist(), dtype=object)[index].tolist()
    training = None if action_prior_from is None else labels_from_file(action_prior_from, scored=predictions.uids)
    try:
        context = run_scoring(store, config, dataset=recorded.get("dataset"), training=training,
                              num_verbs=predictions.verb_logits.shape[1], num_nouns=predictions.noun_logits.shape[1])
    except ValueError as err:
        raise FusionError(f"{run_dir}: {err}") from err
    metrics: dict[str, Any] = context.score(predictions.verb_logits, predictions.noun_logits, verbs, nouns,
                                            participants=participants)
    metrics.update(context.records())
    if training is not None:
        metrics["action_prior"] = training.record()
    return metrics


def fuse(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: str | Sequence[float] | None = None,
    how: str = "probs",
    annotations: str | os.PathLike | None = None,
    dataset: str | None = None,
    meta_dir: str | os.PathLike | None = None,
    action_prior_from: str | os.PathLike | None = None,
    train_split: str | None = None,
    train_where: str | None = None,
    log: Callable[[str], None] = head_data.default_log,
) -> FusionResult:
    """``heads fuse`` as a Python call: fuse run directories or predictions files into ``out``.

    Args:
        inputs: run directories, fused folders or predictions Parquet files.
        out: the folder to write (created; its predictions/metrics are replaced).
        weights: one per input (normalised); None for equal weights.
        how: ``probs`` or ``logits`` (see the module docstring).
        annotations: labelled annotation file to score on; default: the first input run's store.
        dataset: epic55 | epic100 for ``annotations`` (default: from the file).
        meta_dir: class / many-shot / tail lists for ``annotations`` (default: its folder).
        action_prior_from: training annotations to count the LFB action prior on.
        train_split: the named training split of ``annotations`` the inputs were trained on (its pairs
            restrict the many-shot actions); default: the first input run's training selection.
        train_where: a DuckDB WHERE over the annotation columns selecting that split.
        log: one-line messages.
    Returns:
        The fused predictions and metrics (None without labels).
    """
    paths = [Path(p) for p in inputs]
    loaded = [read_predictions(p) for p in paths]
    fused = fuse_predictions(loaded, weights=weights, how=how)
    for path, predictions in zip(paths, loaded):
        if len(predictions.uids) != len(fused.uids):
            log(f"{path}: {len(predictions.uids) - len(fused.uids)} of its {len(predictions.uids)} segments are "
                f"not in every input and are left out")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.parquet", fused)

    source: dict[str, Any] | None = None
    scorer: Callable[[Predictions], dict[str, Any] | None] | None = None
    if annotations is not None:
        from heads.scoring import run_training_split, score_file

        source = {"kind": "annotations", "path": str(Path(annotations).resolve()), "dataset": dataset,
                  "meta_dir": None if meta_dir is None else str(Path(meta_dir).resolve()),
                  "action_prior_from": None if action_prior_from is None else str(Path(action_prior_from).resolve()),
                  "train_split": train_split, "train_where": train_where}
        runs = [s["path"] for s in (_label_source(p) for p in paths) if s is not None and s["kind"] == "run"]
        training = run_training_split(runs[0]) if runs and train_split is None and train_where is None else None

        def scorer(predictions: Predictions) -> dict[str, Any] | None:
            return score_file(predictions, annotations, dataset=dataset, meta_dir=meta_dir,
                              action_prior_from=action_prior_from, train_split=train_split, train_where=train_where,
                              training=training)
    else:
        source = next((s for s in (_label_source(p) for p in paths) if s is not None), None)
        if source is not None and source["kind"] == "run":
            def scorer(predictions: Predictions) -> dict[str, Any] | None:
                return score_like_run(predictions, source["path"], action_prior_from=action_prior_from)
        elif source is not None and source["kind"] == "annotations":
            from heads.scoring import score_file

            def scorer(predictions: Predictions) -> dict[str, Any] | None:
                return score_file(predictions, source["path"], dataset=source.get("dataset"),
                                  meta_dir=source.get("meta_dir"),
                                  action_prior_from=action_prior_from or source.get("action_prior_from"),
                                  train_split=train_split or source.get("train_split"),
                                  train_where=train_where or source.get("train_where"))
    metrics = scorer(fused) if scorer is not None else None
    # Each input on exactly the fused segments, scored the same way: what the fusion gained.
    inputs = tuple((str(path), scorer(p if p.uids == fused.uids else p.subset(fused.uids))
                    if metrics is not None else None) for path, p in zip(paths, loaded))
    metrics_path = out / "metrics.json"
    if metrics is not None and "action_prior" in metrics:
        log(prior_note(metrics["action_prior"]))
    if metrics is not None:
        atomic_write_json(metrics_path, metrics)
    else:
        metrics_path.unlink(missing_ok=True)  # a stale file from an earlier fusion would mislead
        log("no labels for the fused segments (pass --annotations to score them); wrote predictions only")
    w = parse_weights(weights, len(paths))
    atomic_write_json(out / "fusion.json", {
        "inputs": [str(p.resolve()) for p in paths], "weights": [float(x) for x in w], "how": how,
        "n_segments": len(fused.uids), "label_source": source if metrics is not None else None,
        "input_metrics": [m for _, m in inputs],
    })
    return FusionResult(fused, metrics, out, source if metrics is not None else None, inputs)


def comparison_table(result: FusionResult) -> str:
    """The inputs' metrics and the fused ones on the same segments, one row each (Table 1's columns).

    Returns:
        A plain text table; empty when there are no labels.
    """
    from heads.metric_registry import table_metrics

    rows = [(name, metrics) for name, metrics in result.inputs] + [("fused", result.metrics)]
    if result.metrics is None:
        return ""
    columns = [m for m in table_metrics() if any(values is not None and m.key in values for _, values in rows)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}" + "".join(f"{m.label:>18}" for m in columns)]
    for name, values in rows:
        cells = "".join(f"{m.format(values[m.key]):>18}" if values is not None and m.key in values else f"{'-':>18}"
                        for m in columns)
        lines.append(f"{name:<{width}}{cells}")
    lines.append(f"(each on the {len(result.predictions.uids)} fused segments, scored the same way)")
    return "\n".join(lines)
