"""Ground-truth objects: EPIC-55 object labels (a generated file in the real schema, malformed rows
included), the --boxes format (the demo sample's boxes.csv), image layouts, class tables, splits."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featstore.epic.annotations import AnnotationError
from featstore.epic.metadata import read_class_list
from featstore.epic.boxes import BoxesFileError
from featstore.epic.frames import EpicJpegFrames
from featstore.epic.objects import (
    EPIC_OBJECT_COLUMNS,
    HELD_OUT_PARTICIPANTS,
    ImageLayout,
    ObjectImage,
    read_box_file_objects,
    read_epic_object_labels,
    read_objects,
)
from featstore.samples.kitchens import SampleSpec, generate_sample

# Rows as EPIC_train_object_labels.csv has them: one noun on one frame per row, boxes as
# (top, left, height, width), zero-padded frame numbers, frames with several nouns, nouns not visible.
ROWS = [
    (20, "bag", "P01", "P01_01", "056581", "[(76, 1260, 462, 186)]"),
    (1, "pan", "P01", "P01_01", "056581", "[(10, 20, 30, 40), (0, 0, 5, 5)]"),
    (3, "tap", "P01", "P01_01", "056581", "[]"),  # not visible in this frame
    (3, "tap", "P01", "P01_01", "000031", "[]"),  # a frame without objects: background
    (8, "cupboard", "P01", "P01_01", "000061", "[(5, 6, 0, 10), (1, 2, 3, 4)]"),  # one box without area
    (1, "pan", "P26", "P26_02", "000091", "[(0, 0, 100, 200)]"),
    (1, "pan", "P27", "P27_01", "000001", "[(4, 4, 4, 4)]"),
]


def write_object_labels(path: Path, rows=ROWS) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(EPIC_OBJECT_COLUMNS)
        writer.writerows(rows)
    return path


def as_tuples(image: ObjectImage) -> list[tuple]:
    return [(*box, label) for box, label in zip(image.boxes.tolist(), image.labels.tolist())]


def test_epic_object_labels_become_one_record_per_image(tmp_path: Path) -> None:
    labels = read_epic_object_labels(write_object_labels(tmp_path / "EPIC_train_object_labels.csv"))
    assert [(i.participant_id, i.video_id, i.frame) for i in labels] == [
        ("P01", "P01_01", 31), ("P01", "P01_01", 61), ("P01", "P01_01", 56581), ("P26", "P26_02", 91),
        ("P27", "P27_01", 1),
    ]
    background, cupboard, busy, _, _ = labels
    assert labels[2] is busy
    assert len(background) == 0 and background.boxes.shape == (0, 4) and background.labels.dtype == np.int64
    assert as_tuples(cupboard) == [(2, 1, 6, 4, 8)]  # the zero-height box is dropped ...
    assert labels.dropped_boxes == 1  # ... and counted
    # (top, left, height, width) -> x1, y1, x2, y2; the frame's rows merge in file order.
    assert as_tuples(busy) == [(1260, 76, 1446, 538, 20), (20, 10, 60, 40, 1), (0, 0, 5, 5, 1)]
    assert busy.boxes.dtype == np.float32
    assert labels.n_boxes == 6 and labels.class_counts() == {1: 4, 8: 1, 20: 1}


def test_read_objects_tells_the_two_formats_apart(tmp_path: Path) -> None:
    epic = read_objects(write_object_labels(tmp_path / "objects.csv"))
    assert len(epic) == 5
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("video_id,frame,x1,y1,x2,y2,score,label\nP01_01,7,1,2,3,4,0.9,5\n")
    (image,) = read_objects(boxes)
    assert (image.video_id, image.frame, as_tuples(image)) == ("P01_01", 7, [(1, 2, 3, 4, 5)])


BAD_CELLS = [
    ("bounding_boxes", "[(1, 2, 3)]", r"row 2, column 'bounding_boxes': expected a list of \(top, left, height, width\)"),
    ("bounding_boxes", "(1, 2, 3, 4)", "row 2, column 'bounding_boxes'"),
    ("bounding_boxes", "[(1, 2, 3, -4)]", "row 2, column 'bounding_boxes'"),
    ("bounding_boxes", "[(1, 2, 3, 4) (5, 6, 7, 8)]", "row 2, column 'bounding_boxes'"),
    ("bounding_boxes", "", "row 2, column 'bounding_boxes'.*got ''"),
    ("noun_class", "pan", "row 2, column 'noun_class': expected an integer, got 'pan'"),
    ("noun_class", "", "row 2, column 'noun_class': empty cell"),
    ("frame", "12.5", "row 2, column 'frame': expected an integer"),
    ("frame", "-3", "row 2, column 'frame': negative frame -3"),
    ("participant_id", "X1", "row 2, column 'participant_id': 'X1' does not look like P##"),
    ("video_id", "P02_01", "row 2, column 'video_id': video_id 'P02_01' does not start with participant_id 'P01'"),
]


@pytest.mark.parametrize("column, value, message", BAD_CELLS)
def test_malformed_object_label_rows_name_file_row_and_column(tmp_path: Path, column: str, value: str,
                                                              message: str) -> None:
    rows = [list(row) for row in ROWS[:3]]
    rows[1][EPIC_OBJECT_COLUMNS.index(column)] = value
    path = write_object_labels(tmp_path / "objects.csv", rows)
    with pytest.raises(AnnotationError, match=message) as error:
        read_epic_object_labels(path)
    assert error.value.file == str(path) and error.value.row == 2 and error.value.column == column


def test_missing_columns_and_classes_outside_the_class_table(tmp_path: Path, epic55_dir: Path) -> None:
    path = tmp_path / "objects.csv"
    path.write_text("noun_class,participant_id,video_id,frame,bounding_boxes\n1,P01,P01_01,1,[]\n")
    with pytest.raises(AnnotationError, match="column 'noun': required column missing"):
        read_epic_object_labels(path)

    nouns = read_class_list(epic55_dir / "EPIC_noun_classes.csv")
    assert len(nouns) == 352 and nouns[1] == "pan" and nouns[20] == "bag"
    assert len(read_epic_object_labels(write_object_labels(path), class_names=nouns)) == 5
    rows = [list(row) for row in ROWS]
    rows[4][0] = 352
    with pytest.raises(AnnotationError, match="row 5, column 'noun_class': class 352 is not a class id of the 352"):
        read_epic_object_labels(write_object_labels(path, rows), class_names=nouns)


def test_a_class_table_of_other_columns(tmp_path: Path) -> None:
    table = tmp_path / "classes.csv"
    table.write_text("id,key\n1,plate\n0,pan\n")
    assert read_class_list(table) == ("pan", "plate")
    table.write_text("name\npan\n")
    with pytest.raises(AnnotationError, match="a class table needs columns"):
        read_class_list(table)


def test_the_demo_sample_boxes_are_training_data_with_its_frames(tmp_path: Path) -> None:
    sample = generate_sample(tmp_path / "sample", SampleSpec(("P01",), ("P26",), videos_per_participant=1,
                                                             segments_per_video=1))
    labels = read_box_file_objects(sample.boxes)
    with open(sample.boxes, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert labels.n_boxes == len(rows) > 0
    assert {i.participant_id for i in labels} == {"P01", "P26"}
    first = next(i for i in labels if i.video_id == rows[0]["video_id"] and i.frame == int(rows[0]["frame"]))
    expected = [(float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"]), int(r["label"])) for r in rows
                if (r["video_id"], int(r["frame"])) == (first.video_id, first.frame)]
    assert sorted(as_tuples(first)) == sorted(expected)

    layout = ImageLayout(sample.frames, "rgb-frames")
    assert layout.missing(labels) == []
    assert layout.path(first) == EpicJpegFrames(sample.frames).frame_path("P01", first.video_id, first.frame)
    train, val = labels.split(HELD_OUT_PARTICIPANTS)
    assert {i.participant_id for i in train} == {"P01"} and {i.participant_id for i in val} == {"P26"}
    assert len(train) + len(val) == len(labels)


def test_box_files_as_ground_truth_errors_and_normalised_coordinates(tmp_path: Path) -> None:
    header = "video_id,frame,x1,y1,x2,y2,score"
    path = tmp_path / "boxes.csv"
    path.write_text(f"{header}\nP01_01,1,1,2,3,4,0.5\n")
    with pytest.raises(AnnotationError, match="column 'label': required column missing"):
        read_box_file_objects(path)
    path.write_text(f"{header},label\nP01_01,1,1,2,3,4,0.5,2\nP01_01,2,1,2,3,4,0.5,\n")
    with pytest.raises(AnnotationError, match="boxes.csv: row 2, column 'label': empty or negative label"):
        read_box_file_objects(path)
    path.write_text(f"{header},label\nP01_01,1,1,2,3,4,0.5,2\nP01_01,2,1,2,3,4,0.5,9\n")
    with pytest.raises(AnnotationError, match="row 2, column 'label': class 9 is not a class id of the 3"):
        read_box_file_objects(path, class_names=["a", "b", "c"])
    path.write_text(f"{header},label\nvideo7,1,1,2,3,4,0.5,2\n")
    with pytest.raises(AnnotationError, match="row 1, column 'video_id': 'video7' is not an EPIC video id"):
        read_box_file_objects(path)
    path.write_text(f"{header},label\nP01_01,1,1,2,0,4,0.5,2\n")
    with pytest.raises(BoxesFileError, match="row 1, column 'x2'"):
        read_box_file_objects(path)

    parquet = tmp_path / "boxes.parquet"
    pq.write_table(pa.table({"video_id": ["P01_01", "P02_01"], "frame": [3, 4], "x1": [0.0, 0.5], "y1": [0.0, 0.5],
                             "x2": [0.5, 1.0], "y2": [1.0, 1.0], "score": [1.0, 1.0], "label": [1, 2]}), parquet)
    with pytest.raises(ValueError, match="need frame_size"):
        read_box_file_objects(parquet, coords="normalized")
    one, two = read_box_file_objects(parquet, coords="normalized", frame_size=(100, 200))
    assert as_tuples(one) == [(0, 0, 100, 100, 1)] and as_tuples(two) == [(100, 50, 200, 100, 2)]
    _, two = read_box_file_objects(parquet, coords="normalized", frame_size={"P01_01": (10, 20), "P02_01": (2, 4)})
    assert as_tuples(two) == [(2, 1, 4, 2, 2)]
    with pytest.raises(AnnotationError, match="row 2, column 'video_id': no frame size for video 'P02_01'"):
        read_box_file_objects(parquet, coords="normalized", frame_size={"P01_01": (10, 20)})


def test_image_layouts(tmp_path: Path) -> None:
    image = ObjectImage("P01", "P01_01", 56581, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert ImageLayout(tmp_path).path(image) == tmp_path / "P01" / "P01_01" / "0000056581.jpg"
    assert ImageLayout(tmp_path, "rgb-frames").path(image) == tmp_path / "P01/rgb_frames/P01_01/frame_0000056581.jpg"
    custom = ImageLayout(tmp_path, "{video_id}/img_{frame:06d}.png")
    assert custom.path(image) == tmp_path / "P01_01" / "img_056581.png"
    assert custom.missing([image]) == [custom.path(image)]
    custom.path(image).parent.mkdir(parents=True)
    custom.path(image).write_bytes(b"")
    assert custom.missing([image]) == []
    for bad, why in (("{kitchen}/{frame}.jpg", r"fields \['kitchen'\] are not among"), ("frames.jpg", "names no field"),
                     ("{frame:s}.jpg", "Unknown format code"), ("{video_id.jpg", "expected '}'")):
        with pytest.raises(ValueError, match=f"bad image pattern .*{why}"):
            ImageLayout(tmp_path, bad)


def test_selections_and_splits_are_sql_over_the_image_table(tmp_path: Path) -> None:
    labels = read_epic_object_labels(write_object_labels(tmp_path / "objects.csv"))
    assert labels.table().column_names == ["participant_id", "video_id", "frame", "n_objects"]
    busy = labels.select("n_objects >= 2")
    assert [(i.video_id, i.frame) for i in busy] == [("P01_01", 56581)]
    assert len(labels.select(None)) == len(labels)
    train, val = labels.split("video_id = 'P26_02' or frame = 31")
    assert [(i.video_id, i.frame) for i in val] == [("P01_01", 31), ("P26_02", 91)]
    assert len(train) == 3 and not {id(i) for i in train} & {id(i) for i in val}
    train, val = labels.split()  # the paper's held-out participants
    assert {i.participant_id for i in val} == {"P26", "P27"}
    with pytest.raises(ValueError, match="leaves no validation images"):
        labels.split("participant_id = 'P99'")
    with pytest.raises(ValueError, match="selection .* names no column no_such_column"):
        labels.select("no_such_column = 1")


def test_a_file_of_frames_without_objects(tmp_path: Path) -> None:
    rows = [(3, "tap", "P01", "P01_01", "1", "[]"), (3, "tap", "P01", "P01_01", "2", "[ ]")]
    labels = read_epic_object_labels(write_object_labels(tmp_path / "objects.csv", rows))
    assert len(labels) == 2 and labels.n_boxes == 0 and labels.class_counts() == {}
    assert all(image.boxes.shape == (0, 4) for image in labels)
