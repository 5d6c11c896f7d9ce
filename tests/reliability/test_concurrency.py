"""Readers in other processes while a writer appends; two writers pointed at one store by mistake.

DataLoader workers reading a finished store with fork and spawn are covered by
tests/featstore/store/test_environments.py::test_dataloader_workers_read_the_same_bytes_as_one_process; here
forked and spawned readers run *while* another process writes.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import write_feature_npzs
from featstore.store.schema import FieldSpec
from featstore.store.reader import FeatureStore
from featstore.store.writer import segment_checksum
from tests.reliability import faults
from tests.reliability.invariants import assert_store_consistent
from tests.reliability.workloads import (
    BUILD_BOXES_PER_SEGMENT,
    BUILD_FIELDS,
    IMPORT_BOXES_PER_SEGMENT,
    IMPORT_SHAPES,
    build_command,
    import_command,
)

# Writers and readers in several processes: over a minute in all (CI runs them).
pytestmark = pytest.mark.slow

FIELDS = {"verb.global": FieldSpec("float16", (64,)), "verb.map": FieldSpec("float16", (16, 64))}
N_WRITTEN = 500
PAUSES = (100, 250, 400)  # the writer waits here until every reader has read the store as it is


def _row(i: int) -> dict:
    return {"uid": f"u{i:05d}", "participant_id": "P01", "video_id": "P01_01", "start_frame": i + 1,
            "stop_frame": i + 2, "verb_class": i % 5, "noun_class": i % 7}


def _tensors(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {name: rng.standard_normal(spec.shape).astype(np.float16) for name, spec in FIELDS.items()}


def _write(path: str, everyone_ready, n: int, rounds) -> None:
    store = FeatureStore.open(path)
    # A 64 KiB map: it doubles about eight times while the readers read.
    with store.writer(flush_every=3, map_size=1 << 16) as writer:
        everyone_ready.wait()
        for i in range(n):
            if i in PAUSES:
                _wait_for_reads(rounds)
            writer.put(_row(i), _tensors(i))


def _wait_for_reads(rounds, timeout: float = 60.0) -> None:
    """Wait until every reader has finished a round that started after now, so that the reads overlap
    the writes however loaded the machine is (on a busy one the writer can otherwise finish first)."""
    import time

    wanted = [count + 2 for count in rounds[:]]  # the round under way may have started before the pause
    deadline = time.monotonic() + timeout
    while any(count < want for count, want in zip(rounds[:], wanted)) and time.monotonic() < deadline:
        time.sleep(0.01)


def _read_until(path: str, everyone_ready, done, results, shared_rounds, slot: int) -> None:
    """Read everything the index lists as stored, over and over, until the writer is done
    (``shared_rounds[slot]`` counts the finished rounds)."""
    store = FeatureStore.open(path)
    store.uids()
    everyone_ready.wait()
    rounds, seen, problems = 0, [], []
    while True:
        finished = done.is_set()
        try:
            uids = store.uids()
            seen.append(len(uids))
            problems += store.verify(uids)  # one read transaction over all listed segments
            for uid in uids[-5:]:  # the newest ones, each in its own transaction
                i = int(uid[1:])
                arrays = store.read(uid)
                if segment_checksum(arrays) != segment_checksum(_tensors(i)):
                    problems.append((uid, "bytes differ from what was written"))
        except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
            problems.append(("?", repr(err)))
        rounds += 1
        shared_rounds[slot] = rounds
        if finished:
            break
    results.put({"rounds": rounds, "seen": seen, "problems": problems[:10], "n_problems": len(problems)})


def test_readers_in_other_processes_see_only_complete_segments_while_a_writer_appends(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    FeatureStore.create(path, fields=FIELDS)
    FeatureStore.open(path).uids()  # the parent has used the store before forking its readers
    spawn, fork = mp.get_context("spawn"), mp.get_context("fork")
    # Spawn-context synchronisation objects work in forked children too.
    everyone_ready, done, results = spawn.Barrier(3, timeout=120), spawn.Event(), spawn.Queue()
    rounds = spawn.Array("i", 2)
    readers = [spawn.Process(target=_read_until, args=(path, everyone_ready, done, results, rounds, 0)),
               fork.Process(target=_read_until, args=(path, everyone_ready, done, results, rounds, 1))]
    writer = spawn.Process(target=_write, args=(path, everyone_ready, N_WRITTEN, rounds))
    for process in (*readers, writer):
        process.start()
    writer.join(300)
    done.set()
    reports = [results.get(timeout=300) for _ in readers]
    for reader in readers:
        reader.join(60)
    assert writer.exitcode == 0 and [r.exitcode for r in readers] == [0, 0]
    for report in reports:
        assert report["n_problems"] == 0, report["problems"]
        assert report["seen"] == sorted(report["seen"]), "a reader saw stored segments disappear"
        assert len(set(report["seen"])) >= 3, f"the reads did not overlap the writes: {report['seen']}"
        assert report["seen"][-1] == N_WRITTEN
    store = FeatureStore.open(path)
    assert store.verify() == []


def test_a_second_import_into_a_store_being_written_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    segments = generate_segments(20, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(tmp_path / "npz", segments, shapes=IMPORT_SHAPES)
    store, flag = tmp_path / "store", tmp_path / "go"
    first = faults.start(import_command(store, annotations, npz), fault=f"lmdb.commit:5:pause:{flag}")
    faults.wait_for(Path(f"{flag}.waiting"))  # the first holds the shard's lock, mid-import
    second = faults.run(import_command(store, annotations, npz))
    flag.touch()
    out, err = first.communicate(timeout=120)
    assert second.returncode == 1, faults.describe(second)
    assert "is being written by another process" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, out + err
    assert_store_consistent(store, [str(i) for i in range(20)], n_fields=len(IMPORT_SHAPES),
                            boxes_per_segment=IMPORT_BOXES_PER_SEGMENT)


def test_a_second_build_pointed_at_a_store_being_built_is_refused_and_leaves_no_trace(
        build_inputs: dict, tmp_path: Path) -> None:
    store, flag = tmp_path / "store", tmp_path / "go"
    args = (store, build_inputs["annotations"], build_inputs["frames"])
    first = faults.start(build_command(*args), fault=f"lmdb.commit:2:pause:{flag}")  # after one segment
    faults.wait_for(Path(f"{flag}.waiting"))
    manifest = (store / "manifest.json").read_bytes()
    second = faults.run(build_command(*args))
    assert second.returncode == 1, faults.describe(second)
    assert "shard 'rank0' is being written by another process" in second.stderr
    assert "Traceback" not in second.stderr
    assert (store / "manifest.json").read_bytes() == manifest  # the refused run is not recorded
    flag.touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert_store_consistent(store, build_inputs["uids"], n_fields=BUILD_FIELDS,
                            boxes_per_segment=BUILD_BOXES_PER_SEGMENT)
    assert len(FeatureStore.open(store).manifest["provenance"]["runs"]) == 1
