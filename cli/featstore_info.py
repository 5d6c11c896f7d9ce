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
    from featstore.store.reader import FeatureStore

    summary = FeatureStore.open(store).info()
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    click.echo(f"store     {summary['path']}")
    click.echo(f"segments  {summary['segments']['ok']} ok, {summary['segments']['failed']} failed")
    per_segment = summary["bytes_per_segment"]
    measured = per_segment["measured"]
    click.echo(f"size      {summary['bytes'] / 2**20:.1f} MiB on disk"
               + (f", {_kib(measured)} per stored segment (index and journal included)" if measured else ""))
    click.echo("fields                                                  bytes per segment (payload / in LMDB)")
    for name, spec in summary["fields"].items():
        sizes = per_segment["fields"][name]
        state = "  (being derived: not complete)" if spec.get("complete") is False else ""
        click.echo(f"  {name:<20} {spec['dtype']:<8} {str(spec['shape']):<22} "
                   f"{_kib(sizes['payload']):>11} / {_kib(sizes['lmdb']):>11}{state}")
    for name, recipe in summary["derived"].items():
        made = ", ".join(f"{k} {json.dumps(recipe[k])}" for k in ("from", "pool", "output_size") if k in recipe)
        click.echo(f"  {name} is derived: {made}")
    click.echo("with another --map (tensors in LMDB; the index adds a few KiB per segment)")
    for mode, estimate in summary["map_alternatives"].items():
        if estimate is None:
            click.echo(f"  --map {mode:<10} not possible from what this store records")
        else:
            click.echo(f"  --map {mode:<10} {_kib(estimate['bytes_per_segment']):>11} per segment, "
                       f"{estimate['bytes'] / 2**30:,.2f} GiB for {summary['segments']['ok']} segments")
    provenance = summary["manifest"].get("provenance", {})
    if provenance:
        click.echo("provenance")
        for key, value in sorted(provenance.items()):
            click.echo(f"  {key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:,.1f} KiB"
