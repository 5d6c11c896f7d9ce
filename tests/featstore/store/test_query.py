"""`featstore query` is read-only: every kind of write and every read outside the store is refused."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from featstore.store.query import QueryError, format_result, run_query
from featstore.store.schema import FieldSpec
from featstore.store.reader import FeatureStore


@pytest.fixture()
def store(tmp_path: Path) -> FeatureStore:
    store = FeatureStore.create(tmp_path / "store", fields={"verb.global": FieldSpec("float16", (4,))})
    with store.writer() as writer:
        for i in range(5):
            writer.put(
                {"uid": f"u{i}", "participant_id": "P01", "video_id": "P01_01", "start_frame": i, "stop_frame": i + 9,
                 "verb_class": i % 2, "noun_class": 3},
                {"verb.global": np.full(4, i)},
                boxes={"set": ["global"], "slot": [0], "x1": [0.1], "y1": [0.2], "x2": [0.3], "y2": [0.4],
                       "score": [0.9], "valid": [True]},
            )
        writer.fail({"uid": "bad", "participant_id": "P01", "video_id": "P01_01", "start_frame": 1, "stop_frame": 2},
                    "corrupt JPEG")
    return FeatureStore.open(tmp_path / "store")


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_select_over_segments_boxes_and_fields(store: FeatureStore) -> None:
    table = run_query(store, "select status, count(*) as n from segments group by status order by status")
    assert table.to_pylist() == [{"status": "failed", "n": 1}, {"status": "ok", "n": 5}]
    assert run_query(store, "select count(*) as n from boxes where valid").to_pylist() == [{"n": 5}]
    assert run_query(store, "select field, dtype, shape from fields").to_pylist() == [
        {"field": "verb.global", "dtype": "float16", "shape": [4]}]
    assert run_query(store, "select uid from segments where verb_class = ? order by uid", [1]).column(
        "uid").to_pylist() == ["u1", "u3"]


def test_formats(store: FeatureStore) -> None:
    table = run_query(store, "select uid, verb_class from segments where status = 'ok' order by uid limit 2")
    assert format_result(table, "csv") == "uid,verb_class\nu0,0\nu1,1"
    assert json.loads(format_result(table, "json")) == [{"uid": "u0", "verb_class": 0}, {"uid": "u1", "verb_class": 1}]
    text = format_result(table, "table")
    assert text.splitlines()[0].split() == ["uid", "|", "verb_class"] and text.endswith("(2 rows)")


HOSTILE = [
    ("copy (select * from segments) to '{store}/x.csv'", "only SELECT"),
    ("copy segments_all to '/tmp/featstore-escape.parquet'", "only SELECT"),
    ("create table t as select 1", "only SELECT"),
    ("insert into segments values (1)", "only SELECT"),
    ("update segments set status = 'ok'", "only SELECT"),
    ("delete from segments", "only SELECT"),
    ("drop view segments", "only SELECT"),
    ("attach '{store}/evil.db' as evil", "only SELECT"),
    ("install httpfs", "only SELECT"),
    ("load httpfs", "only SELECT"),
    ("pragma enable_profiling", "only SELECT"),
    ("set enable_external_access = true", "only SELECT"),
    ("export database '{store}/dump'", "only SELECT"),
    ("select 1; select 2", "exactly one statement"),
    ("select * from read_csv('/etc/passwd')", "query failed"),
    ("select * from read_text('/etc/passwd')", "query failed"),
    ("select * from glob('/etc/*')", "query failed"),
    ("select * from read_parquet('{store}/../*.parquet')", "query failed"),
    ("select * from read_blob('{store}/lmdb/0/data.mdb')", "query failed"),
    ("select * from read_json_auto('{store}/manifest.json')", "query failed"),
    ("select " + " + ".join(["1"] * 12000), "characters"),
]


@pytest.mark.parametrize("sql, reason", HOSTILE)
def test_hostile_statements_are_refused_and_nothing_changes(store: FeatureStore, sql: str, reason: str) -> None:
    before = _digest_tree(store.path)
    with pytest.raises(QueryError, match=reason):
        run_query(store, sql.format(store=store.path))
    assert _digest_tree(store.path) == before
    assert not Path("/tmp/featstore-escape.parquet").exists()


def test_segments_view_works_on_an_empty_store(tmp_path: Path) -> None:
    empty = FeatureStore.create(tmp_path / "empty", fields={"verb.global": FieldSpec("float16", (4,))})
    assert run_query(empty, "select count(*) as n from segments").to_pylist() == [{"n": 0}]
    assert run_query(empty, "select count(*) as n from boxes").to_pylist() == [{"n": 0}]


def test_boxes_are_those_of_each_kept_attempt_and_never_of_a_crashed_export(store: FeatureStore) -> None:
    import shutil

    box_query = "select uid, x1 from boxes order by uid"
    before = run_query(store, box_query).to_pylist()
    assert len(before) == 5
    # A boxes part whose segments part never came (a writer killed between the two): left out.
    part = next((store.path / "boxes").glob("*.parquet"))
    shutil.copy(part, store.path / "boxes" / "part-0-999999999999.parquet")
    assert run_query(FeatureStore.open(store.path), box_query).to_pylist() == before
    # A second ok attempt of u1 with other boxes: only the newest attempt's boxes are seen.
    with store.writer() as writer:
        writer.put({"uid": "u1", "participant_id": "P01", "video_id": "P01_01", "start_frame": 1, "stop_frame": 10,
                    "verb_class": 1, "noun_class": 3}, {"verb.global": np.full(4, 1)},
                   boxes={"set": ["global"], "slot": [0], "x1": [0.5], "y1": [0.2], "x2": [0.6], "y2": [0.4],
                          "score": [0.9], "valid": [True]})
    after = run_query(FeatureStore.open(store.path), box_query).to_pylist()
    assert after == [row if row["uid"] != "u1" else {"uid": "u1", "x1": pytest.approx(0.5)} for row in before]
