"""`featstore import` SIGKILLed at exact I/O points and at seeded random times, then rerun.

300 segments: the importer exports Parquet every 256 segments and at the end, so a run commits
LMDB 302 times (300 segments, then the "exported up to" marker after each export), writes four
Parquet parts (boxes, then segments, twice) and renames five files (the manifest, then each part).
The kill points below are numbered on those calls. After every kill the same command is rerun
to completion and the store must equal an uninterrupted import's, segment for segment.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import write_feature_npzs
from featstore.store.reader import FeatureStore
from tests.reliability import faults
from tests.reliability.invariants import assert_store_consistent
from tests.reliability.workloads import (
    IMPORT_BOXES_PER_SEGMENT,
    IMPORT_SHAPES,
    import_command,
)

# An import killed at each I/O point and rerun, in subprocesses: minutes in all (CI runs them).
pytestmark = pytest.mark.slow

N_SEGMENTS = 300

# (fault, what the process is doing when it dies)
KILL_POINTS = [
    ("lmdb.commit:1:kill", "the first segment's transaction, before its commit"),
    ("lmdb.commit:97:kill-during", "inside LMDB's commit of segment 97"),
    ("lmdb.commit:200:kill-after", "right after segment 200 committed, nothing of it exported"),
    ("parquet.write:1:kill-during", "half-way through the first boxes part"),
    ("parquet.write:2:kill-during", "half-way through the first segments part (its boxes part is out)"),
    ("os.replace:3:kill", "the first segments part complete under its temporary name"),
    ("lmdb.commit:257:kill", "the first export renamed, its 'exported up to' marker not committed"),
    ("lmdb.commit:283:kill-during", "inside the commit of segment 282, after an export"),
    ("parquet.write:4:kill-during", "half-way through the final segments part"),
    ("os.replace:1:kill", "the manifest written under its temporary name, not renamed"),
    ("os.replace:1:kill-after", "the manifest renamed, the store's folders not made yet"),
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("import-sample")
    segments = generate_segments(N_SEGMENTS, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(root / "npz", segments, shapes=IMPORT_SHAPES)
    reference = root / "reference"
    faults.warm_up()  # its "seconds" time the import alone: the seeded kills fall inside an import
    started = time.monotonic()
    done = faults.run(import_command(reference, annotations, npz))
    assert done.returncode == 0, faults.describe(done)
    return annotations, npz, {"store": reference, "seconds": time.monotonic() - started}


def _assert_equals_reference(store: Path, reference: Path) -> None:
    got, want = FeatureStore.open(store), FeatureStore.open(reference)
    columns = ["uid", "participant_id", "video_id", "start_frame", "stop_frame", "verb_class", "noun_class",
               "status", "checksum"]
    assert got.segments().select(columns).to_pylist() == want.segments().select(columns).to_pylist()
    box_columns = ["uid", "set", "slot", "x1", "y1", "x2", "y2", "score", "valid"]
    assert got.boxes().select(box_columns).to_pylist() == want.boxes().select(box_columns).to_pylist()


def _rerun_and_check(store: Path, sample) -> None:
    annotations, npz, reference = sample
    rerun = faults.run(import_command(store, annotations, npz))
    assert rerun.returncode == 0, faults.describe(rerun)
    assert_store_consistent(store, [str(i) for i in range(N_SEGMENTS)], n_fields=len(IMPORT_SHAPES),
                            boxes_per_segment=IMPORT_BOXES_PER_SEGMENT)
    _assert_equals_reference(store, reference["store"])


@pytest.mark.parametrize("fault, moment", KILL_POINTS, ids=[k for k, _ in KILL_POINTS])
def test_import_killed_at_an_io_point_then_rerun_equals_an_uninterrupted_import(
        sample, tmp_path: Path, fault: str, moment: str) -> None:
    annotations, npz, _ = sample
    store = tmp_path / "store"
    killed = faults.run(import_command(store, annotations, npz), fault=fault, seed=len(fault))
    assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
    _rerun_and_check(store, sample)


def test_import_killed_again_while_recovering_then_rerun(sample, tmp_path: Path) -> None:
    """A crash, then a crash of the rerun while it re-exports what the first one left in LMDB only."""
    annotations, npz, _ = sample
    store = tmp_path / "store"
    first = faults.run(import_command(store, annotations, npz), fault="lmdb.commit:120:kill-after")
    assert faults.killed(first), faults.describe(first)
    # The rerun's writer finds 120 journal entries that were never exported and exports them first.
    second = faults.run(import_command(store, annotations, npz), fault="parquet.write:2:kill-during", seed=3)
    assert faults.killed(second), faults.describe(second)
    _rerun_and_check(store, sample)


@pytest.mark.parametrize("seed", [11, 12])
def test_import_killed_from_outside_at_a_seeded_random_time_then_rerun(sample, tmp_path: Path, seed: int) -> None:
    annotations, npz, reference = sample
    store = tmp_path / "store"
    delay = random.Random(seed).uniform(0.4, 1.0) * reference["seconds"]
    outcome = faults.run_killed_after(import_command(store, annotations, npz), delay)
    assert faults.killed(outcome) or outcome.returncode == 0, faults.describe(outcome)
    _rerun_and_check(store, sample)


def test_reader_during_and_after_a_crash_sees_only_complete_segments(sample, tmp_path: Path) -> None:
    """What a killed import left behind is readable as it is: only exported segments are listed, and
    each of them reads back with its checksum, before any rerun repairs anything."""
    annotations, npz, _ = sample
    store = tmp_path / "store"
    killed = faults.run(import_command(store, annotations, npz), fault="parquet.write:4:kill-during", seed=5)
    assert faults.killed(killed), faults.describe(killed)
    opened = FeatureStore.open(store)
    assert len(opened.uids()) == 256  # the first export; the last 44 segments are in the LMDB journal only
    assert opened.verify() == []
