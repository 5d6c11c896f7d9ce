"""``narration-pickle``: features pickled by narration id (TA3N's EPIC-100 UDA features, C5's files).

TA3N's layout (``EPIC-KITCHENS-100_UDA_TA3N/dataset.py``): a pickle
``{'features': {modality: [n, 25, 1024]}, 'narration_ids': [...]}``, row ``i`` of every modality
belonging to ``narration_ids[i]``; the 25 rows of a segment are TBN snippet features in time order.
The retrieval challenge's (C5) split files hold the same ``features`` without ids: their rows follow
an annotation file's order (``--order``, e.g. ``EPIC_100_retrieval_train.pkl``), one row per row of it.

Each modality becomes a field ``<prefix>.<modality>`` (lower case): the ``[25, 1024]`` snippets
as they are (``--pool keep``), or their mean (``--pool mean``). The pickle is read by the
allow-listed machine of `featstore.imports.pickles`, its arrays left in the file and read a row at
a time, so a pickle larger than memory imports in bounded memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featstore.epic.annotations import read_segments
from featstore.imports.pickles import LazyArray, PickleFile
from featstore.imports.registry import PublishedSource, register_format
from featstore.imports.timing import SegmentSkipped, SegmentSpan
from featstore.store.importer import ImportFailure
from featstore.store.schema import FieldSpec, default_dtype

__all__ = ["NarrationFeatures", "open_narrations"]

POOLS = ("keep", "mean")


class NarrationFeatures(PublishedSource):
    """A narration-keyed pickle opened lazily.

    Args:
        pickle: the opened pickle.
        arrays: modality -> its ``[n, S, D]`` rows (lazy or in memory).
        rows: narration id -> row.
        pool: ``keep`` or ``mean``.
        prefix: field-name prefix.
        ids_from: where the ids came from (provenance).
    """

    def __init__(self, *, pickle: PickleFile, arrays: dict[str, Any], rows: dict[str, int], pool: str, prefix: str,
                 ids_from: str) -> None:
        self.pickle, self.arrays, self.rows, self.pool, self.prefix, self.ids_from = (
            pickle, arrays, rows, pool, prefix, ids_from)
        self.names = {modality: f"{prefix}.{modality.lower()}" for modality in arrays}
        self.fields = {}
        for modality, array in arrays.items():
            shape = tuple(int(d) for d in array.shape[1:])
            name = self.names[modality]
            self.fields[name] = FieldSpec(default_dtype(name), shape if pool == "keep" else shape[-1:])

    def describe(self) -> dict[str, Any]:
        return {
            "layout": "pickle {'features': {modality: [n, snippets, dim]}, 'narration_ids': [...]} "
                      "(TA3N dataset.py; C5 files with rows in an annotation file's order)",
            "ids": self.ids_from,
            "modalities": {m: {"shape": list(a.shape[1:]), "field": self.names[m]} for m, a in self.arrays.items()},
            "pool": self.pool,
        }

    def read(self, span: SegmentSpan) -> dict[str, np.ndarray]:
        row = self.rows.get(span.uid)
        if row is None:
            raise SegmentSkipped(f"narration id {span.uid} is not in {self.pickle.path.name} ({self.ids_from})")
        out = {}
        for modality, array in self.arrays.items():
            snippets = np.asarray(array[row], np.float32)
            pooled = self.pool == "mean" and snippets.ndim > 1
            out[self.names[modality]] = snippets.mean(axis=0) if pooled else snippets
        return out

    def close(self) -> None:
        self.pickle.close()


def _ids_in_order(order: Path) -> list[str]:
    """The segment ids of an annotation file, in the file's row order."""
    return [str(uid) for uid in read_segments(order).column("uid").to_pylist()]


@register_format("narration-pickle", description="features pickled by narration id: TA3N's {'features': "
                 "{modality: [n, 25, 1024]}, 'narration_ids'}, C5's split files",
                 source="one pickle file")
def open_narrations(source: Path, *, modalities: str = "", pool: str = "keep", order: str | None = None,
                    prefix: str = "tbn", dim: int | None = None) -> NarrationFeatures:
    """Open a narration-keyed features pickle (allow-listed: plain data only, nothing in it runs).

    Args:
        source: the pickle.
        modalities: comma-separated modalities to import (RGB, Flow, Audio for TA3N); empty: all of them.
        pool: keep (the snippets as a [snippets, dim] field) or mean (their mean, a [dim] field).
        order: an annotation file whose rows the pickle's rows follow, for files without
            'narration_ids' (C5's retrieval splits follow EPIC_100_retrieval_*.pkl).
        prefix: field names are <prefix>.<modality in lower case>.
        dim: the feature width the publisher gives (checked; default: as found).
    Raises:
        ImportFailure, PickleRefused: not such a pickle (one line naming what differs), or one that
            names anything but plain data.
    """
    if pool not in POOLS:
        raise ImportFailure(f"--pool {pool!r}: narration-pickle takes one of {', '.join(POOLS)}")
    if not source.is_file():
        raise ImportFailure(f"--from {source}: narration-pickle reads one pickle file")
    opened = PickleFile(source)
    try:
        value = opened.value
        if not isinstance(value, dict) or "features" not in value:
            found = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise ImportFailure(f"{source}: holds {found}, not TA3N's {{'features': ..., 'narration_ids': ...}}")
        features = value["features"]
        if not isinstance(features, dict):
            features = {"features": features}
        wanted = [m.strip() for m in modalities.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in features]
        if unknown:
            raise ImportFailure(f"{source}: no modality {', '.join(unknown)} (it has: {', '.join(map(str, features))})")
        arrays = {str(m): features[m] for m in (wanted or features)}
        for modality, array in arrays.items():
            if not isinstance(array, (LazyArray, np.ndarray)) or len(array.shape) < 2:
                raise ImportFailure(f"{source}: features[{modality!r}] is not an [n, snippets, dim] array")
            if dim is not None and array.shape[-1] != dim:
                raise ImportFailure(f"{source}: features[{modality!r}] are {array.shape[-1]}-d, --dim says {dim}")
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise ImportFailure(f"{source}: modalities have different row counts {sorted(counts)}")
        n = counts.pop()
        if "narration_ids" in value:
            ids, ids_from = [str(i) for i in value["narration_ids"]], "its narration_ids"
            if order is not None:
                raise ImportFailure(f"{source} names its rows (narration_ids): --order does not apply")
        elif order is not None:
            ids, ids_from = _ids_in_order(Path(order)), f"the row order of {Path(order).name}"
        else:
            raise ImportFailure(f"{source} has no 'narration_ids': pass --order, the annotation file its rows follow")
        if len(ids) != n:
            raise ImportFailure(f"{source}: {n} feature rows but {len(ids)} ids ({ids_from})")
        rows = {uid: i for i, uid in enumerate(ids)}
        return NarrationFeatures(pickle=opened, arrays=arrays, rows=rows, pool=pool, prefix=prefix, ids_from=ids_from)
    except BaseException:
        opened.close()
        raise
