"""Synthetic EPIC-layout frames (JPEG folders and video files) for tests, benchmarks and the demo.

No dataset can be downloaded here, so everything that reads frames is tested on frames written by
these generators. The default content is a moving colour pattern (so that crops, resizes and clips
differ frame to frame) with the frame index written into a barcode strip along the bottom edge, so
that any reader can check it got the frame it asked for: ``read_frame_number`` decodes it back.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

__all__ = [
    "Painter",
    "paint_frame",
    "paint_frame_number",
    "read_frame_number",
    "write_jpeg_video",
    "write_mp4",
]

# painter(frame_index) -> (H, W, 3) uint8: the content of one 1-based frame.
Painter = Callable[[int], np.ndarray]

# Barcode: BARCODE_BITS cells across the bottom BARCODE_ROWS rows, white = 1, most significant bit
# first. Cells of >= 8 px survive JPEG and yuv420p/h264 compression; 12 bits count to 4095 frames.
BARCODE_BITS = 12
BARCODE_ROWS = 16
JPEG_QUALITY = 95  # high, so that tests can compare decoded frames to their painter with a tight tolerance


def paint_frame_number(image: np.ndarray, frame_index: int) -> np.ndarray:
    """Write ``frame_index`` as a black/white barcode into the bottom rows of ``image`` (in place).

    Args:
        image: (H, W, C) uint8, H >= 16 and W >= 12 * 8.
        frame_index: 0 .. 4095.

    Returns:
        The same array.
    """
    height, width = image.shape[:2]
    if not 0 <= frame_index < 2**BARCODE_BITS:
        raise ValueError(f"frame index {frame_index} does not fit in {BARCODE_BITS} bits")
    if height < BARCODE_ROWS or width < BARCODE_BITS * 8:
        raise ValueError(f"image {height}x{width} too small for a frame-number barcode")
    edges = np.linspace(0, width, BARCODE_BITS + 1).astype(int)
    for bit in range(BARCODE_BITS):
        on = (frame_index >> (BARCODE_BITS - 1 - bit)) & 1
        image[height - BARCODE_ROWS:, edges[bit]:edges[bit + 1]] = 255 if on else 0
    return image


def read_frame_number(image: np.ndarray) -> int:
    """Decode the barcode written by ``paint_frame_number`` (robust to JPEG / video compression).

    Args:
        image: (H, W, C) or (H, W) uint8, at the size it was painted.

    Returns:
        The frame index.
    """
    height, width = image.shape[:2]
    grey = image.reshape(height, width, -1).astype(np.float32).mean(axis=2)
    edges = np.linspace(0, width, BARCODE_BITS + 1).astype(int)
    value = 0
    for bit in range(BARCODE_BITS):
        # Sample the cell's middle, away from the edges where compression blurs black into white.
        lo, hi = edges[bit], edges[bit + 1]
        pad = (hi - lo) // 4
        cell = grey[height - BARCODE_ROWS + 4: height - 4, lo + pad: hi - pad]
        value = (value << 1) | int(cell.mean() > 127.5)
    return value


def paint_frame(frame_index: int, *, height: int = 90, width: int = 160, seed: int = 0) -> np.ndarray:
    """The default synthetic frame: a smooth colour pattern drifting right by 3 px a frame + barcode.

    Args:
        frame_index: 1-based frame index.
        height, width: frame size in pixels.
        seed: picks the pattern's colours, so that two videos differ.

    Returns:
        (H, W, 3) uint8.
    """
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    periods = rng.uniform(20, 60, size=3)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x = x - 3.0 * frame_index  # the motion
    channels = [
        127.5 + 100.0 * np.sin(2 * np.pi * (x + 0.5 * y) / periods[c] + phases[c]) for c in range(3)
    ]
    image = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    if height >= BARCODE_ROWS * 2 and width >= BARCODE_BITS * 8:
        paint_frame_number(image, frame_index % 2**BARCODE_BITS)
    return image


def _check_painted(image: np.ndarray, height: int, width: int, frame_index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.shape != (height, width, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"painter({frame_index}) returned {image.shape} {image.dtype}, expected ({height}, {width}, 3) uint8"
        )
    return image


def write_jpeg_video(
    root: str | Path,
    participant_id: str,
    video_id: str,
    n_frames: int,
    *,
    height: int = 90,
    width: int = 160,
    modality: str = "rgb",
    seed: int = 0,
    painter: Painter | None = None,
) -> Path:
    """Write one video as an EPIC JPEG frame folder.

    RGB: ``root/<participant>/rgb_frames/<video>/frame_%010d.jpg`` for frames 1..n_frames.
    Flow: ``root/<participant>/flow_frames/<video>/{u,v}/frame_%010d.jpg`` for flow frames
    1..n_frames // 2 (EPIC flow runs at half the RGB rate); each is a grey JPEG made from channel 0
    (u) or channel 1 (v) of ``painter(flow_index)``.

    Args:
        root: dataset root (created if needed).
        participant_id: e.g. ``"P01"``.
        video_id: e.g. ``"P01_01"``.
        n_frames: number of RGB frames of the video.
        height, width: frame size in pixels.
        modality: ``"rgb"`` or ``"flow"``.
        seed: varies the default pattern.
        painter: ``painter(frame_index) -> (H, W, 3) uint8``; default ``paint_frame``.

    Returns:
        The video's folder (``.../rgb_frames/<video>`` or ``.../flow_frames/<video>``).
    """
    if modality not in ("rgb", "flow"):
        raise ValueError(f"modality must be 'rgb' or 'flow', got {modality!r}")
    if painter is None:
        def painter(index: int) -> np.ndarray:
            return paint_frame(index, height=height, width=width, seed=seed)

    folder = Path(root) / participant_id / f"{modality}_frames" / video_id
    if modality == "rgb":
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, n_frames + 1):
            image = _check_painted(painter(index), height, width, index)
            Image.fromarray(image).save(folder / f"frame_{index:010d}.jpg", quality=JPEG_QUALITY)
    else:
        for sub in ("u", "v"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for index in range(1, n_frames // 2 + 1):
            image = _check_painted(painter(index), height, width, index)
            for channel, sub in enumerate(("u", "v")):
                Image.fromarray(np.ascontiguousarray(image[:, :, channel])).save(  # 2-D uint8 -> grey "L"
                    folder / sub / f"frame_{index:010d}.jpg", quality=JPEG_QUALITY
                )
    return folder


def write_mp4(
    path: str | Path,
    n_frames: int,
    *,
    height: int = 90,
    width: int = 160,
    fps: float = 30,
    seed: int = 0,
    painter: Painter | None = None,
    gop_size: int = 12,
    faststart: bool = True,
) -> Path:
    """Encode frames 1..n_frames into a video file with PyAV (yuv420p; h264, else mpeg4; VP9 for .webm).

    The container follows the suffix (``.mp4``, ``.mkv``, ``.avi``...). ``gop_size`` is small by
    default so that short test videos have several keyframes and seeking is exercised; h264 also
    reorders B-frames, which exercises presentation-order indexing. ``faststart`` moves the mp4 index
    to the front, as in downloaded videos, so a truncated file still opens and decodes up to the cut.

    Args:
        path: output file.
        n_frames: number of frames.
        height, width: frame size (even, for yuv420p).
        fps: frame rate (may be fractional, e.g. 59.94).
        seed: varies the default pattern.
        painter: ``painter(frame_index) -> (H, W, 3) uint8``; default ``paint_frame``.
        gop_size: frames between keyframes.
        faststart: for .mp4/.mov, put the index before the data.

    Returns:
        ``path``.
    """
    import av

    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {height}x{width}")
    if painter is None:
        def painter(index: int) -> np.ndarray:
            return paint_frame(index, height=height, width=width, seed=seed)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # WebM only holds VP8/VP9/AV1; everything else gets h264 (B-frames: the harder case for readers).
    webm = path.suffix.lower() == ".webm"
    candidates = ("libvpx-vp9", "libvpx") if webm else ("libx264", "h264", "mpeg4")
    codec = next((name for name in candidates if name in av.codecs_available), None)
    if codec is None:
        raise RuntimeError(f"PyAV has none of the encoders {', '.join(candidates)} for {path.suffix}")
    options = {"movflags": "faststart"} if faststart and path.suffix.lower() in (".mp4", ".mov") else {}
    rate = Fraction(fps).limit_denominator(1001)  # 59.94 -> 60000/1001
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop_size
        for index in range(1, n_frames + 1):
            image = _check_painted(painter(index), height, width, index)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed (B-)frames
            container.mux(packet)
    return path
