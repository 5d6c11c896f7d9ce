"""``per-video-series``: ActionFormer's per-video ``.npz`` files read back by ActionFormer's own dataset
(``../shared/peers/actionformer_release``) and compared with what lands in the store; ``.npy`` and
``.pt`` series; a wrong preset refused in one line; a segment past the series fails alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.epic.annotations import read_segments
from featstore.imports import import_features
from featstore.imports.series import window_weights
from featstore.imports.timing import SegmentSpan, timestamp_seconds
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.store.importer import ImportFailure
from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec
from tests.helpers.published_sets import write_actionformer_source

PRESET = {"preset": "actionformer-epic-slowfast"}


def _annotations(root: Path, n: int = 8) -> Path:
    return write_epic55_annotations(root / "EPIC_train_action_labels.csv",
                                    generate_segments(n, num_verbs=5, num_nouns=7, frames_per_segment=97))


def _publisher_view(dataset_class: type, root: Path, annotations: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """uid -> (feats (C, T), segment in feature-grid units) as ActionFormer's EpicKitchensDataset gives them."""
    rows = read_segments(annotations).to_pylist()
    database: dict[str, dict] = {}
    for row in rows:
        video = database.setdefault(row["video_id"], {"subset": "training", "fps": 30, "annotations": []})
        video["annotations"].append({"segment": [timestamp_seconds(row["start_timestamp"]),
                                                 timestamp_seconds(row["stop_timestamp"])],
                                     "label": f"verb{row['verb_class']}", "label_id": row["verb_class"],
                                     "uid": row["uid"]})
    (root / "epic_verb.json").write_text(json.dumps({"database": database}))
    dataset = dataset_class(
        is_training=False, split=["training"], feat_folder=str(root / "actionformer"),
        json_file=str(root / "epic_verb.json"), feat_stride=16, num_frames=32, default_fps=30, downsample_rate=1,
        max_seq_len=2304, trunc_thresh=0.5, crop_ratio=None, input_dim=2304, num_classes=97, file_prefix=None,
        file_ext=".npz", force_upsampling=False)
    view = {}
    for i in range(len(dataset)):
        item = dataset[i]
        for annotation, segment in zip(database[item["video_id"]]["annotations"], item["segments"].numpy()):
            view[annotation["uid"]] = (item["feats"].numpy(), segment, item["feat_num_frames"] / item["feat_stride"])
    return view


def test_the_store_holds_what_actionformers_reader_reads_pooled_over_each_segment(
        tmp_path: Path, actionformer_dataset: type) -> None:
    annotations = _annotations(tmp_path)
    write_actionformer_source(tmp_path / "actionformer", annotations)
    report = import_features(tmp_path / "store", annotations, tmp_path / "actionformer", format="per-video-series",
                             options=PRESET, progress=False)
    assert (report.imported, report.failed) == (8, [])
    store = FeatureStore.open(tmp_path / "store")
    assert store.fields == {"actionformer.slowfast": FieldSpec("float16", (2304,))}
    for uid, (feats, (start, stop), width) in _publisher_view(actionformer_dataset, tmp_path, annotations).items():
        # The reader puts feature t's centre at grid point t, covering [t - width/2, t + width/2].
        t = np.arange(feats.shape[1])
        overlap = np.clip(np.minimum(t + width / 2, stop) - np.maximum(t - width / 2, start), 0, None)
        expected = feats @ overlap / overlap.sum()
        np.testing.assert_allclose(store.read(uid)["actionformer.slowfast"], expected, rtol=2e-3, atol=2e-3)
    publisher = store.manifest["provenance"]["publisher"]
    assert (publisher["window"], publisher["stride"], publisher["fps"], publisher["dim"]) == (32, 16, 30.0, 2304)


def test_nearest_takes_the_window_centred_nearest_the_segment(tmp_path: Path, actionformer_dataset: type) -> None:
    annotations = _annotations(tmp_path, 4)
    write_actionformer_source(tmp_path / "actionformer", annotations)
    import_features(tmp_path / "store", annotations, tmp_path / "actionformer", format="per-video-series",
                    options={**PRESET, "pool": "nearest"}, progress=False)
    store = FeatureStore.open(tmp_path / "store")
    for uid, (feats, (start, stop), _) in _publisher_view(actionformer_dataset, tmp_path, annotations).items():
        nearest = int(np.argmin(np.abs(np.arange(feats.shape[1]) - (start + stop) / 2)))
        np.testing.assert_allclose(store.read(uid)["actionformer.slowfast"], feats[:, nearest], rtol=2e-3, atol=2e-3)


def test_overlap_weights_are_seconds_in_common() -> None:
    span = SegmentSpan("0", "P01_01", 1.0, 2.0)
    weights = window_weights(span, 6, window=30, stride=15, fps=30.0)  # windows [0,1), [0.5,1.5), [1,2), ...
    np.testing.assert_allclose(weights, [0.0, 0.5, 1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("ext", [".npy", ".pt"])
def test_npy_and_pt_series_import_as_the_npz_does(tmp_path: Path, ext: str) -> None:
    annotations = _annotations(tmp_path, 4)
    written = write_actionformer_source(tmp_path / "npz", annotations, dim=64)
    (tmp_path / "other").mkdir()
    for video, feats in written.items():
        if ext == ".npy":
            np.save(tmp_path / "other" / f"{video}.npy", feats)
        else:
            torch.save(torch.from_numpy(feats), tmp_path / "other" / f"{video}.pt")
    layout = {"window": 32, "stride": 16, "fps": 30.0, "dim": 64, "field": "clip.feat"}
    import_features(tmp_path / "a", annotations, tmp_path / "npz", format="per-video-series", options=layout,
                    progress=False)
    import_features(tmp_path / "b", annotations, tmp_path / "other", format="per-video-series",
                    options={**layout, "ext": ext}, progress=False)
    a, b = FeatureStore.open(tmp_path / "a"), FeatureStore.open(tmp_path / "b")
    for uid in a.uids():
        np.testing.assert_array_equal(a.read(uid)["clip.feat"], b.read(uid)["clip.feat"])


def test_a_wrong_preset_is_one_line_naming_what_differs(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 2)
    write_actionformer_source(tmp_path / "narrow", annotations, dim=1024)
    with pytest.raises(ImportFailure, match=r"features are 1024-d; --preset actionformer-epic-slowfast expects 2304-d"):
        import_features(tmp_path / "s", annotations, tmp_path / "narrow", format="per-video-series", options=PRESET,
                        progress=False)
    (tmp_path / "keys").mkdir()
    np.savez(tmp_path / "keys" / "P01_01.npz", x=np.zeros((9, 2304), np.float32))
    with pytest.raises(ImportFailure, match=r"P01_01.npz has no array 'feats' \(it has: x\)"):
        import_features(tmp_path / "s", annotations, tmp_path / "keys", format="per-video-series", options=PRESET,
                        progress=False)
    with pytest.raises(ImportFailure, match="known presets are actionformer-epic-slowfast, ego4d-slowfast"):
        import_features(tmp_path / "s", annotations, tmp_path / "keys", format="per-video-series",
                        options={"preset": "actionformer"}, progress=False)
    with pytest.raises(ImportFailure, match=r"per-video-series needs --window, --stride, --fps, --dim"):
        import_features(tmp_path / "s", annotations, tmp_path / "keys", format="per-video-series", progress=False)
    assert not (tmp_path / "s").exists()


def test_a_segment_past_the_series_or_of_a_missing_video_fails_alone(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 16)  # two segments a video, the second from 1.62 s
    written = write_actionformer_source(tmp_path / "actionformer", annotations)
    rows = read_segments(annotations).to_pylist()
    last = max((r for r in rows if r["video_id"] == "P01_01"), key=lambda r: r["start_frame"])
    np.savez(tmp_path / "actionformer" / "P01_01.npz", feats=written["P01_01"][:2])  # 2 windows: 0-1.6 s
    (tmp_path / "actionformer" / "P02_01.npz").unlink()
    report = import_features(tmp_path / "store", annotations, tmp_path / "actionformer", format="per-video-series",
                             options=PRESET, progress=False)
    reasons = dict(report.failed)
    assert reasons[last["uid"]].startswith("no window of P01_01.npz (2 windows, 0-1.60 s) overlaps ")
    missing = [r["uid"] for r in rows if r["video_id"] == "P02_01"]
    assert all(reasons[uid] == f"no P02_01.npz in {tmp_path / 'actionformer'}" for uid in missing)
    assert report.imported == 16 - len(reasons) and len(reasons) == 3
