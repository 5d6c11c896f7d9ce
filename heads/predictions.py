"""``predictions.parquet`` (contract): ``uid``, ``verb_logits``, ``noun_logits`` (lists of float).

What we write also carries, for people and queries (readers need only the three columns above):
``verb_class`` / ``noun_class`` (the labels, null where unknown: a test set), ``verb_top5`` /
``noun_top5`` (class ids, best first) and ``action_top5`` (``{verb, noun}`` pairs, best first, by
`heads.actions.action_scores` with the run's action prior when it has one), e.g.
``featstore query``-style DuckDB: ``select uid from 'predictions.parquet' where verb_top5[1] != verb_class``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.io.atomic import atomic_write
from heads.actions import action_scores, rank_classes

TOP_K = 5  # the ranked classes a predictions file lists (EPIC's top-5)


class PredictionsError(ValueError):
    """A predictions file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Predictions:
    """Logits of a set of segments, row-aligned."""

    uids: tuple[str, ...]
    verb_logits: np.ndarray  # (N, V) float32
    noun_logits: np.ndarray  # (N, Nn) float32

    def __post_init__(self) -> None:
        n = len(self.uids)
        if self.verb_logits.shape[0] != n or self.noun_logits.shape[0] != n:
            raise PredictionsError(
                f"{n} uids but {self.verb_logits.shape[0]} verb and {self.noun_logits.shape[0]} noun rows")

    def subset(self, uids: Sequence[str]) -> "Predictions":
        """Rows of ``uids``, in that order."""
        where = {u: i for i, u in enumerate(self.uids)}
        missing = [u for u in uids if u not in where]
        if missing:
            raise PredictionsError(f"{len(missing)} uid(s) have no prediction, e.g. {', '.join(missing[:5])}")
        rows = np.array([where[u] for u in uids], dtype=np.int64)
        return Predictions(tuple(uids), self.verb_logits[rows], self.noun_logits[rows])


def _list_column(matrix: np.ndarray) -> pa.ListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    offsets = np.arange(0, matrix.size + 1, matrix.shape[1] if matrix.ndim == 2 else 1, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1)))


def _label_column(labels: np.ndarray | None, n: int) -> pa.Array:
    if labels is None:
        return pa.nulls(n, pa.int64())
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    return pa.array(labels, pa.int64(), mask=labels < 0)  # < 0: unknown (SegmentLabels' -1)


def _ids_column(ids: np.ndarray) -> pa.ListArray:
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    offsets = np.arange(0, ids.size + 1, ids.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1)))


def write_predictions(path: str | os.PathLike, predictions: Predictions, *, verb_labels: np.ndarray | None = None,
                      noun_labels: np.ndarray | None = None, prior: np.ndarray | None = None) -> Path:
    """Write ``predictions`` as a Parquet file (atomically: ``featstore.io.atomic``), with their labels
    and top-5 classes and actions beside the logits (see the module docstring).

    Args:
        path: the file.
        predictions: the logits.
        verb_labels: `(N,)` the segments' verb classes, -1 where unknown; None: all unknown.
        noun_labels: `(N,)` noun classes, likewise.
        prior: `(V, Nn)` the action prior the top-5 actions are ranked with, or None.
    """
    path = Path(path)
    n = len(predictions.uids)
    k_verbs, k_nouns = min(TOP_K, predictions.verb_logits.shape[1]), min(TOP_K, predictions.noun_logits.shape[1])
    pairs, _ = action_scores(predictions.verb_logits, predictions.noun_logits, prior=prior)  # (N, A, 2)
    pairs = pairs[:, :TOP_K].astype(np.int64)
    offsets = np.arange(0, pairs.shape[0] * pairs.shape[1] + 1, pairs.shape[1], dtype=np.int32)
    actions = pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays(
        [pa.array(pairs[..., 0].reshape(-1), pa.int32()), pa.array(pairs[..., 1].reshape(-1), pa.int32())],
        names=["verb", "noun"]))
    table = pa.table({
        "uid": pa.array(list(predictions.uids), pa.string()),
        "verb_logits": _list_column(predictions.verb_logits),
        "noun_logits": _list_column(predictions.noun_logits),
        "verb_class": _label_column(verb_labels, n),
        "noun_class": _label_column(noun_labels, n),
        "verb_top5": _ids_column(rank_classes(predictions.verb_logits)[:, :k_verbs]),
        "noun_top5": _ids_column(rank_classes(predictions.noun_logits)[:, :k_nouns]),
        "action_top5": actions,
    })
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _matrix(column: pa.ChunkedArray, name: str, path: Path) -> np.ndarray:
    array = column.combine_chunks()
    if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type) \
            and not pa.types.is_fixed_size_list(array.type):
        raise PredictionsError(f"{path}: column {name} must be a list of floats, it is {array.type}")
    lengths = set(array.value_lengths().to_pylist()) if len(array) else {0}
    if len(lengths) != 1:
        raise PredictionsError(f"{path}: rows of {name} have different lengths {sorted(lengths)[:5]}")
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(array), lengths.pop())


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read a predictions Parquet file (ours or another codebase's with the same three columns).

    A run directory may be given instead of the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.parquet"
    if not path.is_file():
        raise PredictionsError(f"{path}: no such predictions file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise PredictionsError(f"{path}: not a readable Parquet file ({err})") from err
    missing = [c for c in ("uid", "verb_logits", "noun_logits") if c not in table.column_names]
    if missing:
        raise PredictionsError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        raise PredictionsError(f"{path}: holds no predictions (0 rows); nothing to score, fuse or submit")
    uids = tuple(str(u) for u in table.column("uid").to_pylist())
    if len(set(uids)) != len(uids):
        raise PredictionsError(f"{path}: duplicate uids")
    return Predictions(uids, _matrix(table.column("verb_logits"), "verb_logits", path),
                       _matrix(table.column("noun_logits"), "noun_logits", path))
