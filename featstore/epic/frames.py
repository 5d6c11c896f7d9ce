"""Frame sources for extraction: EPIC JPEG folders (RGB, flow u/v) and video files decoded with PyAV.

Every source answers the same three questions (``FrameSource``): give me these 1-based frames of a
video as one uint8 array, how many frames does the video have, and at what frame rate. Frame indices
are always EPIC's RGB frame indices (the annotations' index space), also for flow, whose files run at
half that rate and are looked up as ``max(1, rgb_index // 2)``.

Anything wrong with an input (missing file, zero-byte / truncated / garbage JPEG, unopenable or
truncated video) raises ``FrameError`` whose message names the file or video and the frame, so that
the extraction service can fail that one segment with a useful reason and go on.

JPEGs are decoded with Pillow (libjpeg-turbo). ``torchvision.io.decode_jpeg`` is ~1.7x faster but is
deprecated since torchvision 0.29 (superseded by TorchCodec), and at EPIC's 456x256 Pillow decodes a
frame in under 1 ms, far below the cost of the 3D CNN that consumes it.
"""
from __future__ import annotations

import io
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "FrameError",
    "FrameSource",
    "EpicJpegFrames",
    "VideoFiles",
    "VIDEO_EXTENSIONS",
    "decode_jpeg_file",
    "resize_short_side",
    "open_frame_source",
    "stack_snippets",
]

MODALITY_CHANNELS = {"rgb": 3, "flow": 2}
VIDEO_EXTENSIONS = ("mp4", "avi", "mkv", "webm", "mov")
# AVI stores no presentation timestamps (FFmpeg guesses them from decode order, wrong with B-frames
# and off by one without), so AVI frames are found by counting from the start: right, but no seeking.
_COUNT_ONLY_SUFFIXES = (".avi",)
_UNORDERED = "timestamps out of order"
_OVERSHOOT = "seek overshot"
_FRAME_NAME = re.compile(r"^frame_(\d+)\.jpg$")

# A JPEG ends with the EOI marker FF D9. Inside entropy-coded data FF is always followed by 00 or a
# restart marker (D0-D7), so FF D9 near the end can only be a real EOI; a file cut anywhere in its
# image data lacks it. Some writers pad a few bytes after EOI, hence "near the end", not "last".
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_EOI_SEARCH_BYTES = 32


class FrameError(Exception):
    """A frame could not be read. The message names the file or video and the frame.

    Attributes:
        video_id: the video, when known.
        frame: the 1-based (RGB-index) frame that failed, when one frame is to blame.
        path: the file that failed, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        video_id: str | None = None,
        frame: int | None = None,
        path: str | Path | None = None,
    ) -> None:
        super().__init__(message)
        self.video_id = video_id
        self.frame = frame
        self.path = None if path is None else str(path)


@runtime_checkable
class FrameSource(Protocol):
    """Where extraction gets frames from. Implementations must be picklable (sent to workers)."""

    modality: str  # 'rgb' | 'flow'

    def read(self, participant_id: str, video_id: str, frames: Sequence[int]) -> np.ndarray:
        """Frames in the order asked (repeats allowed; each distinct frame decoded once).

        Returns:
            uint8 (T, H, W, C), C = 3 for rgb, 2 for flow (u, v).
        """
        ...

    def n_frames(self, participant_id: str, video_id: str) -> int | None:
        """Highest readable RGB frame index, None when unknown."""
        ...

    def fps(self, video_id: str) -> float | None:
        """Frames per second of the video, None when unknown."""
        ...


def _check_frame_indices(frames: Sequence[int], video_id: str) -> list[int]:
    indices = [int(f) for f in frames]
    for index, original in zip(indices, frames):
        if index != original or index < 1:
            raise FrameError(
                f"video {video_id}: frame index {original!r} is not a 1-based frame number",
                video_id=video_id,
                frame=index if index == original else None,
            )
    return indices


def decode_jpeg_file(path: str | Path, *, grey: bool = False, video_id: str | None = None,
                     frame: int | None = None) -> np.ndarray:
    """Read and decode one JPEG, refusing missing, empty, truncated and non-JPEG files.

    Pillow decodes a truncated file silently when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set (any
    library may set that global), and libjpeg fills the missing part with grey; so truncation is
    checked on the bytes (EOI marker) before decoding, whatever the decoder does.

    Args:
        path: the file.
        grey: decode to one channel (flow u/v) instead of RGB.
        video_id, frame: only for the error message.

    Returns:
        uint8 (H, W, 3), or (H, W) when ``grey``.

    Raises:
        FrameError: naming the path, for a missing / unreadable / empty / truncated / corrupt file.
    """
    where = f" (video {video_id}, frame {frame})" if video_id is not None else ""

    def fail(reason: str) -> FrameError:
        return FrameError(f"{reason}: {path}{where}", video_id=video_id, frame=frame, path=path)

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise fail("missing frame file") from None
    except OSError as error:
        raise fail(f"cannot read frame file ({error.strerror or error})") from error
    if not data:
        raise fail("empty (zero-byte) JPEG")
    if data[:2] != _JPEG_SOI:
        raise fail(f"not a JPEG (starts with {data[:4].hex(' ')})")
    if _JPEG_EOI not in data[-_EOI_SEARCH_BYTES:]:
        raise fail(f"truncated JPEG (no end-of-image marker; {len(data)} bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Image.open is lazy: decoding errors surface only here
            image = image.convert("L" if grey else "RGB")
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise fail(f"corrupt JPEG ({error})") from error


def _stack(images: dict[int, np.ndarray], order: list[int], channels: int, video_id: str,
           describe: str) -> np.ndarray:
    """Stack decoded frames in the requested order; all must share one size."""
    if not order:
        return np.zeros((0, 0, 0, channels), dtype=np.uint8)
    first_shape = images[order[0]].shape
    for index in order:
        if images[index].shape != first_shape:
            raise FrameError(
                f"video {video_id}: frame {index} is {images[index].shape[:2]} but frame {order[0]} is "
                f"{first_shape[:2]} ({describe})",
                video_id=video_id,
                frame=index,
            )
    return np.stack([images[index] for index in order])  # (T, H, W, C)


class EpicJpegFrames:
    """Frames from EPIC-layout JPEG folders.

    RGB: ``ROOT/<participant>/rgb_frames/<video>/frame_%010d.jpg``.
    Flow: ``ROOT/<participant>/flow_frames/<video>/{u,v}/frame_%010d.jpg``, grey JPEGs at half the RGB
    rate; RGB frame i reads flow frame ``max(1, i // 2)`` and returns (u, v) as 2 channels.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        modality: str = "rgb",
        fps_by_video: Mapping[str, float] | None = None,
    ) -> None:
        """
        Args:
            root: dataset root holding one folder per participant.
            modality: ``"rgb"`` or ``"flow"``.
            fps_by_video: frame rate per video id (from ``EPIC_video_info.csv``); JPEG folders carry none.
        """
        if modality not in MODALITY_CHANNELS:
            raise ValueError(f"modality must be 'rgb' or 'flow', got {modality!r}")
        self.root = Path(root)
        self.modality = modality
        self.fps_by_video = dict(fps_by_video or {})
        self._n_frames: dict[tuple[str, str], int] = {}  # listing a folder of 50k files is slow: once

    def video_dir(self, participant_id: str, video_id: str) -> Path:
        """The folder of one video's frames (for flow, the folder holding ``u`` and ``v``)."""
        return self.root / participant_id / f"{self.modality}_frames" / video_id

    def frame_path(self, participant_id: str, video_id: str, file_index: int, component: str | None = None) -> Path:
        """Path of one frame file; ``file_index`` is the file's own index (flow: the flow index)."""
        folder = self.video_dir(participant_id, video_id)
        if component is not None:
            folder = folder / component
        return folder / f"frame_{file_index:010d}.jpg"

    def file_index(self, frame: int) -> int:
        """File index holding RGB frame ``frame``: itself for rgb, ``max(1, frame // 2)`` for flow."""
        return frame if self.modality == "rgb" else max(1, frame // 2)

    def read(self, participant_id: str, video_id: str, frames: Sequence[int]) -> np.ndarray:
        """Read frames, in the order asked; each distinct file is decoded once.

        Args:
            participant_id: e.g. ``"P01"``.
            video_id: e.g. ``"P01_01"``.
            frames: 1-based RGB frame indices; repeats allowed.

        Returns:
            uint8 (T, H, W, 3) for rgb, (T, H, W, 2) (u, v) for flow. T = len(frames).

        Raises:
            FrameError: a frame file is missing, empty, truncated or corrupt (names the path).
        """
        indices = _check_frame_indices(frames, video_id)
        file_indices = [self.file_index(frame) for frame in indices]
        # Remember one RGB frame per file for the error message ("frame 7" means the RGB frame asked for).
        asked_as = dict(zip(file_indices, indices))
        decoded: dict[int, np.ndarray] = {}
        for file_index in sorted(set(file_indices)):
            frame = asked_as[file_index]
            if self.modality == "rgb":
                decoded[file_index] = decode_jpeg_file(
                    self.frame_path(participant_id, video_id, file_index), video_id=video_id, frame=frame
                )
            else:
                u, v = (
                    decode_jpeg_file(
                        self.frame_path(participant_id, video_id, file_index, component),
                        grey=True, video_id=video_id, frame=frame,
                    )
                    for component in ("u", "v")
                )
                if u.shape != v.shape:
                    raise FrameError(
                        f"flow u and v differ in size ({u.shape} vs {v.shape}) at "
                        f"{self.frame_path(participant_id, video_id, file_index, 'u')} (video {video_id}, frame {frame})",
                        video_id=video_id, frame=frame,
                        path=self.frame_path(participant_id, video_id, file_index, "u"),
                    )
                decoded[file_index] = np.stack([u, v], axis=-1)  # (H, W, 2)
        return _stack(decoded, file_indices, MODALITY_CHANNELS[self.modality], video_id,
                      f"in {self.video_dir(participant_id, video_id)}")

    def _highest_index(self, folder: Path, video_id: str) -> int:
        try:
            with os.scandir(folder) as entries:
                indices = [int(m.group(1)) for e in entries if (m := _FRAME_NAME.match(e.name))]
        except FileNotFoundError:
            raise FrameError(f"video {video_id}: no frame folder {folder}", video_id=video_id, path=folder) from None
        if not indices:
            raise FrameError(f"video {video_id}: no frame_*.jpg files in {folder}", video_id=video_id, path=folder)
        return max(indices)

    def n_frames(self, participant_id: str, video_id: str) -> int:
        """Highest readable RGB frame index (the folder is listed once per video, then cached).

        For rgb: the highest ``frame_%010d.jpg`` index present. For flow, still in RGB units so that
        sampling plans (made in annotation frames) clamp to what flow can deliver: with F flow frames
        (the lower of u's and v's highest index), RGB frames up to 2F + 1 map to a flow file.

        Raises:
            FrameError: the folder is missing or holds no frames.
        """
        key = (participant_id, video_id)
        if key not in self._n_frames:
            folder = self.video_dir(participant_id, video_id)
            if self.modality == "rgb":
                self._n_frames[key] = self._highest_index(folder, video_id)
            else:
                n_flow = min(self._highest_index(folder / c, video_id) for c in ("u", "v"))
                self._n_frames[key] = 2 * n_flow + 1
        return self._n_frames[key]

    def fps(self, video_id: str) -> float | None:
        """Frame rate from ``fps_by_video``; None when not given (JPEG folders do not record it)."""
        fps = self.fps_by_video.get(video_id)
        return None if fps is None else float(fps)

    def __repr__(self) -> str:
        return f"EpicJpegFrames(root={str(self.root)!r}, modality={self.modality!r})"


class VideoFiles:
    """RGB frames decoded from video files with PyAV.

    Files are looked up as ``DIR/<video_id>.<ext>``, then ``DIR/<participant>/<video_id>.<ext>`` and
    ``DIR/<participant>/videos/<video_id>.<ext>`` (the EPIC-100 download layout), for the extensions
    in ``VIDEO_EXTENSIONS`` in lower or upper case (EPIC-100 ships ``.MP4``).

    Frame i (1-based) is the i-th frame in presentation order; it is identified by its timestamp,
    ``round((pts - start_time) * time_base * rate) + 1``, so it is the same frame whether decoding
    started at the beginning or after a seek (constant frame rate assumed, as in EPIC videos). Where
    timestamps cannot be trusted (AVI; or pts that go backwards or are missing, found while decoding)
    frames are counted from the start of the file instead, which is always right but cannot seek.
    """

    seek_threshold_frames = 32  # below this, decoding from the start is about as cheap as a seek

    def __init__(
        self,
        directory: str | Path,
        *,
        fps_by_video: Mapping[str, float] | None = None,
        modality: str = "rgb",
        threads: int = 1,
    ) -> None:
        """
        Args:
            directory: folder of video files.
            fps_by_video: frame rate per video id overriding the container's, for ``fps()`` (the
                rate the annotations' frame numbers were made at); decoding always uses the container's.
            modality: must be ``"rgb"``: flow is distributed as JPEG u/v folders, not videos.
            threads: decoder threads per read; 1 because extraction already decodes in several
                worker processes and more threads would oversubscribe the cores.
        """
        if modality != "rgb":
            raise ValueError(
                f"VideoFiles decodes RGB only, got modality={modality!r}: optical flow comes as EPIC "
                "JPEG u/v folders (use EpicJpegFrames / --frames-root)"
            )
        self.directory = Path(directory)
        self.modality = "rgb"
        self.fps_by_video = dict(fps_by_video or {})
        self.threads = threads
        self._paths: dict[str, Path] = {}
        self._info: dict[str, tuple[int, Fraction]] = {}  # video_id -> (n_frames, container rate)
        self._count_only: set[str] = set()  # videos whose timestamps proved unusable

    # -- locating and probing --------------------------------------------------------------------

    def video_path(self, video_id: str, participant_id: str | None = None) -> Path:
        """The file holding ``video_id``.

        Raises:
            FrameError: no such file (names the places looked in).
        """
        if video_id in self._paths:
            return self._paths[video_id]
        participant = participant_id or video_id.split("_")[0]  # EPIC ids: P01_01 -> P01
        folders = [self.directory, self.directory / participant, self.directory / participant / "videos"]
        for folder in folders:
            for ext in VIDEO_EXTENSIONS:
                for suffix in (ext, ext.upper()):
                    candidate = folder / f"{video_id}.{suffix}"
                    if candidate.is_file():
                        self._paths[video_id] = candidate
                        return candidate
        raise FrameError(
            f"video {video_id}: no file {video_id}.{{{','.join(VIDEO_EXTENSIONS)}}} in "
            + ", ".join(str(f) for f in folders),
            video_id=video_id,
        )

    def _open(self, path: Path, video_id: str):  # -> (container, stream)
        import av

        try:
            container = av.open(str(path))
        except (av.FFmpegError, OSError) as error:
            raise FrameError(f"cannot open video {path} (video {video_id}): {error}", video_id=video_id,
                             path=path) from error
        if not container.streams.video:
            container.close()
            raise FrameError(f"no video stream in {path} (video {video_id})", video_id=video_id, path=path)
        stream = container.streams.video[0]
        if self.threads != 1:
            stream.thread_type = "AUTO"
            stream.thread_count = self.threads
        return container, stream

    @staticmethod
    def _rate(stream) -> Fraction:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise ValueError("container has no frame rate")
        return Fraction(rate)

    def _probe(self, participant_id: str | None, video_id: str) -> tuple[int, Fraction]:
        """(n_frames, rate) of a video, cached. Counts packets when the container has no frame count."""
        import av

        if video_id in self._info:
            return self._info[video_id]
        path = self.video_path(video_id, participant_id)
        container, stream = self._open(path, video_id)
        try:
            try:
                rate = self._rate(stream)
            except ValueError:
                raise FrameError(f"no frame rate in {path} (video {video_id})", video_id=video_id,
                                 path=path) from None
            n_frames = int(stream.frames or 0)
            if n_frames <= 0:
                # mkv / webm do not store a frame count; counting packets reads the file but decodes
                # nothing, and unlike duration * rate it cannot be off by one. A damaged file counts
                # the packets before the damage: those are the frames it has.
                n_frames = 0
                try:
                    for packet in container.demux(stream):
                        n_frames += 1 if packet.size else 0
                except av.FFmpegError:
                    pass
        finally:
            container.close()
        self._info[video_id] = (n_frames, rate)
        return n_frames, rate

    def n_frames(self, participant_id: str, video_id: str) -> int:
        """Number of frames according to the container (a truncated file may decode fewer).

        Raises:
            FrameError: the file is missing or cannot be opened.
        """
        return self._probe(participant_id, video_id)[0]

    def fps(self, video_id: str) -> float | None:
        """``fps_by_video`` if given, else the container's average frame rate.

        Raises:
            FrameError: the file is missing or cannot be opened.
        """
        if video_id in self.fps_by_video:
            return float(self.fps_by_video[video_id])
        return float(self._probe(None, video_id)[1])

    # -- decoding --------------------------------------------------------------------------------

    def read(self, participant_id: str, video_id: str, frames: Sequence[int]) -> np.ndarray:
        """Decode frames, in the order asked; each distinct frame is converted once.

        Decoding starts at the keyframe before the first frame needed (a seek, when it is more than
        ``seek_threshold_frames`` in) and runs forward to the last one, so a segment's clip and
        detection frames cost one pass over a few seconds of video.

        Args:
            participant_id: e.g. ``"P01"``.
            video_id: e.g. ``"P01_01"``.
            frames: 1-based frame indices; repeats allowed.

        Returns:
            uint8 (T, H, W, 3), T = len(frames).

        Raises:
            FrameError: missing / unopenable file, a frame past the end, or frames that cannot be
                decoded (truncated or corrupt file); names the file and the first missing frame.
        """
        indices = _check_frame_indices(frames, video_id)
        if not indices:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        path = self.video_path(video_id, participant_id)
        n_frames, rate = self._probe(participant_id, video_id)
        wanted = sorted(set(indices))
        if wanted[-1] > n_frames:
            raise FrameError(
                f"frame {wanted[-1]} is past the end of {path} (video {video_id}, {n_frames} frames)",
                video_id=video_id, frame=wanted[-1], path=path,
            )

        decoded: dict[int, np.ndarray] = {}
        error: str | None = None
        if video_id not in self._count_only and path.suffix.lower() not in _COUNT_ONLY_SUFFIXES:
            seek = wanted[0] > self.seek_threshold_frames
            decoded, error = self._decode(path, video_id, wanted, rate, by_timestamp=True, seek=seek)
            if error == _OVERSHOOT and seek:  # the seek landed after the first frame (poor index)
                decoded, error = self._decode(path, video_id, wanted, rate, by_timestamp=True, seek=False)
            if error in (_UNORDERED, _OVERSHOOT):  # timestamps cannot be trusted: count frames instead
                self._count_only.add(video_id)
        if video_id in self._count_only or path.suffix.lower() in _COUNT_ONLY_SUFFIXES:
            decoded, error = self._decode(path, video_id, wanted, rate, by_timestamp=False, seek=False)
        missing = [index for index in wanted if index not in decoded]
        if missing:
            got = f"last decoded frame {max(decoded)}" if decoded else "no frame decoded"
            reason = f": {error}" if error else ""
            raise FrameError(
                f"cannot decode frame {missing[0]} of {path} (video {video_id}; {len(missing)} of "
                f"{len(wanted)} frames missing, {got}; truncated or corrupt file?){reason}",
                video_id=video_id, frame=missing[0], path=path,
            )
        return _stack(decoded, indices, 3, video_id, f"in {path}")

    def _decode(
        self, path: Path, video_id: str, wanted: list[int], rate: Fraction, *, by_timestamp: bool, seek: bool
    ) -> tuple[dict[int, np.ndarray], str | None]:
        """Decode ``wanted`` (sorted, distinct) frames.

        Args:
            by_timestamp: index frames by their pts (allows seeking); else count decoded frames from
                the start of the file (always right, since decoders emit presentation order, but it
                cannot skip ahead).
            seek: seek to the keyframe before ``wanted[0]`` first (only with ``by_timestamp``).

        Returns:
            (frames got, by index; why decoding stopped early: an FFmpeg error text, ``_UNORDERED``
            when timestamps went backwards, ``_OVERSHOOT`` when the first frame after a seek was past
            ``wanted[0]`` or had no timestamp, or None).
        """
        import av

        container, stream = self._open(path, video_id)
        wanted_set, first, last = set(wanted), wanted[0], wanted[-1]
        decoded: dict[int, np.ndarray] = {}
        origin = stream.start_time or 0
        frames_per_tick = Fraction(stream.time_base) * rate
        counter = 0
        previous: int | None = None
        error: str | None = None

        def take(frame) -> bool | str:
            """Keep the frame if wanted; True once past the last wanted, or a reason to give up."""
            nonlocal counter, previous
            counter += 1
            if not by_timestamp:
                index = counter
            elif frame.pts is None:
                return _UNORDERED
            else:
                # nearest frame, halves up; exact in fractions (pts integers, rates rational)
                index = math.floor((frame.pts - origin) * frames_per_tick + Fraction(1, 2)) + 1
                if previous is None and seek and index > first:
                    return _OVERSHOOT
                if previous is not None and index <= previous:
                    return _UNORDERED  # e.g. AVI with B-frames: pts are decode-order guesses
                previous = index
            if index in wanted_set and index not in decoded:
                decoded[index] = frame.to_ndarray(format="rgb24")  # (H, W, 3); only frames asked for
            return index >= last

        try:
            if seek:
                # Timestamp of frame `first`; backward=True lands on the keyframe at or before it.
                target = origin + math.floor(Fraction(first - 1) / frames_per_tick)
                container.seek(target, stream=stream, backward=True, any_frame=False)
            try:
                for packet in container.demux(stream):
                    for frame in packet.decode():  # the final empty packet flushes the decoder
                        outcome = take(frame)
                        if outcome is True:
                            return decoded, None
                        if outcome:
                            return {}, outcome
            except av.FFmpegError as failure:
                # A truncated/corrupt file: keep the frames decoded so far, and get the ones the
                # decoder still holds (B-frame reordering delays output by a few frames).
                error = str(failure)
                try:
                    for frame in stream.codec_context.decode(None):
                        if take(frame) is not False:
                            break
                except av.FFmpegError:
                    pass
        finally:
            container.close()
        return decoded, error

    def __repr__(self) -> str:
        return f"VideoFiles(directory={str(self.directory)!r})"


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (bilinear, antialiased).

    The long side becomes ``round(long * size / short)``. Frames are resized a few at a time so that a
    64-frame 1080p clip does not need 1.6 GB of float32 at once.

    Args:
        frames: uint8 (T, H, W, C), any C (3 rgb, 2 flow).
        size: target short side in pixels.

    Returns:
        uint8 (T, H', W', C) with min(H', W') == size; the input itself when already that size.
    """
    import torch
    import torch.nn.functional as F

    if frames.ndim != 4 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 (T, H, W, C) frames, got {frames.dtype} {frames.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    t, height, width, channels = frames.shape
    if min(height, width) == size or t == 0 or height == 0 or width == 0:
        return frames
    if height <= width:
        new_height, new_width = size, max(1, int(math.floor(width * size / height + 0.5)))
    else:
        new_height, new_width = max(1, int(math.floor(height * size / width + 0.5))), size
    out = np.empty((t, new_height, new_width, channels), dtype=np.uint8)
    chunk = 8
    with torch.no_grad():
        for lo in range(0, t, chunk):
            batch = torch.from_numpy(np.ascontiguousarray(frames[lo:lo + chunk])).permute(0, 3, 1, 2).float()
            resized = F.interpolate(batch, size=(new_height, new_width), mode="bilinear",
                                    align_corners=False, antialias=True)  # (t, C, H', W')
            out[lo:lo + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def stack_snippets(frames: np.ndarray, snippet_frames: int) -> np.ndarray:
    """Stacked-flow input: fold each clip sample's consecutive frames into its channels.

    The EPIC flow TSN / TSM take, per segment, 5 consecutive (u, v) flow frames as 10 channels in the
    order ``u1, v1, u2, v2, ..., u5, v5`` (their gulped flow interleaves u and v that way).

    Args:
        frames: (S * L, H, W, C) frames, sample-major (`featstore.epic.sampling.plan_segment` order).
        snippet_frames: L, frames per sample.

    Returns:
        (S, H, W, L * C); channel ``l * C + c`` is channel c of the sample's l-th frame. The input
        itself when L is 1.
    """
    if snippet_frames == 1:
        return frames
    total, height, width, channels = frames.shape
    if total % snippet_frames:
        raise ValueError(f"{total} frames do not split into snippets of {snippet_frames}")
    samples = frames.reshape(total // snippet_frames, snippet_frames, height, width, channels)
    # (S, L, H, W, C) -> (S, H, W, L, C) -> (S, H, W, L * C)
    return np.ascontiguousarray(samples.transpose(0, 2, 3, 1, 4)).reshape(
        total // snippet_frames, height, width, snippet_frames * channels)


def open_frame_source(
    *,
    frames_root: str | Path | None = None,
    videos_dir: str | Path | None = None,
    modality: str = "rgb",
    fps_by_video: Mapping[str, float] | None = None,
) -> FrameSource:
    """Build the frame source for a build: EPIC JPEG folders or video files (exactly one).

    Args:
        frames_root: root of the EPIC layout (``<root>/<participant>/{rgb,flow}_frames/<video>``).
        videos_dir: folder of video files.
        modality: ``"rgb"`` or ``"flow"`` (flow needs ``frames_root``).
        fps_by_video: frame rate per video id, e.g. from ``EPIC_video_info.csv``.

    Returns:
        An ``EpicJpegFrames`` or a ``VideoFiles``.
    """
    if (frames_root is None) == (videos_dir is None):
        raise ValueError("give exactly one of frames_root (EPIC JPEG folders) or videos_dir (video files)")
    if modality not in MODALITY_CHANNELS:
        raise ValueError(f"modality must be 'rgb' or 'flow', got {modality!r}")
    if frames_root is not None:
        return EpicJpegFrames(frames_root, modality=modality, fps_by_video=fps_by_video)
    return VideoFiles(videos_dir, fps_by_video=fps_by_video, modality=modality)
