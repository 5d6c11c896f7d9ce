"""featstore.epic.splits: named splits on the real annotation files, combining selections, DuckDB filtering."""
from __future__ import annotations

import pyarrow as pa
import pytest

from featstore.epic.annotations import SEGMENT_SCHEMA, read_segments
from featstore.epic.splits import NAMED_SPLITS, resolve_selection, select_segments

_cache: dict = {}


def _read(path):
    if path not in _cache:
        _cache[path] = read_segments(path)
    return _cache[path]


@pytest.fixture(scope="module")
def epic55_all(epic55_dir) -> pa.Table:
    """Every EPIC-55 segment file in one table, as a store built from all of them would hold."""
    names = [
        "EPIC_train_action_labels.csv",
        "EPIC_train_invalid_labels.csv",
        "EPIC_test_s1_timestamps.csv",
        "EPIC_test_s2_timestamps.csv",
    ]
    return pa.concat_tables([_read(epic55_dir / name) for name in names])


@pytest.fixture(scope="module")
def epic100_all(epic100_dir) -> pa.Table:
    names = ["derived/EPIC_100_train_segments_derived.csv", "EPIC_100_validation.csv", "EPIC_100_test_timestamps.csv"]
    return pa.concat_tables([_read(epic100_dir / name) for name in names])


def _small_table() -> pa.Table:
    # (participant, narration, verb): P25/P26 sit on the LFB boundary; one row has no labels.
    cells = [("P30", "cut; wash", 1), ("P01", "take", 0), ("P26", None, None), ("P25", "put", 1), ("P02", "open", 2)]
    rows = [
        {
            "uid": str(i),
            "dataset": "epic55",
            "source": "EPIC_train_action_labels",
            "participant_id": participant,
            "video_id": f"{participant}_01",
            "start_frame": 10 * i,
            "stop_frame": 10 * i + 5,
            "start_timestamp": None,
            "stop_timestamp": None,
            "narration": narration,
            "verb_class": verb,
            "noun_class": 3,
        }
        for i, (participant, narration, verb) in enumerate(cells)
    ]
    return pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)


def test_named_split_names():
    assert set(NAMED_SPLITS) == {
        "epic55-train", "epic55-lfb-train", "epic55-lfb-val", "epic55-test-s1", "epic55-test-s2",
        "epic100-train", "epic100-validation", "epic100-test",
    }


def test_lfb_protocol_counts(epic55_all):
    train = select_segments(epic55_all, resolve_selection("epic55-train"))
    lfb_train = select_segments(epic55_all, resolve_selection("epic55-lfb-train"))
    lfb_val = select_segments(epic55_all, resolve_selection("epic55-lfb-val"))
    assert (train.num_rows, lfb_train.num_rows, lfb_val.num_rows) == (28_472, 23_191, 5_281)
    uids = lambda t: set(t.column("uid").to_pylist())  # noqa: E731
    assert uids(lfb_train) | uids(lfb_val) == uids(train) and not uids(lfb_train) & uids(lfb_val)
    assert max(lfb_train.column("participant_id").to_pylist()) == "P25"
    assert min(lfb_val.column("participant_id").to_pylist()) == "P26"


@pytest.mark.parametrize(
    "split,rows",
    [("epic55-test-s1", 8_047), ("epic55-test-s2", 2_929)],
)
def test_epic55_test_splits(epic55_all, split, rows):
    selected = select_segments(epic55_all, resolve_selection(split))
    assert selected.num_rows == rows
    assert selected.column("verb_class").null_count == rows


@pytest.mark.parametrize(
    "split,rows",
    [("epic100-train", 67_217), ("epic100-validation", 9_668), ("epic100-test", 13_092)],
)
def test_epic100_splits(epic100_all, split, rows):
    assert select_segments(epic100_all, resolve_selection(split)).num_rows == rows


def test_epic100_train_split_selects_the_derived_txt_too(epic100_dir):
    table = _read(epic100_dir / "derived/EPIC_100_train_new.txt")
    assert select_segments(table, resolve_selection("epic100-train")).num_rows == 67_217


def test_resolve_selection_combinations():
    assert resolve_selection() is None
    assert resolve_selection(None, "  ") is None
    assert resolve_selection(where="verb_class = 1") == "verb_class = 1"
    assert resolve_selection("epic55-test-s1") == NAMED_SPLITS["epic55-test-s1"]
    combined = resolve_selection("epic55-lfb-val", "verb_class = 1 OR noun_class = 2")
    assert combined == f"({NAMED_SPLITS['epic55-lfb-val']}) AND (verb_class = 1 OR noun_class = 2)"


def test_unknown_split_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown split 'epic55-lfb'.*epic55-lfb-train.*epic100-test"):
        resolve_selection("epic55-lfb")


def test_combined_selection_keeps_the_or_inside(epic55_all):
    where = resolve_selection("epic55-lfb-val", "verb_class = 0 OR verb_class = 1")
    selected = select_segments(epic55_all, where)
    assert set(selected.column("verb_class").to_pylist()) == {0, 1}
    assert min(selected.column("participant_id").to_pylist()) >= "P26"


def test_select_preserves_order_and_schema():
    table = _small_table()
    selected = select_segments(table, "verb_class >= 1 OR verb_class IS NULL")
    assert selected.column("uid").to_pylist() == ["0", "2", "3", "4"]
    assert selected.schema.equals(table.schema)
    assert select_segments(table, None) is table
    assert select_segments(table, "false").num_rows == 0
    assert select_segments(table, "narration LIKE '%;%'").column("uid").to_pylist() == ["0"]


def test_select_order_on_a_large_table(epic55_all):
    # Large enough for DuckDB to scan in parallel; the file order must still come back.
    selected = select_segments(epic55_all, "noun_class IS NULL OR noun_class % 2 = 0")
    uids = epic55_all.column("uid").to_pylist()
    position = {uid: i for i, uid in enumerate(uids)}
    order = [position[uid] for uid in selected.column("uid").to_pylist()]
    assert order == sorted(order) and len(order) > 10_000


def test_bad_expression_is_a_value_error_with_duckdbs_message():
    with pytest.raises(ValueError, match=r"names no column verb_clas"):
        select_segments(_small_table(), "verb_clas = 1")
    with pytest.raises(ValueError, match="syntax error"):
        select_segments(_small_table(), "start_frame >")


def test_selection_cannot_run_a_second_statement_or_read_files(tmp_path):
    with pytest.raises(ValueError, match="not one SQL expression"):
        select_segments(_small_table(), "true); CREATE TABLE x AS SELECT 1; SELECT (1")
    secret = tmp_path / "secret.csv"
    secret.write_text("uid\n0\n")
    with pytest.raises(ValueError, match="subquery"):
        select_segments(_small_table(), f"uid IN (SELECT uid FROM read_csv('{secret}'))")
