"""Sampling plans: which frames of a video feed the clip backbones and the detector for one segment.

Pure functions over frame indices, no I/O. All indices are EPIC's 1-based RGB frame indices (the
index space of the annotations' ``start_frame`` / ``stop_frame`` and of ``frame_%010d.jpg``).

Two ways to take a backbone's clip (``SamplingConfig.clip_sampling``):

- ``"centred"``: ``clip_frames`` frames ``clip_stride`` apart around the segment centre (3D CNNs:
  ResNet50-3D, I3D, R(2+1)D, SlowFast);
- ``"segments"``: TSN's test-time sampling: the segment is cut into ``clip_frames`` equal parts and
  each gives the snippet in its middle (TSN / TSM). A snippet is ``snippet_frames`` frames
  ``clip_stride`` apart, later stacked as channels: the EPIC flow TSN / TSM take 5 consecutive flow
  frames (2 RGB frames apart, flow being at half the RGB rate) as 10 channels.

Frame rates: clip strides count the video's own frames, unless ``resample_fps`` is set (the
report: "The videos are decoded at 60 FPS"): the clip's samples are then taken by time, as if the
video were decoded at that rate, each at the nearest frame of the video (a 30 fps video repeats its
frames), so a 64 x 2 clip spans 126 / 60 s in every video. Detection windows are in seconds already.

One rounding rule is used everywhere a time falls between two frames: the nearest frame, halves
rounded up (``floor(x + 0.5)``). Python's ``round`` rounds halves to even, which would make the
spacing of a detection grid alternate (e.g. 12 and 13 frames at 25 fps steps of 12.5); rounding
halves up keeps every step of a grid the same length, at the cost of a half-frame shift.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["CLIP_SAMPLINGS", "RESIZE_MODES", "SamplingConfig", "SegmentPlan", "plan_segment"]

CLIP_SAMPLINGS = ("centred", "segments")
# How clip frames are resized: the short side to `size` (aspect kept), or to size x size without a crop.
RESIZE_MODES = ("short-side", "square")

# Times are products of small integers and float frame rates (59.94, 29.97...); a half that comes
# out as 0.49999999999 must still round up, so the rule is floor(x + 0.5 + eps).
_ROUND_EPS = 1e-6


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5 + _ROUND_EPS)


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are sampled around a segment (paper defaults; recorded in the store's manifest).

    A build takes the clip settings from its verb backbone's record unless given
    (`featstore.extract.plan.resolve_sampling`); the defaults here are the paper's ResNet50-3D ones.
    """

    clip_frames: int = 64  # clip samples (64 for ResNet50-3D / I3D, 32 for R(2+1)D-34; TSN: segments, 8)
    clip_stride: int = 2  # frames between clip samples, in the video's own frames (4 for R(2+1)D-34);
    # with clip_sampling 'segments': frames between the frames of one snippet
    size: int = 256  # short side after resizing, no crop (128 for R(2+1)D-34)
    resize: str = "short-side"  # 'short-side' (aspect kept) | 'square' (size x size, no crop: R(2+1)D-34's stage 2)
    clip_sampling: str = "centred"  # 'centred' (around the segment centre) | 'segments' (TSN)
    snippet_frames: int = 1  # frames per clip sample, stacked as channels (5 for TSN / TSM flow)
    det_fps: float = 2.0  # detection frames per second of video
    det_global_seconds: float = 6.0  # global window (noun branch) around the clip centre
    det_local_seconds: float = 4.0  # local window (verb branch) around the clip centre
    det_topk: int = 5  # detections kept per detection frame
    # Clip samples taken by time as if decoded at this rate (the report: 60); None: the video's own frames.
    resample_fps: float | None = None

    def __post_init__(self) -> None:
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.clip_stride < 1:
            raise ValueError(f"clip_stride must be >= 1, got {self.clip_stride}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.clip_sampling not in CLIP_SAMPLINGS:
            raise ValueError(f"clip_sampling must be one of {', '.join(CLIP_SAMPLINGS)}, got {self.clip_sampling!r}")
        if self.snippet_frames < 1:
            raise ValueError(f"snippet_frames must be >= 1, got {self.snippet_frames}")
        if self.snippet_frames > 1 and self.clip_sampling != "segments":
            raise ValueError("snippet_frames > 1 (stacked frames per sample) needs clip_sampling='segments'")
        if not self.det_fps > 0:
            raise ValueError(f"det_fps must be > 0, got {self.det_fps}")
        if self.det_global_seconds < 0 or self.det_local_seconds < 0:
            raise ValueError(
                f"detection windows must be >= 0 s, got global={self.det_global_seconds} "
                f"local={self.det_local_seconds}"
            )
        if self.det_topk < 1:
            raise ValueError(f"det_topk must be >= 1, got {self.det_topk}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.resample_fps is not None:
            if not self.resample_fps > 0:
                raise ValueError(f"resample_fps must be > 0, got {self.resample_fps}")
            if self.clip_sampling != "centred":
                raise ValueError("resample_fps applies to centred clips (segment sampling already takes "
                                 "fractions of the segment)")

    @property
    def n_global_frames(self) -> int:
        """Detection frames in the global window (6 s x 2 fps = 12)."""
        return _round_half_up(self.det_global_seconds * self.det_fps)

    @property
    def n_local_frames(self) -> int:
        """Detection frames in the local window (4 s x 2 fps = 8)."""
        return _round_half_up(self.det_local_seconds * self.det_fps)

    @property
    def n_global_slots(self) -> int:
        """Rows of ``det.global.*``: global frames x top-k (60)."""
        return self.n_global_frames * self.det_topk

    @property
    def n_local_slots(self) -> int:
        """Rows of ``det.local.*``: local frames x top-k (40)."""
        return self.n_local_frames * self.det_topk

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON types (for the manifest); ``from_dict`` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingConfig":
        """Rebuild a config from ``to_dict`` output; unknown keys are an error, missing ones default.

        Args:
            values: mapping of field name to value, e.g. a manifest's ``sampling`` entry.

        Returns:
            The config.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SamplingConfig fields: {', '.join(unknown)}")
        return cls(**dict(values))


@dataclass(frozen=True)
class SegmentPlan:
    """The frames one segment needs. Indices are EPIC 1-based RGB frame indices."""

    clip_frames: tuple[int, ...]  # (clip_frames * snippet_frames,) backbone clip, sample-major, clamped
    # into the video (edges repeat)
    clip_center: int  # frame the clip is centred on (and both detection windows, unless window_center says)
    global_frames: tuple[int | None, ...]  # (n_global_frames,) None = outside the video: padded, masked
    local_frames: tuple[int | None, ...]  # (n_local_frames,) None = outside the video: padded, masked
    # The frame the detection windows are centred on, when not clip_center: a temporal view's windows
    # stay on the segment's detection grid (`plan_segment`'s window_steps).
    window_center: int | None = None

    @property
    def windows_center(self) -> int:
        """The frame both detection windows are centred on."""
        return self.clip_center if self.window_center is None else self.window_center

    @property
    def detection_frames(self) -> tuple[int, ...]:
        """Distinct frames the detector must run on, sorted: a frame in both windows is detected once."""
        return tuple(sorted({f for f in self.global_frames + self.local_frames if f is not None}))


def _detection_offsets(n_frames_in_window: int, shift_half_steps: int) -> list[int]:
    """Offsets from the centre, in half detection steps, of a window's frames.

    The k-th of M frames sits at (k - (M-1)/2) steps from the centre, i.e. (2k - (M-1)) half steps:
    the grid is symmetric about the centre. Integers in half steps keep the arithmetic exact, so two
    windows whose offsets coincide produce the very same frame after rounding.
    """
    return [2 * k - (n_frames_in_window - 1) + shift_half_steps for k in range(n_frames_in_window)]


def _segment_snippets(start_frame: int, stop_frame: int, config: SamplingConfig) -> list[int]:
    """TSN's test-time snippets (see `plan_segment`): sample-major frame indices, unclamped."""
    n_frames = stop_frame - start_frame + 1
    snippet_span = (config.snippet_frames - 1) * config.clip_stride + 1
    tick = (n_frames - snippet_span + 1) / config.clip_frames
    frames: list[int] = []
    for k in range(config.clip_frames):
        # The publisher's float expression, truncated as it truncates (no rounding epsilon: the same
        # float arithmetic gives the same frames). A segment shorter than one snippet (tick <= 0)
        # takes every snippet from its start, as TsnDataset's short-segment branch does.
        offset = int(tick / 2.0 + tick * k) if tick > 0 else 0
        frames += [start_frame + offset + j * config.clip_stride for j in range(config.snippet_frames)]
    return frames


def plan_segment(
    start_frame: int,
    stop_frame: int,
    *,
    fps: float,
    n_frames: int | None,
    config: SamplingConfig,
    clip_center: int | None = None,
    window_steps: int | None = None,
) -> SegmentPlan:
    """Plan the clip and detection frames of one segment.

    Rules:
      * Centre: the segment centre ``(start + stop) / 2`` rounded to a frame (halves up), unless
        ``clip_center`` gives another frame (a temporal view, `featstore.epic.views`).
      * Clip, ``clip_sampling="centred"``: ``clip_frames`` frames ``clip_stride`` apart, symmetric
        about the centre (the j-th at ``centre + (j - (N-1)/2) * stride``, rounded halves up when the
        span is odd). With ``resample_fps`` R the stride is in frames of an R fps decoding: the j-th
        at ``centre + (j - (N-1)/2) * stride * fps / R`` rounded halves up (exactly the rule above
        when fps == R).
      * Clip, ``clip_sampling="segments"`` (TSN's test-time rule, ``TsnDataset._get_test_indices``):
        with n = stop - start + 1 frames, a snippet spanning L = (snippet_frames - 1) * clip_stride + 1
        frames and S = clip_frames segments, ``tick = (n - L + 1) / S``; snippet k starts at
        ``start + floor(tick / 2 + k * tick)`` (at ``start`` when the segment is shorter than a
        snippet) and holds ``snippet_frames`` frames ``clip_stride`` apart. Frames come sample-major.
      * Frames past the video's ends are clamped into ``[1, n_frames]``, repeating the edge frame: a
        backbone needs a full-length clip, and repeating the edge is what EPIC loaders do. With
        ``n_frames=None`` (length unknown) only the start is clamped; the reader reports frames past
        the end.
      * Detection: ``n`` frames at ``det_fps`` per window, the k-th of M at
        ``centre + (k - (M-1)/2) * fps / det_fps`` rounded halves up. Frames outside the video are
        ``None`` (padded, masked slots), not clamped, so that no detections are invented by running
        the detector twice on an edge frame.
      * Shared frames: with the formula above two windows lie on the same grid when M_global - M_local
        is even (the defaults, 12 and 8: local offsets -3.5..3.5 steps are global's -5.5..5.5 without
        the two outermost on each side), and their frames coincide exactly, not just approximately,
        because both are computed from the same integer half-step offsets. When the parities differ
        (e.g. 6 s and 3.5 s at 2 fps: 12 and 7 frames) a centred local grid would fall halfway between
        global frames and share none; we then shift the local grid by half a step (1 / (2 det_fps) s,
        below the sampling resolution) so it lands on the global grid and every local frame is shared.

    Args:
        start_frame: first frame of the segment (1-based, inclusive).
        stop_frame: last frame of the segment (1-based, inclusive), >= start_frame.
        fps: frame rate of the video (frames per second), > 0.
        n_frames: number of frames in the video, or None when unknown.
        clip_center: the frame to centre the clip on instead of the segment centre (``centred``
            clips only; the build's temporal views draw it inside the segment).
        window_steps: None: both detection windows are centred on the clip. An integer: they are
            centred this many detection steps (1 / det_fps s) from the segment centre, on the
            segment's own grid: the k-th frame is at
            ``centre + (offset_k + 2 * window_steps) * fps / (2 det_fps)`` half steps, rounded as
            above, so a temporal view's windows share their frames with the centre view's.
        config: the sampling configuration.

    Returns:
        The plan: ``clip_frames`` (clip_frames * snippet_frames,), ``global_frames``
        (n_global_frames,), ``local_frames`` (n_local_frames,).

    Raises:
        ValueError: on a non-positive fps, stop before start, a start before frame 1, or a segment
            that starts past the end of the video (there is nothing of it to sample).
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if start_frame < 1:
        raise ValueError(f"start_frame must be >= 1 (EPIC frames are 1-based), got {start_frame}")
    if stop_frame < start_frame:
        raise ValueError(f"stop_frame {stop_frame} is before start_frame {start_frame}")
    if n_frames is not None:
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1 or None, got {n_frames}")
        if start_frame > n_frames:
            raise ValueError(f"segment starts at frame {start_frame}, past the video's last frame {n_frames}")
    last_frame = n_frames if n_frames is not None else math.inf

    # (start + stop) / 2 rounded halves up == (start + stop + 1) // 2, exactly, in integers.
    segment_center = (start_frame + stop_frame + 1) // 2
    if clip_center is None:
        clip_center = segment_center
    elif config.clip_sampling != "centred":
        raise ValueError("clip_center moves a centred clip; segment sampling takes the whole segment")

    if config.clip_sampling == "segments":
        raw_clip = _segment_snippets(start_frame, stop_frame, config)
    elif config.resample_fps is not None and fps != config.resample_fps:
        frames_per_half_sample = config.clip_stride * fps / (2.0 * config.resample_fps)
        raw_clip = [clip_center + _round_half_up((2 * j - (config.clip_frames - 1)) * frames_per_half_sample)
                    for j in range(config.clip_frames)]
    else:
        raw_clip = []
        for j in range(config.clip_frames):
            offset_half_frames = (2 * j - (config.clip_frames - 1)) * config.clip_stride
            raw_clip.append(clip_center + (offset_half_frames + 1) // 2)  # exact integer half-up rounding
    clip = [int(min(max(frame, 1), last_frame)) for frame in raw_clip]

    n_global, n_local = config.n_global_frames, config.n_local_frames
    # Put the shorter window on the longer one's grid (see "Shared frames" above).
    parity_shift = (n_global - n_local) % 2
    global_offsets = _detection_offsets(n_global, parity_shift if n_global < n_local else 0)
    local_offsets = _detection_offsets(n_local, parity_shift if n_local <= n_global else 0)
    frames_per_half_step = fps / (2.0 * config.det_fps)

    # Without window_steps the windows are centred on the clip (the segment centre, or the given one).
    origin, shift = (clip_center, 0) if window_steps is None else (segment_center, 2 * int(window_steps))

    def window(offsets: list[int]) -> tuple[int | None, ...]:
        out: list[int | None] = []
        for offset in offsets:
            frame = origin + _round_half_up((offset + shift) * frames_per_half_step)
            out.append(frame if 1 <= frame <= last_frame else None)
        return tuple(out)

    window_center = origin + _round_half_up(shift * frames_per_half_step)
    return SegmentPlan(
        clip_frames=tuple(clip),
        clip_center=clip_center,
        global_frames=window(global_offsets),
        local_frames=window(local_offsets),
        window_center=None if window_center == clip_center else window_center,
    )
