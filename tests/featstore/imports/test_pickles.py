"""The allow-listed pickle machine: what Python's pickle reads of plain data, it reads the same (every
protocol, Python 2's latin-1 ``str``); arrays stay in the file until read; anything that names a
class or a function is refused before it can run."""
from __future__ import annotations

import collections
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from featstore.imports.pickles import LAZY_FROM, LazyArray, PickleFile, PickleRefused, load_pickle, materialize
from featstore.samples.published import write_python2_pickle

RNG = np.random.default_rng(0)
PLAIN = {
    "features": {"RGB": RNG.standard_normal((5, 25, 16)).astype(np.float32)},
    "narration_ids": ["P01_101_0", "P01_101_1", "é"],
    "small": np.arange(3, dtype=">i2"),
    "fortran": np.asfortranarray(RNG.standard_normal((40, 30))),
    "numbers": [1, -7, 2 ** 70, 2.5, np.float32(3.25), np.int64(9), None, True, False],
    "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
    "nested": ((1, 2), (), [3, {"x": 4}]),
    "ids": np.array(["P01_101_0", "P01_101_1"]),  # narration ids as numpy text
    "objects": np.array(["P01_101_0", 7], dtype=object),  # or as pandas' object arrays of plain items
}


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        # Byte order aside (numpy itself reads a '>i2' array back as native int16 under protocol < 5).
        b = np.asarray(b)
        return isinstance(a, np.ndarray) and (a.dtype.kind, a.dtype.itemsize) == (b.dtype.kind, b.dtype.itemsize) \
            and a.shape == b.shape and (a == b).all()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_reads_as_pythons_own_unpickler_reads_it(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(PLAIN, protocol=protocol))
    ours = load_pickle(path)
    theirs = pickle.loads(path.read_bytes())
    theirs["ordered"] = dict(theirs["ordered"])  # an OrderedDict reads as a plain dict, in its order
    assert _equal(ours, theirs)


def test_a_python2_bank_reads_as_pickle_load_with_latin1(tmp_path: Path) -> None:
    bank = [{30: RNG.standard_normal((10, 64)).astype(np.float32), 60: [], 90: np.zeros((0, 64), np.float32)},
            {0: RNG.standard_normal((2, 64)).astype(np.float32)}]
    path = write_python2_pickle(tmp_path / "train_lfb.pkl", bank)
    with warnings.catch_warnings():  # numpy.core is numpy 2's deprecated alias of numpy._core
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = pickle.loads(path.read_bytes(), encoding="latin1")
    assert _equal(load_pickle(path), theirs)
    assert _equal(theirs, bank)


def test_large_arrays_stay_in_the_file_and_read_a_row_at_a_time(tmp_path: Path) -> None:
    array = RNG.standard_normal((50, 25, 16)).astype(np.float32)
    assert array[0].nbytes < LAZY_FROM <= array.nbytes
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"features": {"RGB": array}, "small": np.arange(3)}, protocol=4))
    with PickleFile(path) as opened:
        lazy = opened.value["features"]["RGB"]
        assert isinstance(lazy, LazyArray) and isinstance(opened.value["small"], np.ndarray)
        assert (lazy.shape, lazy.dtype, len(lazy)) == ((50, 25, 16), np.float32, 50)
        np.testing.assert_array_equal(lazy[17], array[17])
        np.testing.assert_array_equal(lazy[-1], array[-1])
        np.testing.assert_array_equal(lazy.read(), array)
        np.testing.assert_array_equal(materialize(opened.value)["features"]["RGB"], array)
        with pytest.raises(IndexError):
            lazy[50]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


@pytest.mark.parametrize("make, named", [
    (lambda marker: {"features": _RunsCode(marker)}, "system"),
    (lambda marker: {"features": _Custom()}, "_Custom"),
    (lambda marker: [eval], "eval"),
    (lambda marker: np.array([_Custom()], dtype=object), "_Custom"),
    (lambda marker: np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), "structured"),
])
def test_a_pickle_that_names_code_is_refused_and_nothing_in_it_runs(tmp_path: Path, make, named: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(make(marker), protocol=2))
    with pytest.raises(PickleRefused, match=named) as err:
        load_pickle(path)
    assert str(err.value).startswith(f"{path}: refused: ") and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_truncated_or_foreign_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(PLAIN, protocol=4)[:50])
    with pytest.raises(PickleRefused, match="not a readable pickle"):
        load_pickle(path)
    path.write_bytes(b"PK\x03\x04 a zip, not a pickle")
    with pytest.raises(PickleRefused, match="refused: opcode"):
        load_pickle(path)
