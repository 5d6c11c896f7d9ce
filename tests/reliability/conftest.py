"""Data shared by the reliability suites, each with the result of an uninterrupted run."""
from __future__ import annotations

import time

import pytest

from tests.helpers.stores import make_planted_store
from tests.helpers.tiny_build import make_epic_dataset
from tests.reliability import faults
from tests.reliability.workloads import build_command, train_command

BUILD_SEGMENTS = 4


@pytest.fixture(scope="session")
def build_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """EPIC-layout JPEGs of two videos, four segments, and an uninterrupted `featstore build` of them."""
    root = tmp_path_factory.mktemp("build-inputs")
    frames, annotations = make_epic_dataset(root, n_segments=BUILD_SEGMENTS)
    reference = root / "reference"
    faults.warm_up()  # its "seconds" time the build alone: the seeded kill falls inside a build
    started = time.monotonic()
    done = faults.run(build_command(reference, annotations, frames))
    assert done.returncode == 0, faults.describe(done)
    return {"frames": frames, "annotations": annotations, "reference": reference,
            "uids": [f"s{i}" for i in range(BUILD_SEGMENTS)], "seconds": time.monotonic() - started}


@pytest.fixture(scope="session")
def train_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small planted-signal store and an uninterrupted `heads train` run on it."""
    root = tmp_path_factory.mktemp("train-inputs")
    store = make_planted_store(root, 96)
    faults.warm_up()  # its "seconds" time the training alone: the seeded kill falls inside a run
    started = time.monotonic()
    done = faults.run(train_command(store, root / "reference"))
    assert done.returncode == 0, faults.describe(done)
    return {"store": store, "run": root / "reference", "seconds": time.monotonic() - started}
