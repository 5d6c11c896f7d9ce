"""The layouts `featstore export --format NAME` writes: the inverses of `featstore import`'s readers.

- ``npz``: one ``<uid>.npz`` per segment, its arrays named by field, in the store's dtypes: what
  ``featstore import --format npz`` reads (uncompressed, so the values come back bit for bit).
- ``pt``: one ``features.pt`` for ``torch.load``: ``{"uids": [...], "fields": {field: (N, *shape)
  tensor}, "index": {column: [...]}}``, rows in uid order, the annotation columns of each segment in
  ``index`` (labels, participant, video, frames, timestamps).
- ``rulstm-lmdb``: RULSTM's layout (fpv-iplab/rulstm), one LMDB per vector field, keyed
  ``<video_id>_frame_{:010d}.jpg`` with raw float32 values. A store holds one vector per segment, not
  one per frame: each segment is written under one key, the frame of its centre on the 30 fps clock
  the keys count (`featstore.imports.rulstm.centre_frame`), which is the key
  ``featstore import --format rulstm-lmdb --pool centre`` reads. Two segments of a video whose
  centres fall on one frame cannot both be written: the second is reported, not written.

Like the import formats, a small registry: `register_export_format` refuses a taken name, and the
CLI's ``--format`` choices are `list_export_formats`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import lmdb
import numpy as np

from featstore.imports.rulstm import RULSTM_FPS, centre_frame, frame_key
from featstore.imports.timing import TIME_MAPS, SegmentSkipped, make_time_map
from featstore.io.atomic import atomic_write, atomic_write_torch
from featstore.store.schema import VERB_GLOBAL, FieldSpec, StoreError, default_dtype

__all__ = [
    "PT_FILE",
    "ExportError",
    "ExportFormat",
    "ExportWriter",
    "get_export_format",
    "list_export_formats",
    "lmdb_folders",
    "register_export_format",
]

PT_FILE = "features.pt"  # the one file of a ``pt`` export
FEATURE_DTYPE = default_dtype(VERB_GLOBAL)  # the dtype the store contract gives features (not boxes, scores)


class ExportError(StoreError):
    """An export cannot be made as asked (an unknown format or option, fields the format cannot hold)."""


class ExportWriter:
    """Where an export's segments go, one at a time.

    Attributes:
        skipped: uid -> why the segment is not written (known before any is read: the service
            leaves them out).
    """

    skipped: dict[str, str]

    def add(self, row: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Write one segment: its annotation row and its fields' arrays."""
        raise NotImplementedError

    def finish(self) -> list[Path]:
        """Complete the export; returns the files or folders written."""
        raise NotImplementedError

    def abort(self) -> None:
        """Release what is open after a failed export (what was written stays, incomplete)."""

    def read_back_args(self) -> str:
        """Arguments the import of this export needs besides its format's ``read_back`` (e.g. which LMDBs)."""
        return ""


@dataclass(frozen=True)
class ExportFormat:
    """One registered export format.

    Attributes:
        name: the registry key (``--format NAME``).
        description: one line for ``--help``.
        read_back: the command that imports the export again (``OUT`` and ``ANNOTATIONS`` to fill in),
            or None where no import reads it.
        options: the options its writer takes (keyword arguments).
        make_writer: ``make_writer(out, fields, rows, **options) -> ExportWriter``.
        vectors_only: whether it holds feature vectors only: 1-d floating fields, by default those
            whose name makes them features (`default_dtype`: not boxes or scores).
    """

    name: str
    description: str
    read_back: str | None
    options: tuple[str, ...]
    make_writer: Callable[..., ExportWriter]
    vectors_only: bool = False

    def select_fields(self, available: Mapping[str, FieldSpec], wanted: Sequence[str] | None) -> dict[str, FieldSpec]:
        """The fields to export: ``wanted`` (checked), else every field the format can hold.

        Raises:
            ExportError: a field the store lacks, one the format cannot hold, or none at all.
        """
        if wanted is None:
            chosen = {name: spec for name, spec in sorted(available.items())
                      if not self.vectors_only or (_is_vector(spec) and default_dtype(name) == FEATURE_DTYPE)}
        else:
            missing = [name for name in wanted if name not in available]
            if missing:
                raise ExportError(f"the store has no complete field(s) {', '.join(missing)}; it holds "
                                  f"{', '.join(sorted(available))}")
            chosen = {name: available[name] for name in dict.fromkeys(wanted)}
            if self.vectors_only:
                others = [f"{name} ({spec.dtype}{list(spec.shape)})" for name, spec in chosen.items()
                          if not _is_vector(spec)]
                if others:
                    raise ExportError(f"--format {self.name} holds one feature vector per key: "
                                      f"{', '.join(others)} is not a 1-d floating field")
        if not chosen:
            what = "1-d floating fields" if self.vectors_only else "fields"
            raise ExportError(f"nothing to export as {self.name}: the store has no {what}")
        return chosen

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise `ExportError` naming every option this format does not take."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(f"--{n.replace('_', '-')}" for n in self.options) or "none"
            given = ", ".join(f"--{n.replace('_', '-')}" for n in unknown)
            raise ExportError(f"--format {self.name} does not take {given}; its options are: {known}")


def _is_vector(spec: FieldSpec) -> bool:
    return len(spec.shape) == 1 and np.dtype(spec.dtype).kind == "f"


_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(name: str, *, description: str, read_back: str | None, options: Iterable[str] = (),
                           vectors_only: bool = False) -> Callable[[Callable[..., ExportWriter]], Callable[..., ExportWriter]]:
    """Decorator that registers a writer (class or factory) under ``name``.

    Raises:
        ValueError: the name is taken.
    """

    def decorate(make_writer: Callable[..., ExportWriter]) -> Callable[..., ExportWriter]:
        if name in _FORMATS:
            raise ValueError(f"an export format named {name!r} is already registered")
        _FORMATS[name] = ExportFormat(name, description, read_back, tuple(options), make_writer, vectors_only)
        return make_writer

    return decorate


def list_export_formats() -> list[str]:
    """Names of the registered export formats, ``npz`` first, then sorted."""
    return sorted(_FORMATS, key=lambda n: (n != "npz", n))


def get_export_format(name: str) -> ExportFormat:
    """The record of format ``name``.

    Raises:
        ExportError: an unknown name, listing the known ones.
    """
    try:
        return _FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown export format {name!r}; known formats: {', '.join(list_export_formats())}") from None


def _check_uid(uid: str) -> str:
    if not uid or "/" in uid or os.sep in uid or uid.startswith("."):
        raise ExportError(f"uid {uid!r} cannot name a file")
    return uid


# ------------------------------------------------------------------------------------------------
# npz


def _savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append .npz to the temporary's name
        np.savez(handle, **arrays)


@register_export_format("npz", description="one <uid>.npz per segment, arrays named by field (featstore import's npz)",
                        read_back="featstore import STORE --annotations ANNOTATIONS --from OUT")
class NpzWriter(ExportWriter):
    """One ``<uid>.npz`` per segment in ``out``, each written atomically."""

    def __init__(self, out: Path, fields: Mapping[str, FieldSpec], rows: Sequence[Mapping[str, Any]]) -> None:
        self.out, self.skipped = out, {}
        self.written = 0
        for row in rows:
            _check_uid(str(row["uid"]))

    def add(self, row: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        atomic_write(self.out / f"{row['uid']}.npz", lambda tmp: _savez(tmp, arrays))
        self.written += 1

    def finish(self) -> list[Path]:
        return [self.out]


# ------------------------------------------------------------------------------------------------
# pt


@register_export_format("pt", description=f"one {PT_FILE}: uids, each field stacked (N, ...), the annotation columns",
                        read_back=None)
class PtWriter(ExportWriter):
    """Every segment's fields stacked in memory, then one ``torch.save`` (through the atomic writer)."""

    def __init__(self, out: Path, fields: Mapping[str, FieldSpec], rows: Sequence[Mapping[str, Any]]) -> None:
        self.out, self.skipped = out, {}
        self.rows = list(rows)
        self.stacked = {name: np.empty((len(self.rows), *spec.shape), dtype=spec.dtype) for name, spec in fields.items()}
        self.position = {str(row["uid"]): i for i, row in enumerate(self.rows)}

    def add(self, row: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        index = self.position[str(row["uid"])]
        for name, array in arrays.items():
            self.stacked[name][index] = array

    def finish(self) -> list[Path]:
        import torch

        payload = {
            "uids": [str(row["uid"]) for row in self.rows],
            "fields": {name: torch.from_numpy(values) for name, values in self.stacked.items()},
            "index": {column: [row.get(column) for row in self.rows] for column in (self.rows[0] if self.rows else {})},
        }
        return [atomic_write_torch(self.out / PT_FILE, payload)]


# ------------------------------------------------------------------------------------------------
# rulstm-lmdb


def lmdb_folders(fields: Iterable[str]) -> dict[str, str]:
    """field -> its LMDB folder: the name after its prefix (``rulstm.rgb`` -> ``rgb``), or the whole
    name where that part is shared by two fields (``verb.global``, ``noun.global``) or absent."""
    fields = list(fields)
    short = {name: name.split(".", 1)[1] if "." in name else name for name in fields}
    counts: dict[str, int] = {}
    for folder in short.values():
        counts[folder] = counts.get(folder, 0) + 1
    return {name: short[name] if counts[short[name]] == 1 else name for name in fields}


@register_export_format("rulstm-lmdb",
                        description="RULSTM's LMDBs, one per vector field; each segment under its centre "
                                    "frame's key (30 fps), raw float32",
                        read_back="featstore import STORE --annotations ANNOTATIONS --from OUT --format rulstm-lmdb "
                                  "--pool centre --no-check-dims",
                        options=("time_map", "video_info", "fps", "annotations"), vectors_only=True)
class RulstmWriter(ExportWriter):
    """One LMDB per field under ``out``, each segment's vector under its centre frame's key.

    Args:
        time_map: how a segment is placed in seconds (``featstore.imports.timing.TIME_MAPS``):
            its timestamps, or its native frames over its video's frame rate.
        video_info: the videos' frame rates for ``frames`` (EPIC_video_info.csv).
        fps: the frame rate the keys count (RULSTM's re-encodes: 30).
        annotations: the store's annotation file, where a video-info file is looked for beside it.
    """

    COMMIT_EVERY = 1024  # puts per write transaction

    def __init__(self, out: Path, fields: Mapping[str, FieldSpec], rows: Sequence[Mapping[str, Any]], *,
                 time_map: str = "auto", video_info: str | os.PathLike | None = None, fps: float = RULSTM_FPS,
                 annotations: str | os.PathLike | None = None) -> None:
        if time_map not in TIME_MAPS:
            raise ExportError(f"--time-map {time_map!r}: use one of {', '.join(TIME_MAPS)}")
        if not fps > 0:
            raise ExportError(f"--fps {fps}: must be positive")
        self.out, self.fields, self.skipped = out, dict(fields), {}
        clock = make_time_map(list(rows), annotations or out, time_map=time_map, video_info=video_info)
        self.keys: dict[str, bytes] = {}
        owner: dict[bytes, str] = {}
        for row in rows:
            uid = str(row["uid"])
            try:
                span = clock.span(row)
            except SegmentSkipped as err:
                self.skipped[uid] = str(err)
                continue
            frame = centre_frame(span, fps)
            key = frame_key(span.video_id, frame)
            if key in owner:
                self.skipped[uid] = (f"its centre frame {frame} of {span.video_id} ({span.centre:.3f} s at {fps:g} fps) "
                                     f"holds segment {owner[key]} already")
                continue
            owner[key] = uid
            self.keys[uid] = key
        self.folders = lmdb_folders(self.fields)
        self.envs: dict[str, lmdb.Environment] = {}
        self.txns: dict[str, lmdb.Transaction] = {}
        for name, spec in self.fields.items():
            # Values plus keys and B-tree pages, twice over: LMDB refuses a put beyond its map.
            need = len(self.keys) * (4 * math.prod(spec.shape) + 64) * 2 + 2**20
            folder = out / self.folders[name]
            folder.mkdir(parents=True, exist_ok=True)
            self.envs[name] = lmdb.open(str(folder), map_size=need, subdir=True, meminit=False)
            self.txns[name] = self.envs[name].begin(write=True)
        self.pending = 0

    def add(self, row: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        key = self.keys[str(row["uid"])]
        for name, array in arrays.items():
            self.txns[name].put(key, np.ascontiguousarray(array, dtype=np.float32).tobytes())
        self.pending += 1
        if self.pending >= self.COMMIT_EVERY:
            for name, txn in self.txns.items():
                txn.commit()
                self.txns[name] = self.envs[name].begin(write=True)
            self.pending = 0

    def finish(self) -> list[Path]:
        for name, txn in self.txns.items():
            txn.commit()
            self.envs[name].sync(True)
            self.envs[name].close()
        self.txns, self.envs = {}, {}
        return [self.out / folder for folder in self.folders.values()]

    def read_back_args(self) -> str:
        return f"--modalities {','.join(self.folders.values())}"

    def abort(self) -> None:
        for txn in self.txns.values():
            txn.abort()
        for env in self.envs.values():
            env.close()
        self.txns, self.envs = {}, {}
