"""`featstore export`: a store's segments out to a layout other tools read, the inverse of an import.

The loop is the same for every format (`featstore.exports.formats`): the selection's stored segments
in uid order with their annotation columns (`FeatureStore.labels`), their fields read a chunk at a
time (one read transaction per shard), each segment handed to the format's writer. The store is only
read. ``OUT`` must be new or empty: an export never mixes with other files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from featstore.exports.formats import ExportError, get_export_format
from featstore.io.progress import progress_bar
from featstore.store.reader import FeatureStore

__all__ = ["ExportReport", "export_store"]

READ_CHUNK = 256  # segments read per transaction batch
READ_AHEAD_SHARE = 0.5  # an export reading at least this share of the store's files turns readahead on


@dataclass
class ExportReport:
    """What an export wrote.

    Attributes:
        format: the format's name.
        out: the folder written.
        fields: the fields exported.
        exported: segments written.
        skipped: (uid, reason) of selected segments the format could not hold.
        files: the files or folders written.
        read_back: the command that imports the export again, or None.
    """

    format: str
    out: Path
    fields: list[str]
    exported: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    read_back: str | None = None

    def summary(self) -> str:
        lines = [f"exported {self.exported} segments ({', '.join(self.fields)}) to {self.out} as {self.format}"]
        if self.skipped:
            lines.append(f"not exported: {len(self.skipped)}")
            lines += [f"  {uid}: {reason}" for uid, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        if self.read_back:
            lines.append(f"read it back with: {self.read_back.replace('OUT', str(self.out))}")
        return "\n".join(lines)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; export into a new folder")


def export_store(
    store: FeatureStore | str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "npz",
    fields: Sequence[str] | None = None,
    where: str | None = None,
    split: str | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ExportReport:
    """Write the stored segments of a selection in another layout.

    Args:
        store: a `FeatureStore` or its path (only read).
        out: a new or empty folder.
        format: a registered export format (`featstore.exports.list_export_formats`).
        fields: the fields to export (default: every field the format can hold).
        where: a DuckDB WHERE expression over the segment columns.
        split: a named split, ANDed with ``where``.
        options: the format's options (``ExportFormat.options``); unknown ones are refused. The
            ``rulstm-lmdb`` clock's ``annotations`` default to the file the store records.
        progress: show a progress bar on stderr.
    Returns:
        The report.
    Raises:
        ExportError: an unknown format or option, fields the store lacks or the format cannot
            hold, a selection of no stored segment, or an ``out`` that holds files.
        StoreError: a bad selection.
    """
    record = get_export_format(format)
    options = {name: value for name, value in dict(options or {}).items() if value is not None}
    record.check_options(options)
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    out = Path(out)
    _check_out(out)
    chosen = record.select_fields(store.complete_fields, fields)
    rows = store.labels(where, split=split).to_pylist()
    if not rows:
        raise ExportError(f"the selection holds no stored segment of {store.path}")
    if "annotations" in record.options and "annotations" not in options:
        recorded = store.manifest.get("provenance", {}).get("annotations")
        if isinstance(recorded, str) and Path(recorded).is_file():
            options["annotations"] = recorded
    out.mkdir(parents=True, exist_ok=True)
    writer = record.make_writer(out, chosen, rows, **options)
    todo = [row for row in rows if str(row["uid"]) not in writer.skipped]
    names = list(chosen)
    bar = progress_bar(total=len(todo), desc="export", unit="seg", enabled=progress)
    try:
        with store.read_ahead(store.share_of_files(len(todo), names) >= READ_AHEAD_SHARE):
            for start in range(0, len(todo), READ_CHUNK):
                chunk = todo[start:start + READ_CHUNK]
                arrays = store.read_fields([str(row["uid"]) for row in chunk], names)
                for i, row in enumerate(chunk):
                    writer.add(row, {name: values[i] for name, values in arrays.items()})
                bar.update(len(chunk))
        files = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    read_back = record.read_back and " ".join(filter(None, [record.read_back, writer.read_back_args()]))
    return ExportReport(format=record.name, out=out, fields=names, exported=len(todo),
                        skipped=sorted(writer.skipped.items()), files=files, read_back=read_back or None)
