"""Read-only DuckDB over a store's index: the sandbox behind `featstore query`.

A connection gets three views -- ``segments`` (one row per uid and view), ``boxes`` (the rows of
the kept attempt of each uid and view) and ``fields`` (the manifest's schema, and whether each field is complete: a
field a derive is still writing is listed with ``complete`` false) -- and is then locked down.
Both index views have a ``view`` column (docs/views.md): a store built with ``--views K`` holds a row
per view of a segment, view 0 the centre clip; in a store without views every row is view 0.

The sandbox:

- only a single ``SELECT`` statement is accepted (no COPY, CREATE, ATTACH, INSTALL, PRAGMA, SET, ...);
- DuckDB's external access is off and file reads are allowed only under the store's ``segments/``
  and ``boxes/`` folders, so no query can read ``/etc/passwd`` or glob outside the store (a symlink
  in those folders that points outside is refused too: DuckDB checks the resolved path); there is no
  spill folder, so a large query fails rather than writing temporary files;
- the configuration is locked, so a query cannot switch any of this back on.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING, Any, Sequence

import duckdb
import pyarrow as pa

from featstore.store.schema import BOX_SCHEMA, FIRST_VIEW, SEGMENT_SCHEMA, STATUS_OK, VIEW_COLUMN, StoreError

if TYPE_CHECKING:
    from featstore.store.reader import FeatureStore

MAX_QUERY_CHARS = 20_000
FORMATS = ("table", "csv", "json")


class QueryError(Exception):
    """A statement was refused or failed."""


def fetch_arrow(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
    """Run ``sql`` and return the result as an Arrow table."""
    relation = con.sql(sql, params=params) if params is not None else con.sql(sql)
    if relation is None:  # a statement without a result
        return pa.table({})
    return fetch_relation(relation)


def fetch_relation(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    """A relation's rows as an Arrow table (DuckDB 1.x and 2.x spell this differently)."""
    for name in ("to_arrow_table", "fetch_arrow_table"):
        method = getattr(relation, name, None)
        if method is not None:
            return method()
    raise QueryError("this DuckDB release offers no Arrow fetch")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect_store(store: "FeatureStore") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views, locked down as the module says."""
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            # No spill folder: DuckDB's default ('.tmp' under the working directory) is readable and
            # writable even with external access off, i.e. a place outside the store.
            "temp_directory": "",
        },
    )
    root = store.path.resolve()
    # Locked down before the views are made, so that binding them reads nothing outside the store
    # either (a symlinked part pointing elsewhere is refused here, naming it).
    allowed = [str(root / "segments") + "/", str(root / "boxes") + "/"]
    con.execute("set allowed_directories = [" + ", ".join(_quote(a) for a in allowed) + "]")
    con.execute("set enable_external_access = false")
    con.execute("set lock_configuration = true")
    sources = {}
    segment_parts = sorted(p.name for p in (root / "segments").glob("*.parquet")) if (root / "segments").is_dir() else []
    # A boxes part is published before the segments part of the same name (a segment row is the
    # proof of completion); a boxes part without its segments part is a crashed export whose rows
    # the writer's recovery exports again: it is left out here, by name.
    box_parts = [root / "boxes" / name for name in segment_parts if (root / "boxes" / name).is_file()]
    if segment_parts:
        sources["segments"] = f"read_parquet({_quote(str(root / 'segments' / '*.parquet'))}, union_by_name = true)"
    if box_parts:
        sources["boxes"] = "read_parquet([" + ", ".join(_quote(str(p)) for p in box_parts) + "], union_by_name = true)"
    for name, schema in (("segments", SEGMENT_SCHEMA), ("boxes", BOX_SCHEMA)):
        if name not in sources:
            con.register(f"_empty_{name}", schema.empty_table())
            sources[name] = f"_empty_{name}"
    try:
        # DuckDB reads the parts' footers here: a damaged part (a disk error, a copy cut short) is
        # named in the message.
        con.execute(f"create view segments_all as {_with_view(con, sources['segments'])}")
        sources["boxes"] = f"({_with_view(con, sources['boxes'])})"
        _create_views(con, sources)
    except duckdb.Error as err:
        con.close()
        reason = str(err).strip().splitlines()[0]  # DuckDB appends the view's SQL: not the user's
        raise StoreError(f"{store.path}: the index (segments/, boxes/) cannot be read: {reason}") from None
    # complete: false while a derive is still writing the field (readers treat it as absent).
    incomplete = store.incomplete_fields
    field_rows = [(name, spec.dtype, list(spec.shape), name not in incomplete)
                  for name, spec in sorted(store.fields.items())]
    con.register(
        "_fields",
        pa.table(
            {
                "field": pa.array([r[0] for r in field_rows], pa.string()),
                "dtype": pa.array([r[1] for r in field_rows], pa.string()),
                "shape": pa.array([r[2] for r in field_rows], pa.list_(pa.int64())),
                "complete": pa.array([r[3] for r in field_rows], pa.bool_()),
            }
        ),
    )
    con.execute("create view fields as select * from _fields")
    return con


def _with_view(con: duckdb.DuckDBPyConnection, source: str) -> str:
    """A SELECT of ``source`` whose ``view`` column is always there: the parts' own (a store with
    views), or 0 for parts written without one (a store without views, an import)."""
    columns = [row[0] for row in con.execute(f"describe select * from {source}").fetchall()]
    if VIEW_COLUMN in columns:
        return f"select * replace (coalesce({VIEW_COLUMN}, {FIRST_VIEW})::INTEGER as {VIEW_COLUMN}) from {source}"
    return f"select *, {FIRST_VIEW}::INTEGER as {VIEW_COLUMN} from {source}"


def _create_views(con: duckdb.DuckDBPyConnection, sources: dict[str, str]) -> None:
    # One row per uid and view: a stored (ok) attempt beats a failed one; among equals the newest wins.
    con.execute(
        f"""create view segments as
           select * exclude (_rank) from (
             select *, row_number() over (
               partition by uid, {VIEW_COLUMN} order by (status = '{STATUS_OK}') desc, written_at desc) as _rank
             from segments_all) where _rank = 1"""
    )
    # The boxes of each uid's (and view's) kept attempt. Only ok attempts have boxes, and the kept
    # one that has any is its newest ok one. When no uid and view has two ok attempts (no re-import,
    # no derive yet) every box row of a complete part is a kept one, and the view is the parts
    # themselves: no join of millions of rows on their uid.
    single = con.execute(
        f"select count(*) = count(distinct (uid, {VIEW_COLUMN})) from segments_all where status = 'ok'").fetchone()[0]
    if single:
        con.execute(f"create view boxes as select * exclude (written_at) from {sources['boxes']}")
    else:
        con.execute(
            f"""create view boxes as
                select b.* exclude (written_at) from {sources['boxes']} b
                join (select uid, {VIEW_COLUMN}, max(written_at) as written_at from segments_all
                      where status = 'ok' group by uid, {VIEW_COLUMN}) k
                  on b.uid = k.uid and b.{VIEW_COLUMN} = k.{VIEW_COLUMN} and b.written_at = k.written_at"""
        )


def check_statement(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one SELECT statement.

    Raises:
        QueryError: with the reason.
    """
    if len(sql) > MAX_QUERY_CHARS:
        raise QueryError(f"query refused: {len(sql):,} characters (the limit is {MAX_QUERY_CHARS:,})")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise QueryError(f"query does not parse: {err}") from err
    if len(statements) != 1:
        raise QueryError(f"query refused: give exactly one statement ({len(statements)} given)")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(
            f"query refused: only SELECT is allowed, this is {kind.name} (featstore query is read-only)"
        )


def run_query(store: "FeatureStore", sql: str, params: Sequence[Any] | None = None) -> pa.Table:
    """Run one read-only SELECT over the store's views.

    Args:
        store: an open store.
        sql: one SELECT statement over ``segments``, ``boxes``, ``fields``.
        params: optional positional parameters (``?``).
    Returns:
        The result as an Arrow table.
    Raises:
        QueryError: refused or failed, with DuckDB's reason.
    """
    with connect_store(store) as con:
        check_statement(con, sql)
        try:
            return fetch_arrow(con, sql, params)
        except duckdb.Error as err:
            raise QueryError(f"query failed: {err}") from err


def _cell(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def format_result(table: pa.Table, fmt: str = "table") -> str:
    """Render a result as an aligned text table, CSV (header row, then rows) or a JSON list of objects."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    if fmt == "json":
        return json.dumps([dict(zip(names, row)) for row in rows], default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return buffer.getvalue().rstrip("\n")
    text_rows = [["NULL" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in text_rows]) for i, n in enumerate(names)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(n.ljust(w) for n, w in zip(names, widths)), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in text_rows]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
