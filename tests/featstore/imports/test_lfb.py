"""``lfb-noun-bank``: LFB's Python-2 noun bank sampled by LFB's own ``sample_noun_lfb``
(``../shared/peers/video-long-term-feature-banks``, configured for SAOA's 6 s global window) and
compared with the store's ``det.global.feat`` and its validity mask; no boxes, and heads that need
them refuse the store in one line."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from featstore.epic.annotations import read_segments
from featstore.imports import import_features
from featstore.imports.lfb import read_video_order
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.published import write_lfb_frame_list, write_python2_pickle
from featstore.store.importer import ImportFailure
from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec
from heads.models import MissingFieldsError, check_fields
from tests.helpers.published_sets import video_seconds


def _bank(root: Path, n_segments: int = 8, *, dim: int = 2048, empty_from: float | None = None):
    segments = generate_segments(n_segments, num_verbs=5, num_nouns=7, frames_per_segment=300)  # 5 s each
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    rng = np.random.default_rng(0)
    bank: dict[str, dict[int, object]] = {}
    for video, seconds in sorted(video_seconds(annotations).items(), reverse=True):  # not sorted by id
        frames = {}
        for second in range(int(seconds) + 1):
            if empty_from is not None and second >= empty_from:
                break
            n = int(rng.integers(0, 13))  # up to 12 boxes; some frames empty, as LFB writes []
            frames[second * 30] = rng.standard_normal((n, dim)).astype(np.float32) if n else []
        bank[video] = frames
    frame_list = write_lfb_frame_list(root / "frame_lists" / "train.csv", {v: sorted(f) for v, f in bank.items()})
    source = write_python2_pickle(root / "noun_lfb" / "train_lfb.pkl", list(bank.values()))
    return annotations, source, frame_list, bank


def test_the_store_holds_what_lfbs_sampler_takes_around_each_segment(tmp_path: Path,
                                                                     lfb_epic: types.ModuleType) -> None:
    annotations, source, frame_list, bank = _bank(tmp_path)
    report = import_features(tmp_path / "store", annotations, source, format="lfb-noun-bank",
                             options={"videos": str(frame_list)}, progress=False)
    assert (report.imported, report.failed) == (8, [])
    store = FeatureStore.open(tmp_path / "store")
    assert store.fields == {"det.global.feat": FieldSpec("float16", (60, 2048)),
                            "det.global.score": FieldSpec("float32", (60,))}
    assert len(store.boxes()) == 0  # no boxes: the bank has none
    for row in read_segments(annotations).to_pylist():
        start = lfb_epic.sec_to_frame(lfb_epic.time_to_sec(row["start_timestamp"]))
        stop = lfb_epic.sec_to_frame(lfb_epic.time_to_sec(row["stop_timestamp"]))
        expected = lfb_epic.sample_noun_lfb((start + stop) // 2, bank[row["video_id"]])  # (60, 2048), zero-padded
        stored = store.read(row["uid"])
        np.testing.assert_allclose(stored["det.global.feat"], expected, rtol=2e-3, atol=2e-3)
        filled = int((np.abs(expected).sum(axis=1) > 0).sum())
        assert filled > 0 and stored["det.global.score"].tolist() == [1.0] * filled + [0.0] * (60 - filled)
    publisher = store.manifest["provenance"]["publisher"]
    assert (publisher["dim"], publisher["slots"], publisher["boxes_per_frame"]) == (2048, 60, 10)
    assert publisher["videos"] == "the order of train.csv"


def test_a_segment_with_no_bank_frames_near_it_fails_alone(tmp_path: Path) -> None:
    annotations, source, frame_list, _ = _bank(tmp_path, 16, empty_from=4)  # frames of the first 4 s only
    report = import_features(tmp_path / "store", annotations, source, format="lfb-noun-bank",
                             options={"videos": str(frame_list)}, progress=False)
    assert report.imported == 8 and len(report.failed) == 8  # the second segment of each video: 5-10 s
    uid, reason = report.failed[0]
    assert reason.startswith("no bank frames of P") and "frames 135-315 (6 s around 7.51 s at 30 fps)" in reason


def test_a_bank_that_does_not_match_its_options_is_one_line(tmp_path: Path) -> None:
    annotations, source, frame_list, bank = _bank(tmp_path, 4)
    with pytest.raises(ImportFailure, match=r"bank rows have shape \[\d+, 2048\]; --dim is 1024"):
        import_features(tmp_path / "s", annotations, source, format="lfb-noun-bank",
                        options={"videos": str(frame_list), "dim": 1024}, progress=False)
    with pytest.raises(ImportFailure, match="is a list by video: pass --videos"):
        import_features(tmp_path / "s", annotations, source, format="lfb-noun-bank", progress=False)
    short = tmp_path / "videos.txt"
    short.write_text("P01_01\n")
    with pytest.raises(ImportFailure, match=r"holds 4 videos; .*videos.txt lists 1"):
        import_features(tmp_path / "s", annotations, source, format="lfb-noun-bank",
                        options={"videos": str(short)}, progress=False)
    assert not (tmp_path / "s").exists()
    assert read_video_order(frame_list) == list(bank)


def test_heads_read_its_features_and_heads_that_need_boxes_refuse_it(tmp_path: Path) -> None:
    annotations, source, frame_list, _ = _bank(tmp_path, 4)
    import_features(tmp_path / "store", annotations, source, format="lfb-noun-bank",
                    options={"videos": str(frame_list)}, progress=False)
    fields = FeatureStore.open(tmp_path / "store").fields
    check_fields("vectors", fields, verb_fields="det.global.feat", noun_fields="det.global.feat")
    with pytest.raises(MissingFieldsError) as err:
        check_fields("saoa", fields)
    message = str(err.value)
    assert "\n" not in message and "det.local.feat" in message
    assert "come without boxes (e.g. imported from LFB's noun bank)" in message
