"""``predictions.parquet`` (contract): ``uid``, ``verb_logits``, ``noun_logits`` (lists of float)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.io.atomic import atomic_write


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


def write_predictions(path: str | os.PathLike, predictions: Predictions) -> Path:
    """Write ``predictions`` as a Parquet file (atomically: ``featstore.io.atomic``)."""
    path = Path(path)
    table = pa.table({
        "uid": pa.array(list(predictions.uids), pa.string()),
        "verb_logits": _list_column(predictions.verb_logits),
        "noun_logits": _list_column(predictions.noun_logits),
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
    uids = tuple(str(u) for u in table.column("uid").to_pylist())
    if len(set(uids)) != len(uids):
        raise PredictionsError(f"{path}: duplicate uids")
    return Predictions(uids, _matrix(table.column("verb_logits"), "verb_logits", path),
                       _matrix(table.column("noun_logits"), "noun_logits", path))
