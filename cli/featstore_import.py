"""`featstore import`: features computed elsewhere (a <uid>.npz folder, or a published set) into a store.

``--format`` and each format's options are read from the format registry (`featstore.imports`)
when the command runs, the way `heads train` reads its heads' switches: an option a format's
reader takes is ``--name``, its help the reader's docstring line; options a format does not take
are refused by the library with one line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cli.common import COUNT, POSITIVE, command_line, domain_errors, removed_on_early_failure


def format_options() -> list[click.Option]:
    """``--format``, ``--time-map`` and one option per option of the registered formats.

    A boolean option is a ``--name/--no-name`` pair, any other a ``--name VALUE``; unset options stay
    None and are not passed, so each format keeps its own defaults.
    """
    from featstore.imports import all_options, get_format, list_formats
    from featstore.imports.timing import TIME_MAPS

    described = "; ".join(f"{name}: {get_format(name).description} (--from: {get_format(name).source})"
                          for name in list_formats())
    options = [
        click.Option(["--format", "format_name"], type=click.Choice(list_formats()), default="npz", show_default=True,
                     help=f"Layout of --from. {described}."),
        click.Option(["--time-map"], type=click.Choice(TIME_MAPS), default="auto", show_default=True,
                     help="How segments are placed in time for the published layouts: the annotations' timestamps, "
                          "or native frames / the videos' fps (--video-info); auto: timestamps when every row has them."),
    ]
    for option in all_options().values():
        flag = option.name.replace("_", "-")
        help_text = f"Option of {option.help}"
        if option.kind is bool:
            options.append(click.Option([f"--{flag}/--no-{flag}", option.name], default=None, help=help_text))
        else:
            kind = {int: COUNT, float: POSITIVE}.get(option.kind, click.STRING)
            options.append(click.Option([f"--{flag}", option.name], type=kind, default=None, help=help_text))
    return options


class FormatCommand(click.Command):
    """A command whose ``--format`` and format options come from the format registry when it runs."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        help_option = self.get_help_option(ctx)
        fixed = [p for p in params if p is not help_option]
        taken = {opt for p in fixed for opt in p.opts + p.secondary_opts}
        added = format_options()
        for option in added:
            clash = taken.intersection(option.opts + option.secondary_opts)
            if clash:
                raise click.ClickException(f"an import format option clashes with {', '.join(sorted(clash))} "
                                           f"of `featstore import`; rename the option")
        return fixed + added + ([help_option] if help_option is not None else [])


RUN_PARAMS = ("store", "annotations", "source", "format_name", "time_map", "video_info", "shard", "workers",
              "progress")


@click.command("import", cls=FormatCommand)
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--from", "source", required=True, type=click.Path(exists=True, path_type=Path),
              help="What --format reads: a folder (npz, rulstm-lmdb, per-video-series) or a file (the pickles).")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="EPIC-55 / EPIC-100 annotation file (CSV or pkl): the segments, their labels and times.")
@click.option("--video-info", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="EPIC_video_info.csv / EPIC_100_video_info.csv for --time-map frames (default: beside --annotations).")
@click.option("--shard", default="0", show_default=True, help="LMDB shard to write (one writer per shard).")
@click.option("--workers", default=1, show_default=True, type=COUNT,
              help="Processes importing at once, each a share of the videos into its own shard (<shard>-<i>).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@domain_errors
def import_cmd(**params: Any) -> None:
    """Import features computed elsewhere: a folder of <uid>.npz, or a published feature set.

    Resumable: a rerun skips segments already stored and retries failed ones. Segments the source has
    nothing of are recorded as failed, with the reason (exit 1). Examples (docs/import.md):

    \b
        featstore import STORE --annotations EPIC_train_action_labels.csv --from feats/
        featstore import STORE --annotations EPIC_train_action_labels.csv --from rulstm/ --format rulstm-lmdb
    """
    from featstore.imports import import_features

    options = {name: value for name, value in params.items() if name not in RUN_PARAMS and value is not None}
    with removed_on_early_failure(params["store"], "store"):
        report = import_features(params["store"], params["annotations"], params["source"],
                                 format=params["format_name"], options=options, time_map=params["time_map"],
                                 video_info=params["video_info"], shard=params["shard"], workers=params["workers"],
                                 progress=params["progress"], command=command_line())
    click.echo(report.summary())
    if report.failed:
        sys.exit(1)
