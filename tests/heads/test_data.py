"""Feature loading for the head trainer: a selection's labels, the batch keys a head gets, memory
estimates, batches in order, derived inputs (slot masks, local-alignment features), and streaming
batches equal to preloaded ones."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.store.importer import import_npz
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.reader import FeatureStore
from heads.data import (
    PreloadedFeatures,
    StreamingFeatures,
    batch_keys,
    chunk_order,
    default_memory_budget,
    estimate_bytes,
    load_features,
    selection_labels,
)
from heads.local_alignment import pool_local_verb_features

pytestmark = pytest.mark.usefixtures("one_thread")

N = 24
SHAPES = feature_shapes(verb_dim=6, noun_dim=5, det_dim=3, n_global=4, n_local=3, map_size=(2, 4, 4))
ALL_FIELDS = list(SHAPES)
KEYS = ["verb_global", "noun_global", "det_global_feat", "det_local_feat", "det_global_valid", "det_local_valid",
        "verb_local"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    """24 segments (uids "0".."23") of small random features; segment 5's npz holds a NaN (failed)."""
    root = tmp_path_factory.mktemp("data")
    segments = generate_segments(N, num_verbs=4, num_nouns=6, seed=1)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(root / "npz", segments, shapes=SHAPES, seed=1)
    arrays = dict(np.load(npz / "5.npz"))
    arrays["noun.global"][0] = np.nan
    np.savez(npz / "5.npz", **arrays)
    report = import_npz(root / "store", annotations, npz, progress=False)
    assert [uid for uid, _ in report.failed] == ["5"]
    return FeatureStore.open(root / "store")


def _equal_batches(a, b) -> None:
    (features_a, verb_a, noun_a), (features_b, verb_b, noun_b) = a, b
    assert sorted(features_a) == sorted(features_b)
    for key in features_a:
        assert features_a[key].dtype == features_b[key].dtype, key
        assert torch.equal(features_a[key], features_b[key]), key
    assert torch.equal(verb_a, verb_b) and torch.equal(noun_a, noun_b)


def test_selection_labels_are_the_ok_segments_in_uid_order(store: FeatureStore) -> None:
    labels = selection_labels(store, "participant_id in ('P01', 'P26')")
    expected = sorted((s for s in generate_segments(N, num_verbs=4, num_nouns=6, seed=1)
                       if s.participant_id in ("P01", "P26") and s.uid != "5"), key=lambda s: s.uid)
    assert labels.uids == tuple(s.uid for s in expected)
    assert labels.verb.tolist() == [s.verb_class for s in expected]
    assert labels.noun.tolist() == [s.noun_class for s in expected]
    assert labels.verb.dtype == torch.int64 and labels.labelled
    assert labels.table.column("uid").to_pylist() == list(labels.uids)
    everything = selection_labels(store, None)
    assert len(everything.uids) == N - 1 and "5" not in everything.uids  # the failed segment is left out


def test_unlabelled_segments_get_label_minus_one(tmp_path: Path) -> None:
    segments = generate_segments(4, num_verbs=3, num_nouns=3)
    annotations = write_epic55_annotations(tmp_path / "EPIC_test_s1_timestamps.csv", segments, labelled=False)
    shapes = {k: v for k, v in SHAPES.items() if k.endswith(".global") and not k.startswith("det")}
    import_npz(tmp_path / "store", annotations, write_feature_npzs(tmp_path / "npz", segments, shapes=shapes),
               progress=False)
    labels = selection_labels(FeatureStore.open(tmp_path / "store"), None)
    assert labels.verb.tolist() == [-1] * 4 and labels.noun.tolist() == [-1] * 4 and not labels.labelled


def test_batch_keys_follow_the_fields_a_head_declared() -> None:
    assert batch_keys(ALL_FIELDS) == KEYS
    assert batch_keys(["noun.global", "verb.global"]) == ["verb_global", "noun_global"]
    # Local alignment needs both the verb map and the local boxes.
    assert "verb_local" not in batch_keys(["verb.map", "det.global.box"])
    assert batch_keys(["det.local.score"]) == ["det_local_valid"]


def test_estimate_bytes_counts_float16_features_and_bool_masks(store: FeatureStore) -> None:
    per_segment = 2 * (6 + 5 + 4 * 3 + 3 * 3) + (4 + 3) + 2 * 3 * 6  # features, masks, verb_local (K x C)
    assert estimate_bytes(store, ALL_FIELDS, 10) == 10 * per_segment
    assert estimate_bytes(store, ["verb.global"], 7) == 7 * 2 * 6


def test_chunk_order_keeps_the_order_and_ends_short() -> None:
    order = torch.tensor([4, 0, 3, 1, 2, 6, 5])
    chunks = chunk_order(order, 3)
    assert [c.tolist() for c in chunks] == [[4, 0, 3], [1, 2, 6], [5]]
    assert [c.tolist() for c in chunk_order(order, 7)] == [order.tolist()]


def test_float32_resident_features_give_the_same_batches_without_a_cast(store: FeatureStore) -> None:
    labels = selection_labels(store, None)
    half = PreloadedFeatures(store, labels, ALL_FIELDS)
    full = PreloadedFeatures(store, labels, ALL_FIELDS, float32=True)
    assert all(full.tensors[key].dtype == torch.float32 for key in KEYS if half.tensors[key].dtype == torch.float16)
    index = torch.tensor([5, 1, 2, 0])
    (a, verb_a, noun_a), (b, verb_b, noun_b) = half.batch(index), full.batch(index)
    assert all(torch.equal(a[key], b[key]) for key in KEYS)
    assert torch.equal(verb_a, verb_b) and torch.equal(noun_a, noun_b)


def test_load_features_holds_float32_only_when_twice_the_bytes_fit(store: FeatureStore) -> None:
    labels = selection_labels(store, None)
    need = estimate_bytes(store, ALL_FIELDS, len(labels.uids))
    assert load_features(store, labels, ALL_FIELDS, memory_budget=2 * need).float32
    assert not load_features(store, labels, ALL_FIELDS, memory_budget=2 * need - 1).float32


def test_preloaded_batches_are_the_stored_rows_with_derived_inputs(store: FeatureStore) -> None:
    labels = selection_labels(store, None)
    features = PreloadedFeatures(store, labels, ALL_FIELDS)
    assert features.mode == "preload" and len(features) == N - 1
    assert all(features.tensors[key].dtype == torch.float16 for key in KEYS if not key.endswith("_valid"))
    index = torch.tensor([7, 0, 3])
    batch, verb, noun = features.batch(index)
    assert sorted(batch) == sorted(KEYS)
    uids = [labels.uids[i] for i in index.tolist()]
    assert verb.tolist() == labels.verb[index].tolist() and noun.tolist() == labels.noun[index].tolist()
    assert batch["verb_global"].dtype == torch.float32
    np.testing.assert_array_equal(batch["verb_global"].numpy(),
                                  store.read_field(uids, "verb.global").astype(np.float32))
    np.testing.assert_array_equal(batch["det_local_feat"].numpy(),
                                  store.read_field(uids, "det.local.feat").astype(np.float32))
    # Padded slots (score 0) are masked out.
    scores = store.read_field(uids, "det.global.score")
    assert batch["det_global_valid"].dtype == torch.bool
    assert batch["det_global_valid"].tolist() == (scores > 0).tolist() and not batch["det_global_valid"].all()
    # Local alignment: the verb map RoI-pooled at the local boxes, computed once at load.
    expected = pool_local_verb_features(torch.from_numpy(store.read_field(uids, "verb.map")).float(),
                                        torch.from_numpy(store.read_field(uids, "det.local.box")).float())
    assert batch["verb_local"].shape == (3, 3, 6)
    torch.testing.assert_close(batch["verb_local"], expected.half().float())


def test_batches_walk_the_order_in_chunks(store: FeatureStore) -> None:
    labels = selection_labels(store, None)
    features = PreloadedFeatures(store, labels, ["verb.global"])
    order = torch.randperm(len(labels.uids), generator=torch.Generator().manual_seed(0))
    batches = list(features.batches(order, 5))
    assert [len(verb) for _, verb, _ in batches] == [5, 5, 5, 5, 3]
    assert torch.cat([verb for _, verb, _ in batches]).tolist() == labels.verb[order].tolist()
    for (batch, _, _), rows in zip(batches, chunk_order(order, 5)):
        _equal_batches((batch, labels.verb[rows], labels.noun[rows]), features.batch(rows))


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_gives_the_preloaded_batches(store: FeatureStore, workers: int) -> None:
    labels = selection_labels(store, "participant_id <= 'P26'")
    preloaded = PreloadedFeatures(store, labels, ALL_FIELDS)
    streaming = StreamingFeatures(store, labels, ALL_FIELDS, workers=workers)
    assert streaming.mode == "stream" and len(streaming) == len(preloaded)
    order = torch.randperm(len(labels.uids), generator=torch.Generator().manual_seed(2))
    got, want = list(streaming.batches(order, 4)), list(preloaded.batches(order, 4))
    assert len(got) == len(want) == math.ceil(len(order) / 4)
    for a, b in zip(got, want):
        _equal_batches(a, b)


def test_load_features_streams_only_past_the_budget(store: FeatureStore) -> None:
    labels = selection_labels(store, None)
    need = estimate_bytes(store, ALL_FIELDS, len(labels.uids))
    messages: list[str] = []
    assert load_features(store, labels, ALL_FIELDS, memory_budget=need, log=messages.append).mode == "preload"
    assert load_features(store, labels, ALL_FIELDS, memory_budget=need - 1, workers=0,
                         log=messages.append).mode == "stream"
    assert load_features(store, labels, ALL_FIELDS).mode == "preload"  # no budget: always preload
    modes = [m for m in messages if " mode for " in m]  # other lines say how verb_local is made
    assert modes[0].startswith(f"data: preload mode for {N - 1} segments")
    assert modes[1].startswith(f"data: stream mode for {N - 1} segments") and "budget" in modes[1]


def test_default_memory_budget_is_positive_on_cpu() -> None:
    assert default_memory_budget("cpu") > 0
