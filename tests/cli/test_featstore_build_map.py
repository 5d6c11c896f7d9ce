"""`featstore build --map none|time-mean|full --local-pool avg|max`: the documented fields and manifest entries."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featstore.extract.config import BuildConfig, BuildError
from featstore.store.reader import FeatureStore
from featstore.store.transform import derive_field
from tests.helpers.tiny_build import invoke_featstore, make_epic_dataset, tiny_build

MAP_SHAPE = [512, 1, 2, 4]  # r3d_18 at 8 frames, 32 x 57 input


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_epic_dataset(tmp_path_factory.mktemp("epic"), n_segments=2)


def _info(store: Path) -> dict:
    result = invoke_featstore("info", store, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_full_and_time_mean_keep_their_map_beside_verb_local(dataset, tmp_path: Path) -> None:
    frames, annotations = dataset
    full, tmean = tmp_path / "full", tmp_path / "tmean"
    assert tiny_build(full, annotations, frames, "--map", "full", "--local-pool", "max", "--workers", "0").exit_code == 0
    assert tiny_build(tmean, annotations, frames, "--map", "time-mean", "--workers", "0").exit_code == 0

    info = _info(full)
    assert info["fields"]["verb.map"]["shape"] == MAP_SHAPE and info["fields"]["verb.local"]["shape"] == [40, 512]
    assert "verb.map_tmean" not in info["fields"]
    recipe = info["manifest"]["derived"]["verb.local"]
    assert (recipe["pool"], recipe["output_size"], recipe["from"], recipe["complete"]) == (
        "max", 7, ["verb.map", "det.local.box"], True)
    assert info["manifest"]["provenance"]["map"] == "full"
    assert info["manifest"]["provenance"]["build_signature"]["local_pool"] == "max"

    info = _info(tmean)
    assert info["fields"]["verb.map_tmean"]["shape"] == [512, 2, 4] and "verb.map" not in info["fields"]
    assert info["manifest"]["derived"]["verb.local"]["pool"] == "avg"

    # The same segments, the same weights: time-mean is the full map's mean over T (float16).
    got_full, got_tmean = FeatureStore.open(full), FeatureStore.open(tmean)
    uids = got_full.uids()
    verb_map = got_full.read_field(uids, "verb.map").astype(np.float32)
    np.testing.assert_allclose(got_tmean.read_field(uids, "verb.map_tmean").astype(np.float32),
                               verb_map.mean(axis=2), rtol=2e-3, atol=2e-3)

    # What the build stored as verb.local is what `featstore derive` makes from its stored map (the
    # build pools the float32 map, derive its float16 copy: within float16 rounding).
    built = got_full.read_field(uids, "verb.local").astype(np.float32)
    copy = tmp_path / "copy"
    assert invoke_featstore("copy", full, copy, "--drop", "verb.local", "--no-progress").exit_code == 0
    derive_field(copy, pool="max", progress=False)
    derived = FeatureStore.open(copy).read_field(uids, "verb.local").astype(np.float32)
    np.testing.assert_allclose(derived, built, rtol=2e-3, atol=2e-3 * float(np.abs(built).max()))

    # A rerun with another --map or pooling would mix two kinds of segments: refused, naming it.
    again = tiny_build(full, annotations, frames, "--map", "full", "--local-pool", "avg", "--workers", "0")
    assert again.exit_code == 1 and "local_pool" in again.output


def test_map_none_needs_local_boxes(tmp_path: Path) -> None:
    common = dict(store=tmp_path / "s", annotations=tmp_path / "a.csv", verb_backbone="r3d_18",
                  noun_backbone="r3d_18", frames_root=tmp_path)
    assert BuildConfig(**common).map_mode == "full"  # no detector: no verb.local, the map is kept
    assert BuildConfig(**common, detector="x").map_mode == "none"
    with pytest.raises(BuildError, match="det.local"):
        BuildConfig(**common, verb_map="none")
    with pytest.raises(BuildError, match="local_pool"):
        BuildConfig(**common, local_pool="median")
