"""The seconds clock: timestamps, or native frames over the videos' frame rates; rows that cannot be
placed are skipped with their reason, a missing video-info file is one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from featstore.imports.timing import SegmentSkipped, make_time_map, timestamp_seconds
from featstore.samples.annotations import SegmentLabel, write_epic55_annotations, write_video_info
from featstore.store.importer import ImportFailure

def _annotations(folder: Path) -> Path:
    return write_epic55_annotations(folder / "EPIC_train_action_labels.csv",
                                    [SegmentLabel("7", "P01", "P01_01", 3750, 3840, 1, 2)])


ROW = {"uid": "7", "video_id": "P01_01", "start_timestamp": "00:01:02.50", "stop_timestamp": "00:01:04.00",
       "start_frame": 3750, "stop_frame": 3840}


def test_timestamps_are_hours_minutes_seconds() -> None:
    assert timestamp_seconds("01:02:03.25") == 3723.25
    assert timestamp_seconds("00:00:00.14") == pytest.approx(0.14)
    with pytest.raises(ValueError):
        timestamp_seconds("62.5")


def test_auto_reads_timestamps_when_every_row_has_them(tmp_path: Path) -> None:
    clock = make_time_map([ROW], tmp_path / "EPIC_train_action_labels.csv")
    span = clock.span(ROW)
    assert (span.uid, span.video_id, span.start, span.stop, span.centre) == ("7", "P01_01", 62.5, 64.0, 63.25)
    assert clock.describe()["from"] == "timestamps"


def test_frames_divide_by_the_videos_own_rate(tmp_path: Path) -> None:
    info = write_video_info(tmp_path / "EPIC_video_info.csv", [("P01_01", 1920, 1080, 100000)], fps=60.0)
    annotations = _annotations(tmp_path)
    clock = make_time_map([ROW], annotations, time_map="frames")  # found beside the annotations
    span = clock.span(ROW)
    assert (span.start, span.stop) == (62.5, 64.0)
    assert clock.describe() == {"from": "frames", "seconds": "start_frame / fps, stop_frame / fps",
                                "video_info": str(info.resolve())}
    with pytest.raises(SegmentSkipped, match="P02_01 has no frame rate"):
        clock.span({**ROW, "video_id": "P02_01"})
    # Rows without timestamps (a derived segment list) fall back to frames under auto.
    assert make_time_map([{**ROW, "start_timestamp": None}], annotations).kind == "frames"


def test_frames_without_a_video_info_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ImportFailure, match="--time-map frames needs the videos' frame rates: pass --video-info"):
        make_time_map([ROW], _annotations(tmp_path), time_map="frames")
    with pytest.raises(ImportFailure, match="--time-map 'seconds'"):
        make_time_map([ROW], tmp_path / "a.csv", time_map="seconds")


def test_a_row_the_clock_cannot_place_is_skipped_with_its_reason(tmp_path: Path) -> None:
    clock = make_time_map([ROW], tmp_path / "EPIC_train_action_labels.csv", time_map="timestamps")
    with pytest.raises(SegmentSkipped, match="no usable timestamps"):
        clock.span({**ROW, "start_timestamp": "soon"})
    with pytest.raises(SegmentSkipped, match="stops .* before it starts"):
        clock.span({**ROW, "stop_timestamp": "00:00:01.00"})
