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

from featstore.epic.selection import SelectionError, parse_selection

__all__ = ["NAMED_SPLITS", "TRAINING_SPLITS", "resolve_selection", "select_segments", "training_selection"]

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

# The training halves of the validation protocols: the segments a head trains on when its numbers are
# reported on the held-out participants (EPIC-55) or the validation file (EPIC-100). What
# `featstore build --views` gives temporal views by default (docs/views.md).
TRAINING_SPLITS = ("epic55-lfb-train", "epic100-train")


def training_selection() -> str:
    """The ``WHERE`` expression of the `TRAINING_SPLITS` together: P01-P25 of EPIC-55's training labels,
    and EPIC-100's training file; not the held-out participants, validation or test segments."""
    return " OR ".join(f"({NAMED_SPLITS[name]})" for name in TRAINING_SPLITS)


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
        SelectionError: (a ValueError) not one boolean expression over the table's columns, or
            DuckDB rejects it (its message is included).
    """
    if where is None or not where.strip():
        return table
    expression = parse_selection(where, table.column_names)
    indexed = table.append_column(_ROW_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    # An explicit in-memory connection per call (never the shared global one), without file access;
    # the selection is bound as the relation's filter, never pasted into a statement.
    connection = duckdb.connect(":memory:")
    try:
        connection.execute("SET enable_external_access = false")
        try:
            relation = connection.from_arrow(indexed).filter(expression).project(f'"{_ROW_COLUMN}"')
            rows = relation.order(f'"{_ROW_COLUMN}"').fetchnumpy()[_ROW_COLUMN]
        except duckdb.Error as err:  # binding (a table function as a value) or running (a bad cast)
            raise SelectionError(f"bad selection {where!r}: {str(err).strip().splitlines()[0]}") from None
    finally:
        connection.close()
    return table.take(pa.array(np.asarray(rows, dtype=np.int64)))
