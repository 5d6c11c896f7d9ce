"""`featstore`: build, import, query, inspect and verify feature stores."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.common import command_line, domain_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featstore")
def main() -> None:
    """Feature stores for egocentric action recognition: extract once, train heads many times.

    A store is a directory of LMDB tensors, a Parquet index and a manifest (see `featstore info`).
    """


@main.command("import")
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="EPIC-55 / EPIC-100 annotation file (CSV or pkl); gives labels and metadata.")
@click.option("--from", "from_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of <uid>.npz files whose arrays are named by field (verb.global, det.global.feat, ...).")
@click.option("--shard", default="0", show_default=True, help="LMDB shard to write (one writer per shard).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@domain_errors
def import_cmd(store: Path, annotations: Path, from_dir: Path, shard: str, progress: bool) -> None:
    """Import features computed elsewhere: one <uid>.npz per segment.

    Resumable: a rerun skips segments already stored. Example:

        featstore import STORE --annotations EPIC_train_action_labels.csv --from feats/
    """
    from featstore.importer import import_npz

    report = import_npz(store, annotations, from_dir, shard=shard, progress=progress, command=command_line())
    click.echo(report.summary())
    if report.failed:
        sys.exit(1)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@domain_errors
def query(store: Path, sql: str, fmt: str) -> None:
    """Run one read-only SQL SELECT over the views `segments`, `boxes` and `fields`.

    Nothing can be written and no file outside the store can be read. Example:

        featstore query STORE "select verb_class, count(*) n from segments group by 1 order by n desc limit 5"
    """
    from featstore.query import format_result, run_query
    from featstore.store import FeatureStore

    click.echo(format_result(run_query(FeatureStore.open(store), sql), fmt))


@main.command()
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


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--field", "field_name", default="verb.local", show_default=True,
              type=click.Choice(["verb.local"]), help="The field to derive from the store's own fields.")
@click.option("--local-pool", type=click.Choice(["avg", "max"]), default="avg", show_default=True,
              help="Pooling of the RoIAlign bins (ours: avg; SlowFast/LFB: max); recorded in the manifest.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Segments pooled at once.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@domain_errors
def derive(store: Path, field_name: str, local_pool: str, batch_size: int, device: str, progress: bool) -> None:
    """Add a derived field to every segment of STORE, in place.

    verb.local is verb.map (or verb.map_tmean) averaged over time, RoIAlign 7x7 (aligned) at the
    det.local boxes and pooled: what SAOA reads, so that the map can then be dropped (featstore
    copy --fields). Resumable: an interrupted run loses nothing and a rerun continues. Example:

        featstore derive STORE --field verb.local
    """
    from featstore.transform import derive_field

    report = derive_field(store, field_name, pool=local_pool, batch_size=batch_size, device=device,
                          progress=progress, command=command_line())
    click.echo(report.summary())
    if not report.complete:
        sys.exit(1)


@main.command("copy")
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
    verified after; SOURCE is only read. A rerun continues an interrupted copy. Example:

        featstore copy STORE SMALL --drop verb.map
    """
    from featstore.store import FeatureStore
    from featstore.transform import copy_store

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
    report = copy_store(source, target, fields=fields, where=where, progress=progress, command=command_line())
    click.echo(report.summary())
    if report.damaged:
        sys.exit(1)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--progress/--no-progress", default=True, show_default=True)
@domain_errors
def verify(store: Path, progress: bool) -> None:
    """Recompute every stored segment's checksum; exit 1 and list the uids that differ."""
    from tqdm import tqdm

    from featstore.store import FeatureStore

    opened = FeatureStore.open(store)
    n = opened.info()["segments"]["ok"]
    with tqdm(total=n, desc="verify", unit="seg", disable=not progress, file=sys.stderr) as bar:
        bad = opened.verify(progress=bar.update)
    if bad:
        for uid, reason in bad:
            click.echo(f"{uid}\t{reason}")
        click.echo(f"{len(bad)} of {n} segments failed verification", err=True)
        sys.exit(1)
    click.echo(f"{n} segments verified, all checksums match")


def _register_optional_commands() -> None:
    # Commands living in their own modules (extraction, demo) join the group here.
    for module_name, attr in (("cli.featstore_build", "build"), ("cli.featstore_demo", "demo")):
        try:
            module = __import__(module_name, fromlist=[attr])
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        main.add_command(getattr(module, attr))


_register_optional_commands()


if __name__ == "__main__":
    main()
