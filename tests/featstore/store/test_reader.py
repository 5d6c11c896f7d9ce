"""The store read back: round trip, manifest and format checks, tensor keys, integrity, index refresh."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featstore.store.reader import FeatureStore
from featstore.store.schema import (
    FieldMismatchError,
    FieldSpec,
    FormatVersionError,
    StoreError,
)
from tests.corruption import flip_live_byte
from tests.featstore.store.small_store import FIELDS, fill_store, random_arrays, segment_row


def test_round_trip_float16_within_precision_float32_exact(tmp_path: Path) -> None:
    written = fill_store(tmp_path / "s", 20)
    store = FeatureStore.open(tmp_path / "s")
    assert store.uids() == sorted(written)
    for uid, arrays in written.items():
        got = store.read(uid)
        assert got["verb.global"].dtype == np.float16 and got["verb.global"].shape == (16,)
        np.testing.assert_allclose(got["verb.global"], arrays["verb.global"], rtol=1e-3, atol=1e-3)
        assert got["det.global.box"].dtype == np.float32
        np.testing.assert_array_equal(got["det.global.box"], arrays["det.global.box"])
        np.testing.assert_array_equal(got["det.global.score"], arrays["det.global.score"])
    stacked = store.read_field(["3", "1"], "det.global.box")
    np.testing.assert_array_equal(stacked[0], written["3"]["det.global.box"])
    np.testing.assert_array_equal(stacked[1], written["1"]["det.global.box"])


def test_manifest_records_schema_and_refuses_other_fields(tmp_path: Path) -> None:
    fill_store(tmp_path / "s", 2)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["fields"]["det.global.box"] == {"dtype": "float32", "shape": [6, 4]}
    assert manifest["provenance"] == {"test": True}
    with pytest.raises(FieldMismatchError, match="already holds fields"):
        FeatureStore.create(tmp_path / "s", fields={"verb.global": FieldSpec("float16", (8,))})
    store = FeatureStore.open(tmp_path / "s")
    with store.writer() as writer, pytest.raises(FieldMismatchError, match=r"verb.global has shape \[8\]"):
        writer.put(segment_row("x"), {**random_arrays(np.random.default_rng(0)), "verb.global": np.zeros(8)})


def test_other_format_version_and_missing_manifest_are_clear_errors(tmp_path: Path) -> None:
    fill_store(tmp_path / "s", 1)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FormatVersionError, match="format version 99"):
        FeatureStore.open(tmp_path / "s")
    manifest_path.unlink()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        FeatureStore.open(tmp_path / "s")


@pytest.mark.parametrize("manifest, message", [
    ([], "holds a JSON list, not an object"),
    (None, "holds a JSON NoneType, not an object"),
    ("x", "holds a JSON str, not an object"),
    ({"format_version": 1}, "has no 'fields'"),
    ({"format_version": 1, "fields": {}}, "'fields' = {}"),
    ({"format_version": 1, "fields": {"a": {"dtype": "float32", "shape": [2]}}, "provenance": []},
     "'provenance' must be an object"),
])
def test_a_manifest_of_the_wrong_outline_is_refused_naming_the_manifest(tmp_path: Path, manifest, message) -> None:
    fill_store(tmp_path / "s", 1)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=message) as raised:
        FeatureStore.open(tmp_path / "s")
    assert "manifest.json" in str(raised.value)


def test_tensor_keys_list_every_stored_tensor_per_shard_and_no_bookkeeping(tmp_path: Path) -> None:
    fill_store(tmp_path / "s", 3)
    store = FeatureStore.open(tmp_path / "s")
    with store.writer(shard="1") as writer:
        writer.put(segment_row("x"), random_arrays(np.random.default_rng(5)))
        writer.fail(segment_row("y"), "unreadable")
    keys = list(store.tensor_keys())
    assert sorted(keys) == sorted([("0", f"{uid}/{field}") for uid in "012" for field in FIELDS]
                                  + [("1", f"x/{field}") for field in FIELDS])


def test_verify_catches_one_flipped_byte(tmp_path: Path) -> None:
    written = fill_store(tmp_path / "s", 10)
    store = FeatureStore.open(tmp_path / "s")
    assert store.verify() == []
    # Flip one byte inside the stored bytes of segment 7's box tensor (found by its exact payload).
    needle = np.ascontiguousarray(written["7"]["det.global.box"]).tobytes()
    flip_live_byte(tmp_path / "s" / "lmdb" / "0" / "data.mdb", needle, 5, lambda: bool(store.verify()))
    bad = FeatureStore.open(tmp_path / "s").verify()
    assert bad == [("7", "checksum mismatch")]


def test_an_open_reader_sees_segments_and_failures_written_after_it_looked_one_up(tmp_path: Path) -> None:
    # Readers cache the uid -> shard index; a writer's new index part must invalidate it.
    fill_store(tmp_path / "s", 3)
    reader = FeatureStore.open(tmp_path / "s")
    reader.read("0")
    with pytest.raises(KeyError, match="'new'"):
        reader.read("new")
    rng = np.random.default_rng(9)
    new = random_arrays(rng)
    with FeatureStore.open(tmp_path / "s").writer() as writer:
        writer.put(segment_row("new"), new)
        writer.fail(segment_row("broken"), "unreadable frames")
    assert np.array_equal(reader.read("new", ["det.global.box"])["det.global.box"], new["det.global.box"])
    with pytest.raises(KeyError, match="status: failed"):
        reader.read("broken")


def test_read_fields_and_read_ahead_read_the_same_bytes(tmp_path: Path) -> None:
    written = fill_store(tmp_path / "s", 12)
    store = FeatureStore.open(tmp_path / "s")
    uids = ["7", "2", "11", "0"]  # any order, as a shuffled batch asks
    together = store.read_fields(uids, list(FIELDS))
    for field in FIELDS:
        assert np.array_equal(together[field], store.read_field(uids, field))
    assert store.share_of_files(12, FIELDS) > 0
    with store.read_ahead():  # readahead on the maps for a bulk pass, then random access again
        assert all(np.array_equal(store.read_field(uids, f), together[f]) for f in FIELDS)
    assert store.verify() == []
    assert store.lacking(sorted(written), "verb.global") == []


def _two_participants(path: Path) -> FeatureStore:
    """Segments "0".."5": P01 (train side of the LFB split) for even uids, P26 (val side) for odd ones."""
    store = FeatureStore.create(path, fields=FIELDS)
    rng = np.random.default_rng(0)
    with store.writer() as writer:
        for i in range(6):
            writer.put({**segment_row(str(i), verb=i), "participant_id": "P01" if i % 2 == 0 else "P26",
                        "noun_class": None if i == 5 else 7}, random_arrays(rng))
        writer.fail(segment_row("broken"), "unreadable frames")
    return FeatureStore.open(path)


def test_uids_take_a_named_split_as_a_keyword_and_refuse_it_as_sql(tmp_path: Path) -> None:
    store = _two_participants(tmp_path / "s")
    assert store.uids(split="epic55-lfb-val") == ["1", "3", "5"]
    assert store.uids(split="epic55-lfb-train") == ["0", "2", "4"]
    assert store.uids("verb_class >= 3", split="epic55-lfb-val") == ["3", "5"]
    with pytest.raises(StoreError, match=r"'epic55-lfb-val' is a named split.*split='epic55-lfb-val'"):
        store.uids("epic55-lfb-val")
    with pytest.raises(StoreError, match="unknown split 'lfb-val'; known splits: epic55-train"):
        store.segments(split="lfb-val")


def test_labels_are_the_annotation_columns_of_the_stored_segments(tmp_path: Path) -> None:
    store = _two_participants(tmp_path / "s")
    labels = store.labels()
    assert labels.column("uid").to_pylist() == ["0", "1", "2", "3", "4", "5"]  # the failed one left out
    assert {"uid", "participant_id", "video_id", "verb_class", "noun_class", "narration"} <= set(labels.column_names)
    assert not {"status", "checksum", "shard", "error"} & set(labels.column_names)
    by_uid = dict(zip(labels.column("uid").to_pylist(), labels.column("noun_class").to_pylist()))
    assert by_uid["0"] == 7 and by_uid["5"] is None  # unlabelled stays null
    val = store.labels(split="epic55-lfb-val")
    assert val.column("uid").to_pylist() == ["1", "3", "5"]
    assert set(val.column("participant_id").to_pylist()) == {"P26"}
