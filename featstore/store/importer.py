"""`featstore import`: bring features computed elsewhere into a store.

``DIR`` holds one ``<uid>.npz`` per segment whose array names are field names (``verb.global``,
``det.global.feat``, ...). Labels and metadata come from the annotation file, joined on uid.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from featstore.epic.annotations import read_segments
from featstore.io.progress import progress_bar
from featstore.store.reader import FeatureStore
from featstore.store.schema import BOX_SETS, STATUS_FAILED, STATUS_OK, FieldSpec, StoreError, default_dtype, det_field


class ImportFailure(StoreError):
    """The import cannot go on (a schema disagreement across npz files, an unusable folder)."""


@dataclass
class ImportReport:
    """What an import did."""

    imported: int = 0
    skipped: int = 0  # already stored by an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uid, reason)
    npz_without_annotation: list[str] = field(default_factory=list)
    annotation_without_npz: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"imported {self.imported}, already stored {self.skipped}, failed {len(self.failed)}",
        ]
        for uid, reason in self.failed[:20]:
            lines.append(f"  failed {uid}: {reason}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more (see `featstore query` on status = '{STATUS_FAILED}')")
        for label, items in (
            ("npz files without an annotation row", self.npz_without_annotation),
            ("annotation rows without an npz file", self.annotation_without_npz),
        ):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                lines.append(f"{len(items)} {label}: {shown}")
        return "\n".join(lines)


def field_specs_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, FieldSpec]:
    """The store schema implied by one segment's arrays (shape as given, dtype by field name)."""
    return {
        name: FieldSpec(dtype=default_dtype(name), shape=tuple(int(d) for d in array.shape))
        for name, array in arrays.items()
    }


def box_rows_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, list] | None:
    """``boxes`` rows for the detection sets present (``det.<set>.box`` with its score).

    A slot is valid when its score is positive (padded slots carry score 0, DESIGN section 3).
    """
    columns: dict[str, list] = {k: [] for k in ("set", "slot", "frame", "x1", "y1", "x2", "y2", "score", "label", "valid")}
    for box_set in BOX_SETS:
        boxes = arrays.get(det_field(box_set, "box"))
        if boxes is None:
            continue
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        n = boxes.shape[0]
        scores = arrays.get(det_field(box_set, "score"))
        scores = np.asarray(scores, dtype=np.float32).reshape(n) if scores is not None else np.ones(n, np.float32)
        frames = arrays.get(det_field(box_set, "frame"))
        labels = arrays.get(det_field(box_set, "label"))
        valid = scores > 0
        columns["set"] += [box_set] * n
        columns["slot"] += list(range(n))
        columns["frame"] += [int(f) if v and f > 0 else None for f, v in zip(np.asarray(frames).reshape(n), valid)] if frames is not None else [None] * n
        for i, name in enumerate(("x1", "y1", "x2", "y2")):
            columns[name] += boxes[:, i].tolist()
        columns["score"] += scores.tolist()
        columns["label"] += [int(v) for v in np.asarray(labels).reshape(n)] if labels is not None else [None] * n
        columns["valid"] += valid.tolist()
    return columns if columns["slot"] else None


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of one npz file (eagerly, so the file handle is closed).

    Raises:
        ValueError, OSError, zipfile.BadZipFile, EOFError: the file is not a readable npz (a damaged
            byte fails the member's CRC check as numpy reads it to its end).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (zlib.error, NotImplementedError, RuntimeError, KeyError) as err:
        # What zipfile raises for a damaged compressed member (bad deflate data, an unknown
        # compression method, an encrypted member, a missing member): one unreadable file, which
        # fails its segment like any other, rather than an exception that ends the import.
        raise ValueError(f"{type(err).__name__}: {err}") from err


def value_problem(arrays: Mapping[str, np.ndarray], specs: Mapping[str, FieldSpec]) -> str | None:
    """Why a segment's arrays cannot be stored (not numbers, NaN or inf, beyond the field's dtype),
    or None. Schema disagreements are raised by the caller."""
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            return f"field {name} has dtype {array.dtype}, not a number"
        if not array.size:
            continue
        largest = float(np.abs(array).max())  # NaN and inf survive the max: one pass checks both
        if array.dtype.kind == "f" and not np.isfinite(largest):
            return f"field {name} holds NaN or inf values"
        target = np.dtype(specs[name].dtype)
        if target.kind != "f" or largest <= float(np.finfo(target).max):
            continue  # nothing beyond the target's range (the cast below is the slow, exact test)
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, in words
            cast = array.astype(target)
        if not np.isfinite(cast).all():
            return f"field {name} overflows {target} (max |value| {largest:.3g})"
    return None


def import_npz(
    store_path: str | os.PathLike,
    annotations: str | os.PathLike,
    from_dir: str | os.PathLike,
    *,
    shard: str = "0",
    flush_every: int = 256,
    progress: bool = True,
    command: str | None = None,
    on_segment: Callable[[str], None] | None = None,
) -> ImportReport:
    """Import ``<uid>.npz`` files into a store, resumably.

    Args:
        store_path: the store (created when absent; its fields come from the first npz).
        annotations: an EPIC annotation file; its rows give labels and metadata.
        from_dir: the folder of npz files.
        shard: the LMDB shard to write.
        flush_every: segments between Parquet exports (a crash loses none of them either way).
        progress: show a progress bar on stderr.
        command: the command line, recorded in the manifest.
        on_segment: called with each uid after it is committed (tests use it to inject crashes).
    Returns:
        The report; failed segments are also recorded in the store with their reason.
    Raises:
        ImportFailure: a segment's fields or shapes disagree with the store's (names the npz).
    """
    from_dir = Path(from_dir)
    if not from_dir.is_dir():
        raise ImportFailure(f"--from {from_dir}: not a folder")
    table = read_segments(annotations)
    rows = {row["uid"]: row for row in table.to_pylist()}
    npz_by_uid = {p.name[: -len(".npz")]: p for p in sorted(from_dir.glob("*.npz"))}
    report = ImportReport(
        npz_without_annotation=sorted(set(npz_by_uid) - set(rows)),
        annotation_without_npz=[uid for uid in rows if uid not in npz_by_uid],
    )
    todo = [uid for uid in rows if uid in npz_by_uid]  # annotation order
    if not todo:
        return report

    store = _open_or_create(Path(store_path), npz_by_uid[todo[0]], annotations, from_dir, command)
    specs = store.fields
    with store.writer(shard, flush_every=flush_every) as writer:
        done = set(store.uids(status=STATUS_OK))
        report.skipped = sum(uid in done for uid in todo)
        todo = [uid for uid in todo if uid not in done]
        bar = progress_bar(total=len(todo), desc="import", unit="seg", enabled=progress)
        for uid in todo:
            path = npz_by_uid[uid]
            row = rows[uid]
            try:
                arrays = load_npz(path)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                writer.fail(row, f"{path.name}: unreadable npz ({err})")
                report.failed.append((uid, f"unreadable npz ({err})"))
                bar.update(1)
                continue
            if set(arrays) != set(specs):
                raise ImportFailure(
                    f"{path}: arrays {sorted(arrays)} differ from the store's fields {sorted(specs)}"
                )
            for name, array in arrays.items():
                if tuple(array.shape) != specs[name].shape:
                    raise ImportFailure(
                        f"{path}: field {name} has shape {list(array.shape)}, "
                        f"the store's (from the first segment) is {list(specs[name].shape)}"
                    )
            problem = value_problem(arrays, specs)
            if problem is not None:
                writer.fail(row, f"{path.name}: {problem}")
                report.failed.append((uid, problem))
            else:
                writer.put(row, arrays, boxes=box_rows_from_arrays(arrays))
                report.imported += 1
            if on_segment is not None:
                on_segment(uid)
            bar.update(1)
        bar.close()
    return report


def _open_or_create(store_path: Path, first_npz: Path, annotations: Any, from_dir: Path, command: str | None) -> FeatureStore:
    try:
        first = load_npz(first_npz)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ImportFailure(f"{first_npz}: unreadable npz ({err}); the store's schema comes from it") from err
    provenance = {
        "source": "import",
        "import_from": str(Path(from_dir).resolve()),
        "annotations": str(Path(annotations).resolve()),
        "command": command,
    }
    return FeatureStore.create(store_path, fields=field_specs_from_arrays(first), provenance=provenance)
