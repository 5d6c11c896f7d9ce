"""Shared fixtures: where the real EPIC annotation files are, one torch thread, small stores, the quick demo.

Plain helpers (generators, build settings, oracles) live in tests/helpers/.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

from cli.featstore_cli import main as featstore_main
from tests.helpers.stores import make_planted_store
from tests.helpers.threads import torch_threads

REPO = Path(__file__).resolve().parents[1]
# CI lays ../shared beside the checkout; a user's clone may not have it.
SHARED_DATA = Path(os.environ.get("FEATSTORE_SHARED_DATA", REPO.parent / "shared" / "data"))


# Property-based tests: bounded for CI (a test that sets its own max_examples keeps it);
# `pytest --hypothesis-profile=long` tries twenty times as many inputs.
settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=800, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the quick demo are slow: the demo builds a store and trains two heads first
    (about 30 s on two cores). The fast loop (``-m "not slow"``) skips them; CI runs them."""
    for item in items:
        if "quick_demo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one CPU thread for the test, then back to the previous count.

    Use it (``pytestmark = pytest.mark.usefixtures("one_thread")``) where a test runs models: the
    test machines' cores are shared, and a fixed thread count fixes the CPU reduction order, so
    results compare bit for bit with runs in subprocesses that also use one thread.
    """
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 480-segment planted-signal store (`make_planted_store`), made once per session."""
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
    started = time.perf_counter()
    with torch_threads(1):  # the build's models too: the test machines' cores are shared
        result = CliRunner().invoke(featstore_main, ["demo", str(out), "--quick", "--no-progress"],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return QuickDemo(root, out, result.output, time.perf_counter() - started)
