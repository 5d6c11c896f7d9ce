"""`verb_local` from a store's `verb.local` or pooled from its `verb.map` at load: the same numbers, the same runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.store.local_pool import LocalRecipeError
from featstore.store.reader import FeatureStore
from featstore.store.transform import copy_store, derive_field
from heads.data import (
    PreloadedFeatures,
    StreamingFeatures,
    load_features,
    plan_local,
    selection_labels,
)
from heads.metric_registry import metric_values
from heads.models import get_head
from heads.trainer import TrainConfig, train
from tests.helpers.stores import make_planted_store
from tests.helpers.threads import torch_threads

TRAIN = "participant_id <= 'P25'"
VAL = "participant_id > 'P25'"
SAOA_FIELDS = get_head("saoa").required_fields()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 160 planted segments three ways: the map only, the map + verb.local, verb.local only."""
    with torch_threads(1):
        return _make_stores(tmp_path_factory.mktemp("local"))


def _make_stores(root: Path) -> dict[str, Path]:
    with_map = make_planted_store(root / "map", 160)
    both = root / "both"
    copy_store(with_map, both, progress=False)
    derive_field(both, progress=False)
    local_only = root / "local"
    copy_store(both, local_only, fields=[f for f in FeatureStore.open(both).fields if f != "verb.map"],
               progress=False)
    return {"map": with_map, "both": both, "local": local_only}


def _features(store: Path, cls=PreloadedFeatures, **kwargs):
    opened = FeatureStore.open(store)
    return cls(opened, selection_labels(opened, None), SAOA_FIELDS, **kwargs)


def test_stored_verb_local_gives_the_numbers_pooled_at_load(stores) -> None:
    from_map, from_field = _features(stores["map"]), _features(stores["local"])
    assert not from_map.local.stored and from_field.local.stored
    assert "verb.map RoI-pooled" in from_map.local.note and "verb.local" in from_field.local.note
    assert set(from_map.tensors) == set(from_field.tensors)
    for key, values in from_map.tensors.items():
        # Both are float16 of the same float32 pooling: equal up to float16 rounding.
        torch.testing.assert_close(from_field.tensors[key].float(), values.float(), rtol=1e-3, atol=1e-3)


def test_saoa_on_a_store_without_the_map_matches_the_full_map_store(stores, tmp_path: Path) -> None:
    config = TrainConfig(model="saoa", train_where=TRAIN, val_where=VAL, epochs=2, batch_size=16, lr=0.05, seed=3)
    on_map = train(stores["map"], tmp_path / "map", config, progress=False)
    on_local = train(stores["local"], tmp_path / "local", config, progress=False)
    assert metric_values(on_local) == pytest.approx(metric_values(on_map), abs=1e-9)
    assert "verb.map" not in FeatureStore.open(stores["local"]).fields


def test_streaming_reads_the_stored_verb_local(stores) -> None:
    preloaded = _features(stores["local"])
    streaming = _features(stores["local"], StreamingFeatures, workers=0)
    order = torch.randperm(len(preloaded), generator=torch.Generator().manual_seed(0))
    for (a, verb_a, noun_a), (b, verb_b, noun_b) in zip(preloaded.batches(order, 16), streaming.batches(order, 16)):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(verb_a, verb_b) and torch.equal(noun_a, noun_b)


def test_a_verb_local_pooled_otherwise_is_never_used_silently(stores, tmp_path: Path) -> None:
    max_both = tmp_path / "max"
    copy_store(stores["map"], max_both, progress=False)
    derive_field(max_both, pool="max", progress=False)
    opened = FeatureStore.open(max_both)
    assert plan_local(opened, pool="max").stored
    # With the map at hand, an avg run pools it again (and says so) ...
    plan = plan_local(opened, pool="avg")
    assert not plan.stored and "pooled max, this run asks avg" in plan.note
    # ... without it, the run is refused with what to do.
    max_only = tmp_path / "max_only"
    copy_store(max_both, max_only, fields=[f for f in opened.fields if f != "verb.map"], progress=False)
    with pytest.raises(LocalRecipeError, match="pooled with max.*asks for avg"):
        load_features(FeatureStore.open(max_only), selection_labels(FeatureStore.open(max_only), None), SAOA_FIELDS)
    config = TrainConfig(model="saoa", train_where=TRAIN, val_where=VAL, epochs=1, batch_size=16, pool="max")
    assert train(max_only, tmp_path / "run", config, progress=False)


def test_estimate_counts_verb_local_once_whatever_its_source(stores) -> None:
    from heads.data import estimate_bytes

    sizes = {name: estimate_bytes(FeatureStore.open(path), SAOA_FIELDS, 10) for name, path in stores.items()}
    assert sizes["map"] == sizes["both"] == sizes["local"]
    local = FeatureStore.open(stores["local"]).fields["verb.local"]
    assert sizes["local"] > 10 * 2 * int(np.prod(local.shape))


def test_a_pass_stopped_early_leaves_no_reader_behind(stores) -> None:
    import threading

    streaming = _features(stores["local"], StreamingFeatures, workers=3)
    order = torch.arange(len(streaming))
    for taken, _ in enumerate(streaming.batches(order, 8)):
        if taken == 2:
            break  # e.g. an exception in the training step
    after = [t for t in threading.enumerate() if t.name.startswith("featstore-read")]
    for thread in after:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in after)
    # and the next pass starts from the top
    first, _, _ = next(iter(streaming.batches(order, 8)))
    assert torch.equal(first["verb_global"], _features(stores["local"]).batch(order[:8])[0]["verb_global"])
