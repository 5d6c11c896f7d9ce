"""Writing a store: one writer per LMDB shard, its journal, and the Parquet index parts it exports.

Durability. A writer commits a segment's tensors *and* its index row (as a journal entry) in one LMDB
transaction, so a crash can lose only the segment in flight. Journal entries are exported to Parquet
parts every ``flush_every`` segments and when the writer closes; a writer opened on a shard first
re-exports whatever a crashed predecessor committed but had not exported. Parquet parts are written
to a temporary name and renamed, so a reader never sees half a part. The ``segments`` view keeps one
row per uid (an ``ok`` row over a ``failed`` one, then the newest), which makes a duplicate export
after a crash harmless.

Temporal views (docs/views.md): in a store whose manifest records views (``provenance.views``), an
index row carries its ``view`` and clip columns and its tensors are keyed by ``view_key(uid, view)``;
`StoreWriter.put_views` commits every view of a segment in one LMDB transaction, so a crash leaves a
segment with all its views or none.

Derived fields (``featstore derive``) are written the same way: `StoreWriter.extend` commits a stored
segment's new tensor and its new index row (the checksum now covering the new field, its box rows
again) in one LMDB transaction of the segment's shard, so an interrupted derive loses nothing and a
rerun continues.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.io.atomic import atomic_write, remove_temporaries
from featstore.store.environments import ENVIRONMENTS
from featstore.store.schema import (
    BOX_SCHEMA,
    FIRST_VIEW,
    SEGMENT_SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    VIEW_BOX_SCHEMA,
    VIEW_COLUMN,
    VIEW_SEGMENT_SCHEMA,
    FieldMismatchError,
    StoreError,
    StoreLockedError,
    view_key,
)

if TYPE_CHECKING:
    from featstore.store.reader import FeatureStore

__all__ = ["DEFAULT_MAP_SIZE", "FLUSHED_KEY", "JOURNAL_PREFIX", "StoreWriter", "segment_checksum", "write_parquet"]

JOURNAL_PREFIX = b"__journal__/"  # + the 20-digit sequence number: one index row per entry
FLUSHED_KEY = b"__flushed_seq__"  # the last sequence number exported to Parquet
DEFAULT_MAP_SIZE = 256 * 2**20  # grows by doubling when full; LMDB files are sparse, so this costs no disk


def write_parquet(path: Path, table: pa.Table) -> Path:
    """Write an index part atomically: readers glob ``*.parquet`` only, so a crash mid-write leaves
    a ``.tmp`` file nobody reads rather than a truncated part."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def segment_checksum(tensors: Mapping[str, np.ndarray]) -> str:
    """A digest over every field's name, dtype, shape and bytes, in field-name order.

    Args:
        tensors: field name -> array exactly as stored (after the cast to the field's dtype).
    Returns:
        32 hex characters.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _shard_name_ok(shard: str) -> bool:
    return bool(shard) and all(ch.isalnum() or ch in "-_" for ch in shard)


class StoreWriter:
    """Writes segments into one LMDB shard and its Parquet parts. Use as a context manager."""

    def __init__(self, store: FeatureStore, shard: str, *, flush_every: int, map_size: int):
        if not _shard_name_ok(shard):
            raise StoreError(f"shard name {shard!r} must be letters, digits, '-' or '_'")
        self.store = store
        self.shard = shard
        self.flush_every = max(1, int(flush_every))
        self.dir = store.path / "lmdb" / shard
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_handle = open(self.dir / "writer.lock", "a+")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.close()
            raise StoreLockedError(
                f"{store.path}: shard {shard!r} is being written by another process "
                f"(lock held on {self.dir / 'writer.lock'}); one writer per shard"
            ) from None
        self._lock_handle.seek(0)
        self._lock_handle.truncate()
        self._lock_handle.write(f"{os.getpid()}\n")
        self._lock_handle.flush()
        ENVIRONMENTS.hold_lock(self._lock_handle)
        # Rows of a store with views carry their view columns (docs/views.md); others are written as before.
        self.views = bool(store.manifest.get("provenance", {}).get("views"))
        self.map_grows = 0
        self._closed = False
        try:
            self.env = ENVIRONMENTS.writer(self.dir, map_size)
            self._seq = self._last_seq()
            self._recover()
        except BaseException:
            # A writer that cannot start (truncated shard, full disk during recovery) must not keep
            # the shard locked for the rest of this process.
            self._release()
            raise

    # ---------------------------------------------------------------- journal
    def _last_seq(self) -> int:
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(JOURNAL_PREFIX):
                last = 0
                for key in cursor.iternext(values=False):
                    if not key.startswith(JOURNAL_PREFIX):
                        break
                    last = int(key[len(JOURNAL_PREFIX):])
                return last
        return 0

    def _flushed_seq(self, txn) -> int:
        raw = txn.get(FLUSHED_KEY)
        return int(raw) if raw is not None else 0

    def _pending(self) -> list[dict[str, Any]]:
        """Journal entries committed to LMDB but not yet exported to Parquet."""
        with self.env.begin() as txn:
            start = self._flushed_seq(txn) + 1
            cursor = txn.cursor()
            entries = []
            if cursor.set_range(JOURNAL_PREFIX + b"%020d" % start):
                for key, value in cursor:
                    if not key.startswith(JOURNAL_PREFIX):
                        break
                    entries.append(json.loads(value))
            return entries

    def _recover(self) -> None:
        # Temporary parts of this shard are a killed predecessor's unfinished exports (only the
        # holder of the shard's lock writes them): nobody reads them, and the journal still holds
        # their rows, so they go and the export is redone.
        for folder in ("segments", "boxes"):
            remove_temporaries(self.store.path / folder, [f"part-{self.shard}-*"])
        if self._pending():
            self.flush()

    def _commit(self, puts: list[tuple[bytes, bytes]]) -> None:
        """Write the puts in one transaction, doubling the map size whenever it is full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in puts:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
                self.map_grows += 1
            except lmdb.Error as err:  # e.g. a full disk: the transaction is aborted, nothing is half-written
                raise StoreError(f"{self.store.path}: writing LMDB shard {self.shard!r} failed: {err}") from err

    def _journal_entry(self, row: Mapping[str, Any], status: str, error: str | None, checksum: str | None,
                       boxes: Mapping[str, Sequence] | None) -> tuple[bytes, bytes]:
        self._seq += 1
        record = {name: row.get(name) for name in (VIEW_SEGMENT_SCHEMA if self.views else SEGMENT_SCHEMA).names}
        if self.views:
            record[VIEW_COLUMN] = int(row.get(VIEW_COLUMN) or FIRST_VIEW)
            for key in ("clip_start_frame", "clip_stop_frame", "clip_center", "window_center"):
                if record[key] is not None:
                    record[key] = int(record[key])
        record.update(
            status=status, error=error, checksum=checksum, shard=self.shard, written_at=time.time_ns()
        )
        for key in ("start_frame", "stop_frame", "verb_class", "noun_class"):
            if record[key] is not None:
                record[key] = int(record[key])
        for key in ("uid", "participant_id", "video_id"):
            if record[key] is not None:
                record[key] = str(record[key])
        entry = {"seq": self._seq, "segment": record, "boxes": _boxes_to_json(boxes)}
        return JOURNAL_PREFIX + b"%020d" % self._seq, json.dumps(entry).encode()

    # ---------------------------------------------------------------- public
    def prepare(self, tensors: Mapping[str, np.ndarray], uid: str) -> dict[str, np.ndarray]:
        """Check tensors against the field schema and cast them to the stored dtypes."""
        fields = self.store.fields
        unknown = sorted(set(tensors) - set(fields))
        if unknown:
            raise FieldMismatchError(f"{uid}: field(s) {', '.join(unknown)} are not in the store's schema")
        missing = sorted(set(fields) - set(tensors))
        if missing:
            raise FieldMismatchError(f"{uid}: missing field(s) {', '.join(missing)}")
        prepared = {}
        for name, array in tensors.items():
            spec = fields[name]
            array = np.asarray(array)
            if tuple(array.shape) != spec.shape:
                raise FieldMismatchError(
                    f"{uid}: field {name} has shape {list(array.shape)}, the store's is {list(spec.shape)}"
                )
            prepared[name] = np.ascontiguousarray(array, dtype=spec.dtype)
        return prepared

    def _key(self, row: Mapping[str, Any]) -> str:
        """The tensor key of a row: its uid, or ``uid/v{view}`` for a later view of a store with views."""
        view = int(row.get(VIEW_COLUMN) or FIRST_VIEW)
        if view != FIRST_VIEW and not self.views:
            raise StoreError(f"{self.store.path} records no views (docs/views.md): {row['uid']} view {view} "
                             f"cannot be stored")
        return view_key(str(row["uid"]), view)

    def put(self, row: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
            boxes: Mapping[str, Sequence] | None = None) -> str:
        """Store one segment (or one view of it): its tensors and its index row, atomically.

        Args:
            row: segment columns (at least uid, participant_id, video_id, start_frame, stop_frame);
                in a store with views also ``view`` and the clip columns.
            tensors: field -> array of the field's shape (cast to the field's dtype here).
            boxes: optional box columns (set, slot, frame, x1, y1, x2, y2, score, label, valid).
        Returns:
            The segment's checksum.
        """
        return self.put_views([(row, tensors, boxes)])[0]

    def put_views(self, views: Sequence[tuple[Mapping[str, Any], Mapping[str, np.ndarray],
                                               Mapping[str, Sequence] | None]]) -> list[str]:
        """Store several rows (the views of one segment) in one LMDB transaction: all of them or none.

        Args:
            views: ``(row, tensors, boxes)`` per view, as `put` takes them; each row names its ``view``.
        Returns:
            Each view's checksum, in order.
        """
        puts: list[tuple[bytes, bytes]] = []
        checksums = []
        for row, tensors, boxes in views:
            key = self._key(row)
            prepared = self.prepare(tensors, key)
            checksum = segment_checksum(prepared)
            puts += [(f"{key}/{name}".encode(), memoryview(arr).cast("B").tobytes()) for name, arr in prepared.items()]
            puts.append(self._journal_entry(row, STATUS_OK, None, checksum, boxes))
            checksums.append(checksum)
        self._commit(puts)
        self._maybe_flush()
        return checksums

    def extend(self, row: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *, checksum: str,
               boxes: Mapping[str, Sequence] | None) -> None:
        """Add fields to a stored segment of this shard: the new tensors and its new index row, atomically.

        Args:
            row: the segment's index row as stored (its columns are kept; ``checksum`` replaced).
            tensors: the new fields only (cast to their dtypes here); each must be in the schema.
            checksum: ``segment_checksum`` over the segment's old and new tensors together.
            boxes: the segment's box rows again: the new row supersedes the old, and the ``boxes``
                view keeps the rows of the kept row.
        """
        uid = self._key(row)
        if row.get("shard") not in (None, self.shard):
            raise StoreError(f"{uid} is stored in shard {row.get('shard')!r}, not in {self.shard!r}")
        puts = []
        for name, array in tensors.items():
            spec = self.store.fields.get(name)
            if spec is None:
                raise FieldMismatchError(f"{uid}: field {name} is not in the store's schema")
            array = np.asarray(array)
            if tuple(array.shape) != spec.shape:
                raise FieldMismatchError(
                    f"{uid}: field {name} has shape {list(array.shape)}, the store's is {list(spec.shape)}")
            puts.append((f"{uid}/{name}".encode(),
                         memoryview(np.ascontiguousarray(array, dtype=spec.dtype)).cast("B").tobytes()))
        puts.append(self._journal_entry(row, STATUS_OK, None, checksum, boxes))
        self._commit(puts)
        self._maybe_flush()

    def fail(self, row: Mapping[str, Any], error: str) -> None:
        """Record that a segment could not be made, with the reason (its tensors are not written)."""
        self._commit([self._journal_entry(row, STATUS_FAILED, str(error), None, None)])
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        with self.env.begin() as txn:
            pending = self._seq - self._flushed_seq(txn)
        if pending >= self.flush_every:
            self.flush()

    def flush(self) -> int:
        """Export pending journal entries as one segments part and one boxes part.

        Returns:
            The number of segment rows exported.
        """
        entries = self._pending()
        if not entries:
            return 0
        self.env.sync(True)
        last = entries[-1]["seq"]
        name = f"part-{self.shard}-{last:012d}.parquet"
        # A part holds the view columns when any of its rows has them (a store with views).
        views = any(VIEW_COLUMN in e["segment"] for e in entries)
        segments = pa.Table.from_pylist([e["segment"] for e in entries],
                                        schema=VIEW_SEGMENT_SCHEMA if views else SEGMENT_SCHEMA)
        box_schema = VIEW_BOX_SCHEMA if views else BOX_SCHEMA
        box_columns: dict[str, list] = {col: [] for col in box_schema.names}
        for entry in entries:
            cols = entry["boxes"]
            if not cols:
                continue
            n = len(cols["slot"])
            for col in box_schema.names:
                if col in ("uid", "written_at", VIEW_COLUMN):
                    box_columns[col].extend([entry["segment"].get(col)] * n)
                else:
                    box_columns[col].extend(cols[col])
        # Boxes first: a segment row is the proof of completion, so it must not appear before its boxes.
        if box_columns["uid"]:
            write_parquet(self.store.path / "boxes" / name, pa.Table.from_pydict(box_columns, schema=box_schema))
        write_parquet(self.store.path / "segments" / name, segments)
        self._commit([(FLUSHED_KEY, str(last).encode())])
        return len(entries)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            self.env.sync(True)
        finally:
            self._release()

    def _release(self) -> None:
        ENVIRONMENTS.close_writer(self.dir)
        ENVIRONMENTS.drop_lock(self._lock_handle)
        fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
        self._lock_handle.close()
        self._closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _boxes_to_json(boxes: Mapping[str, Sequence] | None) -> dict[str, list] | None:
    """A segment's box columns as the journal entry holds them: JSON lists, NaN as null."""
    if boxes is None:
        return None
    n = len(boxes["slot"])
    out = {}
    for name in ("set", "slot", "frame", "x1", "y1", "x2", "y2", "score", "label", "valid"):
        values = boxes.get(name)
        if values is None:
            out[name] = [None] * n
        elif isinstance(values, np.ndarray):
            out[name] = values.tolist()  # numpy scalars -> Python numbers, in C
        else:
            out[name] = [_json_scalar(v) for v in values]
    return out


def _json_scalar(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
