"""Corrupt and hostile inputs: each gives a clear error naming the thing, or the documented
per-segment failure (``status = 'failed'`` with the reason), never a silently wrong store.

Covered elsewhere and not repeated here:
- JPEGs: truncated / zero-byte / garbage frames raise naming the file
  (tests/featstore/epic/test_frames.py::test_corrupt_jpeg_raises_naming_the_file,
  ::test_truncated_jpeg_detected_even_when_pillow_allows_truncation), and a truncated JPEG fails
  its segment only in a build, retried once fixed
  (tests/cli/test_featstore_build.py::test_corrupt_jpeg_fails_its_segment_only);
- a truncated mp4 fails its segments only
  (tests/featstore/extract/test_service.py::test_video_files_build_and_a_truncated_one_fails_alone);
- a participant without frames, a segment past the video's end
  (tests/featstore/extract/test_service.py::test_segment_that_cannot_be_sampled_fails_alone);
- annotation files with a missing column, a non-integer class, start after stop, a duplicate uid,
  a malformed participant
  (tests/featstore/epic/test_annotations.py::test_malformed_csv_raises_annotation_error_naming_file_row_column;
  property-based in tests/reliability/test_properties.py);
- npz files with NaNs, an unreadable npz, and a shape that differs from the store's
  (tests/cli/test_featstore_cli.py::test_import_reports_unmatched_files_and_fails_bad_segments,
  ::test_import_refuses_a_segment_whose_shape_differs);
- a store of another format version or without a manifest, opened from Python
  (tests/featstore/store/test_reader.py::test_other_format_version_and_missing_manifest_are_clear_errors).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main
from cli.heads_cli import main as heads_main
from featstore.extract.service import build_store
from featstore.epic.frames import EpicJpegFrames
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.damage import corrupt_jpeg
from featstore.samples.features import random_segment_arrays, write_feature_npzs
from featstore.samples.frames import paint_frame
from featstore.epic.sampling import SamplingConfig, plan_segment
from featstore.store.reader import FeatureStore
from tests.helpers.tiny_build import FPS, N_FRAMES, make_epic_dataset, small_config
from tests.reliability.invariants import assert_store_consistent
from tests.reliability.workloads import (
    IMPORT_BOXES_PER_SEGMENT,
    IMPORT_SHAPES,
    TRAIN_WHERE,
    VAL_WHERE,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # heads train and featstore build run in this process


def featstore(*args: object):
    return CliRunner().invoke(featstore_main, [str(a) for a in args])


def heads(*args: object):
    return CliRunner().invoke(heads_main, [str(a) for a in args])


# LMDB's reader table and the writer's lock file change whenever a command opens the store: they
# are the lock state of the moment, not the store's content.
LOCK_FILES = ("lock.mdb", "writer.lock")


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in LOCK_FILES}


def _clear_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, (word, result.output)


# ------------------------------------------------------------------------------------------------
# frames


def test_damaged_frames_fail_their_segment_only_and_a_fixed_rerun_stores_them(tmp_path: Path) -> None:
    """A zero-byte JPEG, a garbage one, a frame of another size and a gap in the folder: four
    segments fail with the file named in ``error``; the other two are stored; once the frames are
    back, a rerun builds exactly the four."""
    frames, annotations = make_epic_dataset(tmp_path / "epic", n_segments=6)
    sampling = SamplingConfig(clip_frames=8, clip_stride=2, size=32)
    source = EpicJpegFrames(frames)
    # Segment i is in video i % 2, frames 20 + 60 * (i // 2) .. + 60; clip frames are its own.
    damage = {"s1": "zero", "s2": "garbage", "s3": "other size", "s4": "gap"}
    damaged: dict[str, Path] = {}
    for i, how in ((int(uid[1:]), how) for uid, how in damage.items()):
        participant, video = ("P01", "P01_01") if i % 2 == 0 else ("P02", "P02_01")
        start = 20 + 60 * (i // 2)
        plan = plan_segment(start, start + 60, fps=FPS, n_frames=N_FRAMES, config=sampling)
        path = source.frame_path(participant, video, plan.clip_frames[3])
        shutil.copy(path, tmp_path / f"{i}.jpg")
        damaged[f"s{i}"] = path
        if how == "gap":
            path.unlink()
        elif how == "other size":
            from PIL import Image

            Image.fromarray(paint_frame(1, height=120, width=160)).save(path, quality=95)
        else:
            corrupt_jpeg(path, how)
    config = small_config(tmp_path / "store", annotations, frames, detector=None, fps=FPS, sampling=sampling)
    report = build_store(config)
    assert report.built == 2 and sorted(uid for uid, _ in report.failed) == sorted(damage)
    reasons = dict(report.failed)
    assert "empty (zero-byte) JPEG" in reasons["s1"] and "not a JPEG" in reasons["s2"]
    assert "missing frame file" in reasons["s4"] and "(120, 160)" in reasons["s3"]
    for uid, path in damaged.items():
        if uid != "s3":
            assert str(path) in reasons[uid]
    store = FeatureStore.open(tmp_path / "store")
    errors = {row["uid"]: row["error"] for row in store.segments(status="failed").to_pylist()}
    assert errors == reasons
    assert store.uids() == ["s0", "s5"] and store.verify() == []

    for uid, path in damaged.items():
        shutil.copy(tmp_path / f"{uid[1:]}.jpg", path)
    again = build_store(config)
    assert (again.built, again.skipped, again.failed) == (4, 2, [])
    assert_store_consistent(tmp_path / "store", [f"s{i}" for i in range(6)], n_fields=3)


# ------------------------------------------------------------------------------------------------
# annotations, through the commands


HEADER = "uid,participant_id,video_id,start_frame,stop_frame,verb_class,noun_class\n"
BAD_ANNOTATIONS = {
    "missing column": ("uid,participant_id,video_id,start_frame,verb_class,noun_class\n0,P01,P01_01,1,2,3\n",
                       "column 'stop_frame': required column missing"),
    "non-integer class": (HEADER + "0,P01,P01_01,1,9,2,3\n1,P01,P01_01,10,19,two,3\n",
                          "row 2, column 'verb_class': expected an integer, got 'two'"),
    "start after stop": (HEADER + "0,P01,P01_01,50,9,2,3\n",
                         "row 1, column 'start_frame': start_frame 50 > stop_frame 9"),
    "duplicate uid": (HEADER + "7,P01,P01_01,1,9,2,3\n7,P01,P01_01,10,19,2,3\n",
                      "row 2, column 'uid': duplicate uid '7'"),
    "unknown participant": (HEADER + "0,Kitchen1,Kitchen1_01,1,9,2,3\n",
                            "row 1, column 'participant_id': 'Kitchen1'"),
}


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
@pytest.mark.parametrize("command", ["import", "build"])
def test_a_bad_annotation_file_stops_the_command_before_any_store_exists(tmp_path: Path, case: str,
                                                                          command: str) -> None:
    content, words = BAD_ANNOTATIONS[case]
    annotations = tmp_path / "EPIC_train_action_labels.csv"
    annotations.write_text(content)
    (tmp_path / "in").mkdir()
    if command == "import":
        result = featstore("import", tmp_path / "store", "--annotations", annotations, "--from", tmp_path / "in",
                           "--no-progress")
    else:
        result = featstore("build", tmp_path / "store", "--annotations", annotations, "--frames", tmp_path / "in",
                           "--verb-backbone", "r3d_18", "--noun-backbone", "r3d_18",
                           "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn", "--no-progress")
    _clear_error(result, str(annotations), words)
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------------------------
# npz files, through `featstore import`


def _npz_bytes(arrays: dict[str, np.ndarray], *, compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _flip_until(data: bytes, start: int, raises: type[BaseException]) -> bytes:
    """Flip one byte at a time from ``start`` until numpy's own loader raises ``raises``: the damage
    the test needs, found on this numpy's layout."""
    for offset in range(start, len(data)):
        damaged = bytearray(data)
        damaged[offset] ^= 0x5A
        try:
            with np.load(io.BytesIO(bytes(damaged))) as loaded:
                {name: loaded[name] for name in loaded.files}
        except raises:
            return bytes(damaged)
        except Exception:  # noqa: BLE001 - another kind of damage: try the next byte
            continue
    raise AssertionError(f"no single-byte damage makes numpy raise {raises.__name__}")


def _hostile_npz(how: str, arrays: dict[str, np.ndarray]) -> bytes:
    arrays = dict(arrays)
    if how == "string dtype":
        arrays["verb.global"] = np.array(["a"] * arrays["verb.global"].size)
    elif how == "complex dtype":
        arrays["verb.global"] = arrays["verb.global"].astype(np.complex64)
    elif how == "object dtype":
        arrays["verb.global"] = np.array([{"x": 1}] * arrays["verb.global"].size, dtype=object)
    elif how == "inf":
        arrays["det.global.feat"][0, 0] = np.inf
    elif how == "beyond float16":
        arrays["noun.global"] = np.full_like(arrays["noun.global"], 1e6)
    if how in ("string dtype", "complex dtype", "inf", "beyond float16"):
        return _npz_bytes(arrays)
    if how == "object dtype":
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # numpy pickles it; the importer never unpickles
        return buffer.getvalue()
    data = _npz_bytes(arrays)
    if how == "zero bytes":
        return b""
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "flipped byte":  # in an array's bytes: the member's CRC no longer matches
        return _flip_until(data, 200, zipfile.BadZipFile)
    if how == "damaged deflate stream":  # numpy alone raises zlib.error: the import used to crash
        return _flip_until(_npz_bytes(arrays, compressed=True), 64, zlib.error)
    raise ValueError(how)


HOSTILE_NPZ = {
    "string dtype": "not a number",
    "complex dtype": "not a number",
    "object dtype": "unreadable npz",
    "inf": "NaN or inf",
    "beyond float16": "overflows float16",
    "zero bytes": "unreadable npz",
    "truncated": "unreadable npz",
    "flipped byte": "Bad CRC-32",
    "damaged deflate stream": "unreadable npz",
}


@pytest.mark.parametrize("how", list(HOSTILE_NPZ))
def test_a_hostile_npz_fails_its_segment_only_and_is_retried_once_fixed(tmp_path: Path, how: str) -> None:
    segments = generate_segments(6, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(tmp_path / "npz", segments, shapes=IMPORT_SHAPES)
    good = (npz / "3.npz").read_bytes()
    arrays = random_segment_arrays(np.random.default_rng(3), IMPORT_SHAPES)
    (npz / "3.npz").write_bytes(_hostile_npz(how, arrays))
    store = tmp_path / "store"
    result = featstore("import", store, "--annotations", annotations, "--from", npz, "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "imported 5, already stored 0, failed 1" in result.output
    assert "failed 3: " in result.output and HOSTILE_NPZ[how] in result.output
    failed = FeatureStore.open(store).segments(status="failed").to_pylist()
    assert [row["uid"] for row in failed] == ["3"] and "3.npz" in failed[0]["error"]
    assert_store_consistent(store, ["0", "1", "2", "4", "5"], failed=["3"], n_fields=len(IMPORT_SHAPES),
                            boxes_per_segment=IMPORT_BOXES_PER_SEGMENT)
    (npz / "3.npz").write_bytes(good)
    again = featstore("import", store, "--annotations", annotations, "--from", npz, "--no-progress")
    assert again.exit_code == 0 and "imported 1, already stored 5, failed 0" in again.output
    assert_store_consistent(store, [str(i) for i in range(6)], n_fields=len(IMPORT_SHAPES),
                            boxes_per_segment=IMPORT_BOXES_PER_SEGMENT)


def test_an_npz_missing_a_field_stops_the_import_naming_it(tmp_path: Path) -> None:
    segments = generate_segments(6, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(tmp_path / "npz", segments, shapes=IMPORT_SHAPES)
    arrays = dict(np.load(npz / "3.npz"))
    del arrays["det.local.feat"]
    np.savez(npz / "3.npz", **arrays)
    result = featstore("import", tmp_path / "store", "--annotations", annotations, "--from", npz, "--no-progress")
    _clear_error(result, "3.npz", "differ from the store's fields")
    # What was imported before stays, whole; nothing of segment 3 is stored.
    assert_store_consistent(tmp_path / "store", ["0", "1", "2"], n_fields=len(IMPORT_SHAPES),
                            boxes_per_segment=IMPORT_BOXES_PER_SEGMENT)


# ------------------------------------------------------------------------------------------------
# damaged stores, through every command that opens one


@pytest.fixture()
def imported(tmp_path: Path) -> dict[str, Path]:
    segments = generate_segments(16, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(tmp_path / "npz", segments, shapes=IMPORT_SHAPES)
    result = featstore("import", tmp_path / "store", "--annotations", annotations, "--from", npz, "--no-progress")
    assert result.exit_code == 0, result.output
    return {"store": tmp_path / "store", "annotations": annotations, "npz": npz, "runs": tmp_path / "runs"}


def _every_command(paths: dict[str, Path]) -> dict[str, object]:
    store = paths["store"]
    return {
        "info": lambda: featstore("info", store),
        "verify": lambda: featstore("verify", store, "--no-progress"),
        "query": lambda: featstore("query", store, "select count(*) from segments"),
        "import": lambda: featstore("import", store, "--annotations", paths["annotations"], "--from", paths["npz"],
                                    "--no-progress"),
        "train": lambda: heads("train", store, "--model", "global", "--train-where", TRAIN_WHERE,
                               "--val-where", VAL_WHERE, "--epochs", "1", "--out", paths["runs"], "--no-progress"),
    }


def _damage_manifest(store: Path, how: str) -> str:
    manifest_path = store / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if how == "missing":
        manifest_path.unlink()
        return "manifest.json is missing"
    if how == "newer format":
        manifest["format_version"] = 2
        manifest_path.write_text(json.dumps(manifest))
        return "format version 2"
    if how == "not JSON":
        manifest_path.write_text(manifest_path.read_text()[:-40])
        return "manifest.json cannot be read"
    if how == "field without shape":
        del manifest["fields"]["verb.global"]["shape"]
        manifest_path.write_text(json.dumps(manifest))
        return "field 'verb.global' has no valid dtype and shape"
    if how == "unknown dtype":
        manifest["fields"]["verb.global"]["dtype"] = "float99"
        manifest_path.write_text(json.dumps(manifest))
        return "field 'verb.global' has no valid dtype and shape"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing", "newer format", "not JSON", "field without shape", "unknown dtype"])
def test_a_damaged_manifest_is_a_clear_error_for_every_command_and_changes_nothing(imported, how: str) -> None:
    store = imported["store"]
    words = _damage_manifest(store, how)
    before = _digest_tree(store)
    for name, run in _every_command(imported).items():
        result = run()
        # A store whose manifest is missing: no command may make a new one over the old data.
        _clear_error(result, words if not (name == "import" and how == "missing") else "holds store data")
        assert _digest_tree(store) == before, name
    assert not imported["runs"].exists()


def test_a_truncated_lmdb_is_a_clear_error_not_a_crash(imported) -> None:
    """LMDB maps its file: reading a page past a cut used to kill the process with SIGBUS."""
    store = imported["store"]
    data = store / "lmdb" / "0" / "data.mdb"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    before = _digest_tree(store)
    commands = _every_command(imported)
    verify = commands["verify"]()
    assert verify.exit_code == 1, verify.output
    lines = verify.stdout.splitlines()
    assert len(lines) == 16 and all("is truncated" in line and str(data) in line for line in lines)
    _clear_error(commands["import"](), "is truncated", str(data))
    _clear_error(commands["train"](), "is truncated", str(data))
    with pytest.raises(Exception, match="is truncated"):
        FeatureStore.open(store).read("0")
    assert commands["query"]().exit_code == 0  # the index itself is intact
    assert _digest_tree(store) == before


def test_a_missing_lmdb_shard_is_named(imported) -> None:
    store = imported["store"]
    shutil.rmtree(store / "lmdb" / "0")
    verify = _every_command(imported)["verify"]()
    assert verify.exit_code == 1 and "LMDB shard '0' is missing" in verify.stdout
    _clear_error(_every_command(imported)["train"](), "LMDB shard '0' is missing")


def test_a_damaged_index_part_is_a_clear_error_naming_it(imported) -> None:
    store = imported["store"]
    (part,) = (store / "segments").glob("*.parquet")
    part.write_bytes(part.read_bytes()[:-200])
    before = _digest_tree(store)
    for name in ("info", "verify", "query", "import", "train"):
        _clear_error(_every_command(imported)[name](), "the index (segments/, boxes/) cannot be read", part.name)
    assert _digest_tree(store) == before
