"""featstore.epic.annotations: every real EPIC segment file, the narration-id rule, metadata, bad files."""
from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featstore.epic.annotations import (
    SEGMENT_SCHEMA,
    AnnotationError,
    detect_dataset,
    read_segments,
    reconstruct_narration_ids,
)
from featstore.epic.metadata import read_video_info

# (folder fixture, file, dataset, source, rows, labelled); counts from DESIGN section 7 and the files.
SEGMENT_FILES = [
    ("epic55_dir", "EPIC_train_action_labels.csv", "epic55", "EPIC_train_action_labels", 28_472, True),
    ("epic55_dir", "EPIC_train_invalid_labels.csv", "epic55", "EPIC_train_invalid_labels", 116, True),
    ("epic55_dir", "EPIC_train_invalid_labels.pkl", "epic55", "EPIC_train_invalid_labels", 116, True),
    ("epic55_dir", "EPIC_test_s1_timestamps.csv", "epic55", "EPIC_test_s1_timestamps", 8_047, False),
    ("epic55_dir", "EPIC_test_s1_timestamps.pkl", "epic55", "EPIC_test_s1_timestamps", 8_047, False),
    ("epic55_dir", "EPIC_test_s2_timestamps.csv", "epic55", "EPIC_test_s2_timestamps", 2_929, False),
    ("epic55_dir", "EPIC_test_s2_timestamps.pkl", "epic55", "EPIC_test_s2_timestamps", 2_929, False),
    ("epic100_dir", "EPIC_100_validation.csv", "epic100", "EPIC_100_validation", 9_668, True),
    ("epic100_dir", "EPIC_100_validation.pkl", "epic100", "EPIC_100_validation", 9_668, True),
    ("epic100_dir", "EPIC_100_test_timestamps.csv", "epic100", "EPIC_100_test_timestamps", 13_092, False),
    ("epic100_dir", "EPIC_100_test_timestamps.pkl", "epic100", "EPIC_100_test_timestamps", 13_092, False),
    ("epic100_dir", "derived/EPIC_100_train_segments_derived.csv", "epic100", "EPIC_100_train", 67_217, True),
    ("epic100_dir", "derived/EPIC_100_train_new.txt", "epic100", "EPIC_100_train", 67_217, True),
]
CSV_PKL_PAIRS = [(d, f[: -len(".pkl")]) for d, f, *_ in SEGMENT_FILES if f.endswith(".pkl")]

_cache: dict[Path, pa.Table] = {}


def segments(path: Path) -> pa.Table:
    """read_segments, once per file per session: several tests look at the same big files."""
    if path not in _cache:
        _cache[path] = read_segments(path)
    return _cache[path]


def _oracle(path: Path) -> pd.DataFrame:
    """The file read plainly with pandas, as an independent check of every row."""
    if path.suffix == ".pkl":
        return pd.read_pickle(path).reset_index()
    if path.suffix == ".txt":
        names = ["path", "start_frame", "stop_frame", "verb_class", "noun_class"]
        frame = pd.read_csv(path, sep=" ", header=None, names=names)
        frame["video_id"] = frame["path"].str.split("/").str[-1]
        frame["participant_id"] = frame["path"].str.split("/").str[0]
        return frame
    return pd.read_csv(path)


# --------------------------------------------------------------------------------------------------
# real files


@pytest.mark.parametrize("folder,name,dataset,source,rows,labelled", SEGMENT_FILES, ids=[f[1] for f in SEGMENT_FILES])
def test_every_real_segment_file_parses_row_for_row(request, folder, name, dataset, source, rows, labelled):
    path = request.getfixturevalue(folder) / name
    table = segments(path)
    assert table.schema.equals(SEGMENT_SCHEMA)
    assert table.num_rows == rows
    assert set(table.column("dataset").to_pylist()) == {dataset}
    assert set(table.column("source").to_pylist()) == {source}
    assert table.column("uid").null_count == 0
    assert len(set(table.column("uid").to_pylist())) == rows

    expected = _oracle(path)
    assert len(expected) == rows
    for column in ("start_frame", "stop_frame", "participant_id", "video_id"):
        assert table.column(column).to_pylist() == expected[column].tolist(), column
    if "uid" in expected or "narration_id" in expected:
        id_column = "uid" if "uid" in expected else "narration_id"
        assert table.column("uid").to_pylist() == expected[id_column].astype(str).tolist()
    for column in ("verb_class", "noun_class"):
        if labelled:
            want = [None if pd.isna(v) else int(v) for v in expected[column]]
        else:
            want = [None] * rows
        assert table.column(column).to_pylist() == want, column
    if "narration" in expected:
        assert table.column("narration").to_pylist() == expected["narration"].tolist()
    if "start_timestamp" in expected:
        assert table.column("start_timestamp").to_pylist() == expected["start_timestamp"].tolist()
    assert pc.all(pc.less_equal(table.column("start_frame"), table.column("stop_frame"))).as_py()


@pytest.mark.parametrize("folder,stem", CSV_PKL_PAIRS, ids=[p[1] for p in CSV_PKL_PAIRS])
def test_csv_and_pkl_give_the_same_table(request, folder, stem):
    base = request.getfixturevalue(folder)
    from_csv = segments(base / f"{stem}.csv")
    from_pkl = segments(base / f"{stem}.pkl")
    assert from_csv.equals(from_pkl)


def test_derived_train_csv_and_txt_agree(epic100_dir):
    csv = segments(epic100_dir / "derived/EPIC_100_train_segments_derived.csv")
    txt = segments(epic100_dir / "derived/EPIC_100_train_new.txt")
    assert csv.equals(txt)
    assert csv.column("narration").null_count == csv.num_rows  # the stand-in has no text


def test_epic55_train_facts(epic55_dir):
    table = segments(epic55_dir / "EPIC_train_action_labels.csv")
    frame = table.to_pandas()
    assert frame["participant_id"].nunique() == 28
    assert frame["video_id"].nunique() == 272
    pair_counts = frame.groupby(["verb_class", "noun_class"]).size()
    assert len(pair_counts) == 2_513
    assert int((pair_counts > 50).sum()) == 101  # DESIGN section 7: the report's 149 is not reproducible
    assert frame["verb_class"].max() < 125 and frame["noun_class"].max() < 352


def test_epic55_invalid_labels_have_null_verbs(epic55_dir):
    table = segments(epic55_dir / "EPIC_train_invalid_labels.csv")
    assert table.column("verb_class").null_count == 116
    train_uids = set(segments(epic55_dir / "EPIC_train_action_labels.csv").column("uid").to_pylist())
    assert not train_uids & set(table.column("uid").to_pylist())


def test_epic100_splits_cover_disjoint_videos(epic100_dir):
    videos = {
        name: set(segments(epic100_dir / name).column("video_id").to_pylist())
        for name in (
            "derived/EPIC_100_train_segments_derived.csv",
            "EPIC_100_validation.csv",
            "EPIC_100_test_timestamps.csv",
        )
    }
    train, val, test = videos.values()
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 700


# --------------------------------------------------------------------------------------------------
# the narration-id rule


def _split_id(narration_ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    parts = narration_ids.str.rsplit("_", n=1)
    return parts.str[0], parts.str[1].astype(int)


def test_official_narration_ids_are_video_and_time_rank_sorted_as_text(epic100_dir):
    frame = pd.read_csv(epic100_dir / "EPIC_100_validation.csv")
    video, k = _split_id(frame["narration_id"])
    assert (video == frame["video_id"]).all()
    # The file is sorted by narration_id as text: that order is what the rebuild rule relies on.
    assert frame["narration_id"].tolist() == sorted(frame["narration_id"])
    # k numbers a video's narrations in time order...
    by_k = frame.assign(k=k).sort_values(["video_id", "k"])
    assert by_k.groupby("video_id")["start_frame"].apply(lambda s: s.is_monotonic_increasing).all()
    # ...so "k = index within its video in file order" is wrong for almost every row.
    file_position = frame.groupby("video_id").cumcount()
    assert (file_position == k).mean() < 0.05


def test_reconstructed_ids_reproduce_validation_where_numbering_has_no_holes(epic100_dir):
    frame = pd.read_csv(epic100_dir / "EPIC_100_validation.csv")
    _, k = _split_id(frame["narration_id"])
    per_video = frame.assign(k=k).groupby("video_id")["k"].agg(["size", "max"])
    contiguous = set(per_video.index[per_video["max"] + 1 == per_video["size"]])
    assert len(contiguous) == 119 and len(per_video) == 138  # 19 videos miss 26 numbers

    rebuilt = pd.Series(reconstruct_narration_ids(frame["video_id"].to_numpy()))
    in_contiguous = frame["video_id"].isin(contiguous)
    assert (rebuilt[in_contiguous] == frame["narration_id"][in_contiguous]).all()
    assert int(in_contiguous.sum()) == 6_671
    # Where numbers are missing the rule cannot know it, and only there does it differ.
    assert int((rebuilt == frame["narration_id"]).sum()) == 8_663


def test_reconstruct_narration_ids_small_case():
    videos = ["P01_01"] * 12 + ["P02_03"] * 2
    ids = reconstruct_narration_ids(videos).tolist()
    assert ids[:4] == ["P01_01_0", "P01_01_1", "P01_01_10", "P01_01_11"]
    assert ids[4] == "P01_01_2" and ids[11] == "P01_01_9"
    assert ids[12:] == ["P02_03_0", "P02_03_1"]


def test_derived_train_uids_are_reconstructed_and_unique(epic100_dir):
    table = segments(epic100_dir / "derived/EPIC_100_train_segments_derived.csv")
    uids = pd.Series(table.column("uid").to_pylist())
    video, _ = _split_id(uids)
    assert (video == pd.Series(table.column("video_id").to_pylist())).all()
    assert uids.is_unique
    assert uids.iloc[:3].tolist() == ["P01_01_0", "P01_01_1", "P01_01_10"]


# --------------------------------------------------------------------------------------------------
# metadata, video info, dataset detection


def test_detect_dataset(epic55_dir, epic100_dir):
    assert detect_dataset(epic55_dir / "EPIC_test_s2_timestamps.pkl") == "epic55"
    assert detect_dataset(epic100_dir / "EPIC_100_validation.csv") == "epic100"
    assert detect_dataset(epic100_dir / "derived/EPIC_100_train_new.txt") == "epic100"
    assert detect_dataset(segments(epic55_dir / "EPIC_train_action_labels.csv")) == "epic55"
    assert detect_dataset(pd.DataFrame(columns=["narration_id", "video_id"])) == "epic100"
    mixed = pa.concat_tables(
        [segments(epic55_dir / "EPIC_test_s2_timestamps.csv"), segments(epic100_dir / "EPIC_100_test_timestamps.csv")]
    )
    with pytest.raises(ValueError, match="mixes"):
        detect_dataset(mixed)


# --------------------------------------------------------------------------------------------------
# malformed files

HEADER55 = "uid,participant_id,video_id,narration,start_frame,stop_frame,verb_class,noun_class"
GOOD_ROWS = [
    "0,P01,P01_01,open door,8,202,2,8",
    "1,P01,P01_01,turn on light,262,370,12,113",
    "2,P01,P01_01,take cup,400,450,0,5",
]


def _write(tmp_path: Path, rows: list[str], header: str = HEADER55, name: str = "EPIC_train_action_labels.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _replace(row: int, text: str) -> tuple[str, list[str]]:
    """The good file with one data row (1-based) replaced."""
    rows = list(GOOD_ROWS)
    rows[row - 1] = text
    return HEADER55, rows


def _without(column: str) -> tuple[str, list[str]]:
    """The good file with one column dropped."""
    index = HEADER55.split(",").index(column)
    drop = lambda line: ",".join(cell for i, cell in enumerate(line.split(",")) if i != index)  # noqa: E731
    return drop(HEADER55), [drop(row) for row in GOOD_ROWS]


BAD_FILES = {
    # name: ((header, rows), expected row, expected column, words in the message)
    "missing column": (_without("stop_frame"), None, "stop_frame", "missing"),
    "missing class column": (_without("noun_class"), None, "noun_class", "missing"),
    "missing uid": (_without("uid"), None, "uid", "missing"),
    "non-integer class": (_replace(2, "1,P01,P01_01,light,262,370,twelve,113"), 2, "verb_class", "'twelve'"),
    "fractional class": (_replace(3, "2,P01,P01_01,take cup,400,450,0,5.5"), 3, "noun_class", "'5.5'"),
    "non-integer frame": (_replace(1, "0,P01,P01_01,open door,8x,202,2,8"), 1, "start_frame", "'8x'"),
    "empty frame": (_replace(2, "1,P01,P01_01,light,,370,12,113"), 2, "start_frame", "empty"),
    "start after stop": (_replace(3, "2,P01,P01_01,cup,451,450,0,5"), 3, "start_frame", "451 > stop_frame 450"),
    "negative frame": (_replace(2, "1,P01,P01_01,light,-3,370,12,113"), 2, "start_frame", "negative"),
    "duplicate uid": (_replace(3, "1,P01,P01_01,cup,400,450,0,5"), 3, "uid", "duplicate uid '1' (first seen at row 2)"),
    "bad participant": (_replace(2, "1,Person1,P01_01,light,262,370,12,113"), 2, "participant_id", "'Person1'"),
    "participant not prefixing video": (_replace(3, "2,P02,P01_01,cup,400,450,0,5"), 3, "video_id", "'P02'"),
    "ragged row": (_replace(2, "1,P01,P01_01,light,262,370,12,113,x,y"), 2, None, "expected 8 fields, found 10"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_csv_raises_annotation_error_naming_file_row_column(tmp_path, case):
    (header, rows), row, column, words = BAD_FILES[case]
    path = _write(tmp_path, rows, header)
    with pytest.raises(AnnotationError) as info:
        read_segments(path)
    err = info.value
    message = str(err)
    assert message.startswith(str(path)), message
    assert (err.row, err.column) == (row, column), message
    if row is not None:
        assert f"row {row}" in message
    if column is not None:
        assert f"column {column!r}" in message
    assert words in message


def test_annotation_error_format_and_pickling():
    err = AnnotationError("a.csv", 3, "verb_class", "expected an integer")
    assert str(err) == "a.csv: row 3, column 'verb_class': expected an integer"
    missing = AnnotationError("a.csv", None, "uid", "required column missing")
    assert str(missing) == "a.csv: column 'uid': required column missing"
    assert str(AnnotationError("a.csv", None, None, "empty")) == "a.csv: empty"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.file, again.row, again.column, again.message) == (err.file, 3, "verb_class", err.message)
    assert str(again) == str(err)


@pytest.mark.parametrize(
    "name,content",
    [
        ("EPIC_train_action_labels.csv", bytes(range(256)) * 4),
        ("EPIC_train_action_labels.csv", b""),
        ("EPIC_100_validation.pkl", b"\x80\x04not really a pickle"),
        ("EPIC_100_validation.pkl", pickle.dumps([1, 2, 3])),
        ("EPIC_100_train_new.txt", b"P01/rgb_frames/P01_01 8 202 3\n"),
    ],
    ids=["garbage-bytes", "empty-file", "corrupt-pickle", "pickle-not-dataframe", "short-txt-line"],
)
def test_unreadable_files_raise_annotation_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AnnotationError) as info:
        read_segments(path)
    assert str(info.value).startswith(str(path))
    assert info.value.__class__ is AnnotationError
    if name.endswith(".txt"):
        assert (info.value.row, info.value.column) == (1, "noun_class")


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="file not found"):
        read_segments(tmp_path / "EPIC_100_validation.csv")


def test_bad_row_in_pickle_is_located(tmp_path):
    frame = pd.DataFrame(
        {
            "participant_id": ["P01", "P01"],
            "video_id": ["P01_11", "P01_11"],
            "start_frame": [5, 9],
            "stop_frame": [9, 3],
        },
        index=pd.Index(["P01_11_0", "P01_11_1"], name="narration_id"),
    )
    path = tmp_path / "EPIC_100_test_timestamps.pkl"
    frame.to_pickle(path)
    with pytest.raises(AnnotationError, match=r"row 2, column 'start_frame'"):
        read_segments(path)


def test_classes_written_as_floats_are_read_as_integers(tmp_path):
    # pandas writes an int column holding NaN as "3.0"; such files are common after a round trip.
    path = _write(tmp_path, ["0,P01,P01_01,a,1,2,3.0,4", "1,P01,P01_01,b,3,4,,4.00"])
    table = read_segments(path)
    assert table.column("verb_class").to_pylist() == [3, None]
    assert table.column("noun_class").to_pylist() == [4, 4]


def test_official_file_without_id_is_not_mistaken_for_the_derived_one(tmp_path):
    header = "participant_id,video_id,narration,start_frame,stop_frame,verb_class,noun_class"
    path = _write(tmp_path, ["P01,P01_11,a,1,2,3,4"], header, name="EPIC_100_validation.csv")
    with pytest.raises(AnnotationError, match="column 'narration_id'"):
        read_segments(path)


# --------------------------------------------------------------------------------------------------
# round trip, property-based

_participants = st.integers(1, 45).map(lambda n: f"P{n:02d}")
_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufeff") | st.sampled_from(',"\n '),
    max_size=12,
)
_timestamps = st.none() | st.builds(
    lambda h, m, s: f"{h:02d}:{m:02d}:{s:05.2f}", st.integers(0, 3), st.integers(0, 59), st.floats(0, 59.99)
)
_classes = st.none() | st.integers(0, 400)


@st.composite
def _segment_rows(draw):
    kind = draw(st.sampled_from(["EPIC_train_action_labels", "EPIC_test_s1_timestamps", "EPIC_100_validation"]))
    n = draw(st.integers(1, 8))
    uids = draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n, unique=True))
    rows = []
    for i, uid in enumerate(uids):
        participant = draw(_participants)
        video = f"{participant}_{draw(st.integers(1, 150)):02d}"
        start = draw(st.integers(0, 10**7))
        labelled = kind != "EPIC_test_s1_timestamps"
        rows.append(
            {
                "uid": f"{video}_{i}" if kind.startswith("EPIC_100") else str(uid),
                "participant_id": participant,
                "video_id": video,
                "start_frame": start,
                "stop_frame": start + draw(st.integers(0, 10**5)),
                "start_timestamp": draw(_timestamps),
                "stop_timestamp": draw(_timestamps),
                "narration": (draw(_text) or None) if labelled else None,
                "verb_class": draw(_classes) if labelled else None,
                "noun_class": draw(_classes) if labelled else None,
            }
        )
    return kind, rows, draw(st.randoms())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_segment_rows())
def test_read_segments_round_trips_valid_tables(case):
    kind, rows, rng = case
    dataset = "epic100" if kind.startswith("EPIC_100") else "epic55"
    frame = pd.DataFrame(rows)
    frame = frame.rename(columns={"uid": "narration_id" if dataset == "epic100" else "uid"})
    if kind == "EPIC_test_s1_timestamps":
        frame = frame.drop(columns=["narration", "verb_class", "noun_class"])
    else:
        for column in ("verb_class", "noun_class"):
            frame[column] = frame[column].astype("Int64")
    columns = list(frame.columns)
    rng.shuffle(columns)  # files are read by column name, not position
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{kind}.csv"
        frame[columns].to_csv(path, index=False)
        table = read_segments(path)
    expected = pa.Table.from_pylist(
        [{**row, "dataset": dataset, "source": kind} for row in rows], schema=SEGMENT_SCHEMA
    )
    assert table.equals(expected), (table.to_pylist(), rows)



def test_generated_epic55_files_read_back_with_their_class_names_and_video_info(tmp_path) -> None:
    import csv

    from featstore.epic.annotations import read_segments
    from featstore.samples.annotations import (
        SegmentLabel,
        write_epic55_annotations,
        write_video_info,
    )

    segments = [SegmentLabel("0", "P01", "P01_01", 9, 24, 0, 23), SegmentLabel("1", "P01", "P01_01", 33, 48, 9, 7)]
    path = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments, fps=8.0,
                                    verb_names={0: "take", 9: "move"}, noun_names={23: "cup"})
    table = read_segments(path).to_pydict()
    assert table["narration"] == ["take cup", "move noun7"]
    assert table["verb_class"] == [0, 9] and table["noun_class"] == [23, 7]
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["verb"], r["noun"], r["all_nouns"]) for r in rows] == [("take", "cup", "['cup']"),
                                                                       ("move", "noun7", "['noun7']")]
    assert table["start_timestamp"] == ["00:00:01.12", "00:00:04.12"]

    info = write_video_info(tmp_path / "EPIC_video_info.csv", [("P01_01", 128, 96, 480)], fps=8.0)
    assert read_video_info(info)["P01_01"] == pytest.approx(8.0)
