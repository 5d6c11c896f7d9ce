"""predictions.parquet: the contract's three columns, written atomically, read back exactly, bad files named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heads.predictions import Predictions, PredictionsError, read_predictions, write_predictions


def _predictions(n: int = 5, num_verbs: int = 4, num_nouns: int = 6, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    return Predictions(tuple(f"u{i}" for i in range(n)), rng.normal(size=(n, num_verbs)).astype(np.float32),
                       rng.normal(size=(n, num_nouns)).astype(np.float32))


def test_write_then_read_gives_back_the_same_logits(tmp_path: Path) -> None:
    predictions = _predictions()
    path = write_predictions(tmp_path / "predictions.parquet", predictions)
    table = pq.read_table(path)
    assert table.column_names[:3] == ["uid", "verb_logits", "noun_logits"]  # the contract; the rest for people
    assert table.schema.field("verb_logits").type == pa.list_(pa.float32())
    back = read_predictions(path)
    assert back.uids == predictions.uids
    np.testing.assert_array_equal(back.verb_logits, predictions.verb_logits)
    np.testing.assert_array_equal(back.noun_logits, predictions.noun_logits)
    assert read_predictions(tmp_path).uids == predictions.uids  # a run directory works too
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_the_file_carries_the_labels_and_the_top5_classes_and_actions(tmp_path: Path) -> None:
    predictions = Predictions(("a", "b"), np.array([[0.0, 3, 1, 2, -1, -2], [5, 0, 0, 0, 0, 0]], np.float32),
                              np.array([[0.0, 1], [1, 0]], np.float32))
    path = write_predictions(tmp_path / "p.parquet", predictions, verb_labels=np.array([1, -1]),
                             noun_labels=np.array([1, -1]))
    rows = pq.read_table(path).to_pylist()
    assert (rows[0]["verb_class"], rows[0]["noun_class"]) == (1, 1)
    assert (rows[1]["verb_class"], rows[1]["noun_class"]) == (None, None)  # unknown: null
    assert rows[0]["verb_top5"] == [1, 3, 2, 0, 4] and rows[0]["noun_top5"] == [1, 0]  # fewer classes: all
    assert rows[0]["action_top5"][0] == {"verb": 1, "noun": 1} and len(rows[0]["action_top5"]) == 5
    assert pq.read_table(write_predictions(tmp_path / "q.parquet", predictions)).column("verb_class").null_count == 2


def test_another_codebases_file_with_float64_or_fixed_size_lists_is_read(tmp_path: Path) -> None:
    verbs = [[0.5, 1.5, -1.0], [2.0, 0.0, 0.25]]
    table = pa.table({
        "uid": pa.array(["a", "b"]),
        "verb_logits": pa.array(verbs, pa.list_(pa.float64())),
        "noun_logits": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float64(), 2)),
        "extra": pa.array([1, 2]),
    })
    pq.write_table(table, tmp_path / "theirs.parquet")
    back = read_predictions(tmp_path / "theirs.parquet")
    assert back.uids == ("a", "b") and back.verb_logits.dtype == np.float32
    np.testing.assert_array_equal(back.verb_logits, np.array(verbs, dtype=np.float32))
    assert back.noun_logits.shape == (2, 2)


def test_subset_reorders_and_refuses_unknown_uids() -> None:
    predictions = _predictions()
    picked = predictions.subset(["u3", "u0"])
    assert picked.uids == ("u3", "u0")
    np.testing.assert_array_equal(picked.verb_logits, predictions.verb_logits[[3, 0]])
    with pytest.raises(PredictionsError, match="1 uid.*no prediction.*nope"):
        predictions.subset(["u1", "nope"])


def test_rows_and_uids_must_agree() -> None:
    with pytest.raises(PredictionsError, match="2 uids but 3 verb and 2 noun rows"):
        Predictions(("a", "b"), np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32))


@pytest.mark.parametrize("columns, message", [
    ({"uid": ["a"], "verb_logits": [[1.0]]}, "missing column.*noun_logits"),
    ({"uid": ["a", "a"], "verb_logits": [[1.0], [2.0]], "noun_logits": [[1.0], [2.0]]}, "duplicate uids"),
    ({"uid": ["a", "b"], "verb_logits": [[1.0, 2.0], [1.0]], "noun_logits": [[1.0], [2.0]]},
     "rows of verb_logits have different lengths"),
    ({"uid": ["a"], "verb_logits": [1.0], "noun_logits": [[1.0]]}, "column verb_logits must be a list of floats"),
    (pa.table({"uid": pa.array([], pa.string()), "verb_logits": pa.array([], pa.list_(pa.float32())),
               "noun_logits": pa.array([], pa.list_(pa.float32()))}), "holds no predictions"),
])
def test_malformed_files_are_refused_with_the_reason(tmp_path: Path, columns: dict, message: str) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(columns if isinstance(columns, pa.Table) else pa.table(columns), path)
    with pytest.raises(PredictionsError, match=message):
        read_predictions(path)


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(PredictionsError, match="no such predictions file"):
        read_predictions(tmp_path / "absent.parquet")
    with pytest.raises(PredictionsError, match="no such predictions file"):
        read_predictions(tmp_path)  # a folder without predictions.parquet
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(PredictionsError, match="not a readable Parquet file"):
        read_predictions(tmp_path / "text.parquet")
