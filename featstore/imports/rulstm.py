"""``rulstm-lmdb``: RULSTM's per-frame features (fpv-iplab/rulstm), one LMDB per modality.

Layout: ``rgb/``, ``flow/``, ``obj/`` (any subset), each an LMDB whose keys are
``"<video_id>_frame_{:010d}.jpg"`` (utf-8) and whose values are raw float32 bytes: 1024-d rgb and
flow (TSN BNInception, global pool), 352-d obj (per-noun-class sums of detection scores). Frame
numbers count frames of the videos re-encoded at 30 fps, not EPIC's native frames: RULSTM's own
reader maps a time ``t`` to ``floor(t * 30)``. A segment ``[start, stop]`` seconds covers the frames
``floor(start * 30) .. floor(stop * 30)`` (at least frame 1); its field is their mean, or the frame
nearest its centre (``--pool centre``). The frames found are counted per modality.
"""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from featstore.imports.registry import PublishedSource, register_format
from featstore.imports.timing import SegmentSkipped, SegmentSpan
from featstore.store.importer import ImportFailure
from featstore.store.schema import FieldSpec, default_dtype

__all__ = ["RULSTM_DIMS", "RULSTM_FPS", "RulstmFrames", "centre_frame", "frame_key", "open_rulstm"]

RULSTM_DIMS = {"rgb": 1024, "flow": 1024, "obj": 352}  # the published features' widths
RULSTM_FPS = 30.0  # the frame rate of the re-encoded videos the keys count
POOLS = ("mean", "centre")
_KEY = re.compile(rb"^(?P<video>.+)_frame_(?P<frame>\d{10})\.jpg$")


def frame_key(video_id: str, frame: int) -> bytes:
    """The LMDB key of one frame, as RULSTM writes it."""
    return f"{video_id}_frame_{frame:010d}.jpg".encode()


def _frames_of(seconds: float, fps: float) -> int:
    return max(1, math.floor(seconds * fps))


def centre_frame(span: SegmentSpan, fps: float = RULSTM_FPS) -> int:
    """The frame ``--pool centre`` reads for a segment: its centre on the ``fps`` clock, at least 1.

    `featstore export --format rulstm-lmdb` writes each segment under this frame's key, so that an
    import with ``--pool centre`` reads it back.
    """
    return _frames_of(span.centre, fps)


class RulstmFrames(PublishedSource):
    """RULSTM LMDBs opened read-only; a segment is a walk of each modality's cursor over its frames.

    Args:
        lmdbs: modality -> its LMDB folder.
        dims: modality -> feature width.
        pool: ``mean`` or ``centre``.
        fps: the keys' frame rate.
        prefix: field names are ``<prefix>.<modality>`` (and ``.frames`` for the counts).
        source: the folder given, for the provenance.
    """

    def __init__(self, *, lmdbs: dict[str, Path], dims: dict[str, int], pool: str, fps: float, prefix: str,
                 source: Path) -> None:
        self.lmdbs, self.dims, self.pool, self.fps, self.prefix, self.source = lmdbs, dims, pool, fps, prefix, source
        self.envs = {m: lmdb.open(str(path), readonly=True, lock=False, readahead=True, max_readers=16)
                     for m, path in lmdbs.items()}
        self.txns = {m: env.begin(buffers=True) for m, env in self.envs.items()}
        self.names = {m: (f"{prefix}.{m}", f"{prefix}.{m}.frames") for m in dims}  # feature, frame count
        self.fields = {}
        for modality, dim in dims.items():
            feature, counted = self.names[modality]
            self.fields[feature] = FieldSpec(default_dtype(feature), (dim,))
            self.fields[counted] = FieldSpec("int32", (1,))

    def describe(self) -> dict[str, Any]:
        return {
            "layout": "RULSTM per-frame LMDBs (fpv-iplab/rulstm): key '<video_id>_frame_{:010d}.jpg', "
                      "value raw float32",
            "modalities": {m: {"dim": d, "field": f"{self.prefix}.{m}"} for m, d in self.dims.items()},
            "frames": f"floor(seconds * {self.fps:g}), at least 1 (frames of {self.fps:g} fps re-encodes)",
            "pool": self.pool,
            "counts": {m: f"{self.prefix}.{m}.frames" for m in self.dims},
        }

    def read(self, span: SegmentSpan) -> dict[str, np.ndarray]:
        first, last = _frames_of(span.start, self.fps), _frames_of(span.stop, self.fps)
        centre = centre_frame(span, self.fps)
        out: dict[str, np.ndarray] = {}
        for modality, dim in self.dims.items():
            pooled, count = self._pool(modality, dim, span.video_id, first, last, centre)
            if count == 0:
                raise SegmentSkipped(f"no {modality} frames of {span.video_id} in {self.lmdbs[modality]} between "
                                     f"frames {first} and {last} ({span.start:.2f}-{span.stop:.2f} s at "
                                     f"{self.fps:g} fps)")
            feature, counted = self.names[modality]
            out[feature] = pooled
            out[counted] = np.array([count], np.int32)
        return out

    def _pool(self, modality: str, dim: int, video: str, first: int, last: int,
              centre: int) -> tuple[np.ndarray | None, int]:
        values = self._frames(modality, video, first, last)
        if not values:
            return None, 0
        if self.pool == "centre":
            value = self.txns[modality].get(frame_key(video, centre))
            if value is None:  # the centre frame is missing: the nearest present one
                value = min(values, key=lambda item: abs(item[0] - centre))[1]
            return _as_features(bytes(value), dim, modality, video), len(values)
        joined = b"".join(values)
        if len(joined) != 4 * dim * len(values):
            raise ImportFailure(f"{self.lmdbs[modality]}: a {modality} value of {video} is not {dim} float32 "
                                f"({len(joined)} bytes for {len(values)} frames)")
        frames = np.frombuffer(joined, np.float32).reshape(len(values), dim)
        pooled = np.add.reduce(frames, axis=0)  # (dim,): the ufunc itself, without np.mean's wrapper
        pooled *= np.float32(1.0 / len(values))
        return pooled, len(values)

    def _frames(self, modality: str, video: str, first: int, last: int) -> list:
        """The values of the frames ``first .. last`` of ``video`` present in the LMDB, in order.

        For the mean, values only; for ``centre``, ``(frame, value)`` pairs. The common case (every
        frame present) is one cursor walk of exactly ``last - first + 1`` entries, all in C; when the
        walk overshoots the last key (frames missing), the entries are checked one by one.
        """
        cursor = self.txns[modality].cursor()
        end = frame_key(video, last)
        if not cursor.set_range(frame_key(video, first)):
            return []
        if self.pool == "mean":
            expected = last - first + 1
            values = list(itertools.islice(cursor.iternext(keys=False, values=True), expected))
            # As many keys as the range can hold, the last of them inside it: exactly its frames.
            if len(values) == expected and bytes(cursor.key()) <= end:
                return values
            cursor.set_range(frame_key(video, first))
        found = []
        for key, value in cursor:
            key = bytes(key)
            if key > end:
                break
            found.append(value if self.pool == "mean" else (int(key[-14:-4]), value))
        return found

    def close(self) -> None:
        for txn in self.txns.values():
            txn.abort()
        for env in self.envs.values():
            env.close()
        self.txns, self.envs = {}, {}


def _as_features(value: bytes, dim: int, modality: str, video: str) -> np.ndarray:
    if len(value) != 4 * dim:
        raise ImportFailure(f"a {modality} value of {video} holds {len(value)} bytes, not {dim} float32")
    return np.frombuffer(value, np.float32).copy()


def _find_lmdbs(source: Path, wanted: list[str]) -> dict[str, Path]:
    """Modality -> LMDB folder: ``source/<modality>/`` for each, or ``source`` itself named by its folder."""
    if (source / "data.mdb").is_file():
        modality = source.name
        if wanted and wanted != [modality]:
            raise ImportFailure(f"--from {source} is one LMDB ({modality}); --modalities asks for {', '.join(wanted)}")
        return {modality: source}
    present = {m: source / m for m in RULSTM_DIMS if (source / m / "data.mdb").is_file()}
    present.update({m: source / m for m in wanted if (source / m / "data.mdb").is_file()})
    if not wanted:
        if not present:
            raise ImportFailure(f"--from {source}: no RULSTM LMDB in it (looked for {', '.join(f'{m}/data.mdb' for m in RULSTM_DIMS)})")
        return present
    missing = [m for m in wanted if m not in present]
    if missing:
        raise ImportFailure(f"--from {source}: no LMDB for {', '.join(missing)} (looked for "
                            f"{', '.join(f'{m}/data.mdb' for m in missing)})")
    return {m: present[m] for m in wanted}


def _first_entry(path: Path) -> tuple[bytes, int] | None:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        cursor = txn.cursor()
        if not cursor.first():
            return None
        return bytes(cursor.key()), len(cursor.value())


@register_format("rulstm-lmdb", description="RULSTM's per-frame LMDBs: rgb/, flow/, obj/ (any subset)",
                 source="a folder holding RULSTM's rgb/, flow/ and/or obj/ LMDBs (or one of them)")
def open_rulstm(source: Path, *, modalities: str = "", pool: str = "mean", fps: float = RULSTM_FPS,
                prefix: str = "rulstm", check_dims: bool = True) -> RulstmFrames:
    """Open RULSTM's LMDBs, checking their key scheme and dims on their first entries.

    Args:
        source: the folder.
        modalities: comma-separated modalities to import (rgb, flow, obj); empty: every LMDB present.
        pool: how a segment's frames become one vector: mean, or centre (the frame nearest its centre).
        fps: frame rate of the videos the frame keys count (RULSTM re-encoded EPIC at 30 fps).
        prefix: field names are <prefix>.<modality>, with the frame counts in <prefix>.<modality>.frames.
        check_dims: refuse LMDBs whose values are not the published widths (rgb, flow 1024; obj 352).
    Raises:
        ImportFailure: no LMDB, an unknown pool, keys of another scheme, or values of other widths.
    """
    if pool not in POOLS:
        raise ImportFailure(f"--pool {pool!r}: rulstm-lmdb pools frames by one of {', '.join(POOLS)}")
    if not fps > 0:
        raise ImportFailure(f"--fps {fps}: must be positive")
    wanted = [m.strip() for m in modalities.split(",") if m.strip()]
    lmdbs = _find_lmdbs(source, wanted)
    dims = {}
    for modality, path in lmdbs.items():
        first = _first_entry(path)
        if first is None:
            raise ImportFailure(f"{path}: the {modality} LMDB is empty")
        key, size = first
        if _KEY.match(key) is None:
            raise ImportFailure(f"{path}: keys look like {key.decode(errors='replace')!r}, not RULSTM's "
                                f"'<video_id>_frame_{{:010d}}.jpg'")
        if size % 4:
            raise ImportFailure(f"{path}: values of {size} bytes are not float32 vectors")
        dims[modality] = size // 4
        expected = RULSTM_DIMS.get(modality)
        if check_dims and expected is not None and dims[modality] != expected:
            raise ImportFailure(f"{path}: {modality} values are {dims[modality]}-d, RULSTM's {modality} features are "
                                f"{expected}-d (--no-check-dims to import them anyway)")
    return RulstmFrames(lmdbs=lmdbs, dims=dims, pool=pool, fps=fps, prefix=prefix, source=source)
