"""``lfb-noun-bank``: LFB's EPIC noun feature bank as the global detection slots, without boxes.

Layout (``video-long-term-feature-banks``: ``tools/lfb_loader.py``, ``lib/datasets/epic.py``):
``noun_lfb/{train,val}_lfb.pkl``, a Python-2 pickle holding a list indexed by video, in the order
the videos first appear in LFB's frame list (``frame_lists/train.csv``), of
``{frame_idx: [n_boxes, 2048] float}``: up to 10 detector RoI features per frame, one frame per
second, frame numbers counting frames at LFB's ``EPIC.FPS`` (30). There are no box coordinates.

A segment takes the frames of a window centred on it the way LFB's ``sample_noun_lfb`` does, with
SAOA's global window (6 s, so 60 slots of 10 boxes at 1 fps, as LFB with ``WINDOW_SIZE: 60``):
centre ``(round(start * 30) + round(stop * 30)) // 2``, frames ``lower .. lower + 6 * 30`` from
``lower = int(centre - 3 * 30)``, up to 10 rows of each in frame order until the slots are full.
Its fields are ``det.global.feat`` ``[60, 2048]`` and ``det.global.score`` ``[60]``, which is the
validity mask the heads read (1 for a filled slot, 0 for padding: the bank has no scores). No
``det.global.box``: heads that need boxes refuse the store by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featstore.imports.pickles import LazyArray, PickleFile
from featstore.imports.registry import PublishedSource, register_format
from featstore.imports.timing import SegmentSkipped, SegmentSpan
from featstore.store.importer import ImportFailure
from featstore.store.schema import DET_GLOBAL_FEAT, DET_GLOBAL_SCORE, FieldSpec, default_dtype

__all__ = ["LFB_FPS", "NounBank", "bank_window", "open_lfb", "read_video_order"]

LFB_FPS = 30.0  # LFB's cfg.EPIC.FPS: the frame numbers count frames at this rate


def read_video_order(path: Path) -> list[str]:
    """Video ids in the order they first appear in an LFB frame list (or a list of ids, one a line).

    LFB's frame lists have a header (``original_vido_id video_id frame_id path labels``) and one
    frame a line, the video first; its bank's list follows their first appearance.
    """
    order: dict[str, None] = {}
    with open(path) as handle:
        for number, line in enumerate(handle):
            tokens = line.split()
            if not tokens or (number == 0 and tokens[0] == "original_vido_id"):
                continue
            order.setdefault(tokens[0], None)
    return list(order)


def bank_window(span: SegmentSpan, *, fps: float, window_seconds: float) -> tuple[int, int]:
    """The frame numbers ``(lower, upper)`` (inclusive) around the segment's centre, as LFB computes them."""
    centre = (int(np.round(span.start * fps)) + int(np.round(span.stop * fps))) // 2
    lower = int(centre - (window_seconds / 2) * fps)
    return lower, int(lower + window_seconds * fps)


class NounBank(PublishedSource):
    """The bank opened lazily: per video a dict of frame -> rows left in the file.

    Args:
        pickle: the opened bank.
        videos: video id -> its frames dict.
        fps, window_seconds, slots, boxes_per_frame, dim: the sampling (see the module).
        order_from: where the video order came from (provenance).
    """

    def __init__(self, *, pickle: PickleFile, videos: dict[str, dict], fps: float, window_seconds: float, slots: int,
                 boxes_per_frame: int, dim: int, order_from: str) -> None:
        self.pickle, self.videos = pickle, videos
        self.fps, self.window_seconds, self.slots, self.boxes_per_frame, self.dim = (
            fps, window_seconds, slots, boxes_per_frame, dim)
        self.order_from = order_from
        self.fields = {
            DET_GLOBAL_FEAT: FieldSpec(default_dtype(DET_GLOBAL_FEAT), (slots, dim)),
            DET_GLOBAL_SCORE: FieldSpec(default_dtype(DET_GLOBAL_SCORE), (slots,)),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "layout": "LFB noun feature bank: a Python-2 pickle, a list by video of {frame_idx: [n_boxes, dim]} "
                      "(video-long-term-feature-banks tools/lfb_loader.py, lib/datasets/epic.py)",
            "videos": self.order_from,
            "dim": self.dim,
            "frames": f"frame numbers at {self.fps:g} fps (LFB's EPIC.FPS)",
            "window": f"{self.window_seconds:g} s centred on (round(start * {self.fps:g}) + round(stop * "
                      f"{self.fps:g})) // 2, as LFB's sample_noun_lfb",
            "slots": self.slots, "boxes_per_frame": self.boxes_per_frame,
            "fields": {DET_GLOBAL_FEAT: "the sampled rows, zero-padded",
                       DET_GLOBAL_SCORE: "1 for a filled slot, 0 for padding (a validity mask: the bank has no "
                                         "scores); no boxes"},
        }

    def read(self, span: SegmentSpan) -> dict[str, np.ndarray]:
        frames = self.videos.get(span.video_id)
        if frames is None:
            raise SegmentSkipped(f"video {span.video_id} is not in the bank ({self.order_from})")
        lower, upper = bank_window(span, fps=self.fps, window_seconds=self.window_seconds)
        feat = np.zeros((self.slots, self.dim), np.float32)
        filled = 0
        for frame in range(lower, upper + 1):
            rows = frames.get(frame)
            if rows is None or len(rows) == 0:
                continue
            take = min(self.boxes_per_frame, len(rows), self.slots - filled)
            block = rows.read() if isinstance(rows, LazyArray) else np.asarray(rows)
            if block.ndim != 2 or block.shape[1] != self.dim:
                raise ImportFailure(f"{self.pickle.path}: frame {frame} of {span.video_id} holds rows of shape "
                                    f"{list(block.shape)}, not [n, {self.dim}]")
            feat[filled:filled + take] = block[:take]
            filled += take
            if filled >= self.slots:
                break
        if filled == 0:
            raise SegmentSkipped(f"no bank frames of {span.video_id} in frames {lower}-{upper} "
                                 f"({self.window_seconds:g} s around {span.centre:.2f} s at {self.fps:g} fps)")
        score = np.zeros(self.slots, np.float32)
        score[:filled] = 1.0
        return {DET_GLOBAL_FEAT: feat, DET_GLOBAL_SCORE: score}

    def close(self) -> None:
        self.pickle.close()


def _first_rows(videos: dict[str, dict]) -> Any:
    for frames in videos.values():
        for rows in frames.values():
            if len(rows):
                return rows
    return None


@register_format("lfb-noun-bank", description="LFB's noun feature bank ({frame_idx: [n_boxes, 2048]} per video, "
                 "Python-2 pickle) as det.global.feat with a validity mask, no boxes",
                 source="the bank's pickle (noun_lfb/train_lfb.pkl)")
def open_lfb(source: Path, *, videos: str | None = None, fps: float = LFB_FPS, window_seconds: float = 6.0,
             slots: int = 60, boxes_per_frame: int = 10, dim: int = 2048) -> NounBank:
    """Open the bank (allow-listed pickle reading: plain data only, its arrays left in the file).

    Args:
        source: the pickle.
        videos: LFB's frame list (frame_lists/train.csv) or a file of video ids, one a line: the order
            of the bank's list (not needed when the bank is a dict by video id).
        fps: frame rate the bank's frame numbers count (LFB's EPIC.FPS).
        window_seconds: seconds of bank frames around each segment's centre (SAOA's global window).
        slots: rows kept per segment (det.global.feat's first dimension).
        boxes_per_frame: rows taken from each frame at most (LFB: MAX_NUM_FEATS_PER_NOUN_LFB_FRAME).
        dim: the bank's feature width (checked).
    Raises:
        ImportFailure, PickleRefused: not such a bank (one line naming what differs), or a pickle
            naming anything but plain data.
    """
    if min(slots, boxes_per_frame, dim) <= 0 or not fps > 0 or not window_seconds > 0:
        raise ImportFailure("--slots, --boxes-per-frame, --dim, --fps and --window-seconds must be positive")
    if not source.is_file():
        raise ImportFailure(f"--from {source}: lfb-noun-bank reads the bank's pickle file")
    opened = PickleFile(source)
    try:
        bank = opened.value
        if isinstance(bank, dict) and all(isinstance(k, str) for k in bank):
            by_video, order_from = bank, "the bank's video ids"
        elif isinstance(bank, list):
            if videos is None:
                raise ImportFailure(f"{source} is a list by video: pass --videos, LFB's frame list that orders it")
            order = read_video_order(Path(videos))
            if len(order) != len(bank):
                raise ImportFailure(f"{source} holds {len(bank)} videos; {videos} lists {len(order)}")
            by_video, order_from = dict(zip(order, bank)), f"the order of {Path(videos).name}"
        else:
            raise ImportFailure(f"{source} holds a {type(bank).__name__}, not LFB's list of {{frame_idx: rows}}")
        if not all(isinstance(frames, dict) for frames in by_video.values()):
            raise ImportFailure(f"{source}: a video's entry is not a {{frame_idx: [n_boxes, {dim}]}} dict")
        first = _first_rows(by_video)
        if first is None:
            raise ImportFailure(f"{source}: the bank holds no features")
        if len(first.shape) != 2 or first.shape[1] != dim:
            raise ImportFailure(f"{source}: bank rows have shape {list(first.shape)}; --dim is {dim} "
                                f"(LFB's noun bank is 2048-d)")
        return NounBank(pickle=opened, videos=by_video, fps=fps, window_seconds=window_seconds, slots=slots,
                        boxes_per_frame=boxes_per_frame, dim=dim, order_from=order_from)
    except BaseException:
        opened.close()
        raise
