"""`featstore derive` and `featstore copy`: new fields in place, new stores from old (registered by `cli.featstore_cli`)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import COUNT, command_line, domain_errors, removed_on_early_failure
from featstore.store.schema import VERB_LOCAL


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--field", "field_name", default=VERB_LOCAL, show_default=True,
              type=click.Choice([VERB_LOCAL]), help="The field to derive from the store's own fields.")
@click.option("--local-pool", type=click.Choice(["avg", "max"]), default="avg", show_default=True,
              help="Pooling of the RoIAlign bins (ours: avg; SlowFast/LFB: max); recorded in the manifest.")
@click.option("--batch-size", type=COUNT, default=16, show_default=True, help="Segments pooled at once.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the RoIAlign pooling runs on.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@domain_errors
def derive(store: Path, field_name: str, local_pool: str, batch_size: int, device: str, progress: bool) -> None:
    """Add a derived field to every segment of STORE, in place.

    verb.local is verb.map (or verb.map_tmean) averaged over time, RoIAlign 7x7 (aligned) at the
    det.local boxes and pooled: what SAOA reads, so that the map can then be dropped (featstore
    copy --fields). Resumable: an interrupted run loses nothing and a rerun continues. Example:

    \b
        featstore derive STORE --field verb.local
    """
    from featstore.store.transform import derive_field

    report = derive_field(store, field_name, pool=local_pool, batch_size=batch_size, device=device,
                          progress=progress, command=command_line())
    click.echo(report.summary())
    if not report.complete:
        sys.exit(1)


@click.command("copy")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.option("--fields", "fields_csv", metavar="F1,F2,...",
              help="Fields to keep (comma-separated; default: all), e.g. every field but verb.map.")
@click.option("--drop", "drop_csv", metavar="F1,F2,...", help="Fields to leave out (comma-separated).")
@click.option("--where", help="DuckDB WHERE over the source's segments, e.g. \"participant_id <= 'P25'\".")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@domain_errors
def copy_cmd(source: Path, target: Path, fields_csv: str | None, drop_csv: str | None, where: str | None,
             progress: bool) -> None:
    """Write a new store TARGET with some fields and/or segments of SOURCE.

    Each source segment's checksum is checked before it is copied, and the copy's checksums are
    verified after; SOURCE is only read. A rerun continues an interrupted copy. Examples:

    \b
        featstore copy STORE SMALL --drop verb.map
        featstore copy STORE P01 --fields verb.global,noun.global --where "participant_id = 'P01'"
    """
    from featstore.store.reader import FeatureStore
    from featstore.store.transform import copy_store

    fields = None
    if fields_csv:
        fields = [f.strip() for f in fields_csv.split(",") if f.strip()]
    if drop_csv:
        dropped = {f.strip() for f in drop_csv.split(",") if f.strip()}
        held = fields if fields is not None else sorted(FeatureStore.open(source).fields)
        unknown = sorted(dropped - set(held))
        if unknown:
            raise click.UsageError(f"--drop {', '.join(unknown)}: not a field of the copy ({', '.join(held)})")
        fields = [f for f in held if f not in dropped]
    with removed_on_early_failure(target, "store"):
        report = copy_store(source, target, fields=fields, where=where, progress=progress, command=command_line())
    click.echo(report.summary())
    if report.damaged:
        sys.exit(1)
