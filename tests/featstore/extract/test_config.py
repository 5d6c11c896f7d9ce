"""A build's configuration: what `BuildConfig` refuses, and the rank a process has under torchrun."""
from __future__ import annotations

from pathlib import Path

import pytest

from featstore.extract.config import BuildConfig, BuildError, distributed_env


def test_distributed_env() -> None:
    assert distributed_env({}) == (0, 1, 0)
    assert distributed_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(BuildError, match="RANK"):
        distributed_env({"WORLD_SIZE": "2"})


def test_config_refuses_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="exactly one frame source"):
        BuildConfig(store=tmp_path, annotations=tmp_path, verb_backbone="r3d_18", noun_backbone="r3d_18")
    with pytest.raises(BuildError, match="detector"):
        BuildConfig(store=tmp_path, annotations=tmp_path, verb_backbone="r3d_18", noun_backbone="r3d_18",
                     frames_root=tmp_path, boxes=tmp_path / "b.csv")
    with pytest.raises(BuildError, match="flow"):
        BuildConfig(store=tmp_path, annotations=tmp_path, verb_backbone="r3d_18", noun_backbone="r3d_18",
                     videos_dir=tmp_path, modality="flow")
