"""Frame sources on small synthetic EPIC folders and videos: values, order, flow, seeking, damage."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFile

import featstore.epic.frames as frames_module
from featstore.epic.frames import (
    EpicJpegFrames,
    FrameError,
    FrameSource,
    VideoFiles,
    open_frame_source,
    resize_short_side,
    stack_snippets,
)
from featstore.samples.damage import corrupt_jpeg, truncate_file
from featstore.samples.frames import (
    paint_frame,
    read_frame_number,
    write_jpeg_video,
    write_mp4,
)

N_RGB = 40  # RGB frames of the JPEG video -> 20 flow frames
N_VIDEO = 100  # frames of the encoded videos
H, W = 90, 160


def painted(index: int, seed: int = 0) -> np.ndarray:
    return paint_frame(index, height=H, width=W, seed=seed)


def assert_close_to_painted(image: np.ndarray, expected: np.ndarray, *, mean_tol: float, where: str) -> None:
    diff = np.abs(image.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() < mean_tol, f"{where}: mean abs diff {diff.mean():.2f}"


@pytest.fixture(scope="module")
def epic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("epic")
    write_jpeg_video(root, "P01", "P01_01", N_RGB, modality="rgb")
    write_jpeg_video(root, "P01", "P01_01", N_RGB, modality="flow", seed=1)
    return root


@pytest.fixture(scope="module")
def videos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    write_mp4(folder / "P01_02.mp4", N_VIDEO, fps=30)
    write_mp4(folder / "P02_01.mkv", N_VIDEO, fps=59.94, seed=2)  # no frame count in mkv: packets counted
    (folder / "P03" / "videos").mkdir(parents=True)
    write_mp4(folder / "P03" / "videos" / "P03_01.MP4", 30, fps=25)  # EPIC-100 download layout
    write_mp4(folder / "P04_01.avi", N_VIDEO, fps=30, seed=4)  # no usable pts: frames are counted
    write_mp4(folder / "P05_01.webm", N_VIDEO, fps=30, seed=5)  # VP9
    return folder


# --- EPIC JPEG folders ---------------------------------------------------------------------------


def test_rgb_read_in_order_with_repeats(epic_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = EpicJpegFrames(epic_root)
    decoded_paths: list[str] = []
    real_decode = frames_module.decode_jpeg_file

    def counting_decode(path, **kwargs):
        decoded_paths.append(str(path))
        return real_decode(path, **kwargs)

    monkeypatch.setattr(frames_module, "decode_jpeg_file", counting_decode)
    asked = [5, 1, 5, 40, 3, 5]
    clip = source.read("P01", "P01_01", asked)

    assert clip.shape == (6, H, W, 3) and clip.dtype == np.uint8
    assert len(decoded_paths) == 4  # 5 asked three times, decoded once
    for image, index in zip(clip, asked):
        assert read_frame_number(image) == index
        assert_close_to_painted(image, painted(index), mean_tol=3.0, where=f"frame {index}")
    assert np.array_equal(clip[0], clip[2]) and np.array_equal(clip[0], clip[5])


def test_rgb_n_frames_listed_once_and_fps(epic_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = EpicJpegFrames(epic_root, fps_by_video={"P01_01": 59.94})
    calls = []
    real_scandir = frames_module.os.scandir
    monkeypatch.setattr(frames_module.os, "scandir", lambda p: calls.append(p) or real_scandir(p))
    assert source.n_frames("P01", "P01_01") == N_RGB
    assert source.n_frames("P01", "P01_01") == N_RGB
    assert len(calls) == 1
    assert source.fps("P01_01") == pytest.approx(59.94)
    assert source.fps("P09_09") is None
    assert source.read("P01", "P01_01", []).shape == (0, 0, 0, 3)


def test_flow_shape_and_index_mapping(epic_root: Path) -> None:
    source = EpicJpegFrames(epic_root, modality="flow")
    # RGB 1, 2, 3 -> flow 1 (1 // 2 = 0 is clamped to 1); 4 -> 2; 41 -> 20, the last flow frame.
    asked = [1, 2, 3, 4, 41]
    flow_index = [1, 1, 1, 2, 20]
    flow = source.read("P01", "P01_01", asked)
    assert flow.shape == (5, H, W, 2) and flow.dtype == np.uint8
    for image, index in zip(flow, flow_index):
        expected = painted(index, seed=1)
        assert read_frame_number(image[..., 0]) == index  # u
        assert read_frame_number(image[..., 1]) == index  # v
        assert_close_to_painted(image, expected[..., :2], mean_tol=3.0, where=f"flow {index}")
    assert np.array_equal(flow[0], flow[2])
    # n_frames in RGB units: 20 flow frames serve RGB frames up to 41.
    assert source.n_frames("P01", "P01_01") == 2 * (N_RGB // 2) + 1
    with pytest.raises(FrameError, match="frame_0000000021.jpg"):
        source.read("P01", "P01_01", [42])


@pytest.fixture()
def small_root(tmp_path: Path) -> Path:
    write_jpeg_video(tmp_path, "P01", "P01_03", 4)
    write_jpeg_video(tmp_path, "P01", "P01_03", 8, modality="flow")
    return tmp_path


@pytest.mark.parametrize("how", ["truncate", "zero", "garbage"])
def test_corrupt_jpeg_raises_naming_the_file(small_root: Path, how: str) -> None:
    source = EpicJpegFrames(small_root)
    bad = source.frame_path("P01", "P01_03", 2)
    corrupt_jpeg(bad, how)
    assert source.read("P01", "P01_03", [1, 3]).shape[0] == 2  # the good frames still read
    with pytest.raises(FrameError) as raised:
        source.read("P01", "P01_03", [1, 2, 3])
    assert str(bad) in str(raised.value)
    assert raised.value.frame == 2 and raised.value.path == str(bad) and raised.value.video_id == "P01_03"


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.1])
def test_truncated_jpeg_detected_even_when_pillow_allows_truncation(
    small_root: Path, keep: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some library may flip this global; Pillow then decodes a cut file without complaint.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    source = EpicJpegFrames(small_root)
    bad = source.frame_path("P01", "P01_03", 3)
    truncate_file(bad, keep)
    with pytest.raises(FrameError, match="truncated") as raised:
        source.read("P01", "P01_03", [3])
    assert str(bad) in str(raised.value)


def test_missing_frame_and_folder_raise(small_root: Path) -> None:
    source = EpicJpegFrames(small_root)
    gone = source.frame_path("P01", "P01_03", 2)
    gone.unlink()
    with pytest.raises(FrameError, match="missing frame file") as raised:
        source.read("P01", "P01_03", [1, 2])
    assert str(gone) in str(raised.value)
    with pytest.raises(FrameError, match="frame_0000000005.jpg"):
        source.read("P01", "P01_03", [5])
    with pytest.raises(FrameError, match="P01_99"):
        source.n_frames("P01", "P01_99")
    with pytest.raises(FrameError, match="not a 1-based"):
        source.read("P01", "P01_03", [0])


def test_flow_missing_v_raises_naming_it(small_root: Path) -> None:
    source = EpicJpegFrames(small_root, modality="flow")
    v_file = source.frame_path("P01", "P01_03", 4, "v")  # 8 RGB frames -> flow 1..4; drop v's last
    v_file.unlink()
    with pytest.raises(FrameError) as raised:
        source.read("P01", "P01_03", [8])
    assert str(v_file) in str(raised.value)
    assert source.n_frames("P01", "P01_03") == 7  # u ends at 4 but v at 3 -> RGB frames 1..7


# --- video files ----------------------------------------------------------------------------------


def test_video_probe(videos_dir: Path) -> None:
    source = VideoFiles(videos_dir, fps_by_video={"P01_02": 29.97})
    assert source.n_frames("P01", "P01_02") == N_VIDEO
    assert source.fps("P01_02") == pytest.approx(29.97)  # the override wins
    assert VideoFiles(videos_dir).fps("P01_02") == pytest.approx(30.0)
    assert source.n_frames("P02", "P02_01") == N_VIDEO  # mkv: counted
    assert source.fps("P02_01") == pytest.approx(59.94, abs=1e-3)
    assert source.n_frames("P03", "P03_01") == 30  # found in P03/videos/, upper-case .MP4
    assert source.video_path("P03_01").name == "P03_01.MP4"


@pytest.mark.parametrize(("video_id", "seed"), [("P01_02", 0), ("P02_01", 2), ("P04_01", 4), ("P05_01", 5)])
def test_video_frame_accuracy_with_and_without_seek(videos_dir: Path, video_id: str, seed: int) -> None:
    source = VideoFiles(videos_dir)
    participant = video_id.split("_")[0]
    # 70 is past the seek threshold and not a keyframe (gop 12); repeats and any order allowed.
    asked = [70, 85, 71, 70, 100, 99]
    got = source.read(participant, video_id, asked)
    assert got.shape == (6, H, W, 3)
    assert [read_frame_number(image) for image in got] == asked
    for image, index in zip(got, asked):
        assert_close_to_painted(image, painted(index, seed), mean_tol=8.0, where=f"{video_id} frame {index}")
    # The same frames decoded from the start, without a seek, are bit-identical.
    no_seek = VideoFiles(videos_dir)
    no_seek.seek_threshold_frames = 10**9
    assert np.array_equal(no_seek.read(participant, video_id, asked), got)
    start = source.read(participant, video_id, [1, 2, 3, 2])
    assert [read_frame_number(image) for image in start] == [1, 2, 3, 2]


def test_video_with_unordered_timestamps_falls_back_to_counting(videos_dir: Path, tmp_path: Path) -> None:
    # AVI content under an .mkv name: FFmpeg probes the content, so the reader meets B-frame pts in
    # decode order, must notice, and count frames instead.
    shutil.copy(videos_dir / "P04_01.avi", tmp_path / "P04_02.mkv")
    source = VideoFiles(tmp_path)
    got = source.read("P04", "P04_02", [70, 3, 100])
    assert [read_frame_number(image) for image in got] == [70, 3, 100]
    got = source.read("P04", "P04_02", [1, 2, 3, 4, 5])
    assert [read_frame_number(image) for image in got] == [1, 2, 3, 4, 5]


def test_video_frame_past_end_and_missing_file(videos_dir: Path) -> None:
    source = VideoFiles(videos_dir)
    with pytest.raises(FrameError, match="past the end") as raised:
        source.read("P01", "P01_02", [5, N_VIDEO + 1])
    assert raised.value.frame == N_VIDEO + 1 and "P01_02.mp4" in str(raised.value)
    with pytest.raises(FrameError, match="P09_01"):
        source.read("P09", "P09_01", [1])


def test_truncated_video_raises_for_frames_beyond_the_cut(videos_dir: Path, tmp_path: Path) -> None:
    shutil.copy(videos_dir / "P01_02.mp4", tmp_path / "P01_02.mp4")
    truncate_file(tmp_path / "P01_02.mp4", 0.5)
    source = VideoFiles(tmp_path)
    assert source.n_frames("P01", "P01_02") == N_VIDEO  # the (faststart) index still claims all
    head = source.read("P01", "P01_02", [1, 10, 20])
    assert [read_frame_number(image) for image in head] == [1, 10, 20]
    with pytest.raises(FrameError, match="cannot decode frame 95") as raised:
        source.read("P01", "P01_02", [10, 95])
    assert str(tmp_path / "P01_02.mp4") in str(raised.value)
    assert raised.value.frame == 95


def test_unopenable_video_raises(tmp_path: Path) -> None:
    (tmp_path / "P01_05.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(FrameError, match="cannot open video") as raised:
        VideoFiles(tmp_path).read("P01", "P01_05", [1])
    assert "P01_05.mp4" in str(raised.value)


# --- construction, resizing ----------------------------------------------------------------------


def test_open_frame_source(epic_root: Path, videos_dir: Path) -> None:
    jpeg = open_frame_source(frames_root=epic_root, modality="flow", fps_by_video={"P01_01": 50.0})
    assert isinstance(jpeg, EpicJpegFrames) and isinstance(jpeg, FrameSource) and jpeg.modality == "flow"
    video = open_frame_source(videos_dir=videos_dir)
    assert isinstance(video, VideoFiles) and isinstance(video, FrameSource) and video.modality == "rgb"
    with pytest.raises(ValueError, match="RGB only"):
        open_frame_source(videos_dir=videos_dir, modality="flow")
    with pytest.raises(ValueError, match="exactly one"):
        open_frame_source(frames_root=epic_root, videos_dir=videos_dir)
    with pytest.raises(ValueError, match="exactly one"):
        open_frame_source()
    # Sources go to worker processes: they must pickle, caches included.
    video.n_frames("P01", "P01_02")
    clone = pickle.loads(pickle.dumps(video))
    assert clone.n_frames("P01", "P01_02") == N_VIDEO


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [
        ((2, 90, 160, 3), 45, (2, 45, 80, 3)),  # landscape, down
        ((1, 160, 90, 2), 45, (1, 80, 45, 2)),  # portrait, flow channels
        ((3, 256, 456, 3), 128, (3, 128, 228, 3)),  # EPIC frames for R(2+1)D
        ((1, 100, 150, 3), 256, (1, 256, 384, 3)),  # up
    ],
)
def test_resize_short_side_shapes(shape: tuple[int, ...], size: int, expected: tuple[int, ...]) -> None:
    frames = np.full(shape, 77, dtype=np.uint8)
    resized = resize_short_side(frames, size)
    assert resized.shape == expected and resized.dtype == np.uint8
    assert np.all(resized == 77)  # a flat image stays flat: no darkened borders


def test_resize_short_side_keeps_content_and_identity() -> None:
    frame = painted(7)[None]  # (1, 90, 160, 3)
    assert resize_short_side(frame, 90) is frame
    small = resize_short_side(frame, 45)
    assert read_frame_number(resize_short_side(small, 90)[0]) == 7
    with pytest.raises(ValueError):
        resize_short_side(frame[0], 45)


def test_stack_snippets_interleaves_u_and_v_per_frame() -> None:
    # 2 samples x 3 frames of (u, v): value = 100 * sample + 10 * frame + channel.
    frames = np.array([[[[100 * s + 10 * f + c for c in range(2)]]] for s in range(2) for f in range(3)],
                      dtype=np.uint8)  # (6, 1, 1, 2)
    stacked = stack_snippets(frames, 3)
    assert stacked.shape == (2, 1, 1, 6)
    # u1, v1, u2, v2, u3, v3 of each sample: the channel order of the EPIC flow TSN / TSM.
    assert stacked[0, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]
    assert stacked[1, 0, 0].tolist() == [100, 101, 110, 111, 120, 121]
    assert stack_snippets(frames, 1) is frames
    with pytest.raises(ValueError, match="snippets of 4"):
        stack_snippets(frames, 4)
