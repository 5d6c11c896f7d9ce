"""`heads runs`: one table of every run folder below some folders, to compare runs without opening them.

Each run folder is a pair of files, ``config.json`` (what ran) and ``metrics.json`` (what came of it);
`runs_table` reads them all with DuckDB (``read_json_objects``, one explicit connection) and joins
them by folder. A row per folder that holds a ``config.json`` (a head run, a stage-1 run) or a
``fusion.json`` (a `heads fuse` folder):

- ``run``: the folder; ``kind``: ``heads``, ``backbone``, ``detector`` or ``fusion``;
- ``model``: the head, backbone or detector; ``switches``: the head switches that differ from the
  head's defaults (`heads.results.switch_label`); ``store``: as the run recorded it; ``seed``, ``epochs``;
- the metrics the registry knows (`heads.metric_registry`; a detector's ``map_50`` / ``map_50_95``)
  where any run has them; ``warnings``: how many metrics.json lists (`heads.trainer.run_warnings`);
  ``finished``: whether metrics.json is there.

`format_runs` prints it as Markdown, CSV or JSON; ``sort`` orders by any column (metrics best first).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from featstore.training.run_folder import CONFIG_NAME, METRICS_NAME
from heads.metric_registry import list_metrics
from heads.results import switch_label

__all__ = ["RUN_FORMATS", "RunsError", "RunsTable", "find_run_folders", "format_runs", "runs_table"]

RUN_FORMATS = ("md", "csv", "json")
FUSION_NAME = "fusion.json"  # what `heads fuse` writes beside its predictions (heads.fusion)
DETECTION_METRICS = ("map_50", "map_50_95")
_TEXT_COLUMNS = ("run", "kind", "model", "switches", "store", "seed", "epochs")


class RunsError(ValueError):
    """A folder that holds no run, or a column to sort by that the table lacks."""


@dataclass(frozen=True)
class RunsTable:
    """The runs found, one dict per run, in the table's column order."""

    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]


def find_run_folders(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Every folder at or below ``folders`` that holds a run's ``config.json`` or a fusion's ``fusion.json``.

    Raises:
        RunsError: a folder that does not exist.
    """
    found: dict[Path, None] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise RunsError(f"{folder} is not a folder")
        for name in (CONFIG_NAME, FUSION_NAME):
            for path in sorted(folder.rglob(name)):
                if name == CONFIG_NAME or not (path.parent / CONFIG_NAME).is_file():
                    found[path.parent] = None
    return sorted(found, key=str)


def _shown(path: Path) -> str:
    """A folder as the table shows it: relative to the working folder when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _files_view(name: str, column: str, present: bool) -> str:
    """A CTE of (folder, json) per file; DuckDB refuses an empty file list, so no file is an empty view."""
    if not present:
        return f"{name} as (select null::varchar as folder, null::json as {column} where false)"
    return (f"{name} as (select regexp_replace(filename, '/[^/]*$', '') as folder, json as {column} "
            "from read_json_objects(?, filename = true))")


_SELECT = """
select
    f.folder,
    case when c.config->>'model' is not null then 'heads'
         when c.config->'settings'->>'backbone' is not null then 'backbone'
         when c.config->'settings'->>'detector' is not null then 'detector'
         when u.fusion is not null then 'fusion' else 'unknown' end as kind,
    coalesce(c.config->>'model', c.config->'settings'->>'backbone', c.config->'settings'->>'detector',
             'fusion of ' || json_array_length(u.fusion->'inputs')) as model,
    c.config->'switches' as switches,
    coalesce(c.config->>'store', c.config->'settings'->>'annotations', c.config->'settings'->>'objects') as store,
    coalesce(c.config->>'seed', c.config->'settings'->>'seed')::bigint as seed,
    coalesce(c.config->>'epochs', c.config->'settings'->>'epochs', c.config->'settings'->>'iterations')::bigint
        as epochs,
    m.metrics,
    m.metrics is not null as finished
from folders f
left join configs c using (folder)
left join metrics m using (folder)
left join fusions u using (folder)
"""


def runs_table(folders: Sequence[str | os.PathLike], *, sort: str | None = None) -> RunsTable:
    """The runs at or below ``folders`` as one table (see the module docstring).

    Args:
        folders: where to look (searched recursively).
        sort: a column to order by, ``COLUMN`` or ``COLUMN:asc`` / ``COLUMN:desc``; metrics sort best
            first by default, other columns ascending; None: by folder.
    Returns:
        The table.
    Raises:
        RunsError: no run found, or an unknown sort column.
    """
    import duckdb

    found = find_run_folders(folders)
    if not found:
        raise RunsError(f"no run folder (one with {CONFIG_NAME} or {FUSION_NAME}) in {', '.join(map(str, folders))}")
    paths = [str(p.resolve()) for p in found]

    def existing(name: str) -> list[str]:
        return [f"{p}/{name}" for p in paths if Path(p, name).is_file()]

    views = [("configs", "config", existing(CONFIG_NAME)), ("metrics", "metrics", existing(METRICS_NAME)),
             ("fusions", "fusion", existing(FUSION_NAME))]
    query = ("with " + ", ".join(_files_view(name, column, bool(files)) for name, column, files in views)
             + ", folders as (select unnest(?::varchar[]) as folder)" + _SELECT)
    parameters = [files for _, _, files in views if files] + [paths]
    con = duckdb.connect()
    try:
        records = con.execute(query, parameters).fetchall()
    finally:
        con.close()
    rows = []
    for folder, kind, model, switches, store, seed, epochs, metrics, finished in records:
        values = json.loads(metrics) if metrics else {}
        switch_values = json.loads(switches) if switches else {}
        rows.append({"run": _shown(Path(folder)), "kind": kind, "model": model,
                     "switches": switch_label(model, switch_values) if kind == "heads" else "-",
                     "store": store, "seed": seed, "epochs": epochs, "metrics": values,
                     "warnings": len(values.get("warnings") or []), "finished": bool(finished)})
    metric_keys = [m.key for m in list_metrics()] + list(DETECTION_METRICS)
    shown_metrics = [key for key in metric_keys
                     if any(isinstance(row["metrics"].get(key), (int, float)) for row in rows)]
    columns = (*_TEXT_COLUMNS, *shown_metrics, "warnings", "finished")
    table = [{**{k: row[k] for k in _TEXT_COLUMNS}, **{k: row["metrics"].get(k) for k in shown_metrics},
              "warnings": row["warnings"], "finished": row["finished"]} for row in rows]
    return RunsTable(columns, tuple(_sorted(table, columns, sort, set(shown_metrics))))


def _sorted(rows: list[dict[str, Any]], columns: Sequence[str], sort: str | None, metrics: set[str]) -> list[dict]:
    if sort is None:
        return rows
    column, _, direction = sort.partition(":")
    if column not in columns:
        raise RunsError(f"cannot sort by {column!r}; the table's columns are {', '.join(columns)}")
    if direction not in ("", "asc", "desc"):
        raise RunsError(f"sort direction must be asc or desc, got {direction!r}")
    descending = direction == "desc" or (direction == "" and column in metrics)
    present = [row for row in rows if row[column] is not None]
    missing = [row for row in rows if row[column] is None]  # last, whichever the direction
    return sorted(present, key=lambda row: row[column], reverse=descending) + missing


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_runs(table: RunsTable, fmt: str = "md") -> str:
    """The table as Markdown (``md``), ``csv`` or ``json`` (a list of objects, numbers unrounded)."""
    if fmt == "json":
        return json.dumps([dict(row) for row in table.rows], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table.columns)
        writer.writerows([["" if row[c] is None else row[c] for c in table.columns] for row in table.rows])
        return buffer.getvalue()
    if fmt != "md":
        raise RunsError(f"unknown format {fmt!r}; use one of {', '.join(RUN_FORMATS)}")
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]).replace("|", "\\|") for c in table.columns) + " |" for row in table.rows]
    return "\n".join(lines)
