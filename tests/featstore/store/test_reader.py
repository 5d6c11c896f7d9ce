"""The store contract: round trip, integrity, growth, fork safety, locking, crash recovery."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featstore.store.schema import (
    FieldMismatchError,
    FieldSpec,
    FormatVersionError,
    StoreError,
)
from featstore.store.reader import FeatureStore, segment_checksum
from tests.corruption import flip_live_byte

FIELDS = {
    "verb.global": FieldSpec("float16", (16,)),
    "det.global.box": FieldSpec("float32", (6, 4)),
    "det.global.score": FieldSpec("float32", (6,)),
}


def _row(uid: str, verb: int = 1) -> dict:
    return {"uid": uid, "participant_id": "P01", "video_id": "P01_01", "start_frame": 1, "stop_frame": 30,
            "verb_class": verb, "noun_class": 2, "dataset": "epic55", "source": "EPIC_train_action_labels"}


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "verb.global": rng.standard_normal(16).astype(np.float32),
        "det.global.box": rng.random((6, 4)).astype(np.float32),
        "det.global.score": rng.random(6).astype(np.float32),
    }


def _fill(path: Path, n: int, *, seed: int = 0, **writer_kwargs) -> dict[str, dict[str, np.ndarray]]:
    store = FeatureStore.create(path, fields=FIELDS, provenance={"test": True})
    rng = np.random.default_rng(seed)
    written = {}
    with store.writer(**writer_kwargs) as writer:
        for i in range(n):
            written[str(i)] = _arrays(rng)
            writer.put(_row(str(i)), written[str(i)])
    return written


def test_round_trip_float16_within_precision_float32_exact(tmp_path: Path) -> None:
    written = _fill(tmp_path / "s", 20)
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
    _fill(tmp_path / "s", 2)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["fields"]["det.global.box"] == {"dtype": "float32", "shape": [6, 4]}
    assert manifest["provenance"] == {"test": True}
    with pytest.raises(FieldMismatchError, match="already holds fields"):
        FeatureStore.create(tmp_path / "s", fields={"verb.global": FieldSpec("float16", (8,))})
    store = FeatureStore.open(tmp_path / "s")
    with store.writer() as writer, pytest.raises(FieldMismatchError, match=r"verb.global has shape \[8\]"):
        writer.put(_row("x"), {**_arrays(np.random.default_rng(0)), "verb.global": np.zeros(8)})


def test_other_format_version_and_missing_manifest_are_clear_errors(tmp_path: Path) -> None:
    _fill(tmp_path / "s", 1)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FormatVersionError, match="format version 99"):
        FeatureStore.open(tmp_path / "s")
    manifest_path.unlink()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        FeatureStore.open(tmp_path / "s")


def test_failed_segment_is_indexed_with_reason_and_not_readable(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", fields=FIELDS)
    with store.writer() as writer:
        writer.put(_row("a"), _arrays(np.random.default_rng(0)))
        writer.fail(_row("b"), "frame_0000000031.jpg is missing")
    table = store.segments()
    status = dict(zip(table.column("uid").to_pylist(), table.column("status").to_pylist()))
    assert status == {"a": "ok", "b": "failed"}
    assert store.segments("uid = 'b'").column("error").to_pylist() == ["frame_0000000031.jpg is missing"]
    with pytest.raises(KeyError, match="not a stored segment"):
        store.read("b")
    # A later success replaces the failure in the index: one row per uid.
    with store.writer() as writer:
        writer.put(_row("b"), _arrays(np.random.default_rng(1)))
    assert store.segments().column("status").to_pylist() == ["ok", "ok"]


def test_tensor_keys_list_every_stored_tensor_per_shard_and_no_bookkeeping(tmp_path: Path) -> None:
    _fill(tmp_path / "s", 3)
    store = FeatureStore.open(tmp_path / "s")
    with store.writer(shard="1") as writer:
        writer.put(_row("x"), _arrays(np.random.default_rng(5)))
        writer.fail(_row("y"), "unreadable")
    keys = list(store.tensor_keys())
    assert sorted(keys) == sorted([("0", f"{uid}/{field}") for uid in "012" for field in FIELDS]
                                  + [("1", f"x/{field}") for field in FIELDS])


def test_verify_catches_one_flipped_byte(tmp_path: Path) -> None:
    written = _fill(tmp_path / "s", 10)
    store = FeatureStore.open(tmp_path / "s")
    assert store.verify() == []
    # Flip one byte inside the stored bytes of segment 7's box tensor (found by its exact payload).
    needle = np.ascontiguousarray(written["7"]["det.global.box"]).tobytes()
    flip_live_byte(tmp_path / "s" / "lmdb" / "0" / "data.mdb", needle, 5, lambda: bool(store.verify()))
    bad = FeatureStore.open(tmp_path / "s").verify()
    assert bad == [("7", "checksum mismatch")]


def test_map_grows_past_its_initial_size(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", fields={"verb.map": FieldSpec("float16", (64, 32, 32))})
    initial = 1 << 20  # 1 MiB; each segment is 128 KiB
    with store.writer(map_size=initial, flush_every=8) as writer:
        for i in range(40):
            writer.put(_row(str(i)), {"verb.map": np.full((64, 32, 32), i, np.float32)})
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


class _FieldDataset:
    def __init__(self, store: FeatureStore, uids: list[str]):
        self.store, self.uids = store, uids

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: int):
        arrays = self.store.read(self.uids[i], ["verb.global", "det.global.box"])
        return self.uids[i], arrays["verb.global"].tobytes() + arrays["det.global.box"].tobytes(), os.getpid()


# spawn starts a fresh interpreter per worker: seconds each.
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_read_the_same_bytes_as_one_process(tmp_path: Path, context: str) -> None:
    import torch.utils.data

    _fill(tmp_path / "s", 24)
    store = FeatureStore.open(tmp_path / "s")
    uids = store.uids()
    store.read(uids[0])  # open the environment in the parent first: children must not reuse it
    expected = {uid: store.read(uid, ["verb.global", "det.global.box"]) for uid in uids}
    loader = torch.utils.data.DataLoader(
        _FieldDataset(store, uids), batch_size=None, num_workers=2,
        multiprocessing_context=mp.get_context(context),
    )
    pids = set()
    seen = {}
    for uid, raw, pid in loader:
        seen[uid] = raw
        pids.add(pid)
    assert len(pids) == 2 and os.getpid() not in pids
    assert seen == {u: a["verb.global"].tobytes() + a["det.global.box"].tobytes() for u, a in expected.items()}


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


def test_an_open_reader_sees_segments_and_failures_written_after_it_looked_one_up(tmp_path: Path) -> None:
    # Readers cache the uid -> shard index; a writer's new index part must invalidate it.
    _fill(tmp_path / "s", 3)
    reader = FeatureStore.open(tmp_path / "s")
    reader.read("0")
    with pytest.raises(KeyError, match="'new'"):
        reader.read("new")
    rng = np.random.default_rng(9)
    new = _arrays(rng)
    with FeatureStore.open(tmp_path / "s").writer() as writer:
        writer.put(_row("new"), new)
        writer.fail(_row("broken"), "unreadable frames")
    assert np.array_equal(reader.read("new", ["det.global.box"])["det.global.box"], new["det.global.box"])
    with pytest.raises(KeyError, match="status: failed"):
        reader.read("broken")


def test_read_fields_and_read_ahead_read_the_same_bytes(tmp_path: Path) -> None:
    written = _fill(tmp_path / "s", 12)
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


def test_reader_threads_open_a_closed_shard_once(tmp_path: Path) -> None:
    import threading

    written = _fill(tmp_path / "s", 8)
    store = FeatureStore.open(tmp_path / "s")
    errors: list[Exception] = []
    for _ in range(20):
        store.close()  # e.g. between epochs: every reader thread then finds the shard closed at once
        barrier = threading.Barrier(16)

        def read() -> None:
            barrier.wait()
            try:
                store.read_fields(sorted(written), ["verb.global"])
            except Exception as err:  # noqa: BLE001 - collected for the assertion
                errors.append(err)

        threads = [threading.Thread(target=read) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
