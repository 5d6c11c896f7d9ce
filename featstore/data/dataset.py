"""`StoreDataset`: a store's segments as a ``torch.utils.data.Dataset``, for your own training loops.

The heads' trainer reads stores through ``heads.data`` (whole batches gathered on the device); this
is the plain, general path: item ``i`` is a dict of the chosen fields of one segment and its labels,
so the default ``DataLoader`` collation stacks them into batches. Two ways to read:

- ``preload=True``: every selected tensor is read at construction, one pass per field (what a
  selection that fits in memory wants: items are then array slices);
- ``preload=False`` (streaming): each item, or each batch the ``DataLoader`` asks for at once
  (``__getitems__``), is read from LMDB when it is asked for, in one read transaction per shard.

Worker-safe: a store opens its LMDB environments lazily, once per process (a forked ``DataLoader``
worker drops its parent's and opens its own: ``featstore.store.environments``), so the dataset can
be handed to any number of workers, forked or spawned.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from featstore.store.reader import FeatureStore
from featstore.store.schema import FIRST_VIEW, STATUS_OK, FieldSpec, StoreError, view_key

__all__ = ["DEFAULT_LABELS", "StoreDataset"]

DEFAULT_LABELS = ("verb_class", "noun_class")  # index columns returned with every item
UID_KEY = "uid"  # the item key of the segment's uid
READ_AHEAD_SHARE = 0.5  # a preload reading at least this share of the store's files turns readahead on


class StoreDataset(torch.utils.data.Dataset):
    """The stored segments of a selection, one item each: ``{field: tensor, label: tensor, "uid": str}``.

    Args:
        store: a `FeatureStore` or the path of one.
        fields: the fields to read (default: every complete field of the store).
        where: a DuckDB WHERE expression over the segment columns (e.g. ``"participant_id = 'P01'"``).
        split: a named split (``epic55-lfb-train``, ...), ANDed with ``where``.
        labels: index columns returned with each item: integer columns as int64 scalars (-1 where the
            store has no label: test sets), other columns as they are (strings).
        view: the temporal view to read in a store built with views (``featstore build --views K``;
            0: the centre clip, what evaluation reads); a store without views holds view 0 only.
        preload: read every tensor at construction (True) or each item when it is asked for (False).
        dtype: the dtype of floating fields (default float32; None keeps the store's float16).
    Raises:
        StoreError: a bad selection, unknown fields, or a view the store cannot read.
    """

    def __init__(self, store: FeatureStore | str | os.PathLike, fields: Iterable[str] | None = None, *,
                 where: str | None = None, split: str | None = None, labels: Sequence[str] = DEFAULT_LABELS,
                 view: int = FIRST_VIEW, preload: bool = False, dtype: torch.dtype | None = torch.float32):
        self.store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.fields: dict[str, FieldSpec] = self._chosen_fields(fields)
        self.view = int(view)
        if self.view < FIRST_VIEW:
            raise StoreError(f"view {self.view}: views count from {FIRST_VIEW} (the centre clip)")
        table = self.store.segments(where, split=split, status=STATUS_OK, view=self.view)
        if self.view != FIRST_VIEW and not table.num_rows and self.store.max_views <= self.view:
            raise StoreError(f"{self.store.path} holds {self.store.max_views} view(s) per segment at most "
                             f"(views 0 .. {self.store.max_views - 1}); asked for view {self.view}")
        self.uids: list[str] = table.column("uid").to_pylist()
        # What the tensors are read under: the uid for view 0, its view key after (schema.view_key).
        self.keys: list[str] = [view_key(uid, self.view) for uid in self.uids]
        self.label_names = tuple(labels)
        self.labels = {name: _label_column(table, name, self.store) for name in self.label_names}
        self.dtype = dtype
        self.preloaded: dict[str, np.ndarray] | None = None
        if preload:
            with self.store.read_ahead(self.store.share_of_files(len(self.uids), self.fields) >= READ_AHEAD_SHARE):
                self.preloaded = {name: self.store.read_field(self.keys, name) for name in self.fields}
        else:
            self.store.load_index()  # once here: forked workers inherit it instead of each querying the index

    def _chosen_fields(self, fields: Iterable[str] | None) -> dict[str, FieldSpec]:
        available = self.store.complete_fields
        if fields is None:
            return dict(sorted(available.items()))
        if isinstance(fields, str):
            fields = [fields]
        chosen = list(dict.fromkeys(fields))
        missing = [name for name in chosen if name not in available]
        if missing:
            raise StoreError(f"{self.store.path} has no complete field(s) {', '.join(missing)}; it holds "
                             f"{', '.join(sorted(available))}")
        return {name: available[name] for name in chosen}

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.preloaded is not None:
            arrays = {name: values[index] for name, values in self.preloaded.items()}
        else:
            arrays = {name: values[0] for name, values in
                      self.store.read_fields([self.keys[index]], list(self.fields)).items()}
        return self._item(index, arrays)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The items of a whole batch (what a ``DataLoader`` asks for): streaming reads them in one
        read transaction per shard instead of one per item."""
        indices = [int(i) for i in indices]
        if self.preloaded is not None:
            return [self[i] for i in indices]
        read = self.store.read_fields([self.keys[i] for i in indices], list(self.fields))
        return [self._item(i, {name: values[row] for name, values in read.items()})
                for row, i in enumerate(indices)]

    def _item(self, index: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        item: dict[str, Any] = {name: self._field_tensor(array) for name, array in arrays.items()}
        for name, values in self.labels.items():
            item[name] = values[index]
        item[UID_KEY] = self.uids[index]
        return item

    def _field_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(array))  # a copy: stored arrays may be read-only views
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor


def _label_column(table: pa.Table, name: str, store: FeatureStore) -> Sequence[Any]:
    """One index column of the selection: int64 tensors (null -> -1) for integers, else Python values."""
    if name not in table.column_names:
        raise StoreError(f"{store.path}: no index column {name!r}; the columns are {', '.join(table.column_names)}")
    column = table.column(name)
    if pa.types.is_integer(column.type):
        return torch.from_numpy(column.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
    return column.to_pylist()
