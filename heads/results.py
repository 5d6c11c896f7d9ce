"""Results of a grid: the results.parquet table, results.md (the report's Table 1) and results.png.

The metric columns, their order, labels and the bars of the chart come from the metric registry
(``heads.metric_registry.table_metrics``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.io.atomic import atomic_write, atomic_write_text
from featstore.io.figures import pyplot, save_figure
from heads.grid import Grid
from heads.metric_registry import metric_values, table_metrics
from heads.models import get_head
from heads.trainer import TrainConfig

__all__ = ["switch_label", "results_table", "write_results_markdown", "plot_grid_results", "write_results"]


def _setting_type(field: dataclasses.Field) -> pa.DataType:
    """Arrow type of a TrainConfig field (its annotation is a string under postponed evaluation)."""
    annotation = str(field.type)
    if annotation.startswith("tuple"):
        return pa.list_(pa.int64())
    if annotation.startswith("dict"):
        return pa.string()  # switches: JSON text, since their keys differ between heads
    if annotation.startswith("int"):
        return pa.int64()
    if annotation.startswith("float"):
        return pa.float64()
    return pa.string()


def _setting_value(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_list(kind):
        return [int(v) for v in value]
    if pa.types.is_int64(kind):
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if pa.types.is_float64(kind):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def switch_label(model: str, switches: dict[str, Any]) -> str:
    """Table text for a run's switches: what differs from the head's defaults, e.g. ``no gating``."""
    try:
        defaults = get_head(model).switches()
    except KeyError:
        defaults = {}
    parts = []
    for name in sorted(switches):
        value = switches[name]
        if name in defaults and defaults[name] == value:
            continue
        if isinstance(value, bool):
            parts.append(name.replace("_", " ") if value else f"no {name.replace('_', ' ')}")
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts) if parts else "-"


def results_table(grid: Grid, out: Path, *, failed: dict[str, str] | None = None,
                  seconds: dict[str, float | None] | None = None) -> pa.Table:
    """One row per run of ``grid``: name, method, seed, status, error, settings, switches, metrics.

    Metrics are read from each finished run's ``metrics.json``; a run neither finished nor in
    ``failed`` (it was never tried) gets status ``pending``.

    Args:
        grid: the runs, in the order of the rows.
        out: the grid's output folder.
        failed: name -> error of the runs that failed.
        seconds: name -> training seconds (sum over epochs) where known.
    Returns:
        The table written to results.parquet.
    """
    failed = failed or {}
    seconds = seconds or {}
    fields = dataclasses.fields(TrainConfig)
    types = {f.name: _setting_type(f) for f in fields}
    rows: list[dict[str, Any]] = []
    metric_names: list[str] = []
    for run in grid.runs:
        run_dir = out / run.name
        metrics: dict[str, float] = {}
        if run.name in failed:
            status, error = "failed", failed[run.name]
        elif (run_dir / "metrics.json").is_file():
            status, error = "ok", None
            metrics = metric_values(json.loads((run_dir / "metrics.json").read_text()))
        else:
            status, error = "pending", None
        for key in metrics:
            if key not in metric_names:
                metric_names.append(key)
        settings = run.config.to_json()
        row = {"name": run.name, "method": run.method, "status": status, "error": error,
               "run_dir": str(run_dir), "switch_label": switch_label(run.config.model, run.config.switches),
               "seconds": seconds.get(run.name)}
        row.update({name: _setting_value(settings[name], types[name]) for name in types})
        row["metrics"] = metrics
        rows.append(row)
    # Table 1's metrics first, then the rest in the order runs reported them.
    table_keys = [m.key for m in table_metrics()]
    ordered = [m for m in table_keys if m in metric_names] + [m for m in metric_names if m not in table_keys]
    ordered = ordered or table_keys  # keep the columns even when no run finished
    columns: dict[str, pa.Array] = {}
    fixed = (("name", pa.string()), ("method", pa.string()), ("status", pa.string()), ("error", pa.string()),
             ("run_dir", pa.string()), ("switch_label", pa.string()), ("seconds", pa.float64()))
    for name, kind in fixed:
        columns[name] = pa.array([row[name] for row in rows], kind)
    for name, kind in types.items():
        columns[name] = pa.array([row[name] for row in rows], kind)
    for name in ordered:
        columns[name] = pa.array([row["metrics"].get(name) for row in rows], pa.float64())
    return pa.table(columns)


def _summary(table: pa.Table) -> list[dict[str, Any]]:
    """Per method (grid order): model, switches, counts, and mean / std of each Table-1 metric."""
    rows = table.to_pylist()
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    summary = []
    for method, group in methods.items():
        done = [r for r in group if r["status"] == "ok"]
        stats = {}
        for metric in (m.key for m in table_metrics()):
            values = np.array([r[metric] for r in done if r.get(metric) is not None], dtype=np.float64)
            if values.size == 0:
                stats[metric] = (None, None)
            else:
                # Sample standard deviation: the seeds are a sample of the run-to-run spread.
                spread = float(values.std(ddof=1)) if values.size > 1 else None
                stats[metric] = (float(values.mean()), spread)
        summary.append({
            "method": method, "model": group[0]["model"], "switches": group[0]["switch_label"],
            "n": len(group), "ok": len(done), "failed": sum(r["status"] == "failed" for r in group),
            "seeds": [r["seed"] for r in done], "stats": stats,
        })
    return summary


def _cell(mean: float | None, spread: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" if spread is None else f"{mean:.1f} ± {spread:.1f}"


def write_results_markdown(table: pa.Table, path: str | os.PathLike, *, title: str = "Ablation results") -> Path:
    """results.md: the report's Table 1 layout, mean ± std over seeds, then the failed runs.

    Args:
        table: a ``results_table``.
        path: the Markdown file to write.
        title: the heading.
    Returns:
        ``path``.
    """
    path = Path(path)
    columns = table_metrics()
    header = "| Method | Model | Switches | Runs | " + " | ".join(m.label for m in columns) + " |"
    measures = " / ".join(dict.fromkeys(m.measure for m in columns))
    lines = [f"# {title}", "", f"{measures.capitalize()} accuracy (%) on the validation selection; mean ± standard "
             "deviation over the seeds of each method (sample std, shown when there are two or more).", "", header,
             "|" + "---|" * 3 + "---:|" * (1 + len(columns))]
    for entry in _summary(table):
        runs = f"{entry['ok']}" if entry["ok"] == entry["n"] else f"{entry['ok']}/{entry['n']}"
        if entry["failed"]:
            runs += f" ({entry['failed']} failed)"
        cells = [_cell(*entry["stats"][m.key]) for m in columns]
        lines.append(f"| {entry['method']} | {entry['model']} | {entry['switches']} | {runs} | " + " | ".join(cells)
                     + " |")
    failures = [r for r in table.to_pylist() if r["status"] != "ok"]
    if failures:
        lines += ["", "## Runs without results", "", "| Run | Status | Error |", "|---|---|---|"]
        for row in failures:
            error = (row["error"] or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['name']} | {row['status']} | {error} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return path


def plot_grid_results(table: pa.Table, path: str | os.PathLike, *, title: str = "") -> Path:
    """results.png: per method, bars of action / verb / noun top-1 and top-5 with the spread over seeds.

    Args:
        table: a ``results_table``.
        path: the PNG to write.
        title: figure title.
    Returns:
        ``path``.
    """
    plt = pyplot()
    path = Path(path)
    summary = _summary(table)
    methods = [entry["method"] for entry in summary]
    x = np.arange(len(methods))
    # One panel per measure (top-1, top-5), one bar per task, in Table 1's order.
    panels: dict[str, list] = {}
    for metric in table_metrics():
        panels.setdefault(metric.measure, []).append(metric)
    width = 0.78 / max(len(bars) for bars in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 1.6 * len(methods) + 4), 4.2), sharey=False,
                             squeeze=False)
    for ax, (measure, bars) in zip(axes[0], panels.items()):
        for offset, metric in enumerate(bars):
            stats = [entry["stats"][metric.key] for entry in summary]
            means = [s[0] if s[0] is not None else 0.0 for s in stats]
            errors = [s[1] if s[1] is not None else 0.0 for s in stats]
            ax.bar(x + (offset - (len(bars) - 1) / 2) * width, means, width, yerr=errors, capsize=3,
                   label=f"{metric.task}s")
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set(ylabel=f"{measure} (%)", title=measure)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def write_results(table: pa.Table, out: str | os.PathLike) -> dict[str, Path]:
    """results.parquet, results.md and results.png in ``out``.

    Returns:
        kind -> path written.
    """
    out = Path(out)
    parquet = out / "results.parquet"
    atomic_write(parquet, lambda tmp: pq.write_table(table, tmp))
    return {"parquet": parquet, "markdown": write_results_markdown(table, out / "results.md",
                                                                   title=f"Ablation results ({out.name})"),
            "png": plot_grid_results(table, out / "results.png", title=out.name)}
