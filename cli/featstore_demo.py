"""`featstore demo`: the whole job end to end on a generated sample (registered by `cli.featstore_cli`).

Thin: make the `DemoConfig`, call `cli.demo.run_demo`, print the store's `featstore info`,
where everything went and, last, the results table with the runs' warnings beside it.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from cli.common import SEED, domain_errors


@click.command("demo")
@click.argument("out", required=False, default="demo-out", metavar="[DIR]",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--quick", is_flag=True,
              help="A smaller sample (64 segments) and shorter schedules, for tests: faster, coarser accuracies.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device of the build and of the heads.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the sample, the models and the heads.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@click.option("--train-detector", is_flag=True,
              help="First fine-tune the detector on the sample's boxes (featstore finetune-detector: MobileNetV3, "
                   "150 iterations, several minutes on a CPU; 30 with --quick), then build without the boxes file.")
@click.pass_context
@domain_errors
def demo(ctx: click.Context, out: Path, quick: bool, device: str, seed: int, progress: bool,
         train_detector: bool) -> None:
    """Run both stages of the job on a small built-in sample; nothing is downloaded.

    Generates EPIC-layout JPEG frames of synthetic kitchen scenes (verbs carried by small motions,
    nouns by object appearance, with distractor objects), an EPIC-55 annotation file and a boxes
    file. Stage 1 fine-tunes an r3d_18 verb net from random weights (featstore finetune); stage 2
    builds two stores, one with that verb net and one with random weights only (featstore build),
    and trains the saoa and global heads on each, on the paper's participant split (heads train).
    Prints the before/after results table, the store's info and where everything went (DIR,
    default ./demo-out). Under 3 minutes on a 2-core CPU; --quick under one.

    A rerun into its own DIR reuses what is finished (seconds); a demo of other settings there
    (--quick, --seed) is replaced; any other non-empty DIR is refused. Examples:

    \b
        featstore demo demo-out
        featstore demo demo-quick --quick
    """
    from cli.demo import DemoConfig, run_demo
    from cli.featstore_info import info

    started = time.perf_counter()
    click.echo(f"featstore demo: {'quick' if quick else 'full'} sample, output in {out}")
    report = run_demo(DemoConfig(out=out, quick=quick, seed=seed, device=device, progress=progress,
                                  train_detector=train_detector),
                      log=click.echo)
    # The results table comes last, where a newcomer's eye lands when the command returns.
    click.echo("")
    click.echo(f"$ featstore info {report.store}")
    ctx.invoke(info, store=report.store, as_json=False)
    click.echo("")
    click.echo(report.locations())
    click.echo("")
    click.echo(report.results_table())
    if report.warnings:
        click.echo("")
        click.echo(report.warnings_text())
    click.echo("")
    took = time.perf_counter() - started
    reused = f"; reused {', '.join(report.reused)}" if report.reused else ""
    click.echo(f"done in {took:.0f} s{reused}. Next: the commands of README.md, \"Try it on the demo store\".")
