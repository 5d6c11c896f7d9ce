"""Published feature sets written in their publishers' layouts, for tests, benchmarks and examples.

Each writer produces exactly what its publisher ships, so `featstore import` is tested on the
real layout: RULSTM's per-frame LMDBs, ActionFormer's per-video ``.npz`` series, TA3N's narration
pickle, and LFB's noun bank, a Python-2 pickle (written here opcode by opcode as Python 2's
``cPickle.dump(..., protocol=2)`` writes it: ``str`` as ``BINSTRING``, arrays through
``numpy.core.multiarray._reconstruct``).
"""
from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Iterable

import lmdb
import numpy as np

__all__ = ["rulstm_key", "write_lfb_frame_list", "write_python2_pickle", "write_rulstm_lmdb", "write_ta3n_pickle"]


def rulstm_key(video_id: str, frame: int) -> bytes:
    """RULSTM's key of one frame: ``"<video_id>_frame_{:010d}.jpg"``."""
    return f"{video_id}_frame_{frame:010d}.jpg".encode()


def write_rulstm_lmdb(path: str | os.PathLike, frames: Iterable[tuple[str, int, np.ndarray]], *,
                      map_size: int = 1 << 30, commit_every: int = 4096) -> Path:
    """One modality's LMDB in RULSTM's layout.

    Args:
        path: the LMDB folder (created).
        frames: ``(video_id, frame, vector)`` in any order; vectors are stored as raw float32.
        map_size: initial map size; it doubles when full.
        commit_every: frames per write transaction.
    Returns:
        ``path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=map_size, sync=False, metasync=False, writemap=False)
    try:
        batch: list[tuple[bytes, bytes]] = []

        def commit() -> None:
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in batch:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
            batch.clear()

        for video, frame, vector in frames:
            batch.append((rulstm_key(video, frame), np.asarray(vector, np.float32).tobytes()))
            if len(batch) >= commit_every:
                commit()
        commit()
        env.sync(True)
    finally:
        env.close()
    return path


def write_ta3n_pickle(path: str | os.PathLike, features: dict[str, np.ndarray], narration_ids: list[str] | None) -> Path:
    """TA3N's features pickle: ``{'features': {modality: [n, 25, 1024]}, 'narration_ids': [...]}``
    (without ``narration_ids`` when None: C5's split files, rows in an annotation file's order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    value: dict[str, Any] = {"features": {m: np.asarray(a, np.float32) for m, a in features.items()}}
    if narration_ids is not None:
        value["narration_ids"] = list(narration_ids)
    with open(path, "wb") as handle:
        pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def write_lfb_frame_list(path: str | os.PathLike, frames_by_video: dict[str, list[int]]) -> Path:
    """LFB's frame list (``frame_lists/train.csv``): a header, then ``original_vido_id video_id
    frame_id path labels`` per frame; the bank's list follows the videos' first appearance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["original_vido_id video_id frame_id path labels"]
    for index, (video, frames) in enumerate(frames_by_video.items()):
        for frame in frames:
            lines.append(f"{video} {index} {frame} {video}/frame_{frame:010d}.jpg \"\"")
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Python 2's pickle protocol 2, as cPickle writes it


def _python2_pickle(value: Any, out: io.BytesIO, memo: dict[str, int]) -> None:
    def put() -> None:
        index = len(memo)
        memo[f"#{index}"] = index
        out.write(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def global_(module: str, name: str) -> None:
        key = f"{module}.{name}"
        if key in memo:
            index = memo[key]
            out.write(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))
            return
        out.write(f"c{module}\n{name}\n".encode())
        memo[key] = len(memo)
        index = memo[key]
        out.write(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def string(data: bytes) -> None:  # a Python 2 str
        if len(data) < 256:
            out.write(b"U" + bytes([len(data)]) + data)
        else:
            out.write(b"T" + struct.pack("<i", len(data)) + data)

    if value is None:
        out.write(b"N")
    elif isinstance(value, bool):
        out.write(b"\x88" if value else b"\x89")
    elif isinstance(value, int):
        if 0 <= value < 256:
            out.write(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            out.write(b"M" + struct.pack("<H", value))
        else:
            out.write(b"J" + struct.pack("<i", value))
    elif isinstance(value, float):
        out.write(b"G" + struct.pack(">d", value))
    elif isinstance(value, str):
        string(value.encode("latin1"))
    elif isinstance(value, list):
        out.write(b"]")
        put()
        if value:
            out.write(b"(")
            for item in value:
                _python2_pickle(item, out, memo)
            out.write(b"e")
    elif isinstance(value, dict):
        out.write(b"}")
        put()
        if value:
            out.write(b"(")
            for key, item in value.items():
                _python2_pickle(key, out, memo)
                _python2_pickle(item, out, memo)
            out.write(b"u")
    elif isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        global_("numpy.core.multiarray", "_reconstruct")
        global_("numpy", "ndarray")
        out.write(b"K\x00\x85")  # shape (0,)
        string(b"b")
        out.write(b"\x87R")
        put()
        out.write(b"(K\x01")  # state: (1, shape, dtype, is_fortran, data)
        _python2_pickle(tuple(array.shape), out, memo)
        global_("numpy", "dtype")
        string(array.dtype.str[1:].encode())
        out.write(b"K\x00K\x01\x87R")
        put()
        order = array.dtype.str[0] if array.dtype.str[0] in "<>" else "|"
        out.write(b"(K\x03")
        string(order.encode())
        out.write(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        out.write(b"\x89")
        string(array.tobytes())
        out.write(b"tb")
    elif isinstance(value, tuple):
        if len(value) <= 3:
            for item in value:
                _python2_pickle(item, out, memo)
            out.write({0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(value)])
        else:
            out.write(b"(")
            for item in value:
                _python2_pickle(item, out, memo)
            out.write(b"t")
    else:
        raise TypeError(f"write_python2_pickle: no Python 2 form for {type(value).__name__}")


def write_python2_pickle(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` (dicts, lists, tuples, str, numbers, numpy arrays) as Python 2's cPickle
    protocol 2 would (LFB's ``pickle.dump(lfb, f, pickle.HIGHEST_PROTOCOL)`` under Python 2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    out.write(b"\x80\x02")
    _python2_pickle(value, out, {})
    out.write(b".")
    path.write_bytes(out.getvalue())
    return path
