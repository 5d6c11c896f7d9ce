"""Fixtures for the import tests: the publishers' own readers (``../shared/peers``) as format oracles.

Each reader is imported from its publisher's file as is; the few modules it imports that the copy
does not carry (ActionFormer's dataset registry, LFB's Caffe2-era config and OpenCV) are stood in
for during the import and removed after, so no other test sees them.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from tests.featstore.conftest import PEERS


def _load(path: Path, name: str, stubs: dict[str, types.ModuleType]) -> types.ModuleType:
    if not path.is_file():
        pytest.skip(f"publisher code not found at {path} (CI has ../shared/peers; set FEATSTORE_PEERS)")
    saved = {key: sys.modules.get(key) for key in (*stubs, name)}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []  # type: ignore[attr-defined]
    return module


@pytest.fixture(scope="session")
def actionformer_dataset() -> type:
    """ActionFormer's ``EpicKitchensDataset`` (``libs/datasets/epic_kitchens.py``)."""
    root = PEERS / "actionformer_release" / "libs" / "datasets"
    registry = types.ModuleType("libs.datasets.datasets")
    registry.register_dataset = lambda name: (lambda cls: cls)  # type: ignore[attr-defined]
    utils = _load(root / "data_utils.py", "libs.datasets.data_utils", {})
    module = _load(root / "epic_kitchens.py", "libs.datasets.epic_kitchens", {
        "libs": _package("libs"), "libs.datasets": _package("libs.datasets", root),
        "libs.datasets.datasets": registry, "libs.datasets.data_utils": utils,
    })
    return module.EpicKitchensDataset


@pytest.fixture(scope="session")
def ta3n_dataset() -> type:
    """TA3N's ``TSNDataSet`` (``EPIC-KITCHENS-100_UDA_TA3N/dataset.py``)."""
    return _load(PEERS / "EPIC-KITCHENS-100_UDA_TA3N" / "dataset.py", "ta3n_dataset", {}).TSNDataSet


@pytest.fixture(scope="session")
def lfb_epic() -> types.ModuleType:
    """LFB's ``lib/datasets/epic.py`` (``sample_noun_lfb``, ``sec_to_frame``, ``time_to_sec``) configured
    with SAOA's global window: ``WINDOW_SIZE`` 60 rows, 10 a frame, 1 frame a second -> 6 s; ``EPIC.FPS`` 30."""
    cfg = types.SimpleNamespace(
        EPIC=types.SimpleNamespace(FPS=30, MAX_NUM_FEATS_PER_NOUN_LFB_FRAME=10, NOUN_LFB_FRAMES_PER_SECOND=1,
                                   CLASS_TYPE="noun"),
        LFB=types.SimpleNamespace(WINDOW_SIZE=60, LFB_DIM=2048, ENABLED=True),
    )
    config = types.ModuleType("core.config")
    config.config = cfg  # type: ignore[attr-defined]
    cv2 = types.ModuleType("cv2")
    cv2.ocl = types.SimpleNamespace(setUseOpenCL=lambda flag: None)  # type: ignore[attr-defined]
    helper = types.ModuleType("datasets.dataset_helper")
    datasets = _package("datasets")
    datasets.dataset_helper = helper  # type: ignore[attr-defined]
    core = _package("core")
    core.config = config  # type: ignore[attr-defined]
    return _load(PEERS / "video-long-term-feature-banks" / "lib" / "datasets" / "epic.py", "lfb_epic", {
        "cv2": cv2, "core": core, "core.config": config, "datasets": datasets, "datasets.dataset_helper": helper,
    })
