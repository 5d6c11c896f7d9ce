"""`featstore copy` SIGKILLed at exact I/O points, then rerun: the copy an uninterrupted copy's, the source untouched.

60 segments copied into a new store. The target's manifest is written first (its temporary, then
the rename), then its folders; each segment is one LMDB commit; the shard's writer exports a boxes
part and a segments part and renames them; the copy ends by verifying every copied segment. The
first two kill points are the window between "folder created" and "manifest written", where a
killed copy used to leave a folder no rerun would take.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.importer import import_npz
from featstore.store.reader import FeatureStore
from tests.reliability import faults
from tests.reliability.invariants import assert_parts_complete, leftover_temporaries

N_SEGMENTS = 60
SHAPES = feature_shapes(verb_dim=8, noun_dim=8, det_dim=4, n_global=6, n_local=4, map_size=(2, 4, 5))

# (fault, what the process is doing when it dies)
KILL_POINTS = [
    pytest.param("os.replace:1:kill", "the target folder made, its manifest under its temporary name"),
    pytest.param("os.replace:1:kill-after", "the manifest renamed, the store's folders not made yet",
                 marks=pytest.mark.slow),
    pytest.param("lmdb.commit:1:kill", "the first segment's transaction, before its commit", marks=pytest.mark.slow),
    pytest.param("lmdb.commit:30:kill-during", "inside LMDB's commit of segment 30"),
    pytest.param("lmdb.commit:60:kill-after", "the last segment committed, nothing exported",
                 marks=pytest.mark.slow),
    pytest.param("parquet.write:1:kill-during", "half-way through the boxes part", marks=pytest.mark.slow),
    pytest.param("parquet.write:2:kill-during", "half-way through the segments part", marks=pytest.mark.slow),
    pytest.param("os.replace:3:kill-after", "every part exported, the final check not yet run",
                 marks=pytest.mark.slow),
]


def copy_command(source: Path, target: Path) -> list[str]:
    return faults.command("featstore", "copy", source, target, "--drop", "verb.map", "--no-progress")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("copy-sample")
    segments = generate_segments(N_SEGMENTS, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    import_npz(root / "source", annotations, write_feature_npzs(root / "npz", segments, shapes=SHAPES),
               progress=False)
    done = faults.run(copy_command(root / "source", root / "reference"))
    assert done.returncode == 0, faults.describe(done)
    return {"source": root / "source", "reference": root / "reference",
            "source_files": _files(root / "source")}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_equals_reference(store: Path, reference: Path) -> None:
    got, want = FeatureStore.open(store), FeatureStore.open(reference)
    assert set(got.fields) == set(want.fields) and "verb.map" not in got.fields
    columns = ["uid", "status", "checksum", "verb_class", "noun_class"]
    assert got.segments().select(columns).to_pylist() == want.segments().select(columns).to_pylist()
    assert got.boxes().select(["uid", "set", "slot", "x1", "score", "valid"]).to_pylist() == \
        want.boxes().select(["uid", "set", "slot", "x1", "score", "valid"]).to_pylist()
    uids = want.uids()
    assert len(uids) == N_SEGMENTS
    for name in got.fields:
        assert np.array_equal(got.read_field(uids, name), want.read_field(uids, name))
    assert got.verify() == []
    assert_parts_complete(store)
    assert leftover_temporaries(store) == []


@pytest.mark.parametrize("fault, moment", KILL_POINTS)
def test_copy_killed_at_an_io_point_then_rerun_equals_an_uninterrupted_copy(
        sample, tmp_path: Path, fault: str, moment: str) -> None:
    target = tmp_path / "copy"
    killed = faults.run(copy_command(sample["source"], target), fault=fault, seed=len(fault))
    assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
    rerun = faults.run(copy_command(sample["source"], target))
    assert rerun.returncode == 0, faults.describe(rerun)
    # The rerun checks every copied segment, those the killed run copied included.
    assert f"{N_SEGMENTS} verified" in rerun.stdout, rerun.stdout
    _assert_equals_reference(target, sample["reference"])
    assert _files(sample["source"]) == sample["source_files"]  # the source is only read


def test_a_target_left_as_an_older_release_left_it_is_taken(sample, tmp_path: Path) -> None:
    # Killed between its folders and its manifest by a release that made the folders first: the
    # empty skeleton and a manifest temporary are nothing of note; the rerun copies into them.
    target = tmp_path / "copy"
    for sub in ("segments", "boxes", "lmdb"):
        (target / sub).mkdir(parents=True)
    (target / ".manifest.json.0123abcd.tmp").write_text("{")
    shutil.rmtree(target / "lmdb")
    (target / "lmdb").mkdir()
    rerun = faults.run(copy_command(sample["source"], target))
    assert rerun.returncode == 0, faults.describe(rerun)
    _assert_equals_reference(target, sample["reference"])
