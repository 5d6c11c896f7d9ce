"""`StoreDataset`: a store's segments as torch items, preloaded or streamed, in DataLoader workers too."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.data import StoreDataset
from featstore.store.reader import FeatureStore
from featstore.store.schema import StoreError
from tests.helpers.stores import make_small_store

FIELDS = ["verb.global", "det.global.feat", "det.global.score"]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_store(tmp_path_factory.mktemp("data"), 24)


def _equal_items(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[k] == b[k] if isinstance(a[k], str) else torch.equal(a[k], b[k]) for k in a)


def test_items_are_the_stored_fields_and_labels_preloaded_or_streamed(small_store: Path) -> None:
    store = FeatureStore.open(small_store)
    streamed = StoreDataset(store, FIELDS)
    preloaded = StoreDataset(small_store, FIELDS, preload=True)
    assert len(streamed) == len(preloaded) == 24 and streamed.uids == store.uids()
    labels = store.labels()
    for i in (0, 7, 23):
        item = streamed[i]
        assert _equal_items(item, preloaded[i])
        uid = store.uids()[i]
        assert item["uid"] == uid
        stored = store.read(uid, FIELDS)
        for field in FIELDS:
            assert item[field].dtype == torch.float32  # float16 features and float32 scores, as float32
            assert np.array_equal(item[field].numpy(), stored[field].astype(np.float32))
        assert item["verb_class"].dtype == torch.int64
        assert int(item["verb_class"]) == labels.column("verb_class")[i].as_py()
        assert int(item["noun_class"]) == labels.column("noun_class")[i].as_py()
    # What a DataLoader asks for at once: the same items, read in one transaction per shard.
    batch = streamed.__getitems__([5, 1, 9])
    assert all(_equal_items(got, streamed[i]) for got, i in zip(batch, [5, 1, 9]))
    assert all(_equal_items(got, preloaded[i]) for got, i in zip(preloaded.__getitems__([5, 1]), [5, 1]))


def test_selection_fields_dtype_and_labels_are_chosen(small_store: Path) -> None:
    val = StoreDataset(small_store, "verb.global", split="epic55-lfb-val", labels=("verb_class", "participant_id"),
                       dtype=None)
    assert val.uids == FeatureStore.open(small_store).uids(split="epic55-lfb-val") and len(val) == 12
    item = val[0]
    assert set(item) == {"verb.global", "verb_class", "participant_id", "uid"}
    assert item["verb.global"].dtype == torch.float16 and item["participant_id"] in ("P26", "P27")
    assert len(StoreDataset(small_store, ["verb.global"], where="participant_id = 'P01'")) == 6
    everything = StoreDataset(small_store)
    assert set(everything.fields) == set(FeatureStore.open(small_store).fields)


def test_refusals_say_what_is_wrong(small_store: Path) -> None:
    with pytest.raises(StoreError, match="no complete field.*verb.map"):
        StoreDataset(small_store, ["verb.map"])
    with pytest.raises(StoreError, match="named split"):
        StoreDataset(small_store, ["verb.global"], where="epic55-lfb-val")
    with pytest.raises(StoreError, match="no index column 'kitchen'"):
        StoreDataset(small_store, ["verb.global"], labels=("kitchen",))
    with pytest.raises(StoreError, match="holds 1 view.*asked for view 1"):
        StoreDataset(small_store, ["verb.global"], view=1)
    assert len(StoreDataset(small_store, ["verb.global"], view=0)) == 24  # a store without views: view 0


def test_dataloader_workers_read_the_same_batches(small_store: Path) -> None:
    dataset = StoreDataset(small_store, FIELDS)
    # Read in this process first, so that the forked workers inherit open LMDB environments and must
    # not use them (each opens its own).
    in_process = list(torch.utils.data.DataLoader(dataset, batch_size=5))
    in_workers = list(torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2))
    assert len(in_process) == len(in_workers) == 5
    for a, b in zip(in_process, in_workers):
        assert a["uid"] == b["uid"]
        assert all(torch.equal(a[k], b[k]) for k in a if k != "uid")


def test_a_view_of_a_store_with_views_reads_that_views_tensors(tmp_path: Path) -> None:
    from featstore.store.schema import FieldSpec

    store = FeatureStore.create(tmp_path / "s", fields={"verb.global": FieldSpec("float16", (4,))},
                                provenance={"views": 2})
    with store.writer() as writer:
        for uid in ("a", "b"):
            row = {"uid": uid, "participant_id": "P01", "video_id": "P01_01", "start_frame": 1, "stop_frame": 60,
                   "verb_class": 1, "noun_class": 2, "dataset": "epic55", "source": "EPIC_train_action_labels"}
            writer.put_views([({**row, "view": view, "clip_start_frame": 1, "clip_stop_frame": 60, "clip_center": 30},
                               {"verb.global": np.full(4, 10 * view + (uid == "b"), np.float32)}, None)
                              for view in (0, 1)])
    for view in (0, 1):
        dataset = StoreDataset(tmp_path / "s", ["verb.global"], view=view, preload=view == 1)
        assert dataset.uids == ["a", "b"]
        assert [float(dataset[i]["verb.global"][0]) for i in (0, 1)] == [10 * view, 10 * view + 1]
    with pytest.raises(StoreError, match="holds 2 view.*asked for view 2"):
        StoreDataset(tmp_path / "s", ["verb.global"], view=2)
