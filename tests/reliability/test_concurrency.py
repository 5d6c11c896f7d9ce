"""Readers in other processes while a writer appends; two writers pointed at one store by mistake.

DataLoader workers reading a finished store with fork and spawn are covered by
tests/featstore/store/test_environments.py::test_dataloader_workers_read_the_same_bytes_as_one_process; here
forked and spawned readers run *while* another process writes.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import write_feature_npzs
from featstore.store.reader import FeatureStore
from tests.reliability import faults
from tests.reliability.invariants import assert_store_consistent
from tests.reliability.store_processes import APPEND_FIELDS, N_APPENDED, append_with_pauses, read_until
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


def test_readers_in_other_processes_see_only_complete_segments_while_a_writer_appends(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    FeatureStore.create(path, fields=APPEND_FIELDS)
    FeatureStore.open(path).uids()  # the parent has used the store before forking its readers
    spawn, fork = mp.get_context("spawn"), mp.get_context("fork")
    # Spawn-context synchronisation objects work in forked children too.
    everyone_ready, done, results = spawn.Barrier(3, timeout=120), spawn.Event(), spawn.Queue()
    rounds = spawn.Array("i", 2)
    readers = [spawn.Process(target=read_until, args=(path, everyone_ready, done, results, rounds, 0)),
               fork.Process(target=read_until, args=(path, everyone_ready, done, results, rounds, 1))]
    writer = spawn.Process(target=append_with_pauses, args=(path, everyone_ready, N_APPENDED, rounds))
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
        assert report["seen"][-1] == N_APPENDED
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
