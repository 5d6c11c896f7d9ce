"""`featstore build` SIGKILLed at exact I/O points and at a seeded random time, then rerun.

Four segments of two generated EPIC-layout JPEG videos (the extraction tests' dataset), r3d_18 and
the MobileNet Faster R-CNN with random weights at a tiny input size, ``--flush-every 1``: each
segment is one LMDB commit, then an export (a boxes part, a segments part, each renamed into place)
and an "exported up to" commit. So LMDB commits 1, 3, 5, 7 are segments and 2, 4, 6, 8 markers;
Parquet writes 1, 3, 5, 7 are boxes parts and 2, 4, 6, 8 segments parts; renames 1 and 2 are the
manifest (created, then the run recorded in it), 3-10 the parts.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from featstore.store.reader import FeatureStore
from tests.reliability import faults
from tests.reliability.invariants import assert_store_consistent, assert_views_store_consistent
from tests.reliability.workloads import (
    BUILD_BOXES_PER_SEGMENT,
    BUILD_FIELDS,
    build_command,
)

# Builds killed and rerun in subprocesses: minutes in all (the fast loop skips them; CI runs them).
pytestmark = pytest.mark.slow

def _build(store: Path, inputs: dict, *extra: str) -> list[str]:
    return build_command(store, inputs["annotations"], inputs["frames"], *extra)


def _rerun_and_check(store: Path, inputs: dict) -> None:
    rerun = faults.run(_build(store, inputs))
    assert rerun.returncode == 0, faults.describe(rerun)
    assert_store_consistent(store, inputs["uids"], n_fields=BUILD_FIELDS, boxes_per_segment=BUILD_BOXES_PER_SEGMENT)
    got, want = FeatureStore.open(store), FeatureStore.open(inputs["reference"])
    assert got.fields == want.fields
    assert got.manifest["provenance"]["build_signature"] == want.manifest["provenance"]["build_signature"]


def test_build_killed_inside_an_lmdb_commit_then_rerun_stores_every_segment_once(
        build_inputs: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    killed = faults.run(_build(store, build_inputs), fault="lmdb.commit:3:kill-during", seed=3)  # 2nd segment
    assert faults.killed(killed), faults.describe(killed)
    _rerun_and_check(store, build_inputs)


# The window between "folder created" and "manifest written", and just after it.
CREATION_POINTS = [
    ("os.replace:1:kill", "the store folder made, its manifest under its temporary name"),
    ("os.replace:1:kill-after", "the manifest renamed, the store's folders not made yet"),
    ("os.replace:2:kill", "the run record written to the manifest's temporary, not renamed"),
]


@pytest.mark.parametrize("fault, moment", CREATION_POINTS, ids=[f for f, _ in CREATION_POINTS])
def test_build_killed_while_creating_its_store_then_rerun(build_inputs: dict, tmp_path: Path, fault: str,
                                                           moment: str) -> None:
    store = tmp_path / "store"
    killed = faults.run(_build(store, build_inputs), fault=fault)
    assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
    _rerun_and_check(store, build_inputs)


def test_build_killed_again_while_recovering_then_rerun(build_inputs: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = faults.run(_build(store, build_inputs), fault="lmdb.commit:5:kill-after")  # 3rd segment: not exported
    assert faults.killed(first), faults.describe(first)
    # The rerun's writer exports that segment before anything else: die half-way through its part.
    second = faults.run(_build(store, build_inputs), fault="parquet.write:2:kill-during", seed=2)
    assert faults.killed(second), faults.describe(second)
    _rerun_and_check(store, build_inputs)


def test_build_with_a_decode_worker_killed_from_outside_at_a_seeded_random_time(
        build_inputs: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    delay = random.Random(7).uniform(0.6, 1.0) * build_inputs["seconds"]
    outcome = faults.run_killed_after(_build(store, build_inputs, "--workers", "1"), delay)
    assert faults.killed(outcome) or outcome.returncode == 0, faults.describe(outcome)
    _rerun_and_check(store, build_inputs)


# Temporal views (docs/views.md): s0 and s2 (video P01_01, built first) get three views, s1 and s3 one.
# Every segment is one LMDB commit (all its views), so commit 3 is s2's three views.
VIEWS_FLAGS = ("--views", "3", "--views-where", "participant_id = 'P01'")
VIEW_POINTS = [
    ("lmdb.commit:3:kill-during", "s2's three views in flight: lost whole, built again"),
    ("lmdb.commit:3:kill-after", "s2's three views committed, not exported: exported once by the rerun"),
]


@pytest.mark.parametrize("fault, moment", VIEW_POINTS, ids=[f for f, _ in VIEW_POINTS])
def test_a_build_of_views_killed_then_rerun_stores_every_view_once(build_inputs: dict, tmp_path: Path, fault: str,
                                                                   moment: str) -> None:
    store = tmp_path / "store"
    killed = faults.run(_build(store, build_inputs, *VIEWS_FLAGS, "--workers", "0"), fault=fault)
    assert faults.killed(killed), f"the fault never fired ({moment}): {faults.describe(killed)}"
    rerun = faults.run(_build(store, build_inputs, *VIEWS_FLAGS, "--workers", "0"))
    assert rerun.returncode == 0, faults.describe(rerun)
    assert_views_store_consistent(store, {"s0": 3, "s1": 1, "s2": 3, "s3": 1}, n_fields=BUILD_FIELDS,
                                  boxes_per_view=BUILD_BOXES_PER_SEGMENT)
    assert FeatureStore.open(store).manifest["provenance"]["build_signature"]["views"]["count"] == 3
