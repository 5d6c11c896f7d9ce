"""`featstore info`: counts, fields, size and provenance of a store (registered by `cli.featstore_cli`).

In a module of its own because `featstore demo` prints it too.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import domain_errors


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (segments, fields, bytes, manifest).")
@domain_errors
def info(store: Path, as_json: bool) -> None:
    """Counts, fields (dtype, shape), size on disk and provenance of a store."""
    from featstore.store import FeatureStore

    summary = FeatureStore.open(store).info()
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    click.echo(f"store     {summary['path']}")
    click.echo(f"segments  {summary['segments']['ok']} ok, {summary['segments']['failed']} failed")
    click.echo(f"size      {summary['bytes'] / 2**20:.1f} MiB on disk")
    click.echo("fields")
    for name, spec in summary["fields"].items():
        click.echo(f"  {name:<20} {spec['dtype']:<8} {spec['shape']}")
    provenance = summary["manifest"].get("provenance", {})
    if provenance:
        click.echo("provenance")
        for key, value in sorted(provenance.items()):
            click.echo(f"  {key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")
