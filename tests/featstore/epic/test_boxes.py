"""Files of precomputed boxes (``--boxes``): lookups, top-k and normalisation, ground-truth frames, and
errors that name the file, the row and the column."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featstore.epic.boxes import BoxesFileError, PrecomputedBoxes

HEADER = ["video_id", "frame", "x1", "y1", "x2", "y2", "score", "label"]


def _write_boxes(path: Path, rows: list[list], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_precomputed_boxes_top_k_and_pixel_normalisation(tmp_path: Path) -> None:
    rows = [["P01_01", 30, k, 0, k + 16, 9, (k + 1) / 10, k] for k in range(7)]  # 7 boxes, scores 0.1 .. 0.7
    rows += [["P01_01", 60, 0, 0, 160, 90, 0.5, 1], ["P02_01", 30, 0, 0, 80, 45, 0.5, 1]]
    path = _write_boxes(tmp_path / "boxes.csv", rows)
    boxes = PrecomputedBoxes.read(path, coords="pixel", videos={"P01_01"})
    assert boxes.rows == 8 and boxes.has_labels()
    got, scores, labels = boxes.frame("P01_01", 30, topk=5, frame_size=(90, 160))
    assert scores.tolist() == pytest.approx([0.7, 0.6, 0.5, 0.4, 0.3])
    assert labels.tolist() == [6, 5, 4, 3, 2]
    assert got[0].tolist() == pytest.approx([6 / 160, 0, 22 / 160, 0.1])
    whole, _, _ = boxes.frame("P01_01", 60, topk=5, frame_size=(90, 160))
    assert whole.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert boxes.frame("P01_01", 31, topk=5, frame_size=(90, 160)) is None
    assert boxes.frame("P02_01", 30, topk=5, frame_size=(90, 160)) is None  # not selected
    with pytest.raises(BoxesFileError, match="--boxes-coords pixel"):
        PrecomputedBoxes.read(path, coords="normalized")


def test_normalised_parquet_boxes_without_labels_clip_to_the_frame(tmp_path: Path) -> None:
    table = pa.table({"video_id": ["P03_02"] * 3, "frame": [4, 4, 4], "x1": [0.0, 0.2, 0.5],
                      "y1": [0.0, 0.2, -0.005], "x2": [1.005, 0.4, 0.6], "y2": [0.5, 0.4, 0.7],
                      "score": [0.3, 0.3, 0.9]})
    pq.write_table(table, tmp_path / "boxes.parquet")
    boxes = PrecomputedBoxes.read(tmp_path / "boxes.parquet", coords="normalized")
    assert not boxes.has_labels()
    got, scores, labels = boxes.frame("P03_02", 4, topk=5, frame_size=(1, 1))
    assert labels is None and scores.tolist() == pytest.approx([0.9, 0.3, 0.3])
    # Best first; equal scores keep file order; rounding slack outside [0, 1] is clipped.
    np.testing.assert_allclose(got, [[0.5, 0.0, 0.6, 0.7], [0.0, 0.0, 1.0, 0.5], [0.2, 0.2, 0.4, 0.4]], rtol=1e-6)


@pytest.mark.parametrize("rows, message", [
    ([["P01_01", 0, 0, 0, 4, 4, 0.5, 1]], r"row 1, column 'frame': must be a 1-based integer, got 0"),
    ([["P01_01", 3, 0, 0, 4, 4, 0.5, 1], ["P01_01", 2.5, 0, 0, 4, 4, 0.5, 1]], r"row 2, column 'frame': must be a 1-based integer, got 2.5"),
    ([["P01_01", 3, 0, 0, 4, 4, 0.5, 1], ["P01_01", 3, 0, "-inf", 4, 4, 0.5, 1]],
     r"row 2, column 'y1': non-finite value -inf"),
    ([["P01_01", 3, 0, 0, 4, 4, "inf", 1]], r"row 1, column 'score': non-finite value inf"),
    ([["P01_01", 3, 0, 0, 4, 4, 0.5, 1], ["P01_01", 4, 0, 0, 4, 4, 0.5, 1], ["P01_01", 5, 9, 0, 4, 4, 0.5, 1]],
     r"row 3, column \'x2\': box \[9\.0, 0\.0, 4\.0, 4\.0\] has x2 <= x1"),
    ([["P01_01", 3, 0, 0, 4, 4, 0.5, 1.5]], r"row 1, column 'label': labels must be integers"),
    ([["P01_01", 3, 0, 0, "four", 4, 0.5, 1]], r"non-numeric frame, coordinate, score or label"),
    ([["P01_01", 3, 0, 0, 4, 4, "", 1]], r"row 1, column 'score': empty value"),
])
def test_bad_boxes_files_name_the_file_row_and_column(tmp_path: Path, rows: list[list], message: str) -> None:
    path = _write_boxes(tmp_path / "bad.csv", rows)
    with pytest.raises(BoxesFileError, match=message) as caught:
        PrecomputedBoxes.read(path, coords="pixel")
    assert str(path) in str(caught.value)


def test_boxes_file_missing_a_column_or_the_file_or_with_unknown_coords(tmp_path: Path) -> None:
    bad = _write_boxes(tmp_path / "bad.csv", [["P01_01", 1, 0, 0, 1, 0.5]],
                       header=["video_id", "frame", "x1", "y1", "x2", "score"])
    with pytest.raises(BoxesFileError,
                       match=r"bad\.csv: column\(s\) y2 missing.*has video_id, frame, x1, y1, x2, score"):
        PrecomputedBoxes.read(bad, coords="pixel")
    with pytest.raises(BoxesFileError, match="boxes file not found: .*nowhere.csv"):
        PrecomputedBoxes.read(tmp_path / "nowhere.csv", coords="pixel")
    with pytest.raises(BoxesFileError, match="'pixel' or 'normalized', got 'pixels'"):
        PrecomputedBoxes.read(bad, coords="pixels")
    unreadable = tmp_path / "broken.parquet"
    unreadable.write_bytes(b"PAR1 not really")
    with pytest.raises(BoxesFileError, match="cannot read boxes file .*broken.parquet"):
        PrecomputedBoxes.read(unreadable, coords="pixel")


def test_rows_of_other_videos_are_not_checked(tmp_path: Path) -> None:
    """The build's selection filters the file first: a bad row of another video does not stop it."""
    path = _write_boxes(tmp_path / "boxes.csv", [["P01_01", 3, 0, 0, 4, 4, 0.5, 1], ["P09_01", 0, 9, 0, 4, 4, 0.5, 1]])
    boxes = PrecomputedBoxes.read(path, coords="pixel", videos=["P01_01"])
    assert boxes.rows == 1 and boxes.frame("P01_01", 3, topk=1, frame_size=(4, 4)) is not None
    with pytest.raises(BoxesFileError, match="row 2"):
        PrecomputedBoxes.read(path, coords="pixel")


@pytest.mark.parametrize(
    "row, message",
    [
        ("P01_01,0,0,0,5,5,0.5", r"row 3, column 'frame': must be a 1-based integer, got 0.0"),
        ("P01_01,2,0,0,inf,5,0.5", r"row 3, column 'x2': non-finite value inf"),
        ("P01_01,2,0,9,5,5,0.5", r"row 3, column 'y2': box \[0.0, 9.0, 5.0, 5.0\] has y2 <= y1"),
        ("P01_01,2,0,0,5,5,", r"row 3, column 'score': empty value \(1 in all\)"),
    ],
)
def test_boxes_file_errors_name_the_file_row_and_column(tmp_path: Path, row: str, message: str) -> None:
    # Row numbers are the file's own, also when a video selection skips rows before the bad one.
    path = tmp_path / "boxes.csv"
    path.write_text(f"video_id,frame,x1,y1,x2,y2,score\nP02_01,1,0,0,5,5,0.5\nP01_01,1,0,0,5,5,0.5\n{row}\n")
    with pytest.raises(BoxesFileError, match=message):
        PrecomputedBoxes.read(path, coords="pixel", videos={"P01_01"})


def test_a_boxes_file_with_only_a_header_says_it_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text("video_id,frame,x1,y1,x2,y2,score\n")
    with pytest.raises(BoxesFileError, match="no rows, only a header"):
        PrecomputedBoxes.read(path, coords="pixel")


def test_boxes_file_frames_are_the_file_as_given(tmp_path: Path) -> None:
    path = tmp_path / "boxes.parquet"
    pq.write_table(pa.table({
        "video_id": ["P02_01", "P01_01", "P01_01", "P01_01"], "frame": [5, 9, 3, 9],
        "x1": [0.0, 1, 2, 3], "y1": [0.0, 0, 0, 0], "x2": [10.0, 11, 12, 200], "y2": [5.0, 5, 5, 5],
        "score": [0.5, 0.2, 0.9, 0.8], "label": [1, None, 3, 4],
    }), path)
    frames = list(PrecomputedBoxes.read(path, coords="pixel").frames())
    assert [(f.video_id, f.frame) for f in frames] == [("P01_01", 3), ("P01_01", 9), ("P02_01", 5)]
    nine = frames[1]
    assert nine.boxes.tolist() == [[3, 0, 200, 5], [1, 0, 11, 5]]  # best score first, not clipped
    assert nine.labels.tolist() == [4, -1] and nine.file_rows.tolist() == [4, 2]
