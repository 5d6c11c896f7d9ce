"""Shared fixtures: where the real EPIC annotation files are, and a clean torch state."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main
from featstore.importer import import_npz
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import PlantedSignal, write_feature_npzs

REPO = Path(__file__).resolve().parents[1]
# CI lays ../shared beside the checkout; a user's clone may not have it.
SHARED_DATA = Path(os.environ.get("FEATSTORE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real EPIC-55 / EPIC-100 annotation files; skips when absent."""
    if not (SHARED_DATA / "epic55").is_dir():
        pytest.skip(f"real EPIC annotations not found at {SHARED_DATA} (CI has them; set FEATSTORE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def epic55_dir(shared_data: Path) -> Path:
    return shared_data / "epic55"


@pytest.fixture(scope="session")
def epic100_dir(shared_data: Path) -> Path:
    return shared_data / "epic100"


def make_planted_store(root: Path, n: int = 480, *, seed: int = 0, **planted_kwargs) -> Path:
    """A store of planted-signal features: participants P01, P02 (train) and P26, P27 (val)."""
    planted = PlantedSignal(**planted_kwargs)
    segments = generate_segments(n, num_verbs=planted.verb_embedding.shape[0], num_nouns=planted.num_nouns, seed=seed)
    annotations = write_epic55_annotations(root / "annotations" / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(root / "npz", segments, seed=seed, make_arrays=planted)
    import_npz(root / "store", annotations, npz, progress=False)
    return root / "store"


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_planted_store(tmp_path_factory.mktemp("planted"), 480)


@dataclass(frozen=True)
class QuickDemo:
    root: Path  # the working folder: `demo-out` lies in it, as the README's commands expect
    out: Path  # root / "demo-out"
    output: str  # what the command printed (stdout and stderr)
    seconds: float


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> QuickDemo:
    """`featstore demo demo-out --quick`, run once per session through the CLI and shared."""
    root = tmp_path_factory.mktemp("quick-demo")
    out = root / "demo-out"
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        result = CliRunner().invoke(featstore_main, ["demo", str(out), "--quick", "--no-progress"],
                                    catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return QuickDemo(root, out, result.output, time.perf_counter() - started)
