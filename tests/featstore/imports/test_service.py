"""The import loop every published format shares: killed part-way and rerun, nothing is lost and
nothing is stored twice (the writer's journal); a rerun with other settings is refused; sources are
walked video by video and read a piece at a time; unknown formats and options are one line."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featstore.imports.series as series_module
from featstore.imports import get_format, import_features, list_formats
from featstore.imports.pickles import LazyArray
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.published import write_ta3n_pickle
from featstore.store.importer import ImportFailure
from featstore.store.reader import FeatureStore
from tests.helpers.published_sets import write_actionformer_source, write_epic100_pickle, write_rulstm_source

KILL_SCRIPT = """
import os, signal, sys
from featstore.imports import import_features
store, annotations, source, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
done = []
def maybe_die(uid):
    done.append(uid)
    if len(done) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
import_features(store, annotations, source, format="rulstm-lmdb", flush_every=4, progress=False, on_segment=maybe_die)
"""


def _annotations(root: Path, n: int) -> Path:
    return write_epic55_annotations(root / "EPIC_train_action_labels.csv",
                                    generate_segments(n, num_verbs=5, num_nouns=7, frames_per_segment=60))


def test_killed_part_way_then_rerun_stores_every_segment_once(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 20)
    write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"rgb": 1024, "obj": 352})
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "store"), str(annotations),
                             str(tmp_path / "rulstm"), "11"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    again = import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb", progress=False)
    assert (again.skipped, again.imported, again.failed) == (11, 9, [])  # the 11 committed before the kill
    straight = import_features(tmp_path / "straight", annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                               progress=False)
    assert straight.imported == 20
    resumed, reference = FeatureStore.open(tmp_path / "store"), FeatureStore.open(tmp_path / "straight")
    rows = resumed.segments().to_pylist()
    assert len(rows) == 20 and sorted(r["uid"] for r in rows) == sorted(reference.uids())
    checksums = {r["uid"]: r["checksum"] for r in reference.segments().to_pylist()}
    assert all(r["checksum"] == checksums[r["uid"]] for r in rows)
    assert resumed.verify() == []


def test_a_rerun_with_other_settings_is_refused_and_failed_segments_are_retried(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 12)  # P01_01 holds segments 0 and 8
    write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"flow": 1024},
                        leave_out=lambda video, frame: video == "P01_01")
    first = import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb", progress=False)
    assert first.imported == 10 and [uid for uid, _ in first.failed] == ["0", "8"]
    with pytest.raises(ImportFailure, match=r"was imported with publisher .*'pool': 'mean'.*; this run would use "
                                            r".*'pool': 'centre'"):
        import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                        options={"pool": "centre"}, progress=False)
    write_rulstm_source(tmp_path / "fixed", annotations, modalities={"flow": 1024})
    again = import_features(tmp_path / "store", annotations, tmp_path / "fixed", format="rulstm-lmdb", progress=False)
    assert (again.skipped, again.imported, again.failed) == (10, 2, [])
    store = FeatureStore.open(tmp_path / "store")
    assert len(store.uids()) == 12 and store.uids(status="failed") == []


def test_segments_are_visited_video_by_video_and_each_file_loaded_once(tmp_path: Path, monkeypatch) -> None:
    annotations = _annotations(tmp_path, 12)
    write_actionformer_source(tmp_path / "af", annotations, dim=8)
    loads: list[str] = []
    load = series_module.load_series
    monkeypatch.setattr(series_module, "load_series", lambda path, key: loads.append(path.stem) or load(path, key))
    visited: list[str] = []
    import_features(tmp_path / "store", annotations, tmp_path / "af", format="per-video-series",
                    options={"window": 32, "stride": 16, "fps": 30.0, "dim": 8}, progress=False,
                    on_segment=visited.append)
    videos = {s.uid: s.video_id for s in generate_segments(12, num_verbs=5, num_nouns=7, frames_per_segment=60)}
    order = [videos[uid] for uid in visited]
    assert order == sorted(order) and len(visited) == 12
    assert sorted(loads[1:]) == sorted(set(videos.values()))  # each once (the first file is checked at open too)


def test_a_pickle_is_read_a_row_at_a_time_never_whole(tmp_path: Path, monkeypatch) -> None:
    annotations = write_epic100_pickle(tmp_path / "EPIC_100_train.pkl", 6)
    from featstore.epic.annotations import read_segments

    uids = [str(u) for u in read_segments(annotations).column("uid").to_pylist()]
    source = write_ta3n_pickle(tmp_path / "features.pkl", {"RGB": np.ones((6, 25, 64), np.float32)}, uids)

    def whole(self):  # noqa: ANN001 - the method replaced
        raise AssertionError("a whole array was read")

    monkeypatch.setattr(LazyArray, "read", whole)
    report = import_features(tmp_path / "store", annotations, source, format="narration-pickle", progress=False)
    assert report.imported == 6


def test_unknown_formats_and_options_are_one_line(tmp_path: Path) -> None:
    assert list_formats()[0] == "npz" and {"rulstm-lmdb", "per-video-series", "narration-pickle",
                                           "lfb-noun-bank"} <= set(list_formats())
    with pytest.raises(ImportFailure, match="unknown import format 'rulstm'; known formats: npz, "):
        get_format("rulstm")
    annotations = _annotations(tmp_path, 2)
    with pytest.raises(ImportFailure, match=r"--format rulstm-lmdb does not take --preset; its options are: "
                                            r"--check-dims, --fps, --modalities, --pool, --prefix"):
        import_features(tmp_path / "s", annotations, tmp_path, format="rulstm-lmdb",
                        options={"preset": "actionformer-epic-slowfast"}, progress=False)
    with pytest.raises(ImportFailure, match="--format npz does not take --pool; its options are: none"):
        import_features(tmp_path / "s", annotations, tmp_path, options={"pool": "mean"}, progress=False)


def test_workers_import_shares_of_the_videos_into_shards_of_their_own(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 16)
    write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"obj": 352},
                        leave_out=lambda video, frame: video == "P02_02")
    one = import_features(tmp_path / "one", annotations, tmp_path / "rulstm", format="rulstm-lmdb", progress=False)
    two = import_features(tmp_path / "two", annotations, tmp_path / "rulstm", format="rulstm-lmdb", workers=2,
                          progress=False)
    assert (two.imported, sorted(two.failed)) == (one.imported, sorted(one.failed)) and len(one.failed) == 2
    a, b = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    assert b.shards() == ["0-0", "0-1"]
    assert {r["uid"]: r["checksum"] for r in a.segments().to_pylist()} == \
        {r["uid"]: r["checksum"] for r in b.segments().to_pylist()}
    again = import_features(tmp_path / "two", annotations, tmp_path / "rulstm", format="rulstm-lmdb", workers=2,
                            progress=False)
    assert (again.skipped, again.imported) == (14, 0)  # the failed two are retried, and fail again


def test_a_worker_that_meets_a_bad_file_stops_the_import_in_one_line(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 8)
    written = write_actionformer_source(tmp_path / "af", annotations, dim=8)
    np.savez(tmp_path / "af" / "P27_02.npz", feats=np.zeros((len(written["P27_02"]), 4), np.float32))
    with pytest.raises(ImportFailure, match=r"^\S+P27_02.npz: features are 4-d; --dim expects 8-d$"):
        import_features(tmp_path / "store", annotations, tmp_path / "af", format="per-video-series",
                        options={"window": 32, "stride": 16, "fps": 30.0, "dim": 8}, workers=2, progress=False)
