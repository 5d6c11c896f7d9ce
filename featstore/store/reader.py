"""The feature store: LMDB tensors, a Parquet index, a JSON manifest (DESIGN.md section 3).

Layout of a store directory::

    STORE/
      manifest.json          format version, field schema, provenance
      segments/*.parquet     one row per segment (the index: a segment exists once its row does)
      boxes/*.parquet        one row per detection slot
      lmdb/<shard>/          one LMDB environment per writer

Durability. A writer commits a segment's tensors *and* its index row (as a journal entry) in one LMDB
transaction, so a crash can lose only the segment in flight. Journal entries are exported to Parquet
parts every ``flush_every`` segments and when the writer closes; a writer opened on a shard first
re-exports whatever a crashed predecessor committed but had not exported. Parquet parts are written
to a temporary name and renamed, so a reader never sees half a part. The ``segments`` view keeps one
row per uid (an ``ok`` row over a ``failed`` one, then the newest), which makes a duplicate export
after a crash harmless.

Derived fields. A field computed from a store's own fields (``verb.local``, see
``featstore.store.local_pool``) can be added to an existing store (``featstore derive``): the manifest
gains the field in its schema and a ``derived`` entry saying how it was made, with
``complete: false`` until every stored segment has it. Each segment gets it the way segments are
written: its new tensor and a new index row (the checksum now covering the new field, its box rows
again) commit in one LMDB transaction of the segment's shard, so an interrupted derive loses
nothing and a rerun continues. Readers treat a field that is not complete as absent
(``complete_fields``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import duckdb
import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featstore import __version__
from featstore.io.atomic import atomic_write, atomic_write_json, remove_temporaries
from featstore.store.schema import (
    BOX_SCHEMA,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SEGMENT_SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    FieldMismatchError,
    FieldSpec,
    FormatVersionError,
    StoreError,
    StoreLockedError,
)

JOURNAL_PREFIX = b"__journal__/"
FLUSHED_KEY = b"__flushed_seq__"
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


def _holds_store_data(path: Path) -> bool:
    return (any((path / "segments").glob("*.parquet")) or any((path / "boxes").glob("*.parquet"))
            or any((path / "lmdb").glob("*/data.mdb")))


def _fields_of(manifest_path: Path, manifest: Mapping[str, Any]) -> dict[str, FieldSpec]:
    """The field schema of a manifest, checked: a reader must never guess a dtype or a shape."""
    fields = manifest.get("fields", {})
    if not isinstance(fields, dict):
        raise StoreError(f"{manifest_path}: 'fields' must map field names to {{dtype, shape}}")
    specs = {}
    for name, spec in fields.items():
        try:
            dtype, shape = spec["dtype"], tuple(spec["shape"])
            np.dtype(dtype)
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"shape {list(shape)} is not a list of sizes")
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(
                f"{manifest_path}: field {name!r} has no valid dtype and shape ({spec!r}: {err})") from None
        specs[name] = FieldSpec(dtype=dtype, shape=shape)
    return specs


def _shard_name_ok(shard: str) -> bool:
    return bool(shard) and all(ch.isalnum() or ch in "-_" for ch in shard)


class FeatureStore:
    """A feature store directory opened for reading; ``writer()`` opens one shard for writing.

    Readers open their LMDB environments lazily and per process (read-only, no lock), so a store
    object can be handed to forking DataLoader workers.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self.fields: dict[str, FieldSpec] = _fields_of(self.path / MANIFEST_NAME, manifest)
        derived = manifest.get("derived", {})
        if not isinstance(derived, dict) or not all(isinstance(v, dict) for v in derived.values()):
            raise StoreError(f"{self.path / MANIFEST_NAME}: 'derived' must map field names to their recipes")
        self.derived: dict[str, dict[str, Any]] = derived
        self._shard_cache: tuple[tuple, dict[str, tuple[str, str]]] | None = None  # see _shard_index

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        fields: Mapping[str, FieldSpec],
        provenance: Mapping[str, Any] | None = None,
        derived: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> "FeatureStore":
        """Create a store, or open an existing one whose field schema is the same.

        Args:
            path: the store directory (created with its parents).
            fields: field name -> spec; fixed for the store's lifetime (``derive`` may add fields).
            provenance: what made the features (models, checkpoint hashes, sampling, command line).
            derived: field -> how it was computed from the others (e.g. ``verb.local``'s pooling),
                for fields the writer computes itself; the manifest's ``derived`` entries.
        Returns:
            The store, opened for reading.
        Raises:
            FieldMismatchError: the store exists with other fields.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.exists() and _holds_store_data(path):
            # The manifest is lost, not yet to be written: a new one made from this run's schema
            # would relabel the existing tensors (a shape of the same byte size reads back silently
            # wrong), and the provenance would be gone.
            raise StoreError(
                f"{path} holds store data (LMDB shards or index parts) but its {MANIFEST_NAME} is missing; "
                f"restore the manifest, or write to a new store directory"
            )
        if manifest_path.exists():
            store = cls.open(path)
            wanted = {name: spec for name, spec in fields.items()}
            if wanted != store.fields:
                raise FieldMismatchError(
                    f"{path} already holds fields {_describe_fields(store.fields)}; "
                    f"this run would write {_describe_fields(wanted)}. Use a new store directory."
                )
            return store
        for sub in ("segments", "boxes", "lmdb"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": "featstore",
            "format_version": FORMAT_VERSION,
            "featstore_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fields": {name: spec.to_json() for name, spec in sorted(fields.items())},
            "provenance": dict(provenance or {}),
        }
        if derived:
            manifest["derived"] = {name: {**dict(recipe), "complete": True} for name, recipe in sorted(derived.items())}
        # Two ranks may create the same store at once: both write identical schemas, last rename wins.
        atomic_write_json(manifest_path, manifest, sort_keys=True)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureStore":
        """Open an existing store for reading.

        Raises:
            StoreError: no manifest, or an unreadable one.
            FormatVersionError: the store's format version is not this package's.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise StoreError(f"{path} is not a feature store: {MANIFEST_NAME} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"{manifest_path} cannot be read: {err}") from err
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{path} has store format version {version!r}; this featstore {__version__} reads "
                f"version {FORMAT_VERSION}. Rebuild the store or use a matching featstore release."
            )
        return cls(path, manifest)

    def update_provenance(self, **entries: Any) -> None:
        """Merge entries into the manifest's provenance (atomic rewrite)."""
        self.manifest.setdefault("provenance", {}).update(entries)
        atomic_write_json(self.path / MANIFEST_NAME, self.manifest, sort_keys=True)

    @property
    def incomplete_fields(self) -> set[str]:
        """Derived fields that some stored segments do not have yet (a derive in progress)."""
        return {name for name, recipe in self.derived.items() if not recipe.get("complete", True)}

    @property
    def complete_fields(self) -> dict[str, FieldSpec]:
        """The fields every stored segment has: the schema less derived fields still being made."""
        incomplete = self.incomplete_fields
        return {name: spec for name, spec in self.fields.items() if name not in incomplete}

    def _rewrite_manifest(self, change) -> None:
        # From the newest manifest on disk: another process (a build's run record) may have changed it.
        manifest = json.loads((self.path / MANIFEST_NAME).read_text())
        change(manifest)
        atomic_write_json(self.path / MANIFEST_NAME, manifest, sort_keys=True)
        self.manifest = manifest
        self.fields = _fields_of(self.path / MANIFEST_NAME, manifest)
        self.derived = manifest.get("derived", {})

    def add_derived_field(self, name: str, spec: FieldSpec, recipe: Mapping[str, Any]) -> None:
        """Add a derived field to the schema, marked incomplete until ``mark_derived_complete``.

        Raises:
            FieldMismatchError: the store already holds ``name`` with another spec or recipe.
        """
        if name in self.fields:
            recorded = {k: v for k, v in self.derived.get(name, {}).items() if k not in ("complete", "completed_at")}
            if self.fields[name] != spec or recorded != {k: v for k, v in dict(recipe).items()}:
                raise FieldMismatchError(
                    f"{self.path} already holds {name} as {self.fields[name].dtype}{list(self.fields[name].shape)} "
                    f"made by {json.dumps(recorded or 'another tool (not derived here)', sort_keys=True)}; "
                    f"this derive would make {spec.dtype}{list(spec.shape)} by {json.dumps(dict(recipe), sort_keys=True)}")
            return

        def change(manifest: dict[str, Any]) -> None:
            manifest["fields"][name] = spec.to_json()
            manifest["fields"] = dict(sorted(manifest["fields"].items()))
            manifest.setdefault("derived", {})[name] = {**dict(recipe), "complete": False}

        self._rewrite_manifest(change)

    def mark_derived_complete(self, name: str) -> None:
        """Record in the manifest that every stored segment has derived field ``name``."""
        def change(manifest: dict[str, Any]) -> None:
            manifest["derived"][name].update(
                complete=True, completed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

        self._rewrite_manifest(change)

    @property
    def manifest_hash(self) -> str:
        return hashlib.sha256((self.path / MANIFEST_NAME).read_bytes()).hexdigest()

    # ------------------------------------------------------------------ index
    def connect(self):
        """A sandboxed read-only DuckDB connection with views ``segments``, ``boxes``, ``fields``."""
        from featstore.store.query import connect_store

        return connect_store(self)

    def segments(self, where: str | None = None, *, status: str | None = None) -> pa.Table:
        """The index, one row per uid, optionally filtered by a DuckDB WHERE expression.

        Args:
            where: SQL boolean expression over the segment columns, or None for all.
            status: 'ok' or 'failed' to keep only those.
        Returns:
            A table in uid order.
        """
        clauses = [f"({where})"] if where else []
        if status is not None:
            clauses.append(f"status = '{status}'" if status in (STATUS_OK, STATUS_FAILED) else "false")
        sql = "select * from segments"
        if clauses:
            sql += " where " + " and ".join(clauses)
        sql += " order by uid"
        from featstore.store.query import fetch_arrow

        with self.connect() as con:
            try:
                return fetch_arrow(con, sql)
            except duckdb.Error as err:
                raise StoreError(f"selection {where!r} failed: {err}") from err

    def uids(self, where: str | None = None, *, status: str | None = STATUS_OK) -> list[str]:
        """uids of the selected segments (by default only the stored, ``ok`` ones)."""
        return self.segments(where, status=status).column("uid").to_pylist()

    def boxes(self, uids: Sequence[str] | None = None) -> pa.Table:
        """Box rows, of the given uids or of all."""
        from featstore.store.query import fetch_arrow

        with self.connect() as con:
            if uids is None:
                return fetch_arrow(con, 'select * from boxes order by uid, "set", slot')
            con.register("wanted", pa.table({"uid": pa.array(list(uids), pa.string())}))
            return fetch_arrow(con, 'select b.* from boxes b join wanted w using (uid) order by uid, "set", slot')

    # ------------------------------------------------------------------ tensors
    def _shard_dirs(self) -> list[Path]:
        root = self.path / "lmdb"
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if (p / "data.mdb").is_file())

    def _env(self, shard: str) -> lmdb.Environment:
        shard_dir = self.path / "lmdb" / shard
        if not (shard_dir / "data.mdb").is_file():
            raise StoreError(f"{self.path}: LMDB shard {shard!r} is missing ({shard_dir})")
        return _reader_env(shard_dir)

    def _begin(self, shard: str, *, buffers: bool = False) -> lmdb.Transaction:
        env = self._env(shard)
        try:
            try:
                return env.begin(buffers=buffers)
            except lmdb.MapResizedError:
                # Another process grew the map since this reader opened it: adopt the new size.
                env.set_mapsize(0)
                return env.begin(buffers=buffers)
        except lmdb.Error as err:
            raise StoreError(f"{self.path}: LMDB shard {shard!r} cannot be read: {err}") from err

    def tensor_keys(self) -> Iterator[tuple[str, str]]:
        """Every tensor key LMDB holds, shard by shard, bookkeeping keys (journal) left out.

        What LMDB holds, not what the index says is stored: a writer killed between its LMDB
        commit and its index export leaves keys that no ``ok`` row names yet (its next run
        exports them). For consistency checks that compare the two; readers use `read`.

        Returns:
            (shard, ``"{uid}/{field}"``) pairs, in key order within each shard.
        """
        for shard_dir in self._shard_dirs():
            with self._begin(shard_dir.name) as txn:
                for key in txn.cursor().iternext(values=False):
                    if not key.startswith(b"__"):
                        yield shard_dir.name, bytes(key).decode()

    def _segments_state(self) -> tuple:
        """Names, sizes and mtimes of the index parts: changes whenever a writer exports a part."""
        try:
            with os.scandir(self.path / "segments") as entries:
                parts = [(e.name, e.stat()) for e in entries if e.name.endswith(".parquet")]
        except FileNotFoundError:
            return ()
        return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in parts))

    def _shard_index(self) -> dict[str, tuple[str, str]]:
        """uid -> (shard, status) of the whole index, cached until the index parts change.

        Every read looks its segments up here: one DuckDB query per read made the preload of a
        field cost a query, and a streaming batch a query per segment.
        """
        state = self._segments_state()
        if self._shard_cache is None or self._shard_cache[0] != state:
            with self.connect() as con:
                table = con.sql("select uid, shard, status from segments").to_arrow_table()
            index = dict(zip(table.column("uid").to_pylist(),
                             zip(table.column("shard").to_pylist(), table.column("status").to_pylist())))
            self._shard_cache = (state, index)
        return self._shard_cache[1]

    def load_index(self) -> int:
        """Load the uid -> shard index now (reads load it on first use); returns the number of uids.

        Worth calling before forking reader processes: they inherit it instead of each querying
        the index again.
        """
        return len(self._shard_index())

    def _shard_of(self, uids: Sequence[str]) -> dict[str, str]:
        index = self._shard_index()
        shards = {}
        for uid in uids:
            shard, status = index.get(uid, (None, None))
            if status != STATUS_OK:
                raise KeyError(f"{uid!r} is not a stored segment of {self.path} (status: {status})")
            shards[uid] = shard
        return shards

    def _decode(self, uid: str, field: str, raw: bytes | None) -> np.ndarray:
        spec = self.fields[field]
        if raw is None:
            if field in self.incomplete_fields:
                raise StoreError(
                    f"{self.path}: {uid} has no {field} yet: the field is still being derived; finish it with "
                    f"`featstore derive {self.path} --field {field}`")
            raise StoreError(f"{self.path}: {uid}/{field} is indexed as stored but missing from LMDB")
        if len(raw) != spec.nbytes:
            raise StoreError(
                f"{self.path}: {uid}/{field} holds {len(raw)} bytes, expected {spec.nbytes} "
                f"({spec.dtype} {list(spec.shape)}); run `featstore verify`"
            )
        return np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape)

    def _check_fields(self, fields: Iterable[str]) -> list[str]:
        fields = list(fields)
        missing = [f for f in fields if f not in self.fields]
        if missing:
            raise FieldMismatchError(
                f"{self.path} has no field(s) {', '.join(missing)}; it holds {', '.join(sorted(self.fields))}"
            )
        return fields

    def read(self, uid: str, fields: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Tensors of one stored segment.

        Args:
            uid: the segment.
            fields: field names; all of the store's when None.
        Returns:
            field -> read-only array with the field's dtype and shape.
        """
        fields = self._check_fields(self.fields if fields is None else fields)
        shard = self._shard_of([uid])[uid]
        with self._begin(shard) as txn:
            return {f: self._decode(uid, f, txn.get(f"{uid}/{f}".encode())) for f in fields}

    def read_field(
        self, uids: Sequence[str], field: str, *, out: np.ndarray | None = None, progress=None
    ) -> np.ndarray:
        """One field of many segments stacked into one array (the preload path).

        Args:
            uids: stored segments, in the order wanted.
            field: a field name.
            out: an array of shape (len(uids), *shape) to fill, e.g. a shared or pinned buffer.
            progress: an optional callable(n) called as rows are read.
        Returns:
            (N, *shape) array of the field's dtype.
        """
        (field,) = self._check_fields([field])
        spec = self.fields[field]
        if out is None:
            out = np.empty((len(uids), *spec.shape), dtype=spec.dtype)
        shards = self._shard_of(uids)
        by_shard: dict[str, list[int]] = {}
        for row, uid in enumerate(uids):
            by_shard.setdefault(shards[uid], []).append(row)
        flat = out.reshape(len(uids), -1).view(np.uint8) if out.flags.c_contiguous else None
        for shard, rows in by_shard.items():
            with self._begin(shard, buffers=True) as txn:
                for row in rows:
                    uid = uids[row]
                    raw = txn.get(f"{uid}/{field}".encode())
                    if raw is None or len(raw) != spec.nbytes:
                        self._decode(uid, field, None if raw is None else bytes(raw))
                    if flat is not None:
                        flat[row] = np.frombuffer(raw, dtype=np.uint8)
                    else:
                        out[row] = np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape)
                    if progress is not None:
                        progress(1)
        return out

    def share_of_files(self, n_segments: int, fields: Iterable[str]) -> float:
        """The bytes of ``fields`` of ``n_segments`` segments as a share of the shards' LMDB files (0-1+)."""
        files = sum(os.path.getsize(d / "data.mdb") for d in self._shard_dirs())
        wanted = n_segments * sum(self.fields[f].nbytes for f in self._check_fields(fields))
        return wanted / files if files else 0.0

    @contextlib.contextmanager
    def read_ahead(self, enabled: bool = True) -> Iterator[None]:
        """Kernel readahead on the shards' memory maps for a read of most of the store in key order.

        Readers map the shards for random access (readahead off: a shuffled batch must not drag
        neighbours it does not need into memory), so a cold pass over the whole store faulted its
        pages in one 4 KiB read at a time: 20-25 MiB/s where the disk reads 250+ sequentially.
        Inside this context the maps take the kernel's normal read-around, as a preload, a copy
        or a derive wants; the random-access advice is restored after. Linux only (elsewhere, and
        when ``enabled`` is false, nothing changes).
        """
        regions = []
        if enabled:
            for shard_dir in self._shard_dirs():
                try:
                    _reader_env(shard_dir)  # mapped now, so that the mapping can be found
                except (StoreError, lmdb.Error):
                    continue  # the read itself reports an unreadable shard
                region = _mapped_region(shard_dir / "data.mdb")
                if region is not None and _madvise(*region, _MADV_NORMAL):
                    regions.append(region)
        try:
            yield
        finally:
            for region in regions:
                _madvise(*region, _MADV_RANDOM)

    def shards(self) -> list[str]:
        """Names of the store's LMDB shards."""
        return [shard_dir.name for shard_dir in self._shard_dirs()]

    def lacking(self, uids: Sequence[str], field: str) -> list[str]:
        """The stored segments among ``uids`` whose LMDB holds no tensor of ``field`` (in order)."""
        shards = self._shard_of(uids)
        have: set[str] = set()
        by_shard: dict[str, list[str]] = {}
        for uid in uids:
            by_shard.setdefault(shards[uid], []).append(uid)
        for shard, members in by_shard.items():
            with self._begin(shard) as txn:
                have.update(uid for uid in members if txn.get(f"{uid}/{field}".encode()) is not None)
        return [uid for uid in uids if uid not in have]

    def read_fields(self, uids: Sequence[str], fields: Iterable[str]) -> dict[str, np.ndarray]:
        """Several fields of many segments, stacked per field, in one read transaction per shard.

        The streaming path: a shuffled batch touches each segment once, reading its fields one
        after the other (their keys are neighbours in the shard's B-tree), in key order within a
        shard, rather than one pass over the batch per field.

        Args:
            uids: stored segments, in the order wanted.
            fields: field names.
        Returns:
            field -> (N, *shape) array of the field's dtype.
        """
        fields = self._check_fields(fields)
        out = {f: np.empty((len(uids), *self.fields[f].shape), dtype=self.fields[f].dtype) for f in fields}
        flat = {f: a.reshape(len(uids), -1).view(np.uint8) for f, a in out.items()}
        sizes = {f: self.fields[f].nbytes for f in fields}
        shards = self._shard_of(uids)
        by_shard: dict[str, list[int]] = {}
        for row, uid in enumerate(uids):
            by_shard.setdefault(shards[uid], []).append(row)
        for shard, rows in by_shard.items():
            rows.sort(key=lambda r: uids[r])
            with self._begin(shard, buffers=True) as txn:
                for row in rows:
                    uid = uids[row]
                    for field in fields:
                        raw = txn.get(f"{uid}/{field}".encode())
                        if raw is None or len(raw) != sizes[field]:
                            self._decode(uid, field, None if raw is None else bytes(raw))
                        flat[field][row] = np.frombuffer(raw, dtype=np.uint8)
        return out

    # ------------------------------------------------------------------ integrity
    def verify(self, uids: Sequence[str] | None = None, progress=None) -> list[tuple[str, str]]:
        """Recompute each stored segment's checksum from its LMDB bytes.

        Returns:
            (uid, reason) for every segment whose bytes are missing, mis-sized or changed; empty when clean.
        """
        table = self.segments(status=STATUS_OK)
        if uids is not None:
            wanted = set(uids)
            table = table.filter(pc.is_in(table.column("uid"), pa.array(sorted(wanted), pa.string())))
        bad: list[tuple[str, str]] = []
        rows = table.select(["uid", "shard", "checksum"]).to_pylist()
        with self.read_ahead(self.share_of_files(len(rows), self.fields) >= 0.5):
            self._verify_rows(rows, bad, progress)
        return bad

    def _verify_rows(self, rows: list[dict], bad: list[tuple[str, str]], progress) -> None:
        by_shard: dict[str, list[dict]] = {}
        for row in rows:
            by_shard.setdefault(row["shard"], []).append(row)
        for shard, shard_rows in by_shard.items():
            try:
                txn = self._begin(shard)
            except (StoreError, lmdb.Error) as err:
                bad.extend((row["uid"], f"shard {shard} unreadable: {err}") for row in shard_rows)
                continue
            complete = list(self.complete_fields)
            incomplete = sorted(self.incomplete_fields)
            with txn:
                for row in shard_rows:
                    uid = row["uid"]
                    try:
                        tensors = {f: self._decode(uid, f, txn.get(f"{uid}/{f}".encode())) for f in complete}
                    except StoreError as err:
                        bad.append((uid, str(err)))
                        continue
                    if not self._checksum_matches(txn, uid, tensors, incomplete, row["checksum"]):
                        bad.append((uid, "checksum mismatch"))
                    if progress is not None:
                        progress(1)

    def _checksum_matches(self, txn, uid: str, tensors: dict[str, np.ndarray], incomplete: list[str],
                          checksum: str) -> bool:
        """Whether ``checksum`` covers the segment's tensors.

        While a field is being derived, a segment's index row covers it once its derive committed
        and was exported; a derive killed between the two leaves the tensor with the old row, which
        then covers the other fields only (the rerun writes the new one). Either is consistent.
        """
        if segment_checksum(tensors) == checksum:
            return True
        present = {}
        for field in incomplete:
            raw = txn.get(f"{uid}/{field}".encode())
            if raw is not None:
                present[field] = self._decode(uid, field, raw)
        return bool(present) and segment_checksum({**tensors, **present}) == checksum

    # ------------------------------------------------------------------ summary
    def disk_bytes(self) -> int:
        """Bytes the store's files occupy on disk (allocated blocks: LMDB files are sparse)."""
        total = 0
        for root, _, files in os.walk(self.path):
            for name in files:
                st = os.stat(os.path.join(root, name))
                total += min(st.st_size, st.st_blocks * 512)
        return total

    def info(self) -> dict[str, Any]:
        """Counts, field schema, size on disk and the manifest (the `featstore info --json` object)."""
        from featstore.store.sizes import map_alternatives, segment_bytes

        with self.connect() as con:
            counts = dict(con.execute("select status, count(*) from segments group by status").fetchall())
        ok = int(counts.get(STATUS_OK, 0))
        on_disk = self.disk_bytes()
        page_size = self._page_size()
        incomplete = self.incomplete_fields
        return {
            "path": str(self.path),
            "segments": {"ok": ok, "failed": int(counts.get(STATUS_FAILED, 0))},
            "fields": {name: {**spec.to_json(), **({"complete": False} if name in incomplete else {})}
                       for name, spec in sorted(self.fields.items())},
            "bytes": on_disk,
            # Per segment: each field as stored (payload) and as LMDB lays it out; the measured total
            # adds the index, the journal and LMDB's partly filled pages.
            "bytes_per_segment": {
                "fields": segment_bytes(self.fields, page_size=page_size),
                "measured": on_disk // ok if ok else None,
            },
            "map_alternatives": map_alternatives(self.fields, self.manifest, ok),
            "derived": self.derived,
            "manifest": self.manifest,
        }

    def _page_size(self) -> int:
        for shard_dir in self._shard_dirs():
            try:
                return int(_reader_env(shard_dir).stat()["psize"])
            except (StoreError, lmdb.Error):
                continue
        return 4096

    # ------------------------------------------------------------------ writing
    def writer(self, shard: str = "0", *, flush_every: int = 256, map_size: int = DEFAULT_MAP_SIZE) -> "StoreWriter":
        """Open shard ``shard`` for writing (one writer per shard; a second is refused)."""
        return StoreWriter(self, shard, flush_every=flush_every, map_size=map_size)

    def close(self) -> None:
        """Close this store's read-only environments in this process (they reopen on the next read)."""
        for shard_dir in self._shard_dirs():
            _close_reader_env(shard_dir)


# Environments open in this process, by resolved shard path. LMDB (and py-lmdb's guard) forbid
# opening one environment twice in a process, so every FeatureStore object shares these; a writer's
# environment serves reads of its shard too.
_ENVS: dict[str, lmdb.Environment] = {}
_ENV_LOCK = [threading.Lock()]  # a fresh one in a forked child (_forget_envs_after_fork)
_WRITER_ENVS: set[str] = set()
_INHERITED_WRITERS: list[lmdb.Environment] = []
_WRITER_LOCKS: set = set()  # lock-file handles of this process's writers


_MADV_NORMAL, _MADV_RANDOM = 0, 1  # asm-generic/mman-common.h
_LIBC: list = []  # [ctypes libc or None], resolved once per process


def _madvise(address: int, length: int, advice: int) -> bool:
    """``madvise`` on a mapped region; False where it is not available or fails."""
    if not _LIBC:
        libc = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError):
                libc = None
        _LIBC.append(libc)
    return _LIBC[0] is not None and _LIBC[0].madvise(address, length, advice) == 0


def _mapped_region(data_file: Path) -> tuple[int, int] | None:
    """(start address, length) of this process's mapping of ``data_file`` (LMDB maps it once), or None."""
    real = os.path.realpath(data_file)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real and int(parts[2], 16) == 0:
                    start, stop = (int(x, 16) for x in parts[0].split("-"))
                    return start, stop - start
    except (OSError, ValueError):
        return None
    return None


def _env_key(shard_dir: Path) -> str:
    return os.path.realpath(shard_dir)


def _reader_env(shard_dir: Path) -> lmdb.Environment:
    key = _env_key(shard_dir)
    env = _ENVS.get(key)
    if env is not None:
        return env
    # Reader threads (streaming) may all find the environment closed at once: one opens it (LMDB
    # refuses a second open in a process), the others take that one.
    with _ENV_LOCK[0]:
        return _open_reader_env(shard_dir, key)


def _open_reader_env(shard_dir: Path, key: str) -> lmdb.Environment:
    env = _ENVS.get(key)
    if env is None:
        # Readers register in LMDB's lock table (lock=True) whenever they may: an unregistered
        # reader's snapshot is invisible to a writer in another process, which then recycles the
        # pages that snapshot is still walking, and keys the index lists as stored read back as
        # missing. Where the lock file cannot be opened (read-only copy of a store, no write
        # permission) the store is not being written either, and a lock-free reader is safe.
        # Not fork-safe either way: `_forget_envs_after_fork` makes each process open its own.
        try:
            env = lmdb.open(str(shard_dir), readonly=True, lock=True, readahead=False, max_readers=2048,
                            subdir=True)
        except lmdb.Error:
            try:
                env = lmdb.open(str(shard_dir), readonly=True, lock=False, readahead=False, max_readers=2048,
                                subdir=True)
            except lmdb.Error as err:
                raise StoreError(f"LMDB shard {shard_dir} cannot be opened: {err}") from err
        try:
            _check_not_truncated(env, shard_dir)
        except StoreError:
            env.close()
            raise
        _ENVS[key] = env
    return env


def _check_not_truncated(env: lmdb.Environment, shard_dir: Path) -> None:
    """Refuse an LMDB file shorter than its own last page: touching the missing pages would kill the
    process with SIGBUS (LMDB maps the file) instead of raising an error anyone could read."""
    data_file = shard_dir / "data.mdb"
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data_file)
    if size < needed:
        raise StoreError(
            f"LMDB shard {shard_dir} is truncated: {data_file} holds {size:,} bytes, its pages end at "
            f"{needed:,}. Restore the file, or delete the shard's folder and its segments/boxes parts "
            f"(part-{shard_dir.name}-*.parquet) and rebuild them"
        )


def _writer_env(shard_dir: Path, map_size: int) -> lmdb.Environment:
    key = _env_key(shard_dir)
    _close_reader_env(shard_dir)
    # No fsync per commit: a killed process loses nothing committed (the pages are the kernel's), and
    # StoreWriter.flush syncs before it exports rows to Parquet, so an OS crash can never leave an
    # index row pointing at tensors that did not reach the disk.
    try:
        env = lmdb.open(str(shard_dir), map_size=map_size, subdir=True, max_readers=2048, meminit=False,
                        sync=False, metasync=False)
    except lmdb.Error as err:
        raise StoreError(f"LMDB shard {shard_dir} cannot be opened for writing: {err}") from err
    try:
        _check_not_truncated(env, shard_dir)
        # Reader slots of processes that died mid-read would pin old pages forever: clear them.
        env.reader_check()
    except BaseException:
        env.close()
        raise
    _ENVS[key] = env
    _WRITER_ENVS.add(key)
    return env


def _close_reader_env(shard_dir: Path) -> None:
    key = _env_key(shard_dir)
    if key in _ENVS and key not in _WRITER_ENVS:
        _ENVS.pop(key).close()


def _close_writer_env(shard_dir: Path) -> None:
    key = _env_key(shard_dir)
    _WRITER_ENVS.discard(key)
    env = _ENVS.pop(key, None)
    if env is not None:
        env.close()


def _forget_envs_after_fork() -> None:
    # A forked child must not use its parent's LMDB handles (DataLoader workers fork): close the
    # inherited read-only ones so the child reopens its own. Closing a lock-free reader touches only
    # this process's mapping and descriptor. Writer handles are dropped unused.
    # A child's copy of a writer's lock descriptor would keep the shard locked after the writer
    # dies (flock belongs to the open file, which the child shares): close the child's copies.
    for handle in list(_WRITER_LOCKS):
        try:
            os.close(handle.fileno())
        except OSError:
            pass
    _WRITER_LOCKS.clear()
    _ENV_LOCK[0] = threading.Lock()  # another thread of the parent may have held it at the fork
    for key in list(_ENVS):
        env = _ENVS.pop(key)
        if key in _WRITER_ENVS:
            _INHERITED_WRITERS.append(env)  # kept alive: garbage collection would close it
        else:
            env.close()
    _WRITER_ENVS.clear()


os.register_at_fork(after_in_child=_forget_envs_after_fork)


def _describe_fields(fields: Mapping[str, FieldSpec]) -> str:
    return "{" + ", ".join(f"{n}: {s.dtype}{list(s.shape)}" for n, s in sorted(fields.items())) + "}"


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
        _WRITER_LOCKS.add(self._lock_handle)
        self.map_grows = 0
        self._closed = False
        try:
            self.env = _writer_env(self.dir, map_size)
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
        record = {name: row.get(name) for name in SEGMENT_SCHEMA.names}
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

    def put(self, row: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
            boxes: Mapping[str, Sequence] | None = None) -> str:
        """Store one segment: its tensors and its index row, atomically.

        Args:
            row: segment columns (at least uid, participant_id, video_id, start_frame, stop_frame).
            tensors: field -> array of the field's shape (cast to the field's dtype here).
            boxes: optional box columns (set, slot, frame, x1, y1, x2, y2, score, label, valid).
        Returns:
            The segment's checksum.
        """
        uid = str(row["uid"])
        prepared = self.prepare(tensors, uid)
        checksum = segment_checksum(prepared)
        puts = [(f"{uid}/{name}".encode(), memoryview(arr).cast("B").tobytes()) for name, arr in prepared.items()]
        puts.append(self._journal_entry(row, STATUS_OK, None, checksum, boxes))
        self._commit(puts)
        self._maybe_flush()
        return checksum

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
        uid = str(row["uid"])
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
        segments = pa.Table.from_pylist([e["segment"] for e in entries], schema=SEGMENT_SCHEMA)
        box_columns: dict[str, list] = {col: [] for col in BOX_SCHEMA.names}
        for entry in entries:
            cols = entry["boxes"]
            if not cols:
                continue
            n = len(cols["slot"])
            for col in BOX_SCHEMA.names:
                if col == "uid":
                    box_columns[col].extend([entry["segment"]["uid"]] * n)
                elif col == "written_at":
                    box_columns[col].extend([entry["segment"]["written_at"]] * n)
                else:
                    box_columns[col].extend(cols[col])
        # Boxes first: a segment row is the proof of completion, so it must not appear before its boxes.
        if box_columns["uid"]:
            write_parquet(self.store.path / "boxes" / name, pa.Table.from_pydict(box_columns, schema=BOX_SCHEMA))
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
        _close_writer_env(self.dir)
        _WRITER_LOCKS.discard(self._lock_handle)
        fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
        self._lock_handle.close()
        self._closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _boxes_to_json(boxes: Mapping[str, Sequence] | None) -> dict[str, list] | None:
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


def iter_chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
