"""The feature store: LMDB tensors, a Parquet index, a JSON manifest (DESIGN.md section 3).

Layout of a store directory::

    STORE/
      manifest.json          format version, field schema, provenance
      segments/*.parquet     one row per segment (the index: a segment exists once its row does)
      boxes/*.parquet        one row per detection slot
      lmdb/<shard>/          one LMDB environment per writer

`FeatureStore` opens a store for reading; `FeatureStore.writer` opens one shard for writing
(`featstore.store.writer`: the journal, durability); both take their LMDB environments from the
process's cache (`featstore.store.environments`).

Derived fields. A field computed from a store's own fields (``verb.local``, see
``featstore.store.local_pool``) can be added to an existing store (``featstore derive``): the manifest
gains the field in its schema and a ``derived`` entry saying how it was made, with
``complete: false`` until every stored segment has it. Each segment gets it the way segments are
written (`StoreWriter.extend`), so an interrupted derive loses nothing and a rerun continues.
Readers treat a field that is not complete as absent (``complete_fields``).

Temporal views (docs/views.md). A store built with ``--views K`` holds an index row per view of a
segment (column ``view``; 0 is the centre clip) and each view's tensors under its own key,
``view_key(uid, view)``: ``uid`` for view 0, ``uid/v{view}`` after it. Every tensor read takes such
keys where it takes uids (``read_field(keys, field)``), so a view is addressed, never copied;
`segments` and `uids` give view 0 unless asked for every view (``view=None``), so a reader that
knows nothing of views reads a store with views as the store of its centre clips.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import duckdb
import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featstore import __version__
from featstore.epic.annotations import SEGMENT_SCHEMA as ANNOTATION_SCHEMA
from featstore.io.atomic import TMP_SUFFIX, atomic_write_json
from featstore.io.folders import other_kind_refusal
from featstore.store.environments import ENVIRONMENTS, read_around
from featstore.store.schema import (
    FIRST_VIEW,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STATUS_FAILED,
    STATUS_OK,
    VIEW_COLUMN,
    FieldMismatchError,
    FieldSpec,
    FormatVersionError,
    StoreError,
    view_key,
)
from featstore.store.writer import DEFAULT_MAP_SIZE, StoreWriter, segment_checksum


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


def _make_store_folders(path: Path) -> None:
    for sub in ("segments", "boxes", "lmdb"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def holds_nothing_of_note(path: str | os.PathLike) -> bool:
    """Whether ``path`` is absent or holds nothing a store creation would overwrite.

    Nothing of note: no files but hidden atomic-write temporaries, and at most a store's empty
    skeleton (``segments/``, ``boxes/``, ``lmdb/`` without files), which a create killed by an older
    release left.
    """
    path = Path(path)
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    for entry in path.iterdir():
        if entry.is_file() and entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX):
            continue
        if entry.is_dir() and entry.name in ("segments", "boxes", "lmdb") and not any(
                p.is_file() for p in entry.rglob("*")):
            continue
        return False
    return True


def _check_manifest(manifest_path: Path, manifest: Any) -> None:
    """Refuse a manifest whose outline is wrong, naming the manifest (not every segment it describes)."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{manifest_path} is not a store manifest: it holds a JSON {type(manifest).__name__}, "
                         f"not an object; restore the manifest or rebuild the store")
    fields = manifest.get("fields")
    if not isinstance(fields, dict) or not fields:
        what = "no 'fields'" if fields is None else f"'fields' = {json.dumps(fields)[:80]}"
        raise StoreError(f"{manifest_path} has {what}: a store manifest maps every field name to its dtype "
                         f"and shape; restore the manifest or rebuild the store")
    for key in ("provenance", "derived"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise StoreError(f"{manifest_path}: '{key}' must be an object, not {type(manifest[key]).__name__}")


def _selection(where: str | None, split: str | None) -> str | None:
    """One WHERE expression of a named split and a user's expression (`featstore.epic.splits.resolve_selection`).

    Raises:
        StoreError: an unknown split, or a split's name given as the expression (which DuckDB would
            read as a subtraction of unknown columns).
    """
    from featstore.epic.splits import NAMED_SPLITS, resolve_selection

    if where is not None and where.strip() in NAMED_SPLITS:
        name = where.strip()
        raise StoreError(f"{name!r} is a named split, not a WHERE expression: pass it as split={name!r} "
                         f"(the where argument takes SQL, e.g. \"participant_id >= 'P26'\")")
    try:
        return resolve_selection(split, where)
    except ValueError as err:
        raise StoreError(str(err)) from None


def _describe_fields(fields: Mapping[str, FieldSpec]) -> str:
    return "{" + ", ".join(f"{n}: {s.dtype}{list(s.shape)}" for n, s in sorted(fields.items())) + "}"


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
        self._shard_cache: tuple[tuple, dict[str, tuple[str, str]], dict[str, int]] | None = None  # _shard_index

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
        refusal = other_kind_refusal(path, "store")
        if refusal is not None:
            raise StoreError(refusal)
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
            _make_store_folders(path)  # a create killed between its manifest and its folders
            return store
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
        # The manifest first, then the folders: a create killed at any point leaves either nothing of
        # the store (temporaries at most) or its manifest, so a rerun continues instead of finding
        # "a folder that is not empty and not a store". Two ranks may create the same store at once:
        # both write identical schemas, last rename wins.
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest_path, manifest, sort_keys=True)
        _make_store_folders(path)
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
        _check_manifest(manifest_path, manifest)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{path} has store format version {version!r} (its {MANIFEST_NAME}); this featstore {__version__} reads "
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

    def segments(self, where: str | None = None, *, split: str | None = None,
                 status: str | None = None, view: int | None = FIRST_VIEW) -> pa.Table:
        """The index, one row per uid, optionally filtered by a named split and a DuckDB WHERE expression.

        Args:
            where: SQL boolean expression over the segment columns (``"participant_id = 'P01'"``),
                or None for all.
            split: a named split (``featstore.epic.splits.NAMED_SPLITS``, e.g. ``"epic55-lfb-val"``),
                ANDed with ``where``.
            status: 'ok' or 'failed' to keep only those.
            view: the temporal view whose rows are returned (default 0, the centre clip: one row
                per uid), or None for every view's row (docs/views.md).
        Returns:
            A table in uid (then view) order.
        Raises:
            StoreError: a bad selection, an unknown split, or a split's name passed as ``where``.
        """
        from featstore.epic.selection import SelectionError, parse_selection
        from featstore.store.query import fetch_relation

        where = _selection(where, split)
        with self.connect() as con:
            relation = con.table("segments")
            try:
                if where is not None and where.strip():
                    relation = relation.filter(parse_selection(where, relation.columns))
                if status is not None:
                    relation = relation.filter(duckdb.ColumnExpression("status") == duckdb.ConstantExpression(status))
                if view is not None:
                    relation = relation.filter(duckdb.ColumnExpression(VIEW_COLUMN) == duckdb.ConstantExpression(int(view)))
                return fetch_relation(relation.order(f"uid, {VIEW_COLUMN}"))
            except SelectionError as err:
                raise StoreError(str(err)) from None
            except duckdb.Error as err:  # binding (a table function as a value) or running (a bad cast)
                raise StoreError(f"selection {where!r} failed: {str(err).strip().splitlines()[0]}") from None

    def uids(self, where: str | None = None, *, split: str | None = None,
             status: str | None = STATUS_OK) -> list[str]:
        """uids of the selected segments (by default only the stored, ``ok`` ones), in uid order.

        ``store.uids(split="epic55-lfb-val")`` for a named split, ``store.uids("participant_id = 'P01'")``
        for any WHERE expression, both for their intersection (see `segments`).
        """
        return self.segments(where, split=split, status=status).column("uid").to_pylist()

    def labels(self, where: str | None = None, *, split: str | None = None) -> pa.Table:
        """The annotation columns of the stored (``ok``) segments: what each uid is, without its bookkeeping.

        Args:
            where, split: a selection, as `segments` takes it (default: every stored segment).
        Returns:
            A table in uid order with the annotation columns (``featstore.epic.annotations.SEGMENT_SCHEMA``):
            uid, dataset, source, participant_id, video_id, start/stop frame and timestamp, narration,
            verb_class and noun_class (null where unlabelled: test sets). In a store with temporal
            views, one row per segment (its view 0). ``.to_pandas()``, ``.to_pylist()``, or
            ``dict(zip(t["uid"].to_pylist(), t["verb_class"].to_pylist()))`` for a uid -> label dict.
        """
        table = self.segments(where, split=split, status=STATUS_OK, view=FIRST_VIEW)
        return table.select([name for name in ANNOTATION_SCHEMA.names if name in table.column_names])

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
        return ENVIRONMENTS.reader(shard_dir)

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
        """view key (``uid`` for view 0) -> (shard, status) of the whole index, cached until the
        index parts change.

        Every read looks its segments up here: one DuckDB query per read made the preload of a
        field cost a query, and a streaming batch a query per segment.
        """
        state = self._segments_state()
        if self._shard_cache is None or self._shard_cache[0] != state:
            with self.connect() as con:
                table = con.sql(f"select uid, {VIEW_COLUMN}, shard, status from segments").to_arrow_table()
            uids, views = table.column("uid").to_pylist(), table.column(VIEW_COLUMN).to_pylist()
            statuses = table.column("status").to_pylist()
            index = dict(zip((view_key(uid, view) for uid, view in zip(uids, views)),
                             zip(table.column("shard").to_pylist(), statuses)))
            counts: dict[str, int] = {}
            for uid, status in zip(uids, statuses):
                if status == STATUS_OK:
                    counts[uid] = counts.get(uid, 0) + 1
            self._shard_cache = (state, index, counts)
        return self._shard_cache[1]

    def view_counts(self, uids: Sequence[str]) -> list[int]:
        """How many temporal views each stored segment of ``uids`` has (1 in a store without views).

        Its views are ``0 .. count - 1``, read under ``view_key(uid, view)`` (docs/views.md).

        Raises:
            KeyError: a uid that is not a stored segment.
        """
        self._shard_of(uids)
        counts = self._shard_cache[2]  # type: ignore[index]
        return [counts[uid] for uid in uids]

    @property
    def max_views(self) -> int:
        """The most temporal views any stored segment has: 1 in a store without views."""
        self._shard_index()
        return max(self._shard_cache[2].values(), default=1)  # type: ignore[index]

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

    def read(self, uid: str, fields: Iterable[str] | None = None, *, view: int = FIRST_VIEW) -> dict[str, np.ndarray]:
        """Tensors of one stored segment.

        Args:
            uid: the segment.
            fields: field names; all of the store's when None.
            view: its temporal view (0, the centre clip, in a store without views).
        Returns:
            field -> read-only array with the field's dtype and shape.
        """
        uid = view_key(uid, view)
        fields = self._check_fields(self.fields if fields is None else fields)
        shard = self._shard_of([uid])[uid]
        with self._begin(shard) as txn:
            return {f: self._decode(uid, f, txn.get(f"{uid}/{f}".encode())) for f in fields}

    def read_field(
        self, uids: Sequence[str], field: str, *, out: np.ndarray | None = None, progress=None
    ) -> np.ndarray:
        """One field of many segments stacked into one array (the preload path).

        Args:
            uids: stored segments, in the order wanted: uids, or view keys (``view_key(uid, view)``)
                for temporal views other than the centre one.
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

    def read_ahead(self, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """Kernel readahead on the shards' memory maps for a read of most of the store in key order.

        Readers map the shards for random access (readahead off: a shuffled batch must not drag
        neighbours it does not need into memory), so a cold pass over the whole store faulted its
        pages in one 4 KiB read at a time: 20-25 MiB/s where the disk reads 250+ sequentially.
        Inside this context the maps take the kernel's normal read-around, as a preload, a copy
        or a derive wants; the random-access advice is restored after. Linux only (elsewhere, and
        when ``enabled`` is false, nothing changes).
        """
        return read_around(self._shard_dirs()) if enabled else contextlib.nullcontext()

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
            uids: stored segments, in the order wanted (uids or view keys, as `read_field`).
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
        """Recompute each stored segment's checksum from its LMDB bytes (every temporal view's).

        Returns:
            (uid, reason) for every segment whose bytes are missing, mis-sized or changed, the view
            key (``uid/v{view}``) for a view after the first; empty when clean.
        """
        table = self.segments(status=STATUS_OK, view=None)
        if uids is not None:
            wanted = set(uids)
            table = table.filter(pc.is_in(table.column("uid"), pa.array(sorted(wanted), pa.string())))
        bad: list[tuple[str, str]] = []
        rows = [{**row, "uid": view_key(row["uid"], row[VIEW_COLUMN])}
                for row in table.select(["uid", VIEW_COLUMN, "shard", "checksum"]).to_pylist()]
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
            counts = dict(con.execute(f"select status, count(*) from segments where {VIEW_COLUMN} = {FIRST_VIEW} "
                                      "group by status").fetchall())
            per_view = dict(con.execute(f"select {VIEW_COLUMN}, count(*) from segments where status = '{STATUS_OK}' "
                                        f"group by {VIEW_COLUMN} order by {VIEW_COLUMN}").fetchall())
        ok = int(counts.get(STATUS_OK, 0))
        n_views = int(sum(per_view.values()))
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
            # Temporal views (docs/views.md): stored views of each view number; a view is a segment's
            # fields, so its bytes are the per-segment figures; the measured figure is per view.
            "views": {
                "per_view": {int(view): int(n) for view, n in per_view.items()},
                "total": n_views,
                "max": max((int(view) + 1 for view in per_view), default=1),
                "bytes_per_view": on_disk // n_views if n_views else None,
                "recorded": self.manifest.get("provenance", {}).get("views"),
            },
            "map_alternatives": map_alternatives(self.fields, self.manifest, ok),
            "derived": self.derived,
            "manifest": self.manifest,
        }

    def _page_size(self) -> int:
        for shard_dir in self._shard_dirs():
            try:
                return int(ENVIRONMENTS.reader(shard_dir).stat()["psize"])
            except (StoreError, lmdb.Error):
                continue
        return 4096

    # ------------------------------------------------------------------ writing
    def writer(self, shard: str = "0", *, flush_every: int = 256, map_size: int = DEFAULT_MAP_SIZE) -> StoreWriter:
        """Open shard ``shard`` for writing (one writer per shard; a second is refused)."""
        return StoreWriter(self, shard, flush_every=flush_every, map_size=map_size)

    def close(self) -> None:
        """Close this store's read-only environments in this process (they reopen on the next read)."""
        for shard_dir in self._shard_dirs():
            ENVIRONMENTS.close_reader(shard_dir)
