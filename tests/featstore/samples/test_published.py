"""The published layouts the import tests are written in: RULSTM's LMDB keys and raw float32
values, TA3N's pickle, LFB's frame list, and a Python-2 pickle with Python 2's own opcodes."""
from __future__ import annotations

import pickle
import pickletools
import warnings
from pathlib import Path

import lmdb
import numpy as np

from featstore.samples.published import (
    rulstm_key,
    write_lfb_frame_list,
    write_python2_pickle,
    write_rulstm_lmdb,
    write_ta3n_pickle,
)


def test_rulstm_lmdb_holds_raw_float32_under_rulstms_keys(tmp_path: Path) -> None:
    vectors = {f: np.full(4, f, np.float32) for f in (1, 2, 10)}
    write_rulstm_lmdb(tmp_path / "rgb", [("P01_01", f, v) for f, v in vectors.items()], commit_every=2)
    with lmdb.open(str(tmp_path / "rgb"), readonly=True, lock=False) as env, env.begin() as txn:
        entries = list(txn.cursor())
    assert [k for k, _ in entries] == [b"P01_01_frame_0000000001.jpg", b"P01_01_frame_0000000002.jpg",
                                       b"P01_01_frame_0000000010.jpg"]
    assert all(np.array_equal(np.frombuffer(v, "float32"), vectors[int(k[-14:-4])]) for k, v in entries)
    assert rulstm_key("P01_01", 10) == entries[-1][0]


def test_ta3n_pickle_is_features_by_modality_and_narration_ids(tmp_path: Path) -> None:
    rgb = np.ones((2, 25, 3), np.float32)
    path = write_ta3n_pickle(tmp_path / "t.pkl", {"RGB": rgb}, ["a", "b"])
    loaded = pickle.loads(path.read_bytes())
    assert loaded["narration_ids"] == ["a", "b"] and np.array_equal(loaded["features"]["RGB"], rgb)
    assert "narration_ids" not in pickle.loads(write_ta3n_pickle(tmp_path / "c5.pkl", {"RGB": rgb}, None).read_bytes())


def test_lfb_frame_list_has_lfbs_header_and_columns(tmp_path: Path) -> None:
    lines = write_lfb_frame_list(tmp_path / "train.csv", {"P02_01": [0, 30], "P01_01": [0]}).read_text().splitlines()
    assert lines[0] == "original_vido_id video_id frame_id path labels"
    assert [line.split()[:3] for line in lines[1:]] == [["P02_01", "0", "0"], ["P02_01", "0", "30"], ["P01_01", "1", "0"]]
    assert all(len(line.split()) == 5 for line in lines)


def test_python2_pickle_uses_python2s_opcodes_and_reads_back_with_latin1(tmp_path: Path) -> None:
    bank = [{30: np.arange(6, dtype=np.float32).reshape(2, 3), 60: []}, {}]
    path = write_python2_pickle(tmp_path / "train_lfb.pkl", bank)
    ops = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
    assert {"PROTO", "GLOBAL", "SHORT_BINSTRING", "REDUCE", "BUILD"} <= ops
    assert not ops & {"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES", "STACK_GLOBAL"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core: numpy 2's alias of numpy._core
        loaded = pickle.loads(path.read_bytes(), encoding="latin1")
    assert np.array_equal(loaded[0][30], bank[0][30]) and loaded[0][60] == [] and loaded[1] == {}
