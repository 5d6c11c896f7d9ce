"""`featstore query` against hostile statements, through the CLI: each is refused with a clear
error, the store's files stay byte-identical, and nothing appears outside the store.

tests/featstore/store/test_query.py::test_hostile_statements_are_refused_and_nothing_changes covers the
first list (COPY, CREATE, INSERT/UPDATE/DELETE, DROP, ATTACH, INSTALL/LOAD, PRAGMA, SET, EXPORT,
two statements, read_csv/read_text/glob/read_blob/read_json outside the index, 48k characters)
through the library; these are more, through the command.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.featstore_cli import main
from featstore.store.query import MAX_QUERY_CHARS
from featstore.store.schema import FieldSpec
from featstore.store.reader import FeatureStore

REFUSED = "query refused: only SELECT is allowed"
FAILED = "query failed: Permission Error"  # DuckDB's file access check, with the path it refused

HOSTILE = [
    # reads outside the store, by every reader DuckDB has
    ("select * from read_csv_auto('{outside}/secret.csv')", FAILED),
    ("select * from parquet_scan('{outside}/secret.parquet')", FAILED),
    ("select * from '{outside}/secret.parquet'", FAILED),  # a path as a table name (replacement scan)
    ("select * from read_parquet(['{store}/segments/*.parquet', '{outside}/secret.parquet'])", FAILED),
    ("select * from read_parquet('{store}/segments/../../outside/secret.parquet')", FAILED),
    ("select * from read_json('{store}/manifest.json')", FAILED),  # inside the store, outside the index
    ("select * from read_blob('{store}/lmdb/*/*')", FAILED),
    ("select * from glob('{store}/../**')", FAILED),
    ("select * from sniff_csv('/etc/passwd')", FAILED),
    ("summarize select * from read_csv('{outside}/secret.csv')", FAILED),
    ("summarize '{outside}/secret.parquet'", FAILED),
    ("describe select * from '{outside}/secret.parquet'", FAILED),
    ("describe '{outside}/secret.csv'", FAILED),
    ("select * from read_ndjson_objects('/etc/hostname')", FAILED),
    # DuckDB's default spill folder ('.tmp' under the working directory) was readable: fixed
    ("select * from read_csv('{cwd}/.tmp/leak.csv')", FAILED),
    ("select * from duckdb_secrets()", FAILED),  # would read ~/.duckdb/stored_secrets
    ("select * from which_secret('s3://bucket/key', 's3')", FAILED),
    ("select * from duckdb_extensions()", FAILED),  # would list ~/.duckdb/extensions
    # writes, however they are spelled
    ("copy (with t as (select * from segments) select * from t) to '{outside}/x.csv'", REFUSED),
    ("with t as (select * from segments) copy t to '{outside}/x.csv'", "query does not parse"),
    ("select * from query('copy (select 1) to ''{outside}/x.csv''')", "query failed"),
    ("export database '{outside}/dump'", REFUSED),
    ("pivot segments on status using count(*)", REFUSED),  # PIVOT creates an enum type first
    ("select * from (pivot segments on status using count(*))", REFUSED),
    ("create macro leak(a) as a", REFUSED),
    ("create or replace temp view v as select 1", REFUSED),
    ("update segments set status = 'ok' returning *", REFUSED),
    ("checkpoint", REFUSED),
    ("begin transaction", REFUSED),
    # statements that change the session or the database list
    ("call pragma_version()", REFUSED),
    ("call duckdb_settings()", REFUSED),
    ("pragma version", REFUSED),
    ("set allowed_directories = ['/']", REFUSED),
    ("reset enable_external_access", REFUSED),
    ("use memory", REFUSED),
    ("attach ':memory:' as scratch", REFUSED),
    ("detach memory", REFUSED),
    ("load parquet", REFUSED),
    ("force install httpfs", REFUSED),
    ("install httpfs from 'http://example.invalid'", REFUSED),
    ("explain analyze select 1", REFUSED),
    ("prepare p as select 1", REFUSED),
    ("select * from query('set enable_external_access = true')", "query failed"),
    # several statements, long and deep ones
    ("select 1; attach '{outside}/x.db' as x", "exactly one statement"),
    ("select count(*) from segments; copy segments to '{outside}/x.csv'", "exactly one statement"),
    ("select '" + "x" * MAX_QUERY_CHARS + "'", "characters"),
    ("select " + "(" * 1500 + "1" + ")" * 1500, "query does not parse"),  # DuckDB's depth limit, not a crash
]


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _make_store(path: Path) -> Path:
    store = FeatureStore.create(path, fields={"verb.global": FieldSpec("float16", (4,))})
    with store.writer() as writer:
        for i in range(4):
            writer.put({"uid": f"u{i}", "participant_id": "P01", "video_id": "P01_01", "start_frame": i + 1,
                        "stop_frame": i + 9, "verb_class": i % 2, "noun_class": 3},
                       {"verb.global": np.full(4, i)},
                       boxes={"set": ["global"], "slot": [0], "x1": [0.1], "y1": [0.2], "x2": [0.3], "y2": [0.4],
                              "score": [0.9], "valid": [True]})
    store.close()
    return path


@pytest.fixture()
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), outside / "secret.parquet")
    (outside / "secret.csv").write_text("secret\ns3cr3t\n")
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "leak.csv").write_text("secret\ns3cr3t\n")
    monkeypatch.chdir(cwd)
    return {"store": _make_store(tmp_path / "store"), "outside": outside, "cwd": cwd}


def _query(store: Path, sql: str):
    return CliRunner().invoke(main, ["query", str(store), sql, "--format", "csv"])


@pytest.mark.parametrize("sql, reason", HOSTILE, ids=[f"{i:02d}-{sql[:40]}" for i, (sql, _) in enumerate(HOSTILE)])
def test_hostile_statement_is_refused_and_nothing_changes(places: dict[str, Path], sql: str, reason: str) -> None:
    store, outside, cwd = places["store"], places["outside"], places["cwd"]
    before, outside_before, cwd_before = _digest_tree(store), _digest_tree(outside), _digest_tree(cwd)
    result = _query(store, sql.format(**{k: str(v) for k, v in places.items()}))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and reason in result.output, result.output
    assert "s3cr3t" not in result.output and "Traceback" not in result.output
    assert _digest_tree(store) == before
    assert _digest_tree(outside) == outside_before and _digest_tree(cwd) == cwd_before


def test_reads_inside_the_index_still_work(places: dict[str, Path]) -> None:
    """SUMMARIZE and DESCRIBE are reads: of the store's views they are allowed (of files outside
    the index they are refused above)."""
    store = places["store"]
    for sql, expected in [
        ("select count(*) as n from segments", "n\n4"),
        ("summarize segments", None),
        ("describe boxes", None),
        ("with t as (select uid from segments where verb_class = 1) select count(*) as n from t", "n\n2"),
        (f"select count(*) as n from read_parquet('{store}/segments/*.parquet')", "n\n4"),
    ]:
        result = _query(store, sql)
        assert result.exit_code == 0, (sql, result.output)
        if expected is not None:
            assert result.output.strip() == expected


@pytest.mark.parametrize("link", ["file", "folder"])
def test_a_symlink_in_the_index_pointing_outside_is_refused_naming_it(places: dict[str, Path], link: str) -> None:
    """A part (or a folder of parts) linked in from elsewhere is not read: DuckDB checks the resolved
    path, so the store's every query fails, naming the link, until it is removed."""
    store, outside = places["store"], places["outside"]
    target = outside / "secret.parquet" if link == "file" else outside
    name = store / "segments" / ("evil.parquet" if link == "file" else "evil")
    os.symlink(target, name)
    before, outside_before = _digest_tree(store), _digest_tree(outside)
    sql = ("select * from segments" if link == "file"
           else f"select * from read_parquet('{store}/segments/evil/*.parquet')")
    result = _query(store, sql)
    assert result.exit_code == 1 and "Permission Error" in result.output, result.output
    assert "evil" in result.output and "s3cr3t" not in result.output and "Traceback" not in result.output
    assert _digest_tree(store) == before and _digest_tree(outside) == outside_before
    name.unlink()
    assert _query(store, "select count(*) as n from segments").output.strip() == "n\n4"
