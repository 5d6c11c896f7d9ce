"""`featstore derive` SIGKILLed at exact I/O points, then rerun: nothing lost, the result an uninterrupted run's.

60 segments in one shard, exported once when the shard's writer closes. A run renames the manifest
twice (the new field, then the run record), commits LMDB once per segment (its verb.local and its
new index row together) and once for the "exported up to" marker, writes a boxes part and a
segments part, renames them, and renames the manifest a last time to mark the field complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from featstore.store.importer import import_npz
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.reader import FeatureStore
from tests.reliability import faults
from tests.reliability.invariants import assert_parts_complete, leftover_temporaries

N_SEGMENTS = 60
SHAPES = feature_shapes(verb_dim=8, noun_dim=8, det_dim=4, n_global=6, n_local=4, map_size=(2, 4, 5))

# (fault, what the process is doing when it dies)
KILL_POINTS = [
    pytest.param("os.replace:1:kill", "the manifest with the new field written, not renamed", marks=pytest.mark.slow),
    pytest.param("lmdb.commit:1:kill", "the first segment's transaction, before its commit", marks=pytest.mark.slow),
    pytest.param("lmdb.commit:30:kill-during", "inside LMDB's commit of segment 30"),
    pytest.param("lmdb.commit:45:kill-after", "segment 45 committed, nothing exported", marks=pytest.mark.slow),
    pytest.param("parquet.write:2:kill-during", "half-way through the segments part (its boxes part is out)",
                 marks=pytest.mark.slow),
    pytest.param("os.replace:5:kill", "every segment exported, the manifest not yet marked complete",
                 marks=pytest.mark.slow),
]


def derive_command(store: Path) -> list[str]:
    return faults.command("featstore", "derive", store, "--field", "verb.local", "--no-progress")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("derive-sample")
    segments = generate_segments(N_SEGMENTS, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    import_npz(root / "input", annotations, write_feature_npzs(root / "npz", segments, shapes=SHAPES), progress=False)
    shutil.copytree(root / "input", root / "reference")
    done = faults.run(derive_command(root / "reference"))
    assert done.returncode == 0, faults.describe(done)
    return {"input": root / "input", "reference": root / "reference"}


def _assert_equals_reference(store: Path, reference: Path) -> None:
    got, want = FeatureStore.open(store), FeatureStore.open(reference)
    assert got.derived["verb.local"]["complete"] is True and got.incomplete_fields == set()
    assert set(got.fields) == set(want.fields)
    columns = ["uid", "status", "checksum", "shard", "verb_class", "noun_class"]
    assert got.segments().select(columns).to_pylist() == want.segments().select(columns).to_pylist()
    assert got.boxes().to_pylist() == want.boxes().to_pylist()
    uids = want.uids()
    assert len(uids) == N_SEGMENTS
    assert np.array_equal(got.read_field(uids, "verb.local"), want.read_field(uids, "verb.local"))
    assert got.verify() == []
    assert_parts_complete(store)
    assert leftover_temporaries(store) == []


@pytest.mark.parametrize("fault, moment", KILL_POINTS)
def test_derive_killed_at_an_io_point_then_rerun_equals_an_uninterrupted_derive(
        sample, tmp_path: Path, fault: str, moment: str) -> None:
    store = tmp_path / "store"
    shutil.copytree(sample["input"], store)
    killed = faults.run(derive_command(store), fault=fault, seed=len(fault))
    assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
    # Whatever the kill left, the store reads as before: verb.local is absent until complete.
    left = FeatureStore.open(store)
    assert "verb.local" not in left.complete_fields and left.verify() == []
    rerun = faults.run(derive_command(store))
    assert rerun.returncode == 0, faults.describe(rerun)
    _assert_equals_reference(store, sample["reference"])
