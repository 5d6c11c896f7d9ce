"""The results of `featstore demo`: chance, the before/after table, its plot, and the grid for `heads ablate`.

The rows follow the recipe (``cli.demo_recipe``): each head on each store, then the stage-1 verb net.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cli.demo_recipe import (
    HEADS,
    METRICS,
    STORES,
    TRAIN_SETTINGS,
    VERB_BACKBONE,
    VERBNET,
)
from featstore.io.atomic import atomic_write_text
from featstore.io.figures import pyplot, save_figure

__all__ = [
    "GRID_TEMPLATE",
    "chance_metrics",
    "format_results",
    "plot_results",
    "result_rows",
    "write_grid",
]


def chance_metrics(num_verbs: int, num_nouns: int, num_actions: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of a uniform guess among the classes present."""
    out = {}
    for what, k in (("verb", num_verbs), ("noun", num_nouns), ("action", num_actions)):
        out[f"{what}_top1"] = 100.0 / k
        out[f"{what}_top5"] = 100.0 * min(5, k) / k
    return out


def result_rows(metrics: dict[str, dict[str, float]]) -> list[tuple[str, str, str]]:
    """The table's rows as (features, head, key in ``metrics``): each head on the random store, on
    the stage-1 store, then the stage-1 verb net's own classifier; keys absent from ``metrics`` are left out."""
    rows = [(store.label, head.name, head.name + store.key) for store in STORES for head in HEADS]
    rows.append(("stage 1", VERB_BACKBONE, VERBNET))
    return [row for row in rows if row[2] in metrics]


def format_results(metrics: dict[str, dict[str, float]], chance: dict[str, float], *, n_val: int = 0) -> str:
    """The before/after table: each head on the random-weight store, then on the store of the stage-1
    verb net, the verb net alone, and chance; verb / noun / action top-1 and top-5 (%)."""
    header = f"{'features':<10}{'head':<8}" + "".join(f"{what + ' ' + k:>14}" for what in ("verb", "noun", "action")
                                                     for k in ("top-1", "top-5"))
    lines = [header]
    for features, head, key in result_rows(metrics) + [("", "chance", "")]:
        values = metrics.get(key, chance)
        cells = "".join(f"{values[m]:>14.1f}" if m in values else f"{'-':>14}" for m in METRICS)
        lines.append(f"{features:<10}{head:<8}{cells}")
    if n_val:
        lines.append(f"(validation: the {n_val} segments of participants P26+ (epic55-lfb-val). random: the heads on "
                     "store-random/, random weights only; stage 1: on store/, built with the stage-1 verb net; "
                     f"{VERB_BACKBONE}: that verb net's own classifier; chance: a uniform guess among the sample's "
                     "classes)")
    return "\n".join(lines)


def plot_results(metrics: dict[str, dict[str, float]], chance: dict[str, float], path: str | Path) -> Path:
    """Bars of verb / noun / action top-1 per row of the results table, with chance marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    groups = ("verb_top1", "noun_top1", "action_top1")
    rows = result_rows(metrics)
    width = 0.8 / max(len(rows), 1)
    for i, (features, head, key) in enumerate(rows):
        xs = np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(xs, [metrics[key].get(g, 0.0) for g in groups], width, label=f"{head} ({features})",
               hatch="" if features == "stage 1" else "//")
    for j, g in enumerate(groups):
        ax.hlines(chance[g], j - 0.45, j + 0.45, colors="k", linestyles="--", label="chance" if j == 0 else None)
    ax.set_xticks(np.arange(len(groups)), ["verb top-1", "noun top-1", "action top-1"])
    ax.set(ylabel="accuracy (%)", ylim=(0, 125), yticks=range(0, 101, 20),
           title="featstore demo: validation accuracy (P26+), random weights vs stage 1")
    ax.legend(fontsize="x-small", loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


GRID_TEMPLATE = """\
# An ablation grid over the demo store (the format: heads/ablation.py):
#   heads ablate {store} --grid {grid} --out {out}/ablation
[base]
train_split = "{train_split}"
val_split = "{val_split}"
epochs = {epochs}
lr_steps = [{lr_step}]
batch_size = {batch_size}
lr = {lr}
seed = {seed}
normalize = true           # for the heads that have the switch (saoa, sap)

[[run]]
name = "saoa"
model = "saoa"

[[run]]
name = "saoa-no-relation"
model = "saoa"
no_relation = true

[[run]]
name = "saoa-unnormalised-relation"   # the relation over the gated rows as they are (docs/method.md)
model = "saoa"
relation_norm = "none"

[[run]]
name = "global"
model = "global"
lr = {global_lr}
"""


def write_grid(path: Path, *, store: Path, out: Path, seed: int, epochs: int) -> Path:
    """The grid file for `heads ablate` (the demo's SAOA settings over ``epochs`` epochs)."""
    saoa = next(h.settings for h in HEADS if h.settings["model"] == "saoa")
    baseline = next(h.settings for h in HEADS if h.settings["model"] == "global")
    lr_step = max(1, round(epochs * 0.8))
    atomic_write_text(path, GRID_TEMPLATE.format(store=store, grid=path, out=out, epochs=epochs, lr_step=lr_step,
                                                 lr=saoa["lr"], seed=seed, global_lr=baseline["lr"], **TRAIN_SETTINGS))
    return path
