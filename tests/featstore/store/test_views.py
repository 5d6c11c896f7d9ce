"""Temporal views in the store (docs/views.md): keys, index rows, query, verify, derive, copy, import.

Stores are written through the writer (`StoreWriter.put_views`) with small random tensors: the
build's own views are tested in tests/featstore/extract/test_views.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from cli.featstore_cli import main
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.importer import import_npz
from featstore.store.local_pool import pool_local_verb_features
from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec, FieldMismatchError, StoreError, view_key
from featstore.store.transform import DeriveError, copy_store, derive_field
from tests.featstore.store.small_store import FIELDS, fill_store, random_arrays, segment_row

VIEWS = {"a": 3, "b": 1, "c": 2}  # uid -> views
MAP_FIELDS = {
    "verb.map": FieldSpec("float16", (8, 2, 5, 7)),
    "det.local.box": FieldSpec("float32", (4, 4)),
    "det.local.score": FieldSpec("float32", (4,)),
}


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _view_row(uid: str, view: int) -> dict:
    return {**segment_row(uid), "view": view, "clip_start_frame": 1 + view, "clip_stop_frame": 20 + view,
            "clip_center": 10 + view, "window_center": 10 + view}


def _map_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    boxes = np.sort(rng.random((4, 2, 2)), axis=1).reshape(4, 4)[:, [0, 2, 1, 3]]  # x1 < x2, y1 < y2
    return {"verb.map": rng.standard_normal((8, 2, 5, 7)).astype(np.float32), "det.local.box": boxes.astype(np.float32),
            "det.local.score": rng.random(4).astype(np.float32) + 0.1}


def _views_store(path: Path, *, fields=FIELDS, arrays=random_arrays) -> dict[str, list[dict[str, np.ndarray]]]:
    """A store recording views: segment uid has VIEWS[uid] views, committed together."""
    store = FeatureStore.create(path, fields=fields, provenance={"views": {"count": 3}})
    rng = np.random.default_rng(0)
    written = {}
    with store.writer() as writer:
        for uid, count in VIEWS.items():
            written[uid] = [arrays(rng) for _ in range(count)]
            writer.put_views([(_view_row(uid, v), written[uid][v], None) for v in range(count)])
    return written


def test_each_view_is_an_index_row_and_a_key_of_its_own(tmp_path: Path) -> None:
    written = _views_store(tmp_path / "s")
    store = FeatureStore.open(tmp_path / "s")
    assert store.uids() == ["a", "b", "c"]  # view 0: one row per segment, as a store without views
    assert len(store.segments(view=None)) == 6 and store.segments(view=2).column("uid").to_pylist() == ["a"]
    assert store.view_counts(["a", "b", "c"]) == [3, 1, 2] and store.max_views == 3
    for uid, views in written.items():
        for view, arrays in enumerate(views):
            got = store.read(uid, view=view)
            assert np.array_equal(got["det.global.box"], arrays["det.global.box"])
    keys = [view_key("a", 2), view_key("c", 1), "b"]
    assert keys == ["a/v2", "c/v1", "b"]
    stacked = store.read_field(keys, "det.global.score")
    assert np.array_equal(stacked[0], written["a"][2]["det.global.score"])
    assert {key.rsplit("/", 1)[0] for _, key in store.tensor_keys()} == {"a", "a/v1", "a/v2", "b", "c", "c/v1"}
    rows = _invoke("query", tmp_path / "s", "select uid, view, clip_center from segments order by uid, view",
                   "--format", "json")
    assert json.loads(rows.output)[:3] == [{"uid": "a", "view": v, "clip_center": 10 + v} for v in range(3)]
    assert "3 segments (6 views) verified" in _invoke("verify", tmp_path / "s", "--no-progress").output


def test_a_segments_views_are_written_together_or_not_at_all(tmp_path: Path) -> None:
    _views_store(tmp_path / "s")
    store = FeatureStore.open(tmp_path / "s")
    rng = np.random.default_rng(1)
    bad = random_arrays(rng)
    bad["verb.global"] = bad["verb.global"][:3]
    with store.writer() as writer, pytest.raises(FieldMismatchError):
        writer.put_views([(_view_row("d", 0), random_arrays(rng), None), (_view_row("d", 1), bad, None)])
    assert "d" not in FeatureStore.open(tmp_path / "s").uids(status=None)
    with FeatureStore.create(tmp_path / "plain", fields=FIELDS).writer() as writer, pytest.raises(StoreError,
                                                                                                  match="no views"):
        writer.put(_view_row("x", 1), random_arrays(rng))


def test_verify_checks_every_view_and_names_the_damaged_one(tmp_path: Path) -> None:
    _views_store(tmp_path / "s")
    store = FeatureStore.open(tmp_path / "s")
    shard = store.path / "lmdb" / "0"
    import lmdb

    store.close()
    env = lmdb.open(str(shard), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(b"a/v2/verb.global"))
        raw[0] ^= 0xFF
        txn.put(b"a/v2/verb.global", bytes(raw))
    env.close()
    assert FeatureStore.open(tmp_path / "s").verify() == [("a/v2", "checksum mismatch")]


def test_a_store_without_views_reads_as_before_and_shows_view_zero(tmp_path: Path) -> None:
    fill_store(tmp_path / "s", 3)
    for part in (tmp_path / "s" / "segments").glob("*.parquet"):
        assert "view" not in pq.read_schema(part).names  # the files are written as before
    store = FeatureStore.open(tmp_path / "s")
    assert store.max_views == 1 and store.view_counts(["0", "1"]) == [1, 1]
    result = _invoke("query", tmp_path / "s", "select view, count(*) as n from boxes group by view "
                     "union all select view, count(*) from segments group by view", "--format", "json")
    assert json.loads(result.output) == [{"view": 0, "n": 3}]
    assert "3 segments verified" in _invoke("verify", tmp_path / "s", "--no-progress").output


def test_derive_pools_each_views_map_at_its_own_boxes(tmp_path: Path) -> None:
    written = _views_store(tmp_path / "s", fields=MAP_FIELDS, arrays=_map_arrays)
    report = derive_field(tmp_path / "s", progress=False)
    assert report.complete and report.derived == 6
    store = FeatureStore.open(tmp_path / "s")
    for uid, views in written.items():
        for view, arrays in enumerate(views):
            expected = pool_local_verb_features(
                torch.from_numpy(arrays["verb.map"].astype(np.float16).astype(np.float32))[None],
                torch.from_numpy(arrays["det.local.box"])[None])[0].half().numpy()
            assert np.array_equal(store.read(uid, ["verb.local"], view=view)["verb.local"], expected)
    assert store.verify() == []
    again = derive_field(tmp_path / "s", progress=False)
    assert again.complete and again.already == 6 and again.derived == 0


def test_copy_keeps_the_views_its_selection_names(tmp_path: Path) -> None:
    written = _views_store(tmp_path / "s")
    whole = copy_store(tmp_path / "s", tmp_path / "all", progress=False)
    assert whole.copied == 6 and FeatureStore.open(tmp_path / "all").view_counts(["a", "b", "c"]) == [3, 1, 2]
    result = _invoke("copy", tmp_path / "s", tmp_path / "first", "--where", "view = 0", "--no-progress")
    assert result.exit_code == 0, result.output
    first = FeatureStore.open(tmp_path / "first")
    assert first.max_views == 1 and first.uids() == ["a", "b", "c"]
    assert np.array_equal(first.read("a")["verb.global"], written["a"][0]["verb.global"].astype(np.float16))
    some = copy_store(tmp_path / "s", tmp_path / "some", where="view <> 1", progress=False)
    assert some.copied == 4
    with pytest.raises(DeriveError, match="without their view 0"):
        copy_store(tmp_path / "s", tmp_path / "orphans", where="view = 2", progress=False)


def test_import_writes_view_zero_only(tmp_path: Path) -> None:
    segments = generate_segments(4, num_verbs=3, num_nouns=3, seed=0)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    shapes = feature_shapes(verb_dim=8, noun_dim=8, det_dim=4, n_global=3, n_local=2, map_size=(1, 2, 2))
    write_feature_npzs(tmp_path / "npz", segments, shapes=shapes, seed=0)
    import_npz(tmp_path / "store", annotations, tmp_path / "npz", progress=False)
    store = FeatureStore.open(tmp_path / "store")
    assert store.max_views == 1 and len(store.segments(view=None)) == 4
    assert set(store.segments(view=None).column("view").to_pylist()) == {0}
