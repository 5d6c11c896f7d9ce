"""The switches a run trains with (issue 23): the I3D scheme follows the store, config.json records them all."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from featstore.store.reader import FeatureStore
from heads.models import get_head
from heads.switches import BEFORE_ISSUE_23, normalize_from_store, recorded_switches, resolve_switches
from heads.trainer import TrainConfig, load_run, train
from tests.helpers.stores import make_planted_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _manifest(verb: str | None, noun: str | None) -> dict:
    return {"provenance": {"verb_backbone": verb and {"name": verb}, "noun_backbone": noun and {"name": noun}}}


@pytest.mark.parametrize(("verb", "noun", "on"), [
    ("i3d", "i3d", True), ("s3d", "s3d", True), ("r3d_50", "r3d_50", False), ("r2plus1d_34", "r2plus1d_34", False),
    ("tsm_r50", "tsm_r50", False), (None, None, False),
])
def test_normalize_follows_the_store_backbones(verb: str | None, noun: str | None, on: bool) -> None:
    value, why = normalize_from_store(_manifest(verb, noun))
    assert value is on and why.startswith(f"normalize {'on' if on else 'off'}")
    resolved = resolve_switches("saoa", {}, _manifest(verb, noun))
    assert resolved.values["normalize"] is on and resolved.sources["normalize"] == "store"
    # The flag wins either way.
    given = resolve_switches("saoa", {"normalize": not on}, _manifest(verb, noun))
    assert given.values["normalize"] is (not on) and given.sources["normalize"] == "given"
    assert "normalize" not in resolve_switches("global", {}, _manifest(verb, noun)).values


def test_every_switch_is_resolved_with_its_source() -> None:
    resolved = resolve_switches("sap", {"gating": False}, _manifest("r3d_50", "r3d_50"))
    assert resolved.values == {**get_head("sap").switches(), "gating": False, "normalize": False}
    assert resolved.sources == {"gating": "given", "relation": "default", "relation_norm": "default",
                                "normalize": "store", "concat_global": "default", "verb_objects": "default"}
    with pytest.raises(TypeError, match="local_alignment"):
        resolve_switches("sap", {"local_alignment": False}, {})


def test_runs_recorded_before_issue_23_rebuild_with_their_defaults() -> None:
    old = {"model": "sap", "switches": {"gating": False}}
    assert recorded_switches(old) == {"relation_norm": "none", "verb_objects": "local", "normalize": False,
                                      "gating": False}
    assert recorded_switches({"model": "global", "switches": {}}) == {}
    new = {"model": "sap", "switches": {"gating": False, "verb_objects": "global"}, "switch_sources": {}}
    assert recorded_switches(new) == new["switches"]
    assert set(BEFORE_ISSUE_23) <= set(get_head("sap").switches())


@pytest.fixture(scope="module")
def i3d_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small planted store whose manifest says its backbones are I3D (as a build of `i3d` records)."""
    store = make_planted_store(tmp_path_factory.mktemp("i3d"), 96)
    manifest_path = store / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("provenance", {}).update(verb_backbone={"name": "i3d"}, noun_backbone={"name": "i3d"})
    manifest_path.write_text(json.dumps(manifest))
    assert FeatureStore.open(store).manifest["provenance"]["verb_backbone"]["name"] == "i3d"
    return store


def test_a_run_takes_normalize_from_its_store_prints_and_records_it(i3d_store: Path, tmp_path: Path) -> None:
    config = TrainConfig(model="saoa", train_where="participant_id <= 'P25'", val_where="participant_id > 'P25'",
                         epochs=1, batch_size=32, lr=0.01)
    messages: list[str] = []
    metrics = train(i3d_store, tmp_path / "store-default", config, progress=False, log=messages.append)
    assert any(m.startswith("normalize on: the store's backbones (verb i3d, noun i3d) are of the I3D family")
               for m in messages)
    recorded = json.loads((tmp_path / "store-default" / "config.json").read_text())
    # Every switch with its effective value, the defaults included, and where each came from.
    assert recorded["switches"] == {**get_head("saoa").switches(), "normalize": True}
    assert recorded["switch_sources"]["normalize"] == "store"
    assert recorded["switch_sources"]["relation_norm"] == "default"
    assert metrics["normalize"]["value"] is True and metrics["normalize"]["source"] == "store"
    assert json.loads((tmp_path / "store-default" / "metrics.json").read_text())["normalize"] == metrics["normalize"]

    flagged = train(i3d_store, tmp_path / "flag", TrainConfig(**{**config.to_json(), "switches": {"normalize": False}}),
                    progress=False, log=lambda _: None)
    assert flagged["normalize"] == {"value": False, "source": "given", "why": None}
    # What was recorded is what is rebuilt.
    for run, on in (("store-default", True), ("flag", False)):
        _, model = load_run(tmp_path / run)
        assert model.verb_branch.alignment.normalize is on and model.noun_branch.alignment.normalize is on
