"""`featstore demo`: the whole job on a small built-in sample."""
from __future__ import annotations

from pathlib import Path

import click

from cli.common import domain_errors


@click.command()
@click.argument("out", default="demo-out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help="A smaller sample and fewer epochs (seconds; for tests).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--epochs", type=int, help="Training epochs per head (default 30, 15 with --quick).")
@domain_errors
def demo(out: Path, quick: bool, device: str, seed: int, epochs: int | None) -> None:
    """Generate a synthetic EPIC-layout sample, build its store, train saoa and global heads.

    Nothing is downloaded: the backbones (r3d_18) and the detector (Faster R-CNN) have random
    weights, and the sample is made so that motion carries the verbs and objects the nouns.

        featstore demo demo-out
    """
    from featstore.demo_job import run_demo
    from featstore.store import FeatureStore

    result = run_demo(out, quick=quick, device=device, seed=seed, epochs=epochs, log=click.echo)
    click.echo("")
    click.echo("results on the validation participants (top-k accuracy, %):")
    click.echo(result.table())
    info = FeatureStore.open(result.store).info()
    click.echo("")
    click.echo(f"store {result.store}: {info['segments']['ok']} ok, {info['segments']['failed']} failed, "
               f"{info['bytes'] / 2**20:.1f} MiB")
    for name, spec in info["fields"].items():
        click.echo(f"  {name:<18} {spec['dtype']:<8} {spec['shape']}")
    click.echo("")
    click.echo(f"sample (frames, annotations, boxes): {out / 'sample'}")
    for head, run in result.runs.items():
        click.echo(f"run {head}: {run} (metrics.json, predictions.parquet, curves.png)")
    click.echo(f"results: {out / 'results.json'}")
    click.echo("next: featstore query " + str(result.store) + " \"select verb_class, count(*) n from segments group by 1\"")
