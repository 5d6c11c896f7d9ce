"""`featstore`: build, import, query, inspect and verify feature stores."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import GuardedGroup, debug_option, domain_errors
from cli.featstore_build import build
from cli.featstore_demo import demo
from cli.featstore_export import export_cmd
from cli.featstore_finetune import finetune
from cli.featstore_finetune_detector import finetune_detector
from cli.featstore_import import import_cmd
from cli.featstore_info import info
from cli.featstore_transform import copy_cmd, derive


@click.group(name="featstore", cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featstore")
@debug_option
def main(debug: bool) -> None:
    """Feature stores for egocentric action recognition: extract once, train heads many times.

    A store is a directory of LMDB tensors, a Parquet index and a manifest (see `featstore info`).
    """


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="How the rows are printed.")
@domain_errors
def query(store: Path, sql: str, fmt: str) -> None:
    """Run one read-only SQL SELECT over the views `segments`, `boxes` and `fields`.

    Nothing can be written and no file outside the store can be read. Example:

    \b
        featstore query STORE "select verb_class, count(*) n from segments group by 1 order by n desc limit 5"
    """
    from featstore.store.query import format_result, run_query
    from featstore.store.reader import FeatureStore

    click.echo(format_result(run_query(FeatureStore.open(store), sql), fmt))


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@domain_errors
def verify(store: Path, progress: bool) -> None:
    """Recompute every stored segment's checksum; exit 1 and list the uids that differ.

    Example:

    \b
        featstore verify demo-out/store
    """
    from featstore.io.progress import progress_bar
    from featstore.store.reader import FeatureStore

    opened = FeatureStore.open(store)
    summary = opened.info()
    n, views = summary["segments"]["ok"], summary["views"]["total"]
    # A store with temporal views checks every view (docs/views.md); the count says both.
    counted = f"{n} segments" if views == n else f"{n} segments ({views} views)"
    bar = progress_bar(total=views, desc="verify", unit="view" if views != n else "seg", enabled=progress)
    try:
        bad = opened.verify(progress=bar.update)
    finally:
        bar.close()
    if bad:
        for uid, reason in bad:
            click.echo(f"{uid}\t{reason}")
        click.echo(f"{len(bad)} of {counted} failed verification", err=True)
        sys.exit(1)
    click.echo(f"{counted} verified, all checksums match")


@main.command("convert-checkpoint")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@domain_errors
def convert_checkpoint_cmd(source: Path, target: Path) -> None:
    """Extract the state dict of a checkpoint that also pickles Python objects into TARGET.

    For published files that `featstore build` refuses to read because they keep objects besides
    their tensors (EPIC-55 action-models and AVION: an argparse.Namespace under 'args'; Lightning
    .ckpt hyper-parameters). Only an allow-list of classes is rebuilt (tensors, plain containers,
    argparse.Namespace, numpy scalars; omegaconf / Lightning configuration and pandas tables as
    inert data); a file naming anything else is refused, so nothing in it runs. Example:

    \b
        featstore convert-checkpoint tsn_rgb_epic55.pth.tar tsn_rgb_epic55.pt
    """
    from featstore.models import convert_checkpoint

    report = convert_checkpoint(source, target)
    click.echo(report.summary())
    if report.inert:
        click.echo(f"read as plain data (not imported): {', '.join(report.inert)}")
    click.echo(f"sha256 {report.sha256}")


# Commands of their own modules (imported above: a misspelt or broken module is an error).
for command in (build, copy_cmd, demo, derive, export_cmd, finetune, finetune_detector, import_cmd, info):
    main.add_command(command)


if __name__ == "__main__":
    main()
