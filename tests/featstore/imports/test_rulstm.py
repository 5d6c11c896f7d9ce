"""``rulstm-lmdb``: RULSTM's per-frame LMDBs (its README's layout: keys ``<video>_frame_{:010d}.jpg``
of 30 fps frames, raw float32 values) into ``rulstm.<modality>`` fields; values checked against the
layout worked by hand, failures per segment, a wrong layout refused in one line."""
from __future__ import annotations

import math
from pathlib import Path

import lmdb
import numpy as np
import pytest

from featstore.epic.annotations import read_segments
from featstore.imports import import_features
from featstore.imports.rulstm import frame_key
from featstore.imports.timing import timestamp_seconds
from featstore.samples.annotations import generate_segments, write_epic55_annotations, write_video_info
from featstore.samples.published import write_rulstm_lmdb
from featstore.store.importer import ImportFailure
from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec
from tests.helpers.published_sets import rulstm_mean, write_rulstm_source


def _annotations(root: Path, n: int = 6) -> Path:
    return write_epic55_annotations(root / "EPIC_train_action_labels.csv",
                                    generate_segments(n, num_verbs=5, num_nouns=7, frames_per_segment=120))


def _seconds(row: dict) -> tuple[float, float]:
    return timestamp_seconds(row["start_timestamp"]), timestamp_seconds(row["stop_timestamp"])


def test_each_segment_is_the_mean_of_its_30fps_frames_in_every_modality(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path)
    written = write_rulstm_source(tmp_path / "rulstm", annotations)
    report = import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                             progress=False)
    assert (report.imported, report.failed) == (6, [])
    store = FeatureStore.open(tmp_path / "store")
    assert store.fields == {
        "rulstm.rgb": FieldSpec("float16", (1024,)), "rulstm.flow": FieldSpec("float16", (1024,)),
        "rulstm.obj": FieldSpec("float16", (352,)),
        **{f"rulstm.{m}.frames": FieldSpec("int32", (1,)) for m in ("rgb", "flow", "obj")},
    }
    for row in read_segments(annotations).to_pylist():
        stored = store.read(row["uid"])
        for modality in ("rgb", "flow", "obj"):
            expected, count = rulstm_mean(written[modality][row["video_id"]], *_seconds(row))
            np.testing.assert_allclose(stored[f"rulstm.{modality}"], expected, rtol=2e-3, atol=2e-3)
            assert stored[f"rulstm.{modality}.frames"].tolist() == [count]
    publisher = store.manifest["provenance"]["publisher"]
    assert publisher["modalities"]["obj"] == {"dim": 352, "field": "rulstm.obj"} and publisher["pool"] == "mean"
    assert store.manifest["provenance"]["time_map"]["from"] == "timestamps"
    assert store.verify() == []


def test_centre_pooling_takes_the_frame_at_the_segment_centre(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 3)
    written = write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"flow": 1024})
    import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                    options={"pool": "centre"}, progress=False)
    store = FeatureStore.open(tmp_path / "store")
    assert set(store.fields) == {"rulstm.flow", "rulstm.flow.frames"}  # any subset of the modalities
    for row in read_segments(annotations).to_pylist():
        start, stop = _seconds(row)
        centre = written["flow"][row["video_id"]][max(1, math.floor((start + stop) / 2 * 30))]
        np.testing.assert_allclose(store.read(row["uid"])["rulstm.flow"], centre, rtol=2e-3, atol=2e-3)


def test_one_modality_lmdb_given_directly_and_a_modality_subset(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 2)
    write_rulstm_source(tmp_path / "rulstm", annotations)
    import_features(tmp_path / "a", annotations, tmp_path / "rulstm" / "obj", format="rulstm-lmdb", progress=False)
    assert set(FeatureStore.open(tmp_path / "a").fields) == {"rulstm.obj", "rulstm.obj.frames"}
    import_features(tmp_path / "b", annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                    options={"modalities": "flow,obj"}, progress=False)
    assert set(FeatureStore.open(tmp_path / "b").fields) == {"rulstm.flow", "rulstm.obj", "rulstm.flow.frames",
                                                             "rulstm.obj.frames"}


def test_native_frames_map_through_the_videos_frame_rates(tmp_path: Path) -> None:
    # EPIC-55's native frames at 59.94 fps: frame / fps seconds, then RULSTM's floor(t * 30).
    segments = generate_segments(4, num_verbs=5, num_nouns=7, frames_per_segment=150)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments, fps=59.94)
    write_video_info(tmp_path / "EPIC_video_info.csv", [(s.video_id, 1920, 1080, 10_000) for s in segments], fps=59.94)
    written = write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"rgb": 1024})
    import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb", time_map="frames",
                    progress=False)
    store = FeatureStore.open(tmp_path / "store")
    assert store.manifest["provenance"]["time_map"]["from"] == "frames"
    for segment in segments:
        expected, count = rulstm_mean(written["rgb"][segment.video_id], segment.start_frame / 59.94,
                                      segment.stop_frame / 59.94)
        stored = store.read(segment.uid)
        np.testing.assert_allclose(stored["rulstm.rgb"], expected, rtol=2e-3, atol=2e-3)
        assert stored["rulstm.rgb.frames"].tolist() == [count]


def test_a_segment_without_frames_fails_alone_with_the_frames_looked_for(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 6)
    rows = read_segments(annotations).to_pylist()
    gone = rows[2]
    start, stop = _seconds(gone)
    first, last = max(1, math.floor(start * 30)), math.floor(stop * 30)
    write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"rgb": 1024},
                        leave_out=lambda video, frame: video == gone["video_id"] and first <= frame <= last)
    report = import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                             progress=False)
    assert report.imported == 5 and [uid for uid, _ in report.failed] == [gone["uid"]]
    reason = report.failed[0][1]
    assert reason.startswith(f"no rgb frames of {gone['video_id']} in ") and f"between frames {first} and {last}" in reason
    store = FeatureStore.open(tmp_path / "store")
    assert [(r["uid"], r["error"]) for r in store.segments(status="failed").to_pylist()] == [(gone["uid"], reason)]


def test_other_dims_or_another_key_scheme_is_refused_in_one_line(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 2)
    write_rulstm_lmdb(tmp_path / "narrow" / "rgb", [("P01_01", f, np.zeros(512, np.float32)) for f in range(1, 300)])
    with pytest.raises(ImportFailure, match=r"rgb values are 512-d, RULSTM's rgb features are 1024-d") as err:
        import_features(tmp_path / "s1", annotations, tmp_path / "narrow", format="rulstm-lmdb", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "s1").exists()
    import_features(tmp_path / "s2", annotations, tmp_path / "narrow", format="rulstm-lmdb",
                    options={"check_dims": False}, progress=False)
    assert FeatureStore.open(tmp_path / "s2").fields["rulstm.rgb"].shape == (512,)

    (tmp_path / "keys" / "flow").mkdir(parents=True)
    with lmdb.open(str(tmp_path / "keys" / "flow"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        txn.put(b"P01_01/frame_0001.jpg", np.zeros(1024, np.float32).tobytes())
    with pytest.raises(ImportFailure, match=r"keys look like 'P01_01/frame_0001.jpg', not RULSTM's"):
        import_features(tmp_path / "s3", annotations, tmp_path / "keys", format="rulstm-lmdb", progress=False)
    with pytest.raises(ImportFailure, match="rulstm-lmdb pools frames by one of mean, centre"):
        import_features(tmp_path / "s4", annotations, tmp_path / "narrow", format="rulstm-lmdb",
                        options={"pool": "max"}, progress=False)
    assert frame_key("P01_01", 7) == b"P01_01_frame_0000000007.jpg"
