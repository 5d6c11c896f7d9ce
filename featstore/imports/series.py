"""``per-video-series``: one file per video holding a ``[T, D]`` series of window features.

Window ``t`` covers frames ``[t * stride, t * stride + window)`` of the video at ``fps``, i.e. the
seconds ``[t * stride / fps, (t * stride + window) / fps)``, as ActionFormer's reader assumes
(``feat_stride``, ``num_frames``, ``default_fps``: its EPIC SlowFast features are 2304-d at stride
16, window 32, 30 fps). Files are ``<video_id><ext>``: ``.npz`` (the array under ``key``, ``feats``
for ActionFormer / OpenTAD), ``.npy``, or ``.pt`` (a tensor, or a dict holding one under ``key``;
read with ``torch.load(weights_only=True)``, which builds tensors and nothing else).

A segment's field is the mean of the windows that overlap it, each weighted by the seconds of the
overlap (``--pool overlap``), or the window whose centre is nearest the segment's (``--pool
nearest``, among the windows that overlap it). One video's series is held at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featstore.imports.registry import PublishedSource, register_format
from featstore.imports.timing import SegmentSkipped, SegmentSpan
from featstore.store.importer import ImportFailure
from featstore.store.schema import FieldSpec, default_dtype

__all__ = ["PRESETS", "SeriesPreset", "VideoSeries", "load_series", "open_series", "window_weights"]

POOLS = ("overlap", "nearest")
EXTENSIONS = (".npz", ".npy", ".pt")


@dataclass(frozen=True)
class SeriesPreset:
    """A published set's series layout.

    Attributes:
        window: frames each feature covers.
        stride: frames between consecutive features.
        fps: the frame rate those frames count.
        dim: feature width.
        ext: file extension.
        key: the array's name inside ``.npz`` / dict ``.pt`` files.
        field: the store field it fills.
        reader: the publisher's code that reads it (provenance).
    """

    window: int
    stride: int
    fps: float
    dim: int
    ext: str
    key: str
    field: str
    reader: str


PRESETS = {
    "actionformer-epic-slowfast": SeriesPreset(
        window=32, stride=16, fps=30.0, dim=2304, ext=".npz", key="feats", field="actionformer.slowfast",
        reader="ActionFormer libs/datasets/epic_kitchens.py (configs/epic_slowfast_*.yaml)"),
    "ego4d-slowfast": SeriesPreset(
        window=32, stride=16, fps=30.0, dim=2304, ext=".pt", key="", field="ego4d.slowfast",
        reader="Ego4D slowfast8x8_r101_k400 features: one <video_uid>.pt tensor [T, 2304] per video"),
}


def load_series(path: Path, key: str) -> np.ndarray:
    """One video's ``[T, D]`` float32 series.

    Raises:
        ImportFailure: unreadable, no array under ``key``, or not two-dimensional.
    """
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if key not in data.files:
                    raise ImportFailure(f"{path} has no array {key!r} (it has: {', '.join(data.files) or 'none'})")
                series = data[key]
        elif path.suffix == ".npy":
            series = np.load(path, allow_pickle=False, mmap_mode="r")
        else:
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict):
                if key not in loaded:
                    raise ImportFailure(f"{path} has no tensor {key!r} (it has: {', '.join(map(str, loaded)) or 'none'})")
                loaded = loaded[key]
            if not isinstance(loaded, torch.Tensor):
                raise ImportFailure(f"{path} holds a {type(loaded).__name__}, not a tensor")
            series = loaded.float().numpy()
    except ImportFailure:
        raise
    except Exception as err:  # noqa: BLE001 - numpy / torch / zipfile each raise their own for a bad file
        raise ImportFailure(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if series.ndim != 2:
        raise ImportFailure(f"{path}: {key or 'the array'} has shape {list(series.shape)}, not [T, D]")
    return series


def window_weights(span: SegmentSpan, n_windows: int, *, window: int, stride: int, fps: float) -> np.ndarray:
    """Seconds of overlap between the segment and each window, ``(T,)`` float64."""
    starts = np.arange(n_windows, dtype=np.float64) * stride / fps
    stops = starts + window / fps
    return np.clip(np.minimum(stops, span.stop) - np.maximum(starts, span.start), 0.0, None)


class VideoSeries(PublishedSource):
    """Per-video files, one held at a time (the import visits segments video by video).

    Args:
        folder: where ``<video_id><ext>`` lie.
        layout: window, stride, fps, dim, ext, key and field.
        pool: ``overlap`` or ``nearest``.
        preset: the preset's name, if one was used.
    """

    def __init__(self, *, folder: Path, layout: SeriesPreset, pool: str, preset: str | None) -> None:
        self.folder, self.layout, self.pool, self.preset = folder, layout, pool, preset
        self.fields = {layout.field: FieldSpec(default_dtype(layout.field), (layout.dim,))}
        self._video: str | None = None
        self._series: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "layout": f"one <video_id>{layout.ext} per video, a [T, {layout.dim}] series"
                      + (f" under {layout.key!r}" if layout.key and layout.ext != ".npy" else ""),
            "preset": self.preset,
            "reader": layout.reader,
            "dim": layout.dim,
            "windows": f"feature t covers frames [t * {layout.stride}, t * {layout.stride} + {layout.window}) "
                       f"at {layout.fps:g} fps",
            "window": layout.window, "stride": layout.stride, "fps": layout.fps,
            "field": layout.field,
            "pool": self.pool,
        }

    def _load(self, video: str) -> np.ndarray:
        if video != self._video:
            path = self.folder / f"{video}{self.layout.ext}"
            self._video, self._series = video, None
            if not path.is_file():
                raise SegmentSkipped(f"no {path.name} in {self.folder}")
            series = load_series(path, self.layout.key)
            if series.shape[1] != self.layout.dim:
                raise ImportFailure(f"{path}: features are {series.shape[1]}-d; "
                                    f"{self._what()} expects {self.layout.dim}-d")
            self._series = series
        if self._series is None:
            raise SegmentSkipped(f"no {video}{self.layout.ext} in {self.folder}")
        return self._series

    def _what(self) -> str:
        return f"--preset {self.preset}" if self.preset else "--dim"

    def read(self, span: SegmentSpan) -> dict[str, np.ndarray]:
        series = self._load(span.video_id)
        layout = self.layout
        weights = window_weights(span, len(series), window=layout.window, stride=layout.stride, fps=layout.fps)
        hit = np.flatnonzero(weights > 0)
        if hit.size == 0:
            covered = ((len(series) - 1) * layout.stride + layout.window) / layout.fps if len(series) else 0.0
            raise SegmentSkipped(f"no window of {span.video_id}{layout.ext} ({len(series)} windows, 0-{covered:.2f} s) "
                                 f"overlaps {span.start:.2f}-{span.stop:.2f} s")
        if self.pool == "nearest":
            centres = (hit * layout.stride + layout.window / 2) / layout.fps
            chosen = hit[int(np.argmin(np.abs(centres - span.centre)))]
            return {layout.field: np.asarray(series[chosen], np.float32)}
        rows = np.asarray(series[hit[0]:hit[-1] + 1], np.float64)
        w = weights[hit[0]:hit[-1] + 1]
        return {layout.field: ((w @ rows) / w.sum()).astype(np.float32)}


@register_format("per-video-series", description="one file per video of [T, D] window features (ActionFormer / "
                 "OpenTAD .npz, Ego4D-style .pt, .npy)",
                 source="a folder of <video_id>.npz / .npy / .pt files")
def open_series(source: Path, *, preset: str | None = None, window: int | None = None, stride: int | None = None,
                fps: float | None = None, dim: int | None = None, key: str | None = None, ext: str | None = None,
                field: str | None = None, pool: str = "overlap") -> VideoSeries:
    """Open a folder of per-video series, checking the first file against the layout.

    Args:
        source: the folder.
        preset: a published set's layout: actionformer-epic-slowfast (stride 16, window 32, 30 fps,
            2304-d .npz 'feats'), ego4d-slowfast (the same as .pt); other options override it.
        window: frames each feature covers.
        stride: frames between consecutive features.
        fps: frame rate of those frames.
        dim: feature width (checked on every file).
        key: the array's name in .npz (or dict .pt) files (default feats).
        ext: file extension: .npz, .npy or .pt (default .npz).
        field: the store field the series fills (default series.feat, or the preset's).
        pool: overlap (windows overlapping the segment, weighted by the overlap) or nearest (the window
            whose centre is nearest the segment's).
    Raises:
        ImportFailure: an unknown preset or pool, a missing window / stride / fps / dim without a
            preset, no file, or a first file of another layout (one line naming what differs).
    """
    if preset is not None and preset not in PRESETS:
        raise ImportFailure(f"--preset {preset!r}: known presets are {', '.join(PRESETS)}")
    if pool not in POOLS:
        raise ImportFailure(f"--pool {pool!r}: per-video-series pools windows by one of {', '.join(POOLS)}")
    base = PRESETS.get(preset) if preset is not None else None
    given = {"window": window, "stride": stride, "fps": fps, "dim": dim}
    missing = [name for name, value in given.items() if value is None and base is None]
    if missing:
        raise ImportFailure(f"per-video-series needs --{', --'.join(missing)} (or a --preset: {', '.join(PRESETS)})")
    layout = SeriesPreset(
        window=int(window if window is not None else base.window),
        stride=int(stride if stride is not None else base.stride),
        fps=float(fps if fps is not None else base.fps),
        dim=int(dim if dim is not None else base.dim),
        ext=ext if ext is not None else (base.ext if base else ".npz"),
        key=key if key is not None else (base.key if base else "feats"),
        field=field if field is not None else (base.field if base else "series.feat"),
        reader=base.reader if base else "options given",
    )
    if layout.ext not in EXTENSIONS:
        raise ImportFailure(f"--ext {layout.ext!r}: use one of {', '.join(EXTENSIONS)}")
    if min(layout.window, layout.stride, layout.dim) <= 0 or not layout.fps > 0:
        raise ImportFailure("--window, --stride, --dim and --fps must be positive")
    if not source.is_dir():
        raise ImportFailure(f"--from {source}: per-video-series reads a folder of <video_id>{layout.ext} files")
    first = next(iter(sorted(source.glob(f"*{layout.ext}"))), None)
    if first is None:
        others = sorted({p.suffix for p in source.iterdir() if p.suffix in EXTENSIONS})
        hint = f" (it holds {', '.join(others)}: pass --ext)" if others else ""
        raise ImportFailure(f"--from {source}: no *{layout.ext} file{hint}")
    series = load_series(first, layout.key)
    if series.shape[1] != layout.dim:
        what = f"--preset {preset}" if preset else "--dim"
        raise ImportFailure(f"{first}: features are {series.shape[1]}-d; {what} expects {layout.dim}-d")
    return VideoSeries(folder=source, layout=layout, pool=pool, preset=preset)
