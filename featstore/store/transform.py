"""Store to store: add derived fields in place (`featstore derive`), copy a subset (`featstore copy`).

``derive_field`` computes a field from a store's own fields for every stored segment and writes it
into the segment's shard the way any segment is written (see ``featstore.store.writer``: tensor and new
index row in one LMDB transaction), so a killed derive loses nothing and a rerun continues where it
stopped. The manifest gains the field, ``complete: false`` until the last segment has it.

``copy_store`` writes a new store holding some of the fields of some of the segments of another
(e.g. without ``verb.map`` once ``verb.local`` is derived). Each source segment's checksum is
checked before its bytes are copied, the copy's own checksums are verified once it is written, and
the source is only ever read. A rerun of the same copy continues it.

Temporal views (docs/views.md): both work on every view of a segment, addressed by its key
(``view_key(uid, view)``). ``derive`` pools each view's map at that view's own boxes; ``copy`` keeps
the views its selection names (``--where "view = 0"`` makes a one-view store of the centre clips) and
refuses a selection that would keep a later view of a segment without its view 0.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from featstore.io.progress import progress_bar
from featstore.store.local_pool import (
    LOCAL_FIELD,
    LOCAL_OUTPUT_SIZE,
    check_local_recipe,
    local_recipe,
    local_source,
    pool_local_verb_features,
)
from featstore.store.reader import FeatureStore, holds_nothing_of_note
from featstore.store.schema import (
    FIRST_VIEW,
    STATUS_FAILED,
    STATUS_OK,
    VIEW_COLUMN,
    FieldSpec,
    StoreError,
    default_dtype,
    view_key,
)
from featstore.store.writer import segment_checksum

__all__ = ["DERIVABLE_FIELDS", "DeriveError", "DeriveReport", "CopyReport", "derive_field", "copy_store"]

DERIVABLE_FIELDS = (LOCAL_FIELD,)
INDEX_BLOCK = 1024  # segments whose index rows (boxes) are fetched at once
BOX_COLUMNS = ("set", "slot", "frame", "x1", "y1", "x2", "y2", "score", "label", "valid")


class DeriveError(StoreError):
    """A field cannot be derived, or a store cannot be copied, as asked."""


@dataclass
class DeriveReport:
    """What one ``derive_field`` call did."""

    store: Path
    field: str
    source: tuple[str, ...] = ()
    derived: int = 0  # segments that got the field now
    already: int = 0  # segments that had it from an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uid, why): left without the field
    complete: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.derived / self.seconds if self.seconds > 0 else 0.0
        source = f" from {' + '.join(self.source)}" if self.source else ""
        lines = [f"{self.field}{source}: derived {self.derived}, already there {self.already}, "
                 f"failed {len(self.failed)} ({self.seconds:.1f} s, {rate:.1f} segments/s)"]
        lines += [f"  failed {uid}: {why}" for uid, why in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more")
        lines.append(f"{self.field} is complete: every stored segment has it" if self.complete else
                     f"{self.field} is not complete yet: readers treat it as absent; fix what failed "
                     f"(`featstore verify`) and rerun")
        return "\n".join(lines)


def _key(row: Mapping[str, Any]) -> str:
    """An index row's tensor key: its uid, or ``uid/v{view}`` for a later temporal view."""
    return view_key(row["uid"], row.get(VIEW_COLUMN) or FIRST_VIEW)


def _box_columns(table: pa.Table) -> dict[str, dict[str, list]]:
    """view key -> the journal's box columns of that view's rows (``StoreWriter.put`` / ``extend``)."""
    out: dict[str, dict[str, list]] = {}
    columns = {name: table.column(name).to_pylist() for name in ("uid", VIEW_COLUMN, *BOX_COLUMNS)}
    for i, (uid, view) in enumerate(zip(columns["uid"], columns[VIEW_COLUMN])):
        entry = out.setdefault(view_key(uid, view), {name: [] for name in BOX_COLUMNS})
        for name in BOX_COLUMNS:
            entry[name].append(columns[name][i])
    return out


def _stored_by_shard(store: FeatureStore, where: str | None = None) -> dict[str, list[dict[str, Any]]]:
    rows = store.segments(where, status=STATUS_OK, view=None).to_pylist()
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    return by_shard


def _lacking(store: FeatureStore, rows: Sequence[Mapping[str, Any]], name: str) -> list[dict]:
    missing = set(store.lacking([_key(row) for row in rows], name))
    return [dict(row) for row in rows if _key(row) in missing]


def _stored_keys(store: FeatureStore) -> list[str]:
    """The keys of every stored view of every stored segment."""
    return [_key(row) for row in store.segments(status=STATUS_OK, view=None).select(["uid", VIEW_COLUMN]).to_pylist()]


def _intact(tensors: Mapping[str, np.ndarray], row: Mapping[str, Any]) -> bool:
    return segment_checksum(tensors) == row["checksum"]


def derive_field(
    store_path: str | os.PathLike,
    name: str = LOCAL_FIELD,
    *,
    pool: str = "avg",
    output_size: int = LOCAL_OUTPUT_SIZE,
    batch_size: int = 16,
    device: str = "cpu",
    flush_every: int = 256,
    progress: bool = True,
    command: str | None = None,
    on_segment: Callable[[str], None] | None = None,
) -> DeriveReport:
    """Add derived field ``name`` to every stored segment of a store, in place and resumably.

    ``verb.local`` (the only derivable field so far) is the verb map averaged over time, RoIAlign
    at the ``det.local`` boxes and pooled, by ``featstore.store.local_pool.pool_local_verb_features``:
    the numbers the heads compute at load time from the same map.

    Args:
        store_path: the store; nobody else may be writing it.
        name: the field to derive.
        pool: ``avg`` or ``max`` over the RoIAlign bins (recorded in the manifest).
        output_size: RoIAlign bins per side.
        batch_size: segments pooled at once.
        device: where the pooling runs (``cpu`` or ``cuda``).
        flush_every: segments between Parquet exports of the index rows.
        progress: a progress bar on stderr.
        command: the command line, for the manifest.
        on_segment: called with each uid once its field is committed (tests interrupt here).
    Returns:
        The report; ``complete`` once every stored segment has the field.
    Raises:
        DeriveError: an unknown field, a store without the fields it is made from, another
            derive unfinished.
        LocalRecipeError: the store holds ``verb.local`` pooled otherwise.
    """
    started = time.perf_counter()
    store = FeatureStore.open(store_path)
    report = DeriveReport(store=store.path, field=name)
    if name not in DERIVABLE_FIELDS:
        raise DeriveError(f"cannot derive {name!r}; derivable fields: {', '.join(DERIVABLE_FIELDS)}")
    if batch_size < 1:
        raise DeriveError(f"batch_size must be >= 1, got {batch_size}")
    others = sorted(store.incomplete_fields - {name})
    if others:
        raise DeriveError(f"{store.path}: {', '.join(others)} is still being derived; finish that first "
                          f"(`featstore derive {store.path} --field {others[0]}`)")
    source, complete = _field_source(store, name, pool=pool, output_size=output_size)
    report.source = source
    if complete:
        report.complete = True
        report.already = len(_stored_keys(store))
        report.seconds = time.perf_counter() - started
        return report
    runs = list(store.manifest.get("provenance", {}).get("derive_runs", []))
    runs.append({"field": name, "command": command, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    store.update_provenance(derive_runs=runs)
    _derive_shards(store, name, source, report, pool=pool, output_size=output_size, batch_size=batch_size,
                   device=torch.device(device), flush_every=flush_every, progress=progress, on_segment=on_segment)
    report.complete = _finish(store, name) if not report.failed else False
    report.seconds = time.perf_counter() - started
    return report


def _field_source(store: FeatureStore, name: str, *, pool: str, output_size: int) -> tuple[tuple[str, ...], bool]:
    """The fields ``name`` is made from, and whether every segment has it; a new field joins the schema here."""
    if name in store.fields:
        recipe = store.derived.get(name)
        if recipe is None:
            raise DeriveError(f"{store.path} already holds {name}, not derived here (imported features); "
                              f"copy the store without it (`featstore copy --fields`) to derive it")
        check_local_recipe(recipe, pool=pool, output_size=output_size, where=str(store.path))
        source = tuple(recipe["from"])
        if recipe.get("complete", True):
            return source, True
        if not set(source) <= set(store.complete_fields):
            raise DeriveError(f"{store.path}: {name} was being derived from {' + '.join(source)}, "
                              f"which the store no longer holds")
        return source, False
    found = local_source(store.complete_fields)
    if found is None:
        raise DeriveError(
            f"{store.path} cannot give {name}: it needs verb.map (or verb.map_tmean) and det.local.box; "
            f"the store holds {', '.join(sorted(store.complete_fields))}")
    map_spec = store.fields[found[0]]
    spec = FieldSpec(default_dtype(name), (int(store.fields[found[1]].shape[0]), int(map_spec.shape[0])))
    store.add_derived_field(name, spec, local_recipe(pool=pool, output_size=output_size, source=found[0],
                                                     source_shape=map_spec.shape))
    return found, False


def _derive_shards(store: FeatureStore, name: str, source: Sequence[str], report: DeriveReport, *, pool: str,
                   output_size: int, batch_size: int, device: torch.device, flush_every: int, progress: bool,
                   on_segment: Callable[[str], None] | None) -> None:
    """Derive ``name`` for every stored segment lacking it, shard by shard, counting into ``report``."""
    fields = list(store.complete_fields)
    by_shard = _stored_by_shard(store)
    bar = progress_bar(total=sum(len(rows) for rows in by_shard.values()), desc=f"derive {name}", unit="seg",
                       enabled=progress)
    try:
        for shard in sorted(by_shard):
            # The writer first re-exports what a killed run committed but had not indexed. Reads go
            # through its environment too, which maps the shard with the kernel's readahead.
            with store.writer(shard, flush_every=flush_every) as writer:
                rows = {_key(row): row for row in store.segments(f"shard = '{shard}'", status=STATUS_OK,
                                                                  view=None).to_pylist()}
                todo = _lacking(store, list(rows.values()), name)
                report.already += len(rows) - len(todo)
                bar.update(len(rows) - len(todo))
                for block_start in range(0, len(todo), INDEX_BLOCK):
                    block = todo[block_start:block_start + INDEX_BLOCK]
                    # One index query per block: a DuckDB connection per pooling batch cost more than the pooling.
                    box_rows = _box_columns(store.boxes(sorted({row["uid"] for row in block})))
                    for start in range(0, len(block), batch_size):
                        chunk = block[start:start + batch_size]
                        _derive_chunk(store, writer, chunk, fields, source, name, pool, output_size, device,
                                      box_rows, report, on_segment)
                        bar.update(len(chunk))
    finally:
        bar.close()


def _derive_chunk(store: FeatureStore, writer, chunk: Sequence[Mapping[str, Any]], fields: Sequence[str],
                  source: Sequence[str], name: str, pool: str, output_size: int, device: torch.device,
                  box_rows: Mapping[str, dict[str, list]], report: DeriveReport,
                  on_segment: Callable[[str], None] | None) -> None:
    uids = [_key(row) for row in chunk]  # a view's key: its tensors are read and extended under it
    tensors = store.read_fields(uids, fields)
    intact = [i for i, row in enumerate(chunk) if _intact({f: tensors[f][i] for f in fields}, row)]
    for i in sorted(set(range(len(chunk))) - set(intact)):
        # A fresh checksum over damaged bytes would make them look sound: leave such a segment alone.
        report.failed.append((uids[i], "checksum mismatch: its stored bytes changed (featstore verify)"))
    if not intact:
        return
    rows = slice(None) if len(intact) == len(chunk) else intact  # no copy of the maps when all are sound
    verb_map = torch.from_numpy(tensors[source[0]][rows]).to(device)
    boxes = torch.from_numpy(tensors[source[1]][rows]).to(device)
    pooled = pool_local_verb_features(verb_map, boxes, output_size=output_size, pool=pool)
    pooled = pooled.to(torch.float16).cpu().numpy()  # (n, K, C), as stored
    for j, i in enumerate(intact):
        value = pooled[j]
        checksum = segment_checksum({**{f: tensors[f][i] for f in fields}, name: value})
        writer.extend(chunk[i], {name: value}, checksum=checksum, boxes=box_rows.get(uids[i]))
        report.derived += 1
        if on_segment is not None:
            on_segment(uids[i])


def _finish(store: FeatureStore, name: str) -> bool:
    """Mark ``name`` complete when every stored segment has it, checked while every shard is locked."""
    with contextlib.ExitStack() as locks:
        for shard in store.shards():
            locks.enter_context(store.writer(shard))
        if store.lacking(_stored_keys(store), name):
            return False
        store.mark_derived_complete(name)
    return True


# ------------------------------------------------------------------------------------------------
# copy


@dataclass
class CopyReport:
    """What one ``copy_store`` call did."""

    source: Path
    target: Path
    fields: tuple[str, ...] = ()
    copied: int = 0
    already: int = 0  # copied by an earlier run of the same copy
    not_copied_failed: int = 0  # failed segments of the source (nothing to copy)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # source segments whose checksum failed
    verified: int = 0  # target segments whose checksums were recomputed after the copy
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"copied {self.copied}, already copied {self.already} segments ({', '.join(self.fields)}) "
                 f"into {self.target} in {self.seconds:.1f} s; {self.verified} verified"]
        if self.not_copied_failed:
            lines.append(f"{self.not_copied_failed} failed segments of the source have no features and were not copied")
        lines += [f"  not copied {uid}: {why}" for uid, why in self.damaged[:20]]
        if len(self.damaged) > 20:
            lines.append(f"  ... and {len(self.damaged) - 20} more")
        return "\n".join(lines)


def copy_store(
    source_path: str | os.PathLike,
    target_path: str | os.PathLike,
    *,
    fields: Iterable[str] | None = None,
    where: str | None = None,
    batch_size: int = 16,
    flush_every: int = 256,
    progress: bool = True,
    command: str | None = None,
    on_segment: Callable[[str], None] | None = None,
) -> CopyReport:
    """Write a new store with some fields of some segments of another; the source is only read.

    Args:
        source_path: the store to copy from.
        target_path: the new store (a rerun of the same copy continues it).
        fields: the fields to keep (default: all of the source's).
        where: a DuckDB WHERE over the source's segments (default: every stored segment).
        batch_size: segments read at once.
        flush_every: segments between Parquet exports.
        progress: a progress bar on stderr.
        command: the command line, for the target's manifest.
        on_segment: called with each uid once it is committed.
    Returns:
        The report; source segments whose checksum fails are listed and not copied.
    Raises:
        DeriveError: unknown fields, a target that is the source or another store, a source
            with a derive in progress, or a copy whose own checksums do not verify.
    """
    started = time.perf_counter()
    source = FeatureStore.open(source_path)
    target_path = Path(target_path)
    inside = target_path.resolve().is_relative_to(source.path.resolve())
    if inside or source.path.resolve().is_relative_to(target_path.resolve()):
        where = "inside its source" if inside else "into a folder that holds its source"
        raise DeriveError(f"{target_path}: a copy cannot go {where} ({source.path}); the source must "
                          f"never change. Copy into a directory outside it")
    if source.incomplete_fields:
        raise DeriveError(f"{source.path}: {', '.join(sorted(source.incomplete_fields))} is still being derived; "
                          f"finish it (`featstore derive`) before copying")
    kept = sorted(source.fields) if fields is None else list(dict.fromkeys(fields))
    unknown = [f for f in kept if f not in source.fields]
    if unknown or not kept:
        raise DeriveError(f"{source.path} has no field(s) {', '.join(unknown) or '(none given)'}; "
                          f"it holds {', '.join(sorted(source.fields))}")
    copied_from = {"path": str(source.path.resolve()), "manifest_sha256": source.manifest_hash,
                   "fields": sorted(kept), "where": where}
    derived = {name: {k: v for k, v in recipe.items() if k not in ("complete", "completed_at")}
               for name, recipe in source.derived.items() if name in kept}
    wanted = source.segments(where, view=None)  # a bad selection is refused before the target exists
    _check_views_kept(source, wanted)
    target = _open_target(target_path, {f: source.fields[f] for f in kept},
                          _copy_provenance(source, copied_from, command), derived, copied_from)
    report = CopyReport(source=source.path, target=target.path, fields=tuple(sorted(kept)))
    report.not_copied_failed = sum(status == STATUS_FAILED for status in wanted.column("status").to_pylist())
    rows = [row for row in wanted.to_pylist() if row["status"] == STATUS_OK]
    _copy_segments(source, target, rows, kept, report, batch_size=batch_size, flush_every=flush_every,
                   progress=progress, on_segment=on_segment)
    # Every copied segment of the selection, not only this call's: a copy killed during its own
    # check (or before it) left segments nobody has verified yet.
    in_target = set(target.uids())
    to_check = sorted({row["uid"] for row in rows if row["uid"] in in_target})
    bad = target.verify(to_check)
    if bad:
        raise DeriveError(f"{target.path}: {len(bad)} copied segments do not verify (first: {bad[0][0]}: {bad[0][1]})")
    report.verified = len(to_check)
    report.seconds = time.perf_counter() - started
    return report


def _copy_provenance(source: FeatureStore, copied_from: Mapping[str, Any], command: str | None) -> dict[str, Any]:
    """The copy's provenance: the source's, where it was copied from, and the verb map's shape."""
    provenance = {**source.manifest.get("provenance", {}), "copied_from": copied_from,
                  "copy_command": command}
    if "verb_map_shape" not in provenance:
        from featstore.store.sizes import verb_map_shape

        shape = verb_map_shape(source.fields, source.manifest)
        if shape is not None:
            provenance["verb_map_shape"] = list(shape)  # so that the copy can still size its --map choices
    return provenance


def _copy_segments(source: FeatureStore, target: FeatureStore, rows: Sequence[Mapping[str, Any]],
                   kept: Sequence[str], report: CopyReport, *, batch_size: int, flush_every: int, progress: bool,
                   on_segment: Callable[[str], None] | None) -> list[str]:
    """Copy the ``kept`` fields of the intact ``rows`` not copied yet; returns the uids this call copied."""
    all_fields = sorted(source.fields)
    copied: list[str] = []
    bulk = source.share_of_files(len(rows), all_fields) >= 0.5  # most of the source: read it with readahead
    with source.read_ahead(bulk), target.writer("0", flush_every=flush_every) as writer:
        done = set(_stored_keys(target))
        todo = [row for row in rows if _key(row) not in done]
        report.already = len(rows) - len(todo)
        bar = progress_bar(total=len(todo), desc="copy", unit="seg", enabled=progress)
        for block_start in range(0, len(todo), INDEX_BLOCK):
            block = todo[block_start:block_start + INDEX_BLOCK]
            box_rows = _box_columns(source.boxes(sorted({row["uid"] for row in block})))  # one index query per block
            for start in range(0, len(block), batch_size):
                chunk = block[start:start + batch_size]
                tensors = source.read_fields([_key(row) for row in chunk], all_fields)
                for i, row in enumerate(chunk):
                    segment = {f: tensors[f][i] for f in all_fields}
                    if not _intact(segment, row):
                        report.damaged.append((_key(row), "checksum mismatch in the source (featstore verify it)"))
                        continue
                    writer.put(row, {f: segment[f] for f in kept}, boxes=box_rows.get(_key(row)))
                    copied.append(row["uid"])
                    report.copied += 1
                    if on_segment is not None:
                        on_segment(row["uid"])
                bar.update(len(chunk))
        bar.close()
    return copied


def _check_views_kept(source: FeatureStore, wanted: pa.Table) -> None:
    """Refuse a copy selection that keeps a later temporal view of a segment without its view 0: every
    reader of a store with views evaluates on view 0 (docs/views.md)."""
    rows = wanted.filter(pc.equal(wanted.column("status"), STATUS_OK)).select(["uid", VIEW_COLUMN])
    uids, views = rows.column("uid").to_pylist(), rows.column(VIEW_COLUMN).to_pylist()
    first = {uid for uid, view in zip(uids, views) if view == FIRST_VIEW}
    orphans = sorted({uid for uid, view in zip(uids, views) if view != FIRST_VIEW and uid not in first})
    if orphans:
        raise DeriveError(f"{source.path}: the selection keeps later views of {len(orphans)} segments without their "
                          f"view 0 (first: {orphans[0]}); a copy keeps view 0 of every segment it copies, e.g. "
                          f"--where \"view = 0 or view = 2\"")


def _open_target(path: Path, fields: Mapping[str, FieldSpec], provenance: Mapping[str, Any],
                 derived: Mapping[str, Mapping[str, Any]], copied_from: Mapping[str, Any]) -> FeatureStore:
    if (path / "manifest.json").is_file():
        existing = FeatureStore.open(path)
        before = existing.manifest.get("provenance", {}).get("copied_from", {})
        same = {k: before.get(k) for k in ("path", "fields", "where")} == {k: copied_from.get(k) for k in ("path", "fields", "where")}
        if not same:
            raise DeriveError(f"{path} already holds a store that is not this copy "
                              f"(copied from {before or 'nowhere'}); copy into a new directory")
        return FeatureStore.create(path, fields=fields)
    if not holds_nothing_of_note(path):
        raise DeriveError(f"{path} is not empty and not a store; copy into a new directory")
    return FeatureStore.create(path, fields=fields, provenance=provenance, derived=derived)
