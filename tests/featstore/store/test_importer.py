"""`import_npz` (what `featstore import` runs): report counts, unmatched files and rows, segments
that fail alone (NaN, overflow, unreadable), schema disagreements that stop the import naming the
npz, the ``boxes`` rows from the detection arrays, and a rerun that only finishes the job.

The CLI's output and a kill part-way are tested in tests/cli/test_featstore_cli.py and
tests/reliability/test_crash_import.py."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from featstore.store.importer import (
    ImportFailure,
    ImportReport,
    box_rows_from_arrays,
    field_specs_from_arrays,
    import_npz,
    load_npz,
)
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.schema import FieldSpec
from featstore.store.reader import FeatureStore

SMALL = feature_shapes(verb_dim=8, noun_dim=8, det_dim=4, n_global=6, n_local=4, map_size=None)


def _sample(root: Path, n: int, *, shapes=SMALL) -> tuple[Path, Path]:
    segments = generate_segments(n, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    return annotations, write_feature_npzs(root / "npz", segments, shapes=shapes)


def _rewrite(npz: Path, **changes: np.ndarray) -> None:
    arrays = dict(np.load(npz))
    arrays.update(changes)
    np.savez(npz, **arrays)


def test_import_stores_every_segment_with_its_labels_and_arrays(tmp_path: Path) -> None:
    annotations, npz = _sample(tmp_path, 9)
    committed: list[str] = []
    report = import_npz(tmp_path / "store", annotations, npz, progress=False, command="featstore import x",
                        on_segment=committed.append)
    assert (report.imported, report.skipped, report.failed) == (9, 0, [])
    assert (report.npz_without_annotation, report.annotation_without_npz) == ([], [])
    assert committed == [str(i) for i in range(9)]  # annotation order, each once
    store = FeatureStore.open(tmp_path / "store")
    assert store.fields == {name: FieldSpec("float32" if name.endswith((".box", ".score")) else "float16", shape)
                            for name, shape in SMALL.items()}
    provenance = store.manifest["provenance"]
    assert provenance["source"] == "import" and provenance["command"] == "featstore import x"
    assert provenance["import_from"] == str(npz.resolve()) and provenance["annotations"] == str(annotations.resolve())
    rows = {row["uid"]: row for row in store.segments().to_pylist()}
    for segment in generate_segments(9, num_verbs=5, num_nouns=7):
        row = rows[segment.uid]
        assert (row["verb_class"], row["noun_class"], row["video_id"]) == (
            segment.verb_class, segment.noun_class, segment.video_id)
    given = np.load(npz / "4.npz")
    stored = store.read("4")
    np.testing.assert_array_equal(stored["det.local.box"], given["det.local.box"])
    np.testing.assert_allclose(stored["verb.global"], given["verb.global"], rtol=1e-3)  # float16
    assert stored["verb.global"].dtype == np.float16
    assert store.verify() == []


def test_report_names_unmatched_npz_files_and_annotation_rows(tmp_path: Path) -> None:
    annotations, npz = _sample(tmp_path, 12)
    (npz / "3.npz").unlink()
    (npz / "10.npz").unlink()
    np.savez(npz / "stray.npz", **dict(np.load(npz / "0.npz")))
    report = import_npz(tmp_path / "store", annotations, npz, progress=False)
    assert report.imported == 10 and report.failed == []
    assert report.npz_without_annotation == ["stray"]
    assert report.annotation_without_npz == ["3", "10"]  # in annotation order
    stored = sorted(FeatureStore.open(tmp_path / "store").uids(), key=int)
    assert stored == [str(i) for i in range(12) if i not in (3, 10)]
    summary = report.summary()
    assert summary.splitlines()[0] == "imported 10, already stored 0, failed 0"
    assert "1 npz files without an annotation row: stray" in summary
    assert "2 annotation rows without an npz file: 3, 10" in summary


@pytest.mark.parametrize("field, bad, reason", [
    ("verb.global", np.full(8, np.nan, np.float32), "field verb.global holds NaN or inf values"),
    ("det.global.score", np.array([0.5, np.inf, 0, 0, 0, 0], np.float32),
     "field det.global.score holds NaN or inf values"),
    ("noun.global", np.full(8, 1e6, np.float32), "field noun.global overflows float16 (max |value| 1e+06)"),
    ("verb.global", np.array(list("abcdefgh")), "field verb.global has dtype <U1, not a number"),
])
def test_a_segment_whose_values_cannot_be_stored_fails_alone(tmp_path: Path, field: str, bad: np.ndarray,
                                                            reason: str) -> None:
    annotations, npz = _sample(tmp_path, 6)
    _rewrite(npz / "2.npz", **{field: bad})
    report = import_npz(tmp_path / "store", annotations, npz, progress=False)
    assert report.imported == 5 and report.failed == [("2", reason)]
    store = FeatureStore.open(tmp_path / "store")
    failed = store.segments(status="failed").to_pylist()
    assert [(row["uid"], row["error"]) for row in failed] == [("2", f"2.npz: {reason}")]
    assert "2" not in store.uids() and len(store.boxes(["2"])) == 0


def test_an_unreadable_npz_fails_its_segment_and_a_fixed_one_is_retried(tmp_path: Path) -> None:
    annotations, npz = _sample(tmp_path, 5)
    good = (npz / "3.npz").read_bytes()
    (npz / "3.npz").write_bytes(b"not a zip")
    (npz / "4.npz").write_bytes(good[: len(good) // 2])  # cut short
    report = import_npz(tmp_path / "store", annotations, npz, progress=False)
    assert report.imported == 3 and [uid for uid, _ in report.failed] == ["3", "4"]
    assert all(reason.startswith("unreadable npz (") for _, reason in report.failed)
    assert "failed 3: unreadable npz" in report.summary()

    (npz / "3.npz").write_bytes(good)
    again = import_npz(tmp_path / "store", annotations, npz, progress=False)
    assert (again.imported, again.skipped, [uid for uid, _ in again.failed]) == (1, 3, ["4"])
    store = FeatureStore.open(tmp_path / "store")
    assert store.uids() == ["0", "1", "2", "3"] and store.uids(status="failed") == ["4"]


def test_a_shape_that_differs_from_the_first_segment_stops_the_import_naming_the_npz(tmp_path: Path) -> None:
    annotations, npz = _sample(tmp_path, 6)
    _rewrite(npz / "4.npz", **{"det.global.feat": np.zeros((7, 4), np.float32)})
    with pytest.raises(ImportFailure) as caught:
        import_npz(tmp_path / "store", annotations, npz, progress=False)
    assert str(caught.value) == (f"{npz / '4.npz'}: field det.global.feat has shape [7, 4], "
                                 "the store's (from the first segment) is [6, 4]")
    # Nothing is lost: the segments before it are stored.
    assert FeatureStore.open(tmp_path / "store").uids() == ["0", "1", "2", "3"]


def test_other_arrays_than_the_store_fields_stop_the_import_naming_the_npz(tmp_path: Path) -> None:
    annotations, npz = _sample(tmp_path, 4)
    arrays = dict(np.load(npz / "2.npz"))
    del arrays["noun.global"]
    np.savez(npz / "2.npz", **arrays)
    with pytest.raises(ImportFailure, match=r"2\.npz: arrays \[.*\] differ from the store's fields \[.*'noun\.global'"):
        import_npz(tmp_path / "store", annotations, npz, progress=False)


def test_an_unusable_first_npz_or_folder_is_an_import_failure(tmp_path: Path) -> None:
    annotations, npz = _sample(tmp_path, 3)
    (npz / "0.npz").write_bytes(b"garbage")
    with pytest.raises(ImportFailure, match=r"0\.npz: unreadable npz .*the store's schema comes from it"):
        import_npz(tmp_path / "store", annotations, npz, progress=False)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ImportFailure, match="--from .*nowhere: not a folder"):
        import_npz(tmp_path / "store", annotations, tmp_path / "nowhere", progress=False)


def test_no_npz_for_any_row_imports_nothing_and_creates_no_store(tmp_path: Path) -> None:
    annotations, _ = _sample(tmp_path, 3)
    (tmp_path / "empty").mkdir()
    report = import_npz(tmp_path / "store", annotations, tmp_path / "empty", progress=False)
    assert report.imported == 0 and report.annotation_without_npz == ["0", "1", "2"]
    assert not (tmp_path / "store").exists()


def test_box_rows_come_from_the_detection_arrays() -> None:
    arrays = {
        "det.global.box": np.array([[0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0]], np.float32),
        "det.global.score": np.array([0.9, 0.0], np.float32),
        "det.global.frame": np.array([17, 0]),
        "det.global.label": np.array([3, 0]),
        "det.local.box": np.array([[0.5, 0.5, 0.6, 0.6]], np.float32),  # no scores: every slot valid
        "verb.global": np.zeros(4, np.float32),
    }
    rows = box_rows_from_arrays(arrays)
    assert rows["set"] == ["global", "global", "local"] and rows["slot"] == [0, 1, 0]
    assert rows["valid"] == [True, False, True] and rows["score"] == pytest.approx([0.9, 0.0, 1.0])
    assert rows["frame"] == [17, None, None] and rows["label"] == [3, 0, None]
    assert rows["x1"] == pytest.approx([0.1, 0.0, 0.5]) and rows["y2"] == pytest.approx([0.4, 0.0, 0.6])
    assert box_rows_from_arrays({"verb.global": np.zeros(4)}) is None


def test_field_specs_take_the_shape_given_and_the_dtype_from_the_name() -> None:
    specs = field_specs_from_arrays({"verb.map": np.zeros((3, 1, 2, 2)), "det.local.box": np.zeros((4, 4)),
                                     "det.local.score": np.zeros(4, np.float16)})
    assert specs == {"verb.map": FieldSpec("float16", (3, 1, 2, 2)), "det.local.box": FieldSpec("float32", (4, 4)),
                     "det.local.score": FieldSpec("float32", (4,))}


def test_load_npz_reads_every_array_or_raises_what_the_importer_catches(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "a.npz", x=np.arange(3), y=np.ones((2, 2)))
    loaded = load_npz(tmp_path / "a.npz")
    assert sorted(loaded) == ["x", "y"] and loaded["x"].tolist() == [0, 1, 2]
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[60] ^= 0xFF  # inside the first member's compressed data
    (tmp_path / "b.npz").write_bytes(bytes(raw))
    with pytest.raises((ValueError, OSError, zipfile.BadZipFile, EOFError)):  # its documented errors
        load_npz(tmp_path / "b.npz")


def test_summary_shortens_long_lists() -> None:
    report = ImportReport(imported=1, failed=[(str(i), "bad") for i in range(25)],
                          npz_without_annotation=[f"x{i}" for i in range(12)])
    lines = report.summary().splitlines()
    assert lines[0] == "imported 1, already stored 0, failed 25"
    assert lines[1:21] == [f"  failed {i}: bad" for i in range(20)]
    assert lines[21] == "  ... and 5 more (see `featstore query` on status = 'failed')"
    assert lines[22] == "12 npz files without an annotation row: " + ", ".join(f"x{i}" for i in range(10)) + \
        ", ... (12 in all)"
    assert len(lines) == 23
