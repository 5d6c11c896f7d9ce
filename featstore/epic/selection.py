"""A user's selection (``--where``, ``--train-where``, ``--val-where``): one boolean expression, never SQL text.

Every option that selects segments, images or rows goes through `parse_selection`: DuckDB parses the
text as a single expression (a ``)`` that closes a larger statement, a ``;``, a second statement are
parse errors), its parse tree is checked (no subquery, only the given columns), and callers bind the
result as a relation's filter. The text is never pasted into a larger statement, so ``true) union all
select * from segments where (true`` is a refusal, not a doubled copy.
"""
from __future__ import annotations

import json
import re
from typing import Iterable

import duckdb

__all__ = ["SelectionError", "parse_selection"]

MAX_SELECTION_CHARS = 100_000


class SelectionError(ValueError):
    """A selection that is not one boolean expression over the allowed columns."""


def parse_selection(where: str, columns: Iterable[str]) -> duckdb.Expression:
    """The filter expression of ``where``, checked.

    Args:
        where: the user's text, e.g. ``participant_id >= 'P26' and verb_class in (0, 3)``.
        columns: the names the expression may use (the view's columns).
    Returns:
        A DuckDB expression, for ``relation.filter``.
    Raises:
        SelectionError: not exactly one expression, a subquery, or a name that is not a column; the
            message quotes the selection and says why.
    """
    if not isinstance(where, str) or not where.strip():
        raise SelectionError("an empty selection; give a boolean expression, e.g. \"participant_id = 'P01'\"")
    if len(where) > MAX_SELECTION_CHARS:
        raise SelectionError(f"a selection of {len(where):,} characters is refused (limit {MAX_SELECTION_CHARS:,})")
    shown = _shorten(where)
    try:
        expression = duckdb.SQLExpression(where)
    except duckdb.Error as err:
        raise SelectionError(f"selection {shown} is not one SQL expression: {_first_line(err)}") from None
    tree = _parse_tree(str(expression), shown)
    if "SUBQUERY" in _values(tree, "class") or "SUBQUERY" in _values(tree, "type"):
        raise SelectionError(f"selection {shown} holds a subquery; a selection is one expression over the "
                             f"columns of its rows, without SELECT")
    allowed = {c.lower(): c for c in columns if not c.startswith("__")}  # "__x": internal bookkeeping
    used = {names[-1] for names in _values(tree, "column_names") if names}
    unknown = sorted(name for name in used if name.lower() not in allowed)
    if unknown:
        raise SelectionError(f"selection {shown} names no column {', '.join(unknown)}; the columns are "
                             f"{', '.join(sorted(allowed.values()))}")
    return expression


def _parse_tree(expression: str, shown: str) -> dict:
    """DuckDB's parse tree of ``SELECT <expression>`` (the expression is already one expression)."""
    connection = duckdb.connect(":memory:")
    try:
        connection.execute("SET enable_external_access = false")
        serialized = connection.execute("SELECT json_serialize_sql(?)", [f"SELECT {expression}"]).fetchone()[0]
    except duckdb.Error as err:
        raise SelectionError(f"selection {shown} does not parse: {_first_line(err)}") from None
    finally:
        connection.close()
    tree = json.loads(serialized)
    if tree.get("error"):
        raise SelectionError(f"selection {shown} does not parse: {tree.get('error_message', 'unknown error')}")
    statements = tree.get("statements", [])
    if len(statements) != 1:
        raise SelectionError(f"selection {shown} is not one expression")
    return statements[0]


def _values(node: object, key: str) -> list:
    """Every value of ``key`` anywhere in a JSON tree."""
    found = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key:
                    found.append(tuple(v) if isinstance(v, list) else v)
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _first_line(err: BaseException) -> str:
    return re.sub(r"\s+", " ", str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__


def _shorten(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
