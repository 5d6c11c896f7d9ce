"""What must hold after any crash or failed write and a rerun: the checks the reliability tests share."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main

INDEX_FOLDERS = ("segments", "boxes")


def visible_parts(store: Path, folder: str) -> list[Path]:
    """The Parquet files a reader takes for complete: ``FOLDER/*.parquet`` (the views' glob)."""
    return sorted((store / folder).glob("*.parquet"))


def assert_parts_complete(store: Path) -> None:
    """Every visible Parquet part reads whole (footer, every row group, every column)."""
    for folder in INDEX_FOLDERS:
        for part in visible_parts(store, folder):
            try:
                table = pq.read_table(part)
                assert table.num_rows == pq.ParquetFile(part).metadata.num_rows
            except Exception as err:  # noqa: BLE001 - any failure means a half-written part is visible
                raise AssertionError(f"{part} is visible to readers but unreadable: {err}") from err


def leftover_temporaries(store: Path) -> list[Path]:
    return sorted(p for folder in INDEX_FOLDERS for p in (store / folder).glob(".*.tmp"))


def raw_table(store: Path, folder: str) -> pa.Table:
    parts = visible_parts(store, folder)
    if not parts:
        return pa.table({"uid": pa.array([], pa.string())})
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")


def lmdb_segment_keys(store: Path) -> Counter:
    """uid -> number of tensor keys over every shard (journal and bookkeeping keys excluded).

    Read through the store's own per-process environments: LMDB forbids opening one environment
    twice in a process.
    """
    from featstore.store.reader import FeatureStore

    opened = FeatureStore.open(store)
    counts: Counter = Counter()
    for _shard, key in opened.tensor_keys():
        counts[key.rsplit("/", 1)[0]] += 1
    return counts


def assert_store_consistent(store: Path, ok: Iterable[str], *, failed: Iterable[str] = (),
                            n_fields: int, boxes_per_segment: int | None = None) -> None:
    """The crash-consistency contract, checked on the files themselves.

    - every visible Parquet part is complete; no temporary part is left (the rerun's writer
      removes its shard's);
    - every uid in ``ok`` has exactly one ``ok`` row in the raw index parts (not just in the
      deduplicating view), its ``n_fields`` tensors exactly once in LMDB, and (when given)
      ``boxes_per_segment`` box rows; no other uid is stored;
    - the ``segments`` view has one row per selected uid;
    - ``featstore verify`` recomputes every checksum and exits 0.
    """
    ok, failed = sorted(ok), sorted(failed)
    assert_parts_complete(store)
    assert leftover_temporaries(store) == []
    segments = raw_table(store, "segments")
    ok_rows = Counter(uid for uid, status in zip(segments.column("uid").to_pylist(),
                                                 segments.column("status").to_pylist()) if status == "ok")
    assert sorted(ok_rows) == ok, "stored uids differ from the selection"
    assert set(ok_rows.values()) <= {1}, {u: n for u, n in ok_rows.items() if n > 1}
    assert lmdb_segment_keys(store) == Counter({uid: n_fields for uid in ok})
    if boxes_per_segment is not None:
        boxes = Counter(raw_table(store, "boxes").column("uid").to_pylist())
        assert boxes == Counter({uid: boxes_per_segment for uid in ok})
    from featstore.store.reader import FeatureStore

    with FeatureStore.open(store).connect() as con:
        rows = con.execute(
            "select status, count(*), count(distinct uid) from segments group by 1 order by 1").fetchall()
    expected = [(status, len(uids), len(uids)) for status, uids in (("failed", failed), ("ok", ok)) if uids]
    assert rows == expected
    verify = CliRunner().invoke(featstore_main, ["verify", str(store), "--no-progress"])
    assert verify.exit_code == 0, verify.output
    assert f"{len(ok)} segments verified" in verify.output


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def assert_same_run(run: Path, reference: Path) -> None:
    """``run`` holds exactly what the uninterrupted ``reference`` run wrote, and nothing half-written."""
    assert sorted(p.name for p in run.glob(".*.tmp")) == []
    assert sorted(p.name for p in (run / "checkpoints").glob(".*.tmp")) == []
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert pq.read_table(run / "predictions.parquet").equals(pq.read_table(reference / "predictions.parquet"))
    assert _without_timing(json.loads((run / "history.json").read_text())) == _without_timing(
        json.loads((reference / "history.json").read_text()))
    assert len(json.loads((run / "history.json").read_text())) == 3
    # A finished run keeps its weights (checkpoint.pt); its resume state is deleted.
    assert not (run / "checkpoints" / "last.pt").exists()
    got = torch.load(run / "checkpoint.pt", weights_only=False)
    want = torch.load(reference / "checkpoint.pt", weights_only=False)
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_views_store_consistent(store: Path, views: dict[str, int], *, n_fields: int,
                                  boxes_per_view: int) -> None:
    """`assert_store_consistent` for a store with temporal views (docs/views.md): ``views`` maps each
    stored uid to its number of views, and every view must be stored exactly once -- one ``ok`` row
    in the raw index parts, its ``n_fields`` tensors under its key, ``boxes_per_view`` box rows --
    with every segment's views all there or none, and ``featstore verify`` passing on every view."""
    from featstore.store.schema import view_key

    assert_parts_complete(store)
    assert leftover_temporaries(store) == []
    expected = Counter({view_key(uid, view): 1 for uid, count in views.items() for view in range(count)})
    segments = raw_table(store, "segments")
    ok_rows = Counter(view_key(uid, view or 0) for uid, view, status in zip(
        segments.column("uid").to_pylist(), segments.column("view").to_pylist(), segments.column("status").to_pylist())
        if status == "ok")
    assert ok_rows == expected, {k: n for k, n in ok_rows.items() if expected.get(k) != n}
    assert lmdb_segment_keys(store) == Counter({key: n_fields for key in expected})
    boxes = raw_table(store, "boxes")
    box_rows = Counter(view_key(uid, view or 0) for uid, view in zip(boxes.column("uid").to_pylist(),
                                                                      boxes.column("view").to_pylist()))
    assert box_rows == Counter({key: boxes_per_view for key in expected})
    verify = CliRunner().invoke(featstore_main, ["verify", str(store), "--no-progress"])
    assert verify.exit_code == 0, verify.output
    assert f"{len(views)} segments ({sum(views.values())} views) verified" in verify.output
