"""Temporal views of a segment (docs/views.md): where a build centres each view's clip, and which view
a trainer reads in each epoch.

The report trains its heads with the backbones' temporal sampling: "During the training and testing
of SAOA, we utilize the same temporal sampling strategy during the training and testing of the
backbone" -- a clip centred at a random frame of the segment in training, the centre clip in
testing. A store built with ``featstore build --views K`` therefore holds K views of each training
segment: view 0 centred on the segment (`featstore.epic.sampling.plan_segment`'s rule, what every
evaluation reads), views 1..K-1 centred on frames drawn uniformly from ``[start_frame, stop_frame]``.
Each view's detection windows follow its clip: they are centred on the point of the segment's
detection grid (view 0's frames, 1 / det_fps s apart) nearest the view's clip centre, at most half a
detection step away (0.25 s at 2 fps, below the windows' own sampling). So the views of a segment
share their detection frames but for the steps between their centres, and the detector runs once
per distinct frame.

Every draw is a pure function of integers, so that a build, a rerun of it and another machine agree
without any state: a frame is ``start + mix64(seed, uid, view) mod (stop - start + 1)``, and a
trainer's view of a segment in an epoch ``mix64(seed, epoch, uid) mod count``. ``mix64`` chains
SplitMix64's finaliser over 64-bit words (a uid enters as the first 8 bytes of its BLAKE2b digest);
the modulo's bias is below count / 2**64.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import numpy as np

from featstore.epic.sampling import SamplingConfig, SegmentPlan, plan_segment

__all__ = ["CENTRE_VIEW", "VIEW_DRAW_RULE", "VIEW_CENTRE_RULE", "draw_views", "mix64", "plan_views", "uid_word",
           "view_centres"]

CENTRE_VIEW = 0  # the view every evaluation reads: the clip centred on the segment
VIEW_CENTRE_RULE = ("view 0: the segment centre; view v >= 1: start_frame + mix64(seed, uid, v) mod "
                    "(stop_frame - start_frame + 1), uniform over the segment's frames")
VIEW_DRAW_RULE = "per epoch, segment's view = mix64(seed, epoch, uid) mod its number of views (uniform)"

_MASK = (1 << 64) - 1


def uid_word(uid: str) -> int:
    """A uid as one 64-bit word: the first 8 bytes of its BLAKE2b digest (the same on every machine)."""
    return int.from_bytes(hashlib.blake2b(str(uid).encode(), digest_size=8).digest(), "little")


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _words(value: int | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype == np.uint64:
        return value
    if isinstance(value, (int, np.integer)):
        return np.array([int(value) & _MASK], dtype=np.uint64)
    return np.array([int(v) & _MASK for v in value], dtype=np.uint64)


def mix64(*words: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """Hash 64-bit words into one, elementwise over arrays (broadcast): SplitMix64's finaliser, chained.

    Args:
        words: integers (any sign: taken mod 2**64) or arrays of them, broadcast together.
    Returns:
        uint64 array (at least 1-d).
    """
    with np.errstate(over="ignore"):
        out = np.zeros(1, dtype=np.uint64)
        for word in words:
            out = _splitmix(out ^ _words(word))
    return out


def view_centres(start_frame: int, stop_frame: int, *, count: int, seed: int, uid: str) -> tuple[int, ...]:
    """The frame each of a segment's ``count`` views is centred on.

    Args:
        start_frame, stop_frame: the segment (1-based, inclusive, stop >= start).
        count: views, >= 1.
        seed: the build's seed.
        uid: the segment.
    Returns:
        ``count`` frames: view 0 the segment centre ``(start + stop) / 2`` rounded halves up (as
        `plan_segment`), then one frame drawn uniformly from ``[start, stop]`` per view (see the module).
    """
    if count < 1:
        raise ValueError(f"a segment has at least one view, got count={count}")
    if stop_frame < start_frame:
        raise ValueError(f"stop_frame {stop_frame} is before start_frame {start_frame}")
    centre = (start_frame + stop_frame + 1) // 2
    if count == 1:
        return (centre,)
    span = stop_frame - start_frame + 1
    drawn = mix64(seed, uid_word(uid), np.arange(1, count, dtype=np.uint64)) % np.uint64(span)
    return (centre, *(start_frame + int(d) for d in drawn))


def plan_views(start_frame: int, stop_frame: int, *, fps: float, n_frames: int | None, config: SamplingConfig,
               count: int, seed: int, uid: str) -> list[SegmentPlan]:
    """The sampling plan of each view of a segment: `plan_segment` at each of `view_centres`.

    Args:
        start_frame, stop_frame, fps, n_frames, config: as `plan_segment` (``centred`` clips only:
            segment sampling has no centre to move).
        count, seed, uid: as `view_centres`.
    Returns:
        ``count`` plans, view 0 first (exactly ``plan_segment``'s plan of the segment); view v's
        clip centred on its drawn frame, its windows ``window_steps`` whole detection steps from the
        segment centre (the nearest to its clip centre; ``SegmentPlan.windows_center`` says where).
    """
    if count > 1 and config.clip_sampling != "centred":
        raise ValueError(f"temporal views move a centred clip; clip_sampling {config.clip_sampling!r} has no "
                         "centre to move")
    centres = view_centres(start_frame, stop_frame, count=count, seed=seed, uid=uid)
    plans = [plan_segment(start_frame, stop_frame, fps=fps, n_frames=n_frames, config=config)]
    frames_per_step = fps / config.det_fps
    for centre in centres[1:]:
        # The grid point nearest the clip's centre: whole detection steps from the segment centre.
        steps = math.floor((centre - centres[0]) / frames_per_step + 0.5)
        plans.append(plan_segment(start_frame, stop_frame, fps=fps, n_frames=n_frames, config=config,
                                  clip_center=centre, window_steps=steps))
    return plans


def draw_views(uid_words: np.ndarray | Iterable[int], counts: np.ndarray | Sequence[int], *, seed: int,
               epoch: int) -> np.ndarray:
    """Which view of each segment a trainer reads in one epoch.

    Args:
        uid_words: (N,) `uid_word` of each segment (compute them once per run).
        counts: (N,) views each segment has (1: always its view 0).
        seed: the run's seed.
        epoch: the 0-based epoch.
    Returns:
        (N,) int64 views, ``mix64(seed, epoch, uid) mod count``.
    """
    words = _words(uid_words if isinstance(uid_words, np.ndarray) else list(uid_words))
    counts = np.asarray(counts, dtype=np.uint64)
    if counts.shape != words.shape:
        raise ValueError(f"{words.shape[0]} uids but {counts.shape} counts")
    if (counts < 1).any():
        raise ValueError("every segment has at least one view")
    return (mix64(seed, epoch, words) % counts).astype(np.int64)
