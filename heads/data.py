"""Feature loading for the head trainer: preload once, batch by indexing.

The fields a head needs are read from the store once into tensors on the training device, kept in
float16 and cast to float32 per batch; a batch is a gather by index, with no per-sample Python on
the hot path. Derived inputs are computed once here too: slot masks from detection scores and the
local-alignment features (RoIAlign of the time-averaged ``verb.map`` at the ``det.local`` boxes).

When the selection does not fit the memory budget, ``StreamingFeatures`` reads each batch from
LMDB in DataLoader worker processes instead (same batches, same order, slower).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from featstore.allocator import keep_freed_memory
from featstore.schema import (
    DET_GLOBAL_FEAT,
    DET_GLOBAL_SCORE,
    DET_LOCAL_BOX,
    DET_LOCAL_FEAT,
    DET_LOCAL_SCORE,
    NOUN_GLOBAL,
    STATUS_OK,
    VERB_GLOBAL,
    VERB_MAP,
)
from featstore.store import FeatureStore
from heads.local_alignment import pool_local_verb_features

# Store field -> batch key the heads read.
FIELD_KEYS = {
    VERB_GLOBAL: "verb_global",
    NOUN_GLOBAL: "noun_global",
    DET_GLOBAL_FEAT: "det_global_feat",
    DET_LOCAL_FEAT: "det_local_feat",
}
# Batch keys derived at load time from other fields.
DERIVED = {
    DET_GLOBAL_SCORE: "det_global_valid",
    DET_LOCAL_SCORE: "det_local_valid",
}
LOCAL_CHUNK = 256  # segments per RoIAlign chunk: bounds the float32 verb.map held at once


@dataclass(frozen=True)
class SegmentLabels:
    """Labels and ids of a selection, in order (label -1 where the store has none)."""

    uids: tuple[str, ...]
    verb: torch.Tensor  # (N,) int64
    noun: torch.Tensor  # (N,) int64
    table: pa.Table  # the segment rows, same order

    @property
    def labelled(self) -> bool:
        return bool((self.verb >= 0).all() and (self.noun >= 0).all())


def selection_labels(store: FeatureStore, where: str | None) -> SegmentLabels:
    """The stored (ok) segments matching ``where``, in uid order, with their labels."""
    table = store.segments(where, status=STATUS_OK)
    verb = table.column("verb_class").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    noun = table.column("noun_class").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return SegmentLabels(tuple(table.column("uid").to_pylist()), torch.from_numpy(verb),
                         torch.from_numpy(noun), table)


def batch_keys(fields: Iterable[str]) -> list[str]:
    """The batch keys a head gets for the store fields it declared."""
    fields = set(fields)
    keys = [FIELD_KEYS[f] for f in FIELD_KEYS if f in fields]
    keys += [DERIVED[f] for f in DERIVED if f in fields]
    if VERB_MAP in fields and DET_LOCAL_BOX in fields:
        keys.append("verb_local")
    return keys


def estimate_bytes(store: FeatureStore, fields: Iterable[str], n: int) -> int:
    """Bytes the preloaded tensors of ``n`` segments take (float16 features, bool masks)."""
    total = 0
    fields = set(fields)
    for field in fields:
        spec = store.fields[field]
        if field in FIELD_KEYS:
            total += 2 * math.prod(spec.shape)
        elif field in DERIVED:
            total += math.prod(spec.shape)
    if VERB_MAP in fields and DET_LOCAL_BOX in fields:
        total += 2 * store.fields[DET_LOCAL_BOX].shape[0] * store.fields[VERB_MAP].shape[0]
    return total * n


def _segment_tensors(store: FeatureStore, uids: Sequence[str], fields: set[str], *, pool: str,
                     output_size: int) -> dict[str, torch.Tensor]:
    """Read and derive the batch tensors of ``uids`` (CPU; features float16, masks bool)."""
    out: dict[str, torch.Tensor] = {}
    for field, key in FIELD_KEYS.items():
        if field in fields:
            out[key] = torch.from_numpy(store.read_field(uids, field).astype(np.float16, copy=False))
    for field, key in DERIVED.items():
        if field in fields:
            # Padded slots carry score 0 (DESIGN section 3): that is the mask.
            out[key] = torch.from_numpy(store.read_field(uids, field) > 0)
    if VERB_MAP in fields and DET_LOCAL_BOX in fields:
        local = []
        for start in range(0, len(uids), LOCAL_CHUNK):
            chunk = uids[start:start + LOCAL_CHUNK]
            verb_map = torch.from_numpy(store.read_field(chunk, VERB_MAP)).float()  # (n, C, T, H, W)
            boxes = torch.from_numpy(store.read_field(chunk, DET_LOCAL_BOX)).float()  # (n, K, 4)
            local.append(pool_local_verb_features(verb_map, boxes, output_size=output_size, pool=pool).half())
        out["verb_local"] = torch.cat(local) if local else torch.empty(0)
    return out


def chunk_order(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of row numbers (the last may be short)."""
    return list(torch.split(order, batch_size))


class PreloadedFeatures:
    """Every needed tensor of a selection, resident on ``device``; batches are index gathers."""

    mode = "preload"

    def __init__(self, store: FeatureStore, labels: SegmentLabels, fields: Iterable[str], *,
                 device: torch.device | str = "cpu", pool: str = "avg", output_size: int = 7):
        self.labels = labels
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # every batch is a fresh CPU allocation: see featstore/allocator.py
        cpu = _segment_tensors(store, list(labels.uids), set(fields), pool=pool, output_size=output_size)
        self.tensors = {k: v.to(self.device) for k, v in cpu.items()}
        self.verb = labels.verb.to(self.device)
        self.noun = labels.noun.to(self.device)

    def __len__(self) -> int:
        return len(self.labels.uids)

    def batch(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Gather rows ``index`` (on any device); features come back float32."""
        index = index.to(self.device)
        # index_select, not v[index]: advanced indexing goes through a generic gather kernel that is
        # several times slower on CPU for these wide rows (benchmarks/README.md, train_data_path).
        batch = {k: _gather(v, index) for k, v in self.tensors.items()}
        return batch, self.verb.index_select(0, index), self.noun.index_select(0, index)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
        return self.batches_of(chunk_order(order, batch_size))

    def batches_of(self, chunks: Sequence[torch.Tensor]) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
        """One batch per chunk of row numbers."""
        for rows in chunks:
            yield self.batch(rows)


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``values``; float16 features come back float32."""
    rows = values.index_select(0, index)
    return rows.float() if rows.dtype == torch.float16 else rows


class _BatchReader(torch.utils.data.Dataset):
    """Reads one whole batch (a list of row numbers) from LMDB; runs in DataLoader workers."""

    def __init__(self, store: FeatureStore, uids: Sequence[str], fields: set[str], pool: str, output_size: int):
        self.store, self.uids, self.fields, self.pool, self.output_size = store, list(uids), fields, pool, output_size

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        uids = [self.uids[i] for i in rows]
        return _segment_tensors(self.store, uids, self.fields, pool=self.pool, output_size=self.output_size)


class StreamingFeatures:
    """Same interface as ``PreloadedFeatures`` for selections larger than memory: reads per batch."""

    mode = "stream"

    def __init__(self, store: FeatureStore, labels: SegmentLabels, fields: Iterable[str], *,
                 device: torch.device | str = "cpu", pool: str = "avg", output_size: int = 7, workers: int = 2):
        self.labels = labels
        self.device = torch.device(device)
        self.reader = _BatchReader(store, labels.uids, set(fields), pool, output_size)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.labels.uids)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
        return self.batches_of(chunk_order(order, batch_size))

    def batches_of(self, chunks: Sequence[torch.Tensor]) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
        """One batch per chunk of row numbers, read ahead by the worker processes."""
        chunks = [c.tolist() for c in chunks]
        loader = torch.utils.data.DataLoader(
            self.reader, batch_size=None, sampler=chunks, num_workers=self.workers,
            persistent_workers=False, prefetch_factor=4 if self.workers else None,
        )
        for rows, tensors in zip(chunks, loader):
            index = torch.tensor(rows, dtype=torch.long)
            batch = {k: (v.to(self.device).float() if v.dtype == torch.float16 else v.to(self.device))
                     for k, v in tensors.items()}
            yield batch, self.labels.verb[index].to(self.device), self.labels.noun[index].to(self.device)


def load_features(store: FeatureStore, labels: SegmentLabels, fields: Iterable[str], *,
                  device: torch.device | str = "cpu", memory_budget: int | None = None, pool: str = "avg",
                  output_size: int = 7, workers: int = 2, log=None):
    """Preload when the selection fits ``memory_budget`` bytes (None: always), else stream.

    Returns:
        ``PreloadedFeatures`` or ``StreamingFeatures``; ``.mode`` says which.
    """
    fields = list(fields)
    need = estimate_bytes(store, fields, len(labels.uids))
    if memory_budget is not None and need > memory_budget:
        features = StreamingFeatures(store, labels, fields, device=device, pool=pool, output_size=output_size,
                                     workers=workers)
    else:
        features = PreloadedFeatures(store, labels, fields, device=device, pool=pool, output_size=output_size)
    if log is not None:
        log(f"data: {features.mode} mode for {len(labels.uids)} segments "
            f"({need / 2**20:.1f} MiB of features{'' if memory_budget is None else f', budget {memory_budget / 2**20:.0f} MiB'})")
    return features


def default_memory_budget(device: str | torch.device) -> int:
    """Half the memory free now on ``device`` (train and validation tensors share it)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not every platform reports it
        return 8 * 2**30
    return free // 2


def default_log(message: str) -> None:
    print(message, file=sys.stderr)
