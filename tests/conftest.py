"""Shared fixtures: where the real EPIC annotation files are, and a clean torch state."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
