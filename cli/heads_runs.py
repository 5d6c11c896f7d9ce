"""`heads runs`, `heads inspect`: thin wrappers over heads.runs (every run folder in one table) and
heads.inspection (one segment as a run sees it).

Registered on the `heads` group by ``cli.heads_cli``.
"""
from __future__ import annotations

from pathlib import Path

import click

from cli.common import domain_errors


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--sort", metavar="COLUMN[:asc|desc]",
              help="Order by a column (run, model, seed, action_top1, ...); metrics best first unless :asc.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True,
              help="Markdown table, CSV, or a JSON list of objects (unrounded numbers).")
@domain_errors
def runs(folders: tuple[Path, ...], sort: str | None, fmt: str) -> None:
    """Table every run folder found in FOLDERS (searched recursively): model, switches, store, seed, metrics.

    Reads each run's config.json and metrics.json with DuckDB: head runs, stage-1 runs and fused
    folders alike; a run not finished shows without metrics. Examples:

    \b
        heads runs runs/
        heads runs runs/ ablation/ --sort action_top1
        heads runs runs/ --format csv > runs.csv
    """
    from heads.runs import RunsError, format_runs, runs_table

    try:
        table = runs_table(folders, sort=sort)
    except RunsError as err:
        raise click.ClickException(str(err)) from err
    click.echo(format_runs(table, fmt))


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("uid")
@click.option("--store", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The run's store, when it is no longer where the run recorded it.")
@click.option("--meta-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Class lists for readable names (default: the run's, else its store's annotation folder).")
@click.option("--device", help="Where to predict a segment the run's predictions lack (default: the run's device).")
@domain_errors
def inspect(run: Path, uid: str, store: Path | None, meta_dir: Path | None, device: str | None) -> None:
    """Show one segment as RUN sees it: its narration, label and the top-5 verb, noun and action predictions.

    The logits are the run's predictions.parquet's when the segment is there, else the run predicts
    it. Example:

    \b
        heads inspect runs/saoa P26_01_12
    """
    from heads.inspection import inspect_segment

    click.echo(inspect_segment(run, uid, store_path=store, meta_dir=meta_dir, device=device).format())
