"""`export_store`: a store out and back in through `featstore import`, the same values; refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.exports import PT_FILE, ExportError, export_store, list_export_formats
from featstore.imports import import_features
from featstore.store.reader import FeatureStore
from featstore.store.schema import StoreError
from tests.helpers.stores import make_small_store

ANNOTATIONS = "annotations/EPIC_train_action_labels.csv"


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_store(tmp_path_factory.mktemp("export"), 24)


def _same_fields(a: FeatureStore, b: FeatureStore, pairs: dict[str, str], uids: list[str]) -> None:
    for field_a, field_b in pairs.items():
        np.testing.assert_array_equal(a.read_field(uids, field_a), b.read_field(uids, field_b), err_msg=field_a)


def test_npz_export_imports_back_to_the_same_store(small_store: Path, tmp_path: Path) -> None:
    store = FeatureStore.open(small_store)
    report = export_store(store, tmp_path / "npz", progress=False)
    assert report.exported == 24 and report.skipped == [] and report.fields == sorted(store.fields)
    assert sorted(p.name for p in (tmp_path / "npz").iterdir()) == sorted(f"{uid}.npz" for uid in store.uids())
    assert "featstore import STORE --annotations ANNOTATIONS --from " in report.summary()
    back = import_features(tmp_path / "back", small_store.parent / ANNOTATIONS, tmp_path / "npz", progress=False)
    assert back.imported == 24 and not back.failed
    again = FeatureStore.open(tmp_path / "back")
    assert again.fields == store.fields
    _same_fields(store, again, {f: f for f in store.fields}, store.uids())
    columns = ["uid", "set", "slot", "x1", "y1", "x2", "y2", "score", "valid"]
    assert again.boxes().select(columns).equals(store.boxes().select(columns))
    assert again.labels().equals(store.labels())


def test_rulstm_export_imports_back_the_same_vectors(small_store: Path, tmp_path: Path) -> None:
    store = FeatureStore.open(small_store)
    report = export_store(store, tmp_path / "rulstm", format="rulstm-lmdb", where="participant_id <= 'P02'",
                          progress=False)
    # The feature vectors only (not boxes, scores or detection features), one LMDB each.
    assert report.fields == ["noun.global", "verb.global"] and report.exported == 12
    assert sorted(p.name for p in (tmp_path / "rulstm").iterdir()) == ["noun.global", "verb.global"]
    assert "--pool centre" in report.read_back and "--modalities noun.global,verb.global" in report.read_back
    annotations = small_store.parent / ANNOTATIONS
    uids = store.uids("participant_id <= 'P02'")
    # centre reads each segment's own key; these segments do not overlap, so the mean over a
    # segment's frames finds its key alone and reads the same vector too.
    for pool in ("centre", "mean"):
        result = import_features(tmp_path / pool, annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                                 options={"pool": pool, "check_dims": False, "modalities": "verb.global,noun.global"},
                                 progress=False)
        assert result.imported == 12 and len(result.failed) == 12  # P26 / P27 were not exported
        again = FeatureStore.open(tmp_path / pool)
        _same_fields(store, again, {"verb.global": "rulstm.verb.global", "noun.global": "rulstm.noun.global"}, uids)
        assert again.read_field(uids, "rulstm.verb.global.frames").ravel().tolist() == [1] * 12


def test_rulstm_export_reports_segments_whose_centres_share_a_frame(tmp_path: Path) -> None:
    from featstore.store.schema import FieldSpec

    store = FeatureStore.create(tmp_path / "s", fields={"rulstm.rgb": FieldSpec("float16", (4,))})
    rows = [("a", "00:00:01.00", "00:00:03.00"), ("b", "00:00:00.50", "00:00:03.50"), ("c", "00:00:05.00", "00:00:06.00")]
    with store.writer() as writer:
        for i, (uid, start, stop) in enumerate(rows):
            writer.put({"uid": uid, "participant_id": "P01", "video_id": "P01_01", "start_frame": 60, "stop_frame": 180,
                        "start_timestamp": start, "stop_timestamp": stop, "verb_class": 0, "noun_class": 0,
                        "dataset": "epic55", "source": "EPIC_train_action_labels"},
                       {"rulstm.rgb": np.full(4, i, np.float32)})
    report = export_store(tmp_path / "s", tmp_path / "out", format="rulstm-lmdb", progress=False)
    assert report.exported == 2 and [uid for uid, _ in report.skipped] == ["b"]
    assert "centre frame 60 of P01_01" in report.skipped[0][1] and "segment a" in report.skipped[0][1]
    assert (tmp_path / "out" / "rgb" / "data.mdb").is_file()  # rulstm.rgb -> rgb/, RULSTM's own name


def test_pt_export_is_one_file_of_stacked_fields_and_the_index(small_store: Path, tmp_path: Path) -> None:
    store = FeatureStore.open(small_store)
    report = export_store(store, tmp_path / "pt", format="pt", fields=["verb.global", "det.global.box"],
                          split="epic55-lfb-val", progress=False)
    assert report.files == [tmp_path / "pt" / PT_FILE] and report.read_back is None
    payload = torch.load(tmp_path / "pt" / PT_FILE)
    uids = store.uids(split="epic55-lfb-val")
    assert payload["uids"] == uids and set(payload["fields"]) == {"verb.global", "det.global.box"}
    for field, values in payload["fields"].items():
        assert values.dtype == getattr(torch, store.fields[field].dtype)
        np.testing.assert_array_equal(values.numpy(), store.read_field(uids, field))
    assert payload["index"]["verb_class"] == store.labels(split="epic55-lfb-val").column("verb_class").to_pylist()


def test_refusals(small_store: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_store(small_store, tmp_path / "full", progress=False)
    with pytest.raises(ExportError, match="unknown export format 'hdf5'; known formats: npz, pt, rulstm-lmdb"):
        export_store(small_store, tmp_path / "a", format="hdf5", progress=False)
    with pytest.raises(ExportError, match="--format npz does not take --fps"):
        export_store(small_store, tmp_path / "a", options={"fps": 30.0}, progress=False)
    with pytest.raises(ExportError, match=r"det.global.feat \(float16\[6, 4\]\) is not a 1-d floating field"):
        export_store(small_store, tmp_path / "a", format="rulstm-lmdb", fields=["det.global.feat"], progress=False)
    with pytest.raises(ExportError, match="no complete field.*verb.map"):
        export_store(small_store, tmp_path / "a", fields=["verb.map"], progress=False)
    with pytest.raises(ExportError, match="holds no stored segment"):
        export_store(small_store, tmp_path / "a", where="participant_id = 'P99'", progress=False)
    with pytest.raises(StoreError, match="named split"):
        export_store(small_store, tmp_path / "a", where="epic55-lfb-val", progress=False)
    assert not (tmp_path / "a").exists()  # refused before anything was made
    assert list_export_formats() == ["npz", "pt", "rulstm-lmdb"]
