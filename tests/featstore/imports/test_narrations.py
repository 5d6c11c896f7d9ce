"""``narration-pickle``: TA3N's features pickle read back by TA3N's own ``TSNDataSet``
(``../shared/peers/EPIC-KITCHENS-100_UDA_TA3N``) and compared with the store; C5-style files ordered by
an annotation file; the snippets kept or pooled; a pickle that would run code refused."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from featstore.epic.annotations import read_segments
from featstore.imports import import_features
from featstore.imports.pickles import PickleRefused
from featstore.samples.published import write_ta3n_pickle
from featstore.store.importer import ImportFailure
from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec
from tests.helpers.published_sets import write_epic100_pickle

MODALITIES = ("RGB", "Flow", "Audio")


def _source(root: Path, n: int = 6, *, ids: bool = True, shuffle: bool = True) -> tuple[Path, Path, list[str]]:
    annotations = write_epic100_pickle(root / "EPIC_100_train.pkl", n)
    uids = [str(u) for u in read_segments(annotations).column("uid").to_pylist()]
    order = list(np.random.default_rng(1).permutation(uids)) if shuffle else uids  # any order, by id
    rng = np.random.default_rng(0)
    features = {m: rng.standard_normal((n, 25, 1024)).astype(np.float32) for m in MODALITIES}
    source = write_ta3n_pickle(root / "source_train.pkl", features, order if ids else None)
    return annotations, source, order


def test_the_store_holds_what_ta3ns_reader_reads(tmp_path: Path, ta3n_dataset: type) -> None:
    annotations, source, _ = _source(tmp_path)
    report = import_features(tmp_path / "store", annotations, source, format="narration-pickle", progress=False)
    assert (report.imported, report.failed) == (6, [])
    store = FeatureStore.open(tmp_path / "store")
    assert store.fields == {f"tbn.{m.lower()}": FieldSpec("float16", (25, 1024)) for m in MODALITIES}
    for modality in MODALITIES:
        # The publisher's test path: all 25 snippets of each narration, in its label file's order.
        dataset = ta3n_dataset(str(source), str(annotations), num_dataload=6, num_segments=25, total_segments=25,
                               modality=modality, random_shift=False, test_mode=True)
        for i in range(len(dataset)):
            snippets, _, narration_id = dataset[i]
            np.testing.assert_allclose(store.read(narration_id)[f"tbn.{modality.lower()}"], snippets.numpy(),
                                       rtol=2e-3, atol=2e-3)
    publisher = store.manifest["provenance"]["publisher"]
    assert publisher["ids"] == "its narration_ids"
    assert publisher["modalities"]["Flow"] == {"shape": [25, 1024], "field": "tbn.flow"}


def test_pool_mean_and_a_modality_subset(tmp_path: Path, ta3n_dataset: type) -> None:
    annotations, source, _ = _source(tmp_path, 4)
    import_features(tmp_path / "store", annotations, source, format="narration-pickle",
                    options={"modalities": "RGB", "pool": "mean", "prefix": "ta3n"}, progress=False)
    store = FeatureStore.open(tmp_path / "store")
    assert store.fields == {"ta3n.rgb": FieldSpec("float16", (1024,))}
    dataset = ta3n_dataset(str(source), str(annotations), num_dataload=4, num_segments=25, total_segments=25,
                           modality="RGB", random_shift=False, test_mode=True)
    for i in range(len(dataset)):
        snippets, _, narration_id = dataset[i]
        np.testing.assert_allclose(store.read(narration_id)["ta3n.rgb"], snippets.numpy().mean(axis=0),
                                   rtol=2e-3, atol=2e-3)


def test_rows_without_ids_follow_the_order_file(tmp_path: Path) -> None:
    annotations, source, order = _source(tmp_path, 5, ids=False, shuffle=False)
    with pytest.raises(ImportFailure, match="has no 'narration_ids': pass --order"):
        import_features(tmp_path / "store", annotations, source, format="narration-pickle", progress=False)
    import_features(tmp_path / "store", annotations, source, format="narration-pickle",
                    options={"order": str(annotations)}, progress=False)
    store = FeatureStore.open(tmp_path / "store")
    with open(source, "rb") as handle:
        rgb = pickle.load(handle)["features"]["RGB"]
    for row, uid in enumerate(order):
        np.testing.assert_allclose(store.read(uid)["tbn.rgb"], rgb[row], rtol=2e-3, atol=2e-3)
    assert store.manifest["provenance"]["publisher"]["ids"] == "the row order of EPIC_100_train.pkl"


def test_a_narration_missing_from_the_pickle_fails_alone(tmp_path: Path) -> None:
    annotations = write_epic100_pickle(tmp_path / "EPIC_100_train.pkl", 5)
    uids = [str(u) for u in read_segments(annotations).column("uid").to_pylist()]
    features = {"RGB": np.ones((4, 25, 8), np.float32)}
    source = write_ta3n_pickle(tmp_path / "target_val.pkl", features, uids[:4])
    report = import_features(tmp_path / "store", annotations, source, format="narration-pickle", progress=False)
    assert report.imported == 4
    assert report.failed == [(uids[4], f"narration id {uids[4]} is not in target_val.pkl (its narration_ids)")]


def test_a_wrong_layout_is_one_line(tmp_path: Path) -> None:
    annotations, source, _ = _source(tmp_path, 3)
    with pytest.raises(ImportFailure, match=r"features\['RGB'\] are 1024-d, --dim says 2048"):
        import_features(tmp_path / "s", annotations, source, format="narration-pickle", options={"dim": 2048},
                        progress=False)
    with pytest.raises(ImportFailure, match=r"no modality Depth \(it has: RGB, Flow, Audio\)"):
        import_features(tmp_path / "s", annotations, source, format="narration-pickle",
                        options={"modalities": "Depth"}, progress=False)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"feats": np.zeros(3)}))
    with pytest.raises(ImportFailure, match=r"holds \['feats'\], not TA3N's"):
        import_features(tmp_path / "s", annotations, other, format="narration-pickle", progress=False)
    assert not (tmp_path / "s").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_features_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    annotations = write_epic100_pickle(tmp_path / "EPIC_100_train.pkl", 2)
    marker = tmp_path / "ran"
    evil = tmp_path / "source_train.pkl"
    evil.write_bytes(pickle.dumps({"features": {"RGB": _Payload(marker)}, "narration_ids": ["P01_100_0"]}))
    with pytest.raises(PickleRefused, match=r"refused: it names posix\.system"):
        import_features(tmp_path / "s", annotations, evil, format="narration-pickle", progress=False)
    assert not marker.exists() and not (tmp_path / "s").exists()
