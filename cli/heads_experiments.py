"""`heads ablate`, `heads fuse`, `heads submit`: thin wrappers over heads.ablation / fusion / submission.

Registered on the `heads` group by ``cli.heads_cli``.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import domain_errors


def _echo_log(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--grid", "grid_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Grid TOML: a [base] table and [[run]] entries (see heads.grid).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the run directories and results.parquet / .md / .png.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train this many runs together in one loop over steps (same results as one by one).")
@click.option("--device", help="Device for every run (cpu, cuda, cuda:1, ...); default: the grid's, else cpu.")
@domain_errors
def ablate(store: Path, grid_file: Path, out: Path, parallel: int, device: str | None) -> None:
    """Train a grid of runs on STORE and tabulate them like the report's Table 1.

    Finished runs (with metrics.json) are skipped on a rerun; a failed run is recorded and the others
    go on; the exit status is 1 when any run failed. Example:

    \b
        heads ablate STORE --grid grid.toml --out runs/ablation --parallel 4
    """
    from heads.ablation import ablate as run_ablation

    results = run_ablation(store, grid_file, out, parallel=parallel, device=device, log=_echo_log)
    click.echo((out / "results.md").read_text(encoding="utf-8"))
    click.echo(f"{len(results.trained)} trained, {len(results.skipped)} already finished, "
               f"{len(results.failed)} failed; results in {out}", err=True)
    if results.failed:
        raise click.ClickException(f"{len(results.failed)} run(s) failed: {', '.join(results.failed)} "
                                   f"(errors in {out / 'results.md'})")


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write predictions.parquet, metrics.json and fusion.json to.")
@click.option("--weights", help="Comma-separated weights, one per input (normalised to sum 1); default equal.")
@click.option("--how", type=click.Choice(["probs", "logits"]), default="probs", show_default=True,
              help="Average softmax probabilities (stored as log-probabilities) or logits.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labelled annotations to score on (default: the first input run's store).")
@click.option("--dataset", type=click.Choice(["epic55", "epic100"]), help="For --annotations; default: from the file.")
@click.option("--meta-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Class, many-shot, tail and unseen lists for --annotations (default: its folder).")
@click.option("--action-prior-from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training annotations to count the LFB action prior on; the fused segments' rows are left out.")
@click.option("--train", "train_split",
              help="Named training split of --annotations the inputs were trained on (e.g. epic55-lfb-train): many-shot "
                   "actions are restricted to its pairs (default: the first input run's training selection).")
@click.option("--train-where", help="DuckDB WHERE over the --annotations columns selecting that training split.")
@domain_errors
def fuse(inputs: tuple[Path, ...], out: Path, weights: str | None, how: str, annotations: Path | None,
         dataset: str | None, meta_dir: Path | None, action_prior_from: Path | None, train_split: str | None,
         train_where: str | None) -> None:
    """Late-fuse runs or predictions files over the segments they share.

    With labels, each input is scored on the same segments the same way, and a table of the inputs'
    metrics beside the fused ones goes to stderr (the fused metrics.json to stdout). Examples:

    \b
        heads fuse runs/saoa-rgb runs/saoa-flow --out runs/saoa-2stream --weights 1,1
        heads fuse s1/rgb.parquet s1/flow.parquet --out s1/2stream --how logits
    """
    from heads.fusion import comparison_table
    from heads.fusion import fuse as fuse_inputs

    result = fuse_inputs(inputs, out, weights=weights, how=how, annotations=annotations, dataset=dataset,
                         meta_dir=meta_dir, action_prior_from=action_prior_from, train_split=train_split,
                         train_where=train_where, log=_echo_log)
    if result.metrics is not None:
        click.echo(comparison_table(result), err=True)
        click.echo(json.dumps(result.metrics, indent=2))
    click.echo(f"{len(result.predictions.uids)} fused predictions written to {out}", err=True)


@click.command()
@click.option("--format", "fmt", required=True, type=click.Choice(["epic55", "epic100"]),
              help="epic55: seen.json + unseen.json; epic100: test.json.")
@click.option("--seen", type=click.Path(exists=True, path_type=Path), help="epic55: predictions (or run) of test S1.")
@click.option("--unseen", type=click.Path(exists=True, path_type=Path), help="epic55: predictions of test S2.")
@click.option("--test", type=click.Path(exists=True, path_type=Path), help="epic100: predictions of the test set.")
@click.option("--meta-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with the test timestamp files.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The zip to write.")
@click.option("--action-prior-from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="epic55: training annotations; re-weight the 100 action scores by the LFB prior (rows of the "
                   "submitted segments are left out).")
@click.option("--scores", type=click.Choice(["probs", "logits"]),
              help="Verb / noun values to write; default probs for epic55, logits for epic100.")
@click.option("--sls-pt", default=2, show_default=True, type=click.IntRange(0, 5), help="epic100: pretraining level.")
@click.option("--sls-tl", default=3, show_default=True, type=click.IntRange(0, 5),
              help="epic100: training labels level.")
@click.option("--sls-td", default=4, show_default=True, type=click.IntRange(0, 5), help="epic100: training data level.")
@domain_errors
def submit(fmt: str, seen: Path | None, unseen: Path | None, test: Path | None, meta_dir: Path, out: Path,
           action_prior_from: Path | None, scores: str | None, sls_pt: int, sls_tl: int, sls_td: int) -> None:
    """Write a leaderboard zip, checked against the test timestamp files.

    Examples:

    \b
        heads submit --format epic55 --seen s1.parquet --unseen s2.parquet --meta-dir epic55/ --out sub.zip
        heads submit --format epic100 --test test.parquet --meta-dir epic100/ --out sub100.zip
    """
    from heads.submission import epic55_submission, epic100_submission

    if fmt == "epic55":
        if seen is None or unseen is None or test is not None:
            raise click.UsageError("--format epic55 takes --seen and --unseen (not --test)")
        summary = epic55_submission(seen, unseen, meta_dir, out, action_prior_from=action_prior_from,
                                    scores=scores or "probs")
    else:
        if test is None or seen is not None or unseen is not None:
            raise click.UsageError("--format epic100 takes --test (not --seen / --unseen)")
        if action_prior_from is not None:
            raise click.UsageError("--action-prior-from is for epic55: EPIC-100 submissions carry no action scores")
        summary = epic100_submission(test, meta_dir, out, sls_pt=sls_pt, sls_tl=sls_tl, sls_td=sls_td,
                                     scores=scores or "logits")
    counts = ", ".join(f"{name}: {n} segments" for name, n in summary.segments.items())
    click.echo(f"wrote {summary.out} ({counts})")
    if summary.action_prior is not None:
        from heads.evaluation import prior_note

        click.echo(prior_note(summary.action_prior), err=True)
