"""Writing a store: failures in the index, map growth, one writer per shard, crash recovery, checksums."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec
from featstore.store.writer import segment_checksum
from tests.featstore.store.small_store import FIELDS, random_arrays, segment_row


def test_failed_segment_is_indexed_with_reason_and_not_readable(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", fields=FIELDS)
    with store.writer() as writer:
        writer.put(segment_row("a"), random_arrays(np.random.default_rng(0)))
        writer.fail(segment_row("b"), "frame_0000000031.jpg is missing")
    table = store.segments()
    status = dict(zip(table.column("uid").to_pylist(), table.column("status").to_pylist()))
    assert status == {"a": "ok", "b": "failed"}
    assert store.segments("uid = 'b'").column("error").to_pylist() == ["frame_0000000031.jpg is missing"]
    with pytest.raises(KeyError, match="not a stored segment"):
        store.read("b")
    # A later success replaces the failure in the index: one row per uid.
    with store.writer() as writer:
        writer.put(segment_row("b"), random_arrays(np.random.default_rng(1)))
    assert store.segments().column("status").to_pylist() == ["ok", "ok"]


def test_map_grows_past_its_initial_size(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", fields={"verb.map": FieldSpec("float16", (64, 32, 32))})
    initial = 1 << 20  # 1 MiB; each segment is 128 KiB
    with store.writer(map_size=initial, flush_every=8) as writer:
        for i in range(40):
            writer.put(segment_row(str(i)), {"verb.map": np.full((64, 32, 32), i, np.float32)})
        assert writer.map_grows >= 2
        assert writer.env.info()["map_size"] > initial
    reopened = FeatureStore.open(tmp_path / "s")
    assert len(reopened.uids()) == 40
    assert reopened.read("39")["verb.map"][0, 0, 0] == 39
    assert reopened.verify() == []


def test_second_writer_on_the_same_shard_is_refused(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", fields=FIELDS)
    with store.writer("0"):
        code = (
            "import sys; from featstore.store.reader import FeatureStore; from featstore.store.schema import StoreLockedError\n"
            f"s = FeatureStore.open({str(tmp_path / 's')!r})\n"
            "try:\n    s.writer('0')\nexcept StoreLockedError as e:\n    print('LOCKED', e); sys.exit(3)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 3, result.stderr
        assert "one writer per shard" in result.stdout
        with store.writer("1"):  # another shard is fine
            pass


_KILL_SCRIPT = """
import os, signal, sys
import numpy as np
from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec
path, n, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = FeatureStore.create(path, fields={"verb.global": FieldSpec("float16", (16,))})
writer = store.writer(flush_every=4)
done = set(store.uids())
for i in range(n):
    uid = str(i)
    if uid in done:
        continue
    writer.put({"uid": uid, "participant_id": "P01", "video_id": "P01_01", "start_frame": 1, "stop_frame": 2},
               {"verb.global": np.full(16, i, np.float32)})
    if i == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
writer.close()
"""


def test_killed_writer_loses_nothing_committed_and_rerun_stores_each_segment_once(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    first = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, path, "30", "13"], capture_output=True)
    assert first.returncode == -signal.SIGKILL
    # Segments 0..13 were committed; 12 had been exported to Parquet (flush every 4), 13 was only in
    # the LMDB journal. A read-only open sees the exported ones; the next writer recovers the rest.
    assert len(FeatureStore.open(path).uids()) == 12
    second = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, path, "30", "-1"], capture_output=True)
    assert second.returncode == 0, second.stderr.decode()
    store = FeatureStore.open(path)
    with store.connect() as con:
        assert con.execute("select count(*), count(distinct uid) from segments").fetchone() == (30, 30)
    assert store.uids() == sorted(str(i) for i in range(30))
    assert all(store.read(str(i))["verb.global"][0] == i for i in range(30))
    assert store.verify() == []


def test_checksum_depends_on_every_byte_and_the_shape() -> None:
    a = {"x": np.arange(6, dtype=np.float16)}
    b = {"x": np.arange(6, dtype=np.float16).reshape(2, 3)}
    c = {"x": np.arange(6, dtype=np.float16)}
    c["x"][5] = 6
    assert len({segment_checksum(a), segment_checksum(b), segment_checksum(c)}) == 3
