"""EPIC-Kitchens segment annotation files -> one segment table.

Every annotation file of EPIC-Kitchens 55 and 100 that describes segments reads into the same Arrow
table (:data:`SEGMENT_SCHEMA`), whatever its format:

================================  =========  ===================================================
file                              dataset    notes
================================  =========  ===================================================
EPIC_train_action_labels.csv      epic55     ``uid`` is the segment id
EPIC_train_invalid_labels.csv/pkl epic55     some ``verb_class`` empty (null)
EPIC_test_s{1,2}_timestamps       epic55     no labels
EPIC_100_train/validation         epic100    ``narration_id`` is the segment id
EPIC_100_test_timestamps          epic100    no labels
derived/EPIC_100_train_*.csv/txt  epic100    stand-in for the absent official train file; no
                                             narration_id, so ids are reconstructed (see
                                             :func:`reconstruct_narration_ids`)
================================  =========  ===================================================

The ``.pkl`` files are pandas pickles of the same rows with the id as the index; they read into a
table equal to the CSV's. Only read pickles you trust: unpickling runs code.

Every problem with a file is an :class:`AnnotationError` that names the file, the 1-based data row
(header excluded) and the column, never a parser traceback, because these files are edited by hand
and the first thing a user needs is where to look.

The files that describe the segments' classes and videos (class lists, evaluation subsets, frame
rates) read in `featstore.epic.metadata`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "AnnotationError",
    "SEGMENT_SCHEMA",
    "check_participant_ids",
    "detect_dataset",
    "parse_int_column",
    "read_annotation_rows",
    "read_segments",
    "reconstruct_narration_ids",
]

SEGMENT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),  # EPIC-55 `uid`, EPIC-100 `narration_id`
        ("dataset", pa.string()),  # 'epic55' | 'epic100'
        ("source", pa.string()),  # annotation file stem; the named splits select on it
        ("participant_id", pa.string()),
        ("video_id", pa.string()),
        ("start_frame", pa.int64()),
        ("stop_frame", pa.int64()),
        ("start_timestamp", pa.string()),
        ("stop_timestamp", pa.string()),
        ("narration", pa.string()),
        ("verb_class", pa.int64()),  # null when unlabelled (test sets, invalid labels)
        ("noun_class", pa.int64()),
    ]
)

# The source every EPIC-100 train file gets, official or derived, so that one split selects both.
EPIC100_TRAIN_SOURCE = "EPIC_100_train"

# Columns of the derived one-line-per-segment list (EPIC_100_train_new.txt), which has no header.
_DERIVED_TXT_COLUMNS = ("path", "start_frame", "stop_frame", "verb_class", "noun_class")
# Columns of its CSV twin (EPIC_100_train_segments_derived.csv).
_DERIVED_CSV_COLUMNS = frozenset(
    {"participant_id", "video_id", "start_frame", "stop_frame", "verb_class", "noun_class"}
)

_LABEL_HINTS = ("verb_class", "noun_class", "verb", "noun", "narration")
_PARTICIPANT_RE = r"P\d\d"
# Up to 18 digits always fits int64; a trailing ".0" is what pandas writes for an int column with NaN.
_INT_RE = r"[+-]?\d{1,18}(?:\.0*)?"
_RAGGED_RE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


class AnnotationError(ValueError):
    """A problem in an annotation file, located by file, data row and column.

    ``str(err)`` is ``"{file}: row {row}, column {column!r}: {message}"``; the row and column parts
    are left out when they do not apply (``row`` is 1-based, the header excluded).

    Args:
        file: the file's path as given.
        row: 1-based data row, or None.
        column: the column's name, or None.
        message: what is wrong.
    """

    def __init__(self, file: str | os.PathLike, row: int | None, column: str | None, message: str):
        self.file = str(file)
        self.row = None if row is None else int(row)
        self.column = column
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        location = f": {', '.join(where)}" if where else ""
        return f"{self.file}{location}: {self.message}"

    def __reduce__(self):  # keep it picklable across worker processes despite the custom __init__
        return (type(self), (self.file, self.row, self.column, self.message))


# --------------------------------------------------------------------------------------------------
# reading raw rows


@dataclass(frozen=True)
class _Kind:
    dataset: str  # 'epic55' | 'epic100'
    id_column: str | None  # None: ids are reconstructed (derived EPIC-100 train)
    labelled: bool
    source: str


def read_annotation_rows(path: Path) -> pd.DataFrame:
    """The file's rows as a DataFrame: CSV cells as strings ('' when empty), a pkl as pickled.

    Raises:
        AnnotationError: missing file, or one that does not parse (ragged rows name their row).
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".pkl":
            frame = pd.read_pickle(path)
        elif suffix == ".txt":
            frame = pd.read_csv(
                path,
                sep=" ",
                header=None,
                names=list(_DERIVED_TXT_COLUMNS),
                dtype=str,
                keep_default_na=False,
                encoding="utf-8",
            )
        else:
            # All as text: integer checks are ours, so a bad cell is reported, not silently made float;
            # keep_default_na=False keeps a narration such as "NA" as text.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(path, None, None, "file not found") from None
    except Exception as err:  # noqa: BLE001 -- any parser failure becomes one clear error
        kind = {".pkl": "pickle", ".txt": "a space-separated segment list"}.get(suffix, "CSV")
        detail = " ".join(str(err).split()) or type(err).__name__
        ragged = _RAGGED_RE.search(detail)
        if ragged and suffix != ".pkl":
            # pandas counts physical lines with the header as line 1; ours are data rows.
            expected, line, found = (int(g) for g in ragged.groups())
            header_lines = 0 if suffix == ".txt" else 1
            raise AnnotationError(
                path, line - header_lines, None, f"cannot read as {kind}: expected {expected} fields, found {found}"
            ) from err
        raise AnnotationError(path, None, None, f"cannot read as {kind}: {detail}") from err
    if not isinstance(frame, pd.DataFrame):
        raise AnnotationError(path, None, None, f"the pickle holds a {type(frame).__name__}, not a pandas DataFrame")
    if suffix == ".pkl":
        # The official pickles keep the segment id as the index.
        if frame.index.name in frame.columns:
            frame = frame.reset_index(drop=True)
        elif frame.index.name is not None:
            frame = frame.reset_index()
        else:
            frame = frame.reset_index(drop=True)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _kind_of(columns, path: Path) -> _Kind:
    """Which dataset and file kind a set of columns (and, for ambiguous cases, the name) means."""
    cols = set(columns)
    stem = path.stem
    if "narration_id" in cols:
        dataset, id_column = "epic100", "narration_id"
    elif "uid" in cols:
        dataset, id_column = "epic55", "uid"
    elif path.suffix.lower() == ".txt" or stem.startswith(EPIC100_TRAIN_SOURCE) or cols <= _DERIVED_CSV_COLUMNS:
        # Only the derived EPIC-100 train list has segments without an id column. An official file
        # that lost its id column has other columns (timestamps, narration) and is an error below,
        # not silently read as derived with made-up ids.
        dataset, id_column = "epic100", None
    else:
        missing = "narration_id" if stem.startswith("EPIC_100") else "uid"
        raise AnnotationError(
            path, None, missing, "required column missing (an EPIC-55 file has 'uid', an EPIC-100 file 'narration_id')"
        )
    # Test files carry no labels; anything else (or any file with a label column) must carry both.
    labelled = "test" not in stem.lower() or bool(cols & set(_LABEL_HINTS))
    if id_column is None or stem.startswith(EPIC100_TRAIN_SOURCE):
        source = EPIC100_TRAIN_SOURCE
    else:
        source = stem
    return _Kind(dataset=dataset, id_column=id_column, labelled=labelled, source=source)


def _required_columns(kind: _Kind, txt: bool) -> list[str]:
    if txt:
        return list(_DERIVED_TXT_COLUMNS)
    required = [kind.id_column] if kind.id_column else []
    required += ["participant_id", "video_id", "start_frame", "stop_frame"]
    if kind.labelled:
        required += ["verb_class", "noun_class"]
    return required


# --------------------------------------------------------------------------------------------------
# vectorised cell checks; Python only runs for the first bad row, to word its message


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def parse_int_column(
    frame: pd.DataFrame, column: str, path: Path, *, nullable: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one integer column.

    Args:
        frame: the file's rows.
        column: the column to parse.
        path: the file, for errors.
        nullable: whether an empty cell is allowed (a null) or an error.
    Returns:
        ``(values, null)``: int64 values ``[N]`` (0 where null) and the null mask ``[N]``.
    Raises:
        AnnotationError: at the first non-integer cell (or empty cell when not nullable).
    """
    series = frame[column]
    if pd.api.types.is_bool_dtype(series.dtype):
        raise AnnotationError(path, 1, column, "expected an integer, got booleans")
    if pd.api.types.is_integer_dtype(series.dtype) and not isinstance(series.dtype, pd.CategoricalDtype):
        null = series.isna().to_numpy()
        values = series.fillna(0).to_numpy(dtype=np.int64)
        bad = np.zeros(len(series), dtype=bool)
    elif pd.api.types.is_float_dtype(series.dtype):
        floats = series.to_numpy(dtype=np.float64, na_value=np.nan)
        null = np.isnan(floats)
        # 2**53: beyond it a float no longer says which integer it was.
        bad = ~null & ((np.floor(floats) != floats) | (np.abs(floats) > 2**53))
        values = np.where(null | bad, 0, floats).astype(np.int64)
    else:
        text = series.astype("string").str.strip()
        null = (text.isna() | (text == "")).to_numpy()
        ok = text.str.fullmatch(_INT_RE).fillna(False).to_numpy(dtype=bool)
        bad = ~null & ~ok
        values = np.zeros(len(series), dtype=np.int64)
        good = ~null & ok
        if good.any():
            digits = text[good].str.replace(r"\.0*$", "", regex=True)
            values[good] = digits.astype("int64").to_numpy()
    if bad.any():
        i = _first(bad)
        count = int(bad.sum())
        more = f" ({count} such rows)" if count > 1 else ""
        raise AnnotationError(path, i + 1, column, f"expected an integer, got {series.iloc[i]!r}{more}")
    if not nullable and null.any():
        raise AnnotationError(path, _first(null) + 1, column, "empty cell; a value is required")
    return values, null


def _string_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A text column as an object array with None for empty or missing cells."""
    if column not in frame.columns:
        return np.full(len(frame), None, dtype=object)
    series = frame[column]
    text = series.astype("string")
    empty = (text.isna() | (text == "")).to_numpy()
    out = text.to_numpy(dtype=object, na_value=None)
    out[empty] = None
    return out


def _id_column(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """The segment id as stripped text; empty is an error since everything is keyed by it."""
    series = frame[column]
    if pd.api.types.is_float_dtype(series.dtype):
        # A float uid column comes from a pickle with missing ids; show them as integers when whole.
        values, _ = parse_int_column(frame, column, path, nullable=False)
        return values.astype(str).astype(object)
    text = series.astype("string").str.strip()
    empty = (text.isna() | (text == "")).to_numpy()
    if empty.any():
        raise AnnotationError(path, _first(empty) + 1, column, "empty segment id")
    return text.to_numpy(dtype=object)


def check_participant_ids(participant: np.ndarray, video: np.ndarray, path: Path, video_column: str) -> None:
    """Check that participant ids look like ``P##`` and every video id starts with its participant's.

    Raises:
        AnnotationError: at the first row that does not.
    """
    p = pd.Series(participant, dtype="string")
    v = pd.Series(video, dtype="string")
    bad = ~p.str.fullmatch(_PARTICIPANT_RE).fillna(False).to_numpy(dtype=bool)
    if bad.any():
        i = _first(bad)
        raise AnnotationError(path, i + 1, "participant_id", f"{participant[i]!r} does not look like P## (e.g. 'P01')")
    # EPIC video ids are '<participant>_<n>'; a mismatch means shifted or hand-edited columns.
    prefix_ok = (v.str.slice(0, 4) == p + "_").fillna(False).to_numpy(dtype=bool) & (v.str.len() > 4).fillna(
        False
    ).to_numpy(dtype=bool)
    if not prefix_ok.all():
        i = _first(~prefix_ok)
        raise AnnotationError(
            path,
            i + 1,
            video_column,
            f"video_id {video[i]!r} does not start with participant_id {participant[i]!r} + '_'",
        )


def reconstruct_narration_ids(video_ids) -> np.ndarray:
    """Rebuild EPIC-100 narration ids for rows listed in the official file order.

    What the official files show (checked on ``EPIC_100_validation.csv``, 9,668 rows, 138 videos):
    ``narration_id == f"{video_id}_{k}"`` always, but ``k`` is *not* the row's index within its video
    in file order (that holds for 3.4% of rows): the official CSV/pkl are sorted by narration_id as
    text (``P01_11_0, P01_11_1, P01_11_10, P01_11_100, ...``), and ``k`` numbers a video's narrations
    in time order (start_frame never decreases with k). So the ``i``-th row of a video with ``n`` rows
    gets ``k = sorted(map(str, range(n)))[i]``.

    This reproduces every narration_id of the 119 validation videos whose ``k`` run 0..n-1 without a
    hole (6,671 rows); 8,663 of the 9,668 rows in all. The other 19 videos have 26 numbers missing
    (narrations removed after numbering); no rule can see a hole from the rows that remain, so there
    1,005 rebuilt ids are wrong. The derived train list keeps the official row order, so the same rule
    applies; on it, 174 of 495 videos visibly have holes (start_frame would go backwards with the
    rebuilt k). Rebuilt ids are unique and stable, but treat them as reconstructed, not official.

    Args:
        video_ids: ``[N]`` video id per row, in the official file's row order.
    Returns:
        ``[N]`` object array of narration ids.
    """
    videos = pd.Series(np.asarray(video_ids, dtype=object))
    position = videos.groupby(videos, sort=False).cumcount().to_numpy()
    size = videos.groupby(videos, sort=False).transform("size").to_numpy()
    k = np.empty(len(videos), dtype=np.int64)
    # One sorted-as-text numbering per distinct video length, shared by all videos of that length.
    for n in np.unique(size):
        numbering = np.array(sorted(range(int(n)), key=str), dtype=np.int64)
        rows = size == n
        k[rows] = numbering[position[rows]]
    return (videos.astype(str) + "_" + pd.Series(k).astype(str)).to_numpy(dtype=object)


def read_segments(path: str | os.PathLike) -> pa.Table:
    """Read an EPIC-55 or EPIC-100 segment annotation file into :data:`SEGMENT_SCHEMA`.

    The dataset and kind come from the columns: ``uid`` means EPIC-55, ``narration_id`` EPIC-100, and
    segments without an id column are the derived EPIC-100 train stand-in (CSV with a header, or the
    header-less ``.txt`` list ``PXX/rgb_frames/PXX_YY start stop verb noun``), whose ``uid`` is
    *reconstructed* with :func:`reconstruct_narration_ids` and whose ``source`` is
    ``'EPIC_100_train'``, as for the official train file. A file name containing ``test`` may lack
    label columns; any other file must have ``verb_class`` and ``noun_class``. Rows keep file order.

    Args:
        path: a ``.csv``, ``.pkl`` (pandas pickle; trusted files only) or derived ``.txt`` file.
    Returns:
        A table with :data:`SEGMENT_SCHEMA`, one row per segment.
    Raises:
        AnnotationError: naming file, row and column: a required column missing, an unreadable
            file, a non-integer frame or class, an empty frame, a negative frame or class,
            start_frame > stop_frame, a duplicate uid, a participant_id not like ``P##`` or not
            prefixing the video_id.
    """
    path = Path(path)
    frame = read_annotation_rows(path)
    txt = path.suffix.lower() == ".txt"
    kind = _kind_of(frame.columns, path)
    for column in _required_columns(kind, txt):
        if column not in frame.columns:
            raise AnnotationError(path, None, column, "required column missing")
    participant, video, video_column = _participants_and_videos(frame, txt)
    numbers = _frames_and_classes(frame, path, kind, txt)
    check_participant_ids(participant, video, path, video_column)
    uid = _segment_ids(frame, kind, video, path)
    n = len(frame)
    columns = {
        "uid": pa.array(uid, type=pa.string()),
        "dataset": pa.array(np.full(n, kind.dataset, dtype=object), type=pa.string()),
        "source": pa.array(np.full(n, kind.source, dtype=object), type=pa.string()),
        "participant_id": pa.array(participant, type=pa.string()),
        "video_id": pa.array(video, type=pa.string()),
        "start_frame": numbers["start_frame"],
        "stop_frame": numbers["stop_frame"],
        "start_timestamp": pa.array(_string_column(frame, "start_timestamp"), type=pa.string()),
        "stop_timestamp": pa.array(_string_column(frame, "stop_timestamp"), type=pa.string()),
        "narration": pa.array(_string_column(frame, "narration"), type=pa.string()),
        "verb_class": numbers["verb_class"],
        "noun_class": numbers["noun_class"],
    }
    return pa.table(columns, schema=SEGMENT_SCHEMA)


def _participants_and_videos(frame: pd.DataFrame, txt: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Each row's participant and video id, and the column they come from (for errors)."""
    if txt:
        parts = frame["path"].astype("string").str.strip().str.split("/")
        participant = parts.str[0].to_numpy(dtype=object, na_value=None)
        video = parts.str[-1].to_numpy(dtype=object, na_value=None)
        return participant, video, "path"
    participant = frame["participant_id"].astype("string").str.strip().to_numpy(dtype=object, na_value=None)
    video = frame["video_id"].astype("string").str.strip().to_numpy(dtype=object, na_value=None)
    return participant, video, "video_id"


def _frames_and_classes(frame: pd.DataFrame, path: Path, kind: _Kind, txt: bool) -> dict[str, pa.Array]:
    """The frame and class columns as Arrow arrays, checked: integers, none negative, start <= stop."""
    start, _ = parse_int_column(frame, "start_frame", path, nullable=False)
    stop, _ = parse_int_column(frame, "stop_frame", path, nullable=False)
    if kind.labelled:
        # The derived list has a label on every line; an empty one there is a short line, not a null.
        verb, verb_null = parse_int_column(frame, "verb_class", path, nullable=not txt)
        noun, noun_null = parse_int_column(frame, "noun_class", path, nullable=not txt)
    else:
        verb, verb_null = np.zeros(len(frame), np.int64), np.ones(len(frame), bool)
        noun, noun_null = verb.copy(), verb_null.copy()
    for column, values, null in (
        ("start_frame", start, None),
        ("stop_frame", stop, None),
        ("verb_class", verb, verb_null),
        ("noun_class", noun, noun_null),
    ):
        negative = values < 0 if null is None else (values < 0) & ~null
        if negative.any():
            i = _first(negative)
            raise AnnotationError(path, i + 1, column, f"negative value {int(values[i])}")
    reversed_rows = start > stop
    if reversed_rows.any():
        i = _first(reversed_rows)
        raise AnnotationError(path, i + 1, "start_frame", f"start_frame {start[i]} > stop_frame {stop[i]}")
    return {
        "start_frame": pa.array(start, type=pa.int64()),
        "stop_frame": pa.array(stop, type=pa.int64()),
        "verb_class": pa.array(verb, mask=verb_null, type=pa.int64()),
        "noun_class": pa.array(noun, mask=noun_null, type=pa.int64()),
    }


def _segment_ids(frame: pd.DataFrame, kind: _Kind, video: np.ndarray, path: Path) -> np.ndarray:
    """Each row's segment id: the file's own, checked unique, or rebuilt from the video ids."""
    if kind.id_column is None:
        return reconstruct_narration_ids(video)
    uid = _id_column(frame, kind.id_column, path)
    duplicated = pd.Series(uid).duplicated().to_numpy()
    if duplicated.any():
        i = _first(duplicated)
        first_row = _first(uid == uid[i]) + 1
        raise AnnotationError(
            path, i + 1, kind.id_column, f"duplicate uid {uid[i]!r} (first seen at row {first_row})"
        )
    return uid


# --------------------------------------------------------------------------------------------------
# dataset detection


def _columns_of(path: Path) -> list[str]:
    """The column names of an annotation file, reading as little of it as the format allows."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return list(_DERIVED_TXT_COLUMNS)
    if suffix == ".pkl":
        return list(read_annotation_rows(path).columns)
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0, encoding="utf-8").columns]
    except FileNotFoundError:
        raise AnnotationError(path, None, None, "file not found") from None
    except Exception as err:  # noqa: BLE001
        raise AnnotationError(path, None, None, f"cannot read as CSV: {' '.join(str(err).split())}") from err


def detect_dataset(table_or_path) -> str:
    """Which dataset a segment table, DataFrame or annotation file belongs to.

    Args:
        table_or_path: a table from :func:`read_segments` (its ``dataset`` column decides), any
            table/DataFrame with EPIC columns, or a path to an annotation file.
    Returns:
        ``'epic55'`` or ``'epic100'``.
    Raises:
        ValueError: a table mixing both datasets, or columns that fit neither.
        AnnotationError: an unreadable file.
    """
    if isinstance(table_or_path, (pa.Table, pd.DataFrame)):
        columns = list(table_or_path.column_names if isinstance(table_or_path, pa.Table) else table_or_path.columns)
        if "dataset" in columns:
            values = (
                table_or_path.column("dataset").unique().to_pylist()
                if isinstance(table_or_path, pa.Table)
                else list(pd.unique(table_or_path["dataset"]))
            )
            values = sorted(v for v in values if v is not None)
            if len(values) == 1:
                return values[0]
            if len(values) > 1:
                raise ValueError(f"the table mixes datasets {values}")
        if "narration_id" in columns:
            return "epic100"
        if "uid" in columns:
            return "epic55"
        raise ValueError(f"cannot tell the dataset from columns {columns}")
    path = Path(table_or_path)
    return _kind_of(_columns_of(path), path).dataset
