"""Fixtures for the model tests: the publishers' own model code (``../shared/peers``) as oracles."""
from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# CI lays ../shared beside the checkout; a user's clone may not have it.
PEERS = Path(os.environ.get("FEATSTORE_PEERS", REPO.parent / "shared" / "peers"))
# Top-level names the peers' code uses that are too generic to leave in sys.modules (3D-ResNets-PyTorch
# and C1-Action-Recognition-TSN-TRN-TSM both have a package called `models`).
_GENERIC_PACKAGES = ("models", "ops", "detectron2")


@contextmanager
def _on_path(root: Path, *, stub_detectron2: bool) -> Iterator[None]:
    """Import from ``root``, then forget its generic package names (the imported modules keep working).

    PySlowFast's ``head_helper`` imports ``detectron2.layers.ROIAlign`` at import time, for its
    detection head only; without detectron2 a stand-in is put there for the import and removed after,
    so no other test sees a fake detectron2.
    """
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(root))
    if stub_detectron2:
        try:
            import detectron2.layers  # noqa: F401
        except ImportError:
            layers = types.ModuleType("detectron2.layers")
            layers.ROIAlign = None  # type: ignore[attr-defined]
            package = types.ModuleType("detectron2")
            package.layers = layers  # type: ignore[attr-defined]
            sys.modules.update({"detectron2": package, "detectron2.layers": layers})
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if name.split(".")[0] in _GENERIC_PACKAGES:
                del sys.modules[name]


@pytest.fixture(scope="session")
def peer_module() -> Callable[..., types.ModuleType]:
    """``peer_module(folder, module, stub_detectron2=False)``: a module of a publisher's code.

    Skips the test when ``../shared/peers/<folder>`` is absent (a clone without the shared folder).
    """
    cache: dict[tuple[str, str], types.ModuleType] = {}

    def load(folder: str, module: str, *, source_root: str = "", stub_detectron2: bool = False) -> types.ModuleType:
        root = PEERS / folder / source_root
        if not root.is_dir():
            pytest.skip(f"publisher code not found at {root} (CI has ../shared/peers; set FEATSTORE_PEERS)")
        key = (str(root), module)
        if key not in cache:
            with _on_path(root, stub_detectron2=stub_detectron2):
                cache[key] = importlib.import_module(module)
        return cache[key]

    return load
