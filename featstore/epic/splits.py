"""Named splits and free selections of segments, as DuckDB ``WHERE`` expressions.

A selection is always SQL over the :data:`featstore.epic.annotations.SEGMENT_SCHEMA` columns, so the same
string selects segments from an annotation table in memory (:func:`select_segments`) and from a
store's ``segments`` view (``featstore query``). Named splits are shorthands for the protocols people
report numbers on; anything else is a ``where`` expression, optionally ANDed with a named split.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

__all__ = ["NAMED_SPLITS", "resolve_selection", "select_segments"]

_EPIC55_TRAIN = "source = 'EPIC_train_action_labels'"

NAMED_SPLITS: dict[str, str] = {
    "epic55-train": _EPIC55_TRAIN,
    # The validation protocol of Baradel et al. / the LFB code that the paper follows: EPIC-55's
    # training labels split by participant, P01-P25 train (23,191 segments), P26-P31 val (5,281).
    # Participant ids are zero-padded 'P##', so text comparison orders them numerically.
    "epic55-lfb-train": f"{_EPIC55_TRAIN} AND participant_id <= 'P25'",
    "epic55-lfb-val": f"{_EPIC55_TRAIN} AND participant_id >= 'P26'",
    "epic55-test-s1": "source = 'EPIC_test_s1_timestamps'",
    "epic55-test-s2": "source = 'EPIC_test_s2_timestamps'",
    # read_segments gives the derived train stand-in this source too, so the split selects either.
    "epic100-train": "source = 'EPIC_100_train'",
    "epic100-validation": "source = 'EPIC_100_validation'",
    "epic100-test": "source = 'EPIC_100_test_timestamps'",
}

# Added to the table to restore file order; a name no annotation column will have.
_ROW_COLUMN = "__featstore_row__"


def resolve_selection(split: str | None = None, where: str | None = None) -> str | None:
    """Combine a named split and a user's SQL into one ``WHERE`` expression.

    Args:
        split: a key of :data:`NAMED_SPLITS`, or None.
        where: a DuckDB boolean expression over the segment columns, or None / blank.
    Returns:
        The split's expression, the user's, both parenthesised and ANDed, or None for everything.
    Raises:
        ValueError: an unknown split name (the message lists the known ones).
    """
    parts = []
    if split is not None:
        if split not in NAMED_SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {', '.join(NAMED_SPLITS)}")
        parts.append(NAMED_SPLITS[split])
    if where is not None and where.strip():
        parts.append(where.strip())
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    # Parenthesised so that an OR in either part cannot escape the AND.
    return " AND ".join(f"({part})" for part in parts)


def select_segments(table: pa.Table, where: str | None) -> pa.Table:
    """Keep the rows of a segment table that satisfy a DuckDB ``WHERE`` expression.

    Args:
        table: a segment table (e.g. from :func:`featstore.epic.annotations.read_segments`).
        where: a boolean SQL expression over its columns (see :func:`resolve_selection`), or None
            for all rows.
    Returns:
        The selected rows, in the table's order, with the table's schema.
    Raises:
        ValueError: DuckDB rejects the expression (its message is included).
    """
    if where is None or not where.strip():
        return table
    indexed = table.append_column(_ROW_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    # An explicit in-memory connection per call (never the shared global one), without file access:
    # the expression is user text, and selecting rows should not be able to read or write files.
    connection = duckdb.connect(":memory:")
    try:
        connection.register("segments", indexed)
        connection.execute("SET enable_external_access = false")
        query = f'SELECT "{_ROW_COLUMN}" FROM segments WHERE ({where}) ORDER BY "{_ROW_COLUMN}"'
        try:
            # A ';' could smuggle a second statement after the expression; one statement or nothing.
            if len(connection.extract_statements(query)) != 1:
                raise ValueError(f"bad selection {where!r}: not a single boolean expression")
            rows = connection.execute(query).fetchnumpy()[_ROW_COLUMN]
        except duckdb.Error as err:
            raise ValueError(f"bad selection {where!r}: {err}") from None
    finally:
        connection.close()
    return table.take(pa.array(np.asarray(rows, dtype=np.int64)))
