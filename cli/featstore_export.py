"""`featstore export`: a store's segments out to npz, pt or RULSTM LMDBs (registered by `cli.featstore_cli`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import POSITIVE, domain_errors

# The formats, written out rather than read from the registry: --help must not import the library.
# tests/cli/test_featstore_export.py checks that they are the registry's.
EXPORT_FORMATS = ("npz", "pt", "rulstm-lmdb")


@click.command("export")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "format_name", type=click.Choice(EXPORT_FORMATS), default="npz", show_default=True,
              help="npz: one <uid>.npz per segment, arrays named by field (what `featstore import` reads); "
                   "pt: one features.pt for torch.load (uids, each field stacked, the annotation columns); "
                   "rulstm-lmdb: RULSTM's LMDBs, one per vector field, each segment under its centre frame's "
                   "key at 30 fps.")
@click.option("--fields", "fields_csv", metavar="F1,F2,...",
              help="Fields to export (comma-separated; default: every field the format holds: all for npz and "
                   "pt, the feature vectors for rulstm-lmdb).")
@click.option("--where", help="DuckDB WHERE over the store's segments, e.g. \"participant_id >= 'P26'\".")
@click.option("--split", help="A named split (e.g. epic55-lfb-val), ANDed with --where.")
@click.option("--time-map", type=click.Choice(["auto", "timestamps", "frames"]),
              help="rulstm-lmdb: how a segment is placed in seconds: its timestamps, or its native frames over "
                   "its video's fps (--video-info) [default: auto, timestamps when every segment has them].")
@click.option("--video-info", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="rulstm-lmdb: EPIC_video_info.csv for --time-map frames (default: beside the store's "
                   "recorded annotation file).")
@click.option("--fps", type=POSITIVE, help="rulstm-lmdb: frame rate of the keys' frames [default: 30, RULSTM's].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@domain_errors
def export_cmd(store: Path, out: Path, format_name: str, fields_csv: str | None, where: str | None,
               split: str | None, time_map: str | None, video_info: Path | None, fps: float | None,
               progress: bool) -> None:
    """Write the stored segments of STORE to OUT (a new folder) in a layout other tools read.

    The inverse of `featstore import`: an npz or rulstm-lmdb export imports back to the same
    values (rulstm-lmdb with --pool centre: one key per segment, at its centre frame). Failed
    segments are left out; the store is only read. Examples:

    \b
        featstore export demo-out/store demo-out/export-npz
        featstore export STORE val_pt --format pt --fields verb.global,noun.global --split epic55-lfb-val
        featstore export STORE rulstm_out --format rulstm-lmdb --where "participant_id >= 'P26'"
    """
    from featstore.exports import export_store

    fields = [f.strip() for f in fields_csv.split(",") if f.strip()] if fields_csv else None
    options: dict[str, Any] = {"time_map": time_map, "video_info": video_info, "fps": fps}
    report = export_store(store, out, format=format_name, fields=fields, where=where, split=split,
                          options=options, progress=progress)
    click.echo(report.summary())
