"""Leaderboard zips against the real EPIC test timestamp files: keys, counts, types, refusals, speed."""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from heads.actions import action_scores, lfb_action_prior, softmax
from heads.predictions import Predictions, write_predictions
from heads.submission import (
    SubmissionError,
    align_to_test_set,
    epic55_submission,
    epic100_submission,
    timestamp_uids,
)


def _random_predictions(uids, num_verbs: int, num_nouns: int, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    return Predictions(tuple(uids), (3 * rng.normal(size=(len(uids), num_verbs))).astype(np.float32),
                       (3 * rng.normal(size=(len(uids), num_nouns))).astype(np.float32))


def _read(zip_path: Path) -> dict[str, dict]:
    with zipfile.ZipFile(zip_path) as archive:
        assert all("/" not in name for name in archive.namelist())  # a flat archive
        return {name: json.loads(archive.read(name)) for name in archive.namelist()}


@pytest.mark.slow  # every EPIC-55 test segment (11k), timed
def test_epic55_zip_holds_every_test_segment_with_the_official_layout(epic55_dir: Path, tmp_path: Path) -> None:
    s1, s2 = timestamp_uids(epic55_dir, "epic55-s1"), timestamp_uids(epic55_dir, "epic55-s2")
    assert (len(s1), len(s2)) == (8047, 2929) and s1[0] == "1924"
    seen = _random_predictions(s1, 125, 352, seed=1)
    unseen = _random_predictions(s2[::-1], 125, 352, seed=2)  # any row order is accepted
    write_predictions(tmp_path / "seen.parquet", seen)
    started = time.perf_counter()
    summary = epic55_submission(tmp_path / "seen.parquet", unseen, epic55_dir, tmp_path / "sub.zip",
                                action_prior_from=epic55_dir / "EPIC_train_action_labels.csv")
    elapsed = time.perf_counter() - started
    assert summary.segments == {"seen.json": 8047, "unseen.json": 2929}
    # Test segments are not in the training file: nothing to leave out, every training row counted.
    assert summary.action_prior == {"from": str((epic55_dir / "EPIC_train_action_labels.csv").resolve()),
                                    "excluded_scored_segments": 0, "counted": 28472}
    assert elapsed < 30, f"{elapsed:.1f}s"  # about 5 s on one core; generous for a busy CI machine
    files = _read(tmp_path / "sub.zip")
    assert set(files) == {"seen.json", "unseen.json"}
    for name, uids in (("seen.json", s1), ("unseen.json", s2)):
        document = files[name]
        assert list(document) == ["version", "challenge", "results"]
        assert document["version"] == "0.1" and document["challenge"] == "action_recognition"
        assert list(document["results"]) == list(uids)  # every segment once, in the file's order
    entry = files["seen.json"]["results"]["1924"]
    assert list(entry) == ["verb", "noun", "action"]
    assert list(entry["verb"]) == [str(i) for i in range(125)] and len(entry["noun"]) == 352
    values = list(entry["verb"].values()) + list(entry["noun"].values()) + list(entry["action"].values())
    assert all(type(v) is float for v in values)
    assert np.allclose([entry["verb"][str(i)] for i in range(125)], softmax(seen.verb_logits[0].astype(np.float64)),
                       rtol=1e-7)
    # The 100 actions are action_scores with the LFB prior, best first.
    assert len(entry["action"]) == 100
    from featstore.epic.annotations import read_segments

    train = read_segments(epic55_dir / "EPIC_train_action_labels.csv")
    prior = lfb_action_prior(train.column("verb_class").to_numpy(), train.column("noun_class").to_numpy(), 125, 352)
    pairs, scores = action_scores(seen.verb_logits[:1], seen.noun_logits[:1], prior=prior)
    assert list(entry["action"]) == [f"{v},{n}" for v, n in pairs[0]]
    assert np.allclose(list(entry["action"].values()), scores[0], rtol=1e-7)


def test_a_missing_or_extra_segment_is_refused(epic55_dir: Path, tmp_path: Path) -> None:
    s1, s2 = timestamp_uids(epic55_dir, "epic55-s1"), timestamp_uids(epic55_dir, "epic55-s2")
    seen, unseen = _random_predictions(s1, 125, 352), _random_predictions(s2, 125, 352)
    short = seen.subset(list(s1[:100]) + list(s1[101:]))
    with pytest.raises(SubmissionError, match=rf"seen \(S1\).*1 of 8047 test segments missing: {s1[100]}"):
        epic55_submission(short, unseen, epic55_dir, tmp_path / "sub.zip")
    extra = Predictions(s2 + ("999999",), np.zeros((len(s2) + 1, 125), np.float32), np.zeros((len(s2) + 1, 352),
                                                                                               np.float32))
    with pytest.raises(SubmissionError, match=r"unseen \(S2\).*1 not in the test set: 999999"):
        epic55_submission(seen, extra, epic55_dir, tmp_path / "sub.zip")
    with pytest.raises(SubmissionError, match="need 125 and 352"):
        epic55_submission(seen, _random_predictions(s2, 97, 300), epic55_dir, tmp_path / "sub.zip")
    with pytest.raises(SubmissionError, match="no EPIC_test_s1_timestamps"):
        epic55_submission(seen, unseen, tmp_path, tmp_path / "sub.zip")
    assert not (tmp_path / "sub.zip").exists()
    # Long lists are cut to their first few entries.
    with pytest.raises(SubmissionError, match=r"8047 of 8047 test segments missing: 1924, 1925, .*\(8042 more\)"):
        align_to_test_set(_random_predictions(["x"], 125, 352), s1, "seen (S1)")


@pytest.mark.slow  # every EPIC-100 test segment
def test_epic100_zip_has_the_supervision_levels_and_every_narration(epic100_dir: Path, tmp_path: Path) -> None:
    ids = timestamp_uids(epic100_dir, "epic100-test")
    assert len(ids) == 13092 and ids[0] == "P01_101_0"
    test = _random_predictions(ids, 97, 300, seed=3)
    summary = epic100_submission(test, epic100_dir, tmp_path / "test.zip", sls_pt=2, sls_tl=4, sls_td=3)
    assert summary.segments == {"test.json": 13092}
    document = _read(tmp_path / "test.zip")["test.json"]
    assert list(document) == ["version", "challenge", "sls_pt", "sls_tl", "sls_td", "results"]
    assert document["version"] == "0.2" and (document["sls_pt"], document["sls_tl"], document["sls_td"]) == (2, 4, 3)
    assert all(type(document[k]) is int for k in ("sls_pt", "sls_tl", "sls_td"))
    assert list(document["results"]) == list(ids)
    entry = document["results"]["P01_101_0"]
    assert list(entry) == ["verb", "noun"] and len(entry["verb"]) == 97 and len(entry["noun"]) == 300
    assert all(type(v) is float for v in entry["noun"].values())
    # Logits by default (the server takes its own softmax over the top-100 scores).
    assert np.allclose([entry["verb"][str(i)] for i in range(97)], test.verb_logits[0], rtol=1e-7)
    with pytest.raises(SubmissionError, match="sls_pt must be an integer from 0 to 5"):
        epic100_submission(test, epic100_dir, tmp_path / "bad.zip", sls_pt=6)
    with pytest.raises(SubmissionError, match="1 of 13092 test segments missing: P01_101_0"):
        epic100_submission(test.subset(ids[1:]), epic100_dir, tmp_path / "bad.zip")
