"""Feature loading for the head trainer: preload once, batch by indexing.

The fields a head needs are read from the store once into tensors on the training device, kept in
float16 and cast to float32 per batch; a batch is a gather by index, with no per-sample Python on
the hot path. Derived inputs are computed once here too: slot masks from detection scores and, for
heads that need the local-alignment features ``verb_local``, the store's ``verb.local`` when it has
it, else ``verb.map`` (or ``verb.map_tmean``) RoI-pooled at the ``det.local`` boxes by the same
function that made ``verb.local`` (``featstore.store.local_pool``). A stored ``verb.local`` pooled
otherwise than the run asks (``pool``) is not used silently: the map is pooled instead when the
store has one, and the run is refused when it has not (``plan_local``). A field that is not one of
the store's canonical fields (an imported set's ``rulstm.rgb``, ``actionformer.slowfast``) is read as
it is, under its own name as the batch key (``named_fields``), for heads that name their fields.

Temporal views (docs/views.md): with ``views=True`` the features hold every stored view of each
segment, segment-major (``ViewIndex``: segment i's views are rows ``first[i] .. first[i] + count[i] - 1``),
and a batch is a gather of the rows the trainer drew (``ViewIndex.rows``): a view is read by its
index, never copied into a per-epoch array. Without, a segment is its view 0, one row each, as a
store without views.

When the selection does not fit the memory budget, ``StreamingFeatures`` reads each batch from
LMDB instead (same batches, same order), by reader threads running several batches ahead of the
trainer in the epoch's shuffled order, each batch in one LMDB transaction per shard.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from featstore.io.allocator import keep_freed_memory
from featstore.store.local_pool import (
    LOCAL_BOXES,
    LOCAL_FIELD,
    LOCAL_OUTPUT_SIZE,
    MAP_FIELD,
    LocalRecipeError,
    check_local_recipe,
    local_source,
    pool_local_verb_features,
)
from featstore.store.reader import FeatureStore
from featstore.store.schema import (
    CANONICAL_FIELDS,
    DET_GLOBAL_FEAT,
    DET_GLOBAL_SCORE,
    DET_LOCAL_FEAT,
    DET_LOCAL_SCORE,
    NOUN_GLOBAL,
    STATUS_OK,
    VERB_GLOBAL,
    view_key,
)

# Store field -> batch key the heads read.
FIELD_KEYS = {
    VERB_GLOBAL: "verb_global",
    NOUN_GLOBAL: "noun_global",
    DET_GLOBAL_FEAT: "det_global_feat",
    DET_LOCAL_FEAT: "det_local_feat",
}
LOCAL_KEY = "verb_local"  # (B, N, Cv): from the store's verb.local, or pooled from its map at load time
# Batch keys derived at load time from other fields.
DERIVED = {
    DET_GLOBAL_SCORE: "det_global_valid",
    DET_LOCAL_SCORE: "det_local_valid",
}
LOCAL_CHUNK = 256  # segments per RoIAlign chunk: bounds the float32 verb.map held at once
READ_AHEAD_SHARE = 0.5  # a preload reading at least this share of the store's files turns readahead on


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


@dataclass(frozen=True)
class ViewIndex:
    """Where each segment's temporal views lie among a feature set's rows (segment-major).

    Attributes:
        first: (N,) int64, the row of each segment's view 0.
        counts: (N,) int64, its number of views (all 1 without views).
        keys: the store key of every row (``view_key(uid, view)``).
    """

    first: torch.Tensor
    counts: torch.Tensor
    keys: tuple[str, ...]

    @classmethod
    def of(cls, store: FeatureStore, uids: Sequence[str], *, views: bool) -> "ViewIndex":
        """Every stored view of ``uids`` (``views=True``), or their view 0 only."""
        counts = store.view_counts(uids) if views else [1] * len(uids)
        keys = tuple(view_key(uid, view) for uid, count in zip(uids, counts) for view in range(count))
        counts_t = torch.tensor(counts, dtype=torch.long)
        first = torch.cumsum(counts_t, 0) - counts_t
        return cls(first, counts_t, keys)

    @property
    def rows(self) -> int:
        return len(self.keys)

    def rows_of(self, segments: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of ``views`` (default: view 0) of ``segments`` (both (B,) int64)."""
        first = self.first.index_select(0, segments)
        return first if views is None else first + views

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """A per-segment tensor (labels) repeated for each of its views' rows."""
        return values if len(self.keys) == len(values) else values.repeat_interleave(self.counts, dim=0)


def selection_labels(store: FeatureStore, where: str | None) -> SegmentLabels:
    """The stored (ok) segments matching ``where``, in uid order, with their labels."""
    table = store.segments(where, status=STATUS_OK)
    verb = table.column("verb_class").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    noun = table.column("noun_class").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return SegmentLabels(tuple(table.column("uid").to_pylist()), torch.from_numpy(verb),
                         torch.from_numpy(noun), table)


def _needs(fields: Iterable[str]) -> set[str]:
    """The head's declared fields; the older spelling of local alignment (the map and the boxes
    themselves, as run directories before ``verb.local`` recorded it) reads as ``verb.local``."""
    needs = set(fields)
    if {MAP_FIELD, LOCAL_BOXES} <= needs:
        needs.add(LOCAL_FIELD)
    return needs


def named_fields(fields: Iterable[str]) -> list[str]:
    """The declared fields read as they are, under their own names as batch keys: every field that
    is not a canonical one (imported sets' fields, e.g. ``rulstm.rgb``), for heads that name them."""
    return sorted(f for f in set(fields) if f not in CANONICAL_FIELDS)


def batch_key(field: str) -> str:
    """The batch key of a store field a head reads as it is: ``verb_global`` for ``verb.global``, the
    field's own name for a non-canonical one."""
    return FIELD_KEYS.get(field, field)


def batch_keys(fields: Iterable[str]) -> list[str]:
    """The batch keys a head gets for the store fields it declared."""
    fields = _needs(fields)
    keys = [FIELD_KEYS[f] for f in FIELD_KEYS if f in fields]
    keys += [DERIVED[f] for f in DERIVED if f in fields]
    if LOCAL_FIELD in fields:
        keys.append(LOCAL_KEY)
    return keys + named_fields(fields)


@dataclass(frozen=True)
class LocalPlan:
    """Where a selection's ``verb_local`` comes from.

    Attributes:
        fields: the store fields read for it: ``("verb.local",)``, or a map and the local boxes.
        note: one line for the run's log (what is read, and why when it is not the stored field).
    """

    fields: tuple[str, ...]
    note: str

    @property
    def stored(self) -> bool:
        return self.fields == (LOCAL_FIELD,)


def plan_local(store: FeatureStore, *, pool: str = "avg", output_size: int = LOCAL_OUTPUT_SIZE) -> LocalPlan:
    """Read the stored ``verb.local`` when it is complete and pooled as asked, else pool a map at load.

    Raises:
        LocalRecipeError: the store's ``verb.local`` was pooled otherwise and it holds no map to
            pool again; or it holds neither ``verb.local`` nor a map with the local boxes.
    """
    have = store.complete_fields
    source = local_source(have)
    mismatch = None
    if LOCAL_FIELD in have:
        try:
            check_local_recipe(store.derived.get(LOCAL_FIELD), pool=pool, output_size=output_size,
                               where=str(store.path))
            recipe = store.derived.get(LOCAL_FIELD)
            how = f"pooled {recipe['pool']}" if recipe else "imported, pooling not recorded"
            return LocalPlan((LOCAL_FIELD,), f"verb_local: the store's verb.local ({how})")
        except LocalRecipeError as err:
            if source is None:
                raise
            mismatch = err
    if source is not None:
        why = (f" (its verb.local is pooled {store.derived[LOCAL_FIELD]['pool']}, this run asks {pool})"
               if mismatch is not None else "")
        return LocalPlan(tuple(source), f"verb_local: {source[0]} RoI-pooled ({pool}) at {source[1]} at load{why}")
    being = " (verb.local is still being derived: finish `featstore derive`)" if LOCAL_FIELD in store.fields else ""
    raise LocalRecipeError(
        f"{store.path} holds neither verb.local nor verb.map / verb.map_tmean with det.local.box{being}; "
        f"local alignment needs one of them")


def _local_bytes(store: FeatureStore) -> int:
    """float16 bytes of one segment's ``verb_local`` (N x C), from whichever field describes it."""
    if LOCAL_FIELD in store.fields:
        return 2 * math.prod(store.fields[LOCAL_FIELD].shape)
    source = local_source(store.fields)
    if source is None:
        return 0
    return 2 * store.fields[source[1]].shape[0] * store.fields[source[0]].shape[0]


def estimate_bytes(store: FeatureStore, fields: Iterable[str], n: int) -> int:
    """Bytes the preloaded tensors of ``n`` segments take (float16 features, bool masks)."""
    total = 0
    fields = _needs(fields)
    for field in fields:
        if field in FIELD_KEYS:
            total += 2 * math.prod(store.fields[field].shape)
        elif field in DERIVED:
            total += math.prod(store.fields[field].shape)
    total += sum(2 * math.prod(store.fields[field].shape) for field in named_fields(fields))
    if LOCAL_FIELD in fields:
        total += _local_bytes(store)
    return total * n


def _stored_fields(needs: set[str], local: LocalPlan | None) -> list[str]:
    """The store fields a selection's batches are read from."""
    return ([f for f in (*FIELD_KEYS, *DERIVED) if f in needs] + named_fields(needs)
            + list(local.fields if local is not None else ()))


def _segment_tensors(store: FeatureStore, uids: Sequence[str], fields: set[str], *, pool: str,
                     output_size: int, local: LocalPlan | None, together: bool = False) -> dict[str, torch.Tensor]:
    """Read and derive the batch tensors of ``uids`` (CPU; features float16, masks bool).

    Args:
        fields: the head's needs (``_needs``).
        local: where ``verb_local`` comes from (``plan_local``); None when the head needs none.
        together: read every field of a segment in one go (``read_fields``: the streaming path, a
            small shuffled batch); otherwise field after field (``read_field``: the preload, one
            long pass per field, with a map to pool read in chunks).
    """
    base = [f for f in (*FIELD_KEYS, *DERIVED) if f in fields] + named_fields(fields)
    pooled = local is not None and not local.stored
    if together:
        arrays = store.read_fields(uids, _stored_fields(fields, local))
    else:
        arrays = {f: store.read_field(uids, f) for f in base + ([LOCAL_FIELD] if local is not None and local.stored
                                                               else [])}
    out: dict[str, torch.Tensor] = {}
    for field in [*(f for f in FIELD_KEYS if f in fields), *named_fields(fields)]:
        out[batch_key(field)] = torch.from_numpy(arrays[field].astype(np.float16, copy=False))
    for field, key in DERIVED.items():
        if field in fields:
            # Padded slots carry score 0 (DESIGN section 3): that is the mask.
            out[key] = torch.from_numpy(arrays[field] > 0)
    if local is not None and not pooled:
        out[LOCAL_KEY] = torch.from_numpy(arrays[LOCAL_FIELD])
    elif pooled:
        map_field, box_field = local.fields
        pieces = []
        for start in range(0, len(uids), LOCAL_CHUNK):
            if together:
                verb_map = torch.from_numpy(arrays[map_field][start:start + LOCAL_CHUNK])
                boxes = torch.from_numpy(arrays[box_field][start:start + LOCAL_CHUNK])
            else:
                chunk = uids[start:start + LOCAL_CHUNK]
                verb_map = torch.from_numpy(store.read_field(chunk, map_field))  # (n, C, T, H, W) or (n, C, H, W)
                boxes = torch.from_numpy(store.read_field(chunk, box_field))  # (n, K, 4)
            pieces.append(pool_local_verb_features(verb_map, boxes, output_size=output_size, pool=pool).half())
        out[LOCAL_KEY] = torch.cat(pieces) if pieces else torch.empty(0)
    return out


def chunk_order(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of row numbers (the last may be short)."""
    return list(torch.split(order, batch_size))


class PreloadedFeatures:
    """Every needed tensor of a selection, resident on ``device``; batches are index gathers."""

    mode = "preload"

    def __init__(self, store: FeatureStore, labels: SegmentLabels, fields: Iterable[str], *,
                 device: torch.device | str = "cpu", pool: str = "avg", output_size: int = 7, views: bool = False,
                 float32: bool = False):
        """Args:
            float32: hold float16 features as float32 (twice the memory): a batch is then a bare
                gather, without the per-batch cast (the values are the same either way).
        """
        self.labels = labels
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # every batch is a fresh CPU allocation: see featstore/io/allocator.py
        needs = _needs(fields)
        self.local = plan_local(store, pool=pool, output_size=output_size) if LOCAL_FIELD in needs else None
        self.views = ViewIndex.of(store, labels.uids, views=views)
        read = _stored_fields(needs, self.local)
        # Reading most of the store's bytes: with readahead, a cold page cache reads at disk speed
        # (reading a small part, e.g. verb.local of a store that keeps the full map, it would read
        # the map too).
        with store.read_ahead(store.share_of_files(self.views.rows, read) >= READ_AHEAD_SHARE):
            cpu = _segment_tensors(store, list(self.views.keys), needs, pool=pool, output_size=output_size,
                                   local=self.local)
        self.float32 = float32
        self.tensors = {k: (v.float() if float32 and v.dtype == torch.float16 else v).to(self.device)
                        for k, v in cpu.items()}
        self.verb = self.views.per_row(labels.verb).to(self.device)
        self.noun = self.views.per_row(labels.noun).to(self.device)

    def __len__(self) -> int:
        """Segments (not rows: with views a segment has several)."""
        return len(self.labels.uids)

    def batch(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Gather rows ``index`` (on any device; rows of ``self.views``: a segment's number without views);
        features come back float32."""
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


class _BatchReader:
    """Reads one whole batch (a list of row numbers) from LMDB; called from the reader threads."""

    def __init__(self, store: FeatureStore, uids: Sequence[str], fields: set[str], pool: str, output_size: int,
                 local: LocalPlan | None):
        self.store, self.uids, self.fields, self.pool, self.output_size = store, list(uids), fields, pool, output_size
        self.local = local

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        uids = [self.uids[i] for i in rows]
        return _segment_tensors(self.store, uids, self.fields, pool=self.pool, output_size=self.output_size,
                                local=self.local, together=True)


class StreamingFeatures:
    """Same interface as ``PreloadedFeatures`` for selections larger than memory: reads per batch.

    ``workers`` reader threads in this process read the batches of a pass ahead of the trainer,
    ``READ_AHEAD`` batches each, in the pass's own (shuffled) order. Threads, not processes: the
    reads are LMDB lookups and copies out of the memory map, which release the GIL, so several
    run at once and a cold page cache is read with several requests in flight instead of one
    page fault after another; and a batch needs no trip through shared memory to reach the
    trainer. Each batch is read in one transaction per shard, every field of a segment together
    (``FeatureStore.read_fields``). With ``workers=0`` the batches are read one at a time, in line.
    """

    mode = "stream"
    READ_AHEAD = 2  # batches in flight per reader thread

    def __init__(self, store: FeatureStore, labels: SegmentLabels, fields: Iterable[str], *,
                 device: torch.device | str = "cpu", pool: str = "avg", output_size: int = 7, workers: int = 4,
                 views: bool = False):
        self.labels = labels
        self.device = torch.device(device)
        needs = _needs(fields)
        self.local = plan_local(store, pool=pool, output_size=output_size) if LOCAL_FIELD in needs else None
        store.load_index()  # once, here, rather than raced for by the first reads of every thread
        self.views = ViewIndex.of(store, labels.uids, views=views)
        self.verb, self.noun = self.views.per_row(labels.verb), self.views.per_row(labels.noun)
        self.reader = _BatchReader(store, self.views.keys, needs, pool, output_size, self.local)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.labels.uids)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
        return self.batches_of(chunk_order(order, batch_size))

    def _read_ahead(self, chunks: list[list[int]]) -> Iterator[dict[str, torch.Tensor]]:
        if self.workers == 0:
            yield from (self.reader[rows] for rows in chunks)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="featstore-read") as readers:
            pending: deque = deque()
            upcoming = iter(chunks)
            try:
                for rows in itertools.islice(upcoming, self.workers * self.READ_AHEAD):
                    pending.append(readers.submit(self.reader.__getitem__, rows))
                while pending:
                    tensors = pending.popleft().result()
                    following = next(upcoming, None)
                    if following is not None:
                        pending.append(readers.submit(self.reader.__getitem__, following))
                    yield tensors
            finally:
                for future in pending:  # the consumer stopped early: do not read the rest
                    future.cancel()

    def batches_of(self, chunks: Sequence[torch.Tensor]) -> Iterator[tuple[dict, torch.Tensor, torch.Tensor]]:
        """One batch per chunk of row numbers, read ahead by the reader threads."""
        chunks = [c.tolist() for c in chunks]
        for rows, tensors in zip(chunks, self._read_ahead(chunks)):
            index = torch.tensor(rows, dtype=torch.long)
            batch = {k: (v.to(self.device).float() if v.dtype == torch.float16 else v.to(self.device))
                     for k, v in tensors.items()}
            yield batch, self.verb[index].to(self.device), self.noun[index].to(self.device)


def load_features(store: FeatureStore, labels: SegmentLabels, fields: Iterable[str], *,
                  device: torch.device | str = "cpu", memory_budget: int | None = None, pool: str = "avg",
                  output_size: int = 7, workers: int = 4, log=None, views: bool = False):
    """Preload when the selection fits ``memory_budget`` bytes (None: always), else stream.

    Args:
        views: hold every stored temporal view of each segment (training with ``--views random``);
            otherwise each segment's view 0.
    Returns:
        ``PreloadedFeatures`` or ``StreamingFeatures``; ``.mode`` says which.
    """
    fields = list(fields)
    rows = sum(store.view_counts(labels.uids)) if views else len(labels.uids)
    need = estimate_bytes(store, fields, rows)
    if memory_budget is not None and need > memory_budget:
        features = StreamingFeatures(store, labels, fields, device=device, pool=pool, output_size=output_size,
                                     workers=workers, views=views)
    else:
        # float32 resident when twice the bytes still fit: each batch is then a bare gather
        # (benchmarks/README.md, train_data_path_vs_memory); float16 otherwise, cast per batch.
        float32 = memory_budget is None or 2 * need <= memory_budget
        features = PreloadedFeatures(store, labels, fields, device=device, pool=pool, output_size=output_size,
                                     views=views, float32=float32)
    if log is not None:
        held = f" ({rows} views)" if rows != len(labels.uids) else ""
        resident = "" if features.mode != "preload" else (", held as float32" if features.float32 else
                                                         ", held as float16")
        log(f"data: {features.mode} mode for {len(labels.uids)} segments{held} "
            f"({need / 2**20:.1f} MiB of features{resident}"
            f"{'' if memory_budget is None else f', budget {memory_budget / 2**20:.0f} MiB'})")
        if features.local is not None:
            log(f"data: {features.local.note}")
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
