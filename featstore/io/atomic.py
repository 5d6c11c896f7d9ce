"""Atomic file writes: the one way every file of a store, a run or a demo is written.

The guarantee: a reader sees either the old file or the whole new one, never a part of it, and a
failed write (full or read-only disk, an exception in the writer, a kill) leaves no partial file
under the target's name. How: the content is written to a hidden temporary beside the target
(``.NAME.HEX.tmp``: same folder, so the rename cannot cross file systems), flushed and fsynced, renamed
over the target, and the folder is fsynced so the rename itself survives a power loss. On failure
the temporary is removed; a killed process can still leave one, which ``remove_temporaries`` (called
by the next writer of that folder) deletes: nothing ever reads a ``.tmp`` name.
"""
from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_torch",
    "remove_temporaries",
    "temporary_name",
]

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """The hidden temporary a write of ``path`` goes to: ``.NAME.HEX.tmp`` in the same folder."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename has happened either way
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a file through ``write(temporary_path)``, then move it into place atomically.

    Args:
        path: the target file; its folder must exist.
        write: writes the complete content to the path it is given (which does not end in the
            target's suffix: writers that infer a format from the name must be told the format).
    Returns:
        ``path``.
    Raises:
        Whatever ``write`` or the file system raises; the temporary is removed first. An
        ``OSError`` that names no file (a full disk seen by a library's writer) is raised again
        naming ``path``, so that the user learns which file could not be written.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        if err.filename is None:
            if err.errno is not None:
                raise OSError(err.errno, err.strerror or str(err), str(path)) from err
            raise OSError(f"{err}: {path}") from err
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any, *, sort_keys: bool = False) -> Path:
    """Write ``payload`` as indented JSON atomically (values JSON cannot hold are written as strings)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=str))


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file (a header line, then ``rows``) atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    return atomic_write(path, write)


def atomic_write_torch(path: str | os.PathLike, payload: Any) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (checkpoints, resume states); its folder is created.

    Raises:
        OSError: the write failed (full disk, file size limit), naming the file.
    """
    import torch  # here, not above: the commands' --help imports this module without torch

    path = Path(path)

    def write(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a failed write as an "enforce fail ... unexpected pos"
            # RuntimeError that names neither file nor cause.
            raise OSError(f"cannot write the checkpoint {path} (is the disk full?): {err}") from err

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def remove_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporaries that killed writers left in ``folder``.

    Args:
        folder: where to look (not recursive).
        names: only the temporaries of these target names (e.g. ``"metrics.json"``, or a glob such
            as ``"part-rank0-*"``); all of ``folder``'s when None.
    Returns:
        The paths removed.
    """
    folder = Path(folder)
    patterns = [f".{name}.*{TMP_SUFFIX}" for name in names] if names is not None else [f".*{TMP_SUFFIX}"]
    removed = []
    for pattern in patterns:
        for tmp in folder.glob(pattern):
            _unlink_quietly(tmp)
            removed.append(tmp)
    return removed
