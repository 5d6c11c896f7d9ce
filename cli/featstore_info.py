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
    """A screen-sized summary of a store: segments, size, the models that made it (checkpoints,
    sha256 shortened), sampling, fields with their bytes per segment, and the build's warnings.

    --json prints everything (the whole manifest, every run, full checksums).

    \b
    Example:
      featstore info demo-out/store
      featstore info demo-out/store --json | python -m json.tool | less
    """
    from featstore.store.reader import FeatureStore
    from featstore.store.summary import describe_store

    summary = FeatureStore.open(store).info()
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    for line in describe_store(summary):
        click.echo(line)
