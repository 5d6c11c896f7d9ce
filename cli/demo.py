"""`featstore demo`: both stages of the job on a small generated sample, nothing downloaded.

The demo's orchestration sits in ``cli`` because it drives every library (``finetune`` trains the
verb net, ``featstore`` builds, ``heads`` trains), which none may do for another:

1. ``featstore.samples.kitchens.generate_sample``: EPIC-layout JPEG frames of synthetic kitchens,
   annotations, video info and a boxes file (see that module for what the sample holds), with the
   actions' motions cut to `MOTION` of their travel so that random-weight features no longer
   separate the verbs on their own (at full travel they do: nothing would be left for stage 1).
2. Stage 1, ``finetune.backbone.finetune`` (what `featstore finetune` runs): a ``r3d_18`` VerbNet
   trained from random weights on the training participants' verbs, on the build's own clips
   (`CLIP`); with ``--train-detector`` also the detector (``featstore finetune-detector``).
3. Stage 2, ``featstore.extract.service.build_store`` (what `featstore build` runs) twice: ``store/``
   with the stage-1 verb net, ``store-random/`` with random weights only (the "before"); the noun
   backbone is a random ``r3d_18`` in both, the detector a random ``fasterrcnn_resnet50_fpn``
   pooling its features at the sample's boxes (or the stage-1 detector, finding its own).
4. ``heads.trainer.train`` of ``saoa`` and ``global`` on each store on the paper's participant
   split (``epic55-lfb-train`` = P01-P25, ``epic55-lfb-val`` = P26+), then the before/after table
   with chance, plots, and an ablation grid for ``heads ablate``.

Every step is given as the parameters of its command (`featstore finetune`, `featstore build`,
`heads train`); the commands' own config builders (``cli.featstore_finetune.make_finetune_config``,
``cli.featstore_build.make_build_config``, ``cli.heads_cli.make_train_config``) make the library
configs from them, and ``cli.common.format_command`` the command lines the demo prints, so the two
cannot disagree.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cli.common import command_params, format_command
from featstore.io.atomic import atomic_write_json, atomic_write_text
from featstore.io.figures import pyplot, save_figure
from featstore.training.run_folder import (
    CHECKPOINT_NAME,
    CURVES_NAME,
    METRICS_NAME,
    PREDICTIONS_NAME,
    holds_run,
)
from featstore.samples.kitchens import (
    FULL_SAMPLE,
    NOUNS,
    QUICK_SAMPLE,
    SHOT_FRAMES,
    VERBS,
    Sample,
    SampleSpec,
    generate_sample,
    plot_sample,
    sample_paths,
)
from heads.metric_registry import list_metrics

__all__ = [
    "DemoConfig",
    "DemoError",
    "DemoReport",
    "DemoHead",
    "StoreRun",
    "build_command",
    "build_params",
    "chance_metrics",
    "format_results",
    "prepare_out",
    "result_rows",
    "run_demo",
    "train_command",
    "verbnet_command",
    "verbnet_params",
]

# ------------------------------------------------------------------------------------------------
# the build and the heads the demo runs, as parameters of the `featstore build` and `heads train`
# commands: the commands' own config builders turn them into the library calls, and
# `cli.common.format_command` into the command lines the demo prints (one source for both).

VERB_BACKBONE = "r3d_18"
NOUN_BACKBONE = "r3d_18"  # the same spec: one network, run once (its noun.global is verb.global)
DETECTOR = "fasterrcnn_resnet50_fpn"  # random weights; its box head pools the features at the given boxes
DET_MIN_SIZE, DET_MAX_SIZE = 64, 128  # the detector's input: the 96x128 frames at short side 64
BUILD_BATCH_SIZE = 8  # segments per backbone forward

# Short clips and few detection frames: the sample's segments last 2 s at 8 fps. The clip (4 frames
# at stride 4, short side 32) spans the 16 annotated frames; small, because stage 1 trains a 3D
# network on it on the CPU, and r3d_18 costs ~0.1 s a clip there at 4x32 against ~0.4 s at 8x64
# (forward, backward, step; 2 threads). Stage 1 trains on this very clip, so the build feeds the
# verb net what it learnt from. Detections at 1 fps: the global window (2 s) takes 2 frames, a
# quarter and three quarters into the action; the local window (1 s) 1 frame, which falls on the
# global grid (the later one), so the detector runs twice per segment. Top 3 per frame: the three
# objects of a shot.
CLIP: dict[str, int] = {"clip_frames": 4, "clip_stride": 4, "size": 32}
SAMPLING: dict[str, Any] = {**CLIP, "det_fps": 1.0, "det_global_seconds": 2.0, "det_local_seconds": 1.0,
                            "det_topk": 3}

# The share of each action's travel in the demo's sample (`SampleSpec.motion`). At full travel the
# random-weight store already gives SAOA 100 % verb top-1 on the quick sample; at a tenth, 81 %,
# which leaves room for stage 1 to show (measured, tests/finetune/test_two_stages.py).
MOTION = 0.1


def build_params(sample: Sample, store: str | Path, *, verb_backbone: str = VERB_BACKBONE, seed: int = 0,
                 device: str = "cpu", progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """The `featstore build` parameters the demo builds its stores with.

    Args:
        sample: the generated sample (frames, annotations, video info, boxes).
        store: the store to build.
        verb_backbone: the verb backbone's spec (the stage-1 verb net as ``r3d_18:CHECKPOINT``).
        seed, device, progress, workers: as the `featstore build` options of those names.
    Returns:
        Every parameter of `cli.featstore_build.build` by name, for `make_build_config` and
        `format_command`.
    """
    from cli.featstore_build import build

    return command_params(
        build, store=Path(store), annotations=sample.annotations, frames_root=sample.frames,
        video_info=sample.video_info, verb_backbone=verb_backbone, noun_backbone=NOUN_BACKBONE, detector=DETECTOR,
        boxes=sample.boxes, det_min_size=DET_MIN_SIZE, det_max_size=DET_MAX_SIZE, batch_size=BUILD_BATCH_SIZE,
        workers=workers, seed=seed, device=device, progress=progress, **SAMPLING,
    )


# Stage 1 of the verb net: the r50-3d recipe's optimiser (SGD, momentum 0.9, weight decay 1e-4)
# from random weights, at the build's clip (`CLIP`): random crops of the clip's side from frames
# whose short side is drawn up to an eighth larger, the centre crop for validation. Few epochs at a
# high lr, dropped for the last one: what a 2-core CPU allows within the demo's minutes.
VERBNET_STAGE1: dict[str, Any] = dict(
    backbone=VERB_BACKBONE, target="verb", recipe="r50-3d", clip_frames=CLIP["clip_frames"],
    clip_stride=CLIP["clip_stride"], crop=CLIP["size"], scale_range=f"{CLIP['size']},{CLIP['size'] * 9 // 8}",
    test_size=CLIP["size"], batch_size=8)
VERBNET_EPOCHS = {False: 6, True: 3}  # full sample, --quick
VERBNET_LR = 0.005
# Decoding in the main process: a clip is 4 JPEGs of 96 x 128, cheaper to decode than a worker
# process is to start (seconds: a fresh interpreter importing torch), and a worker would take a
# core from the two threads that train (measured on the quick sample: 18 s without, 24 s with one).
VERBNET_WORKERS = 0


def verbnet_params(sample: Sample, out: str | Path, *, quick: bool, seed: int = 0, device: str = "cpu",
                   progress: bool = True, workers: int = VERBNET_WORKERS) -> dict[str, Any]:
    """The `featstore finetune` parameters of the demo's stage 1 (the r3d_18 verb net).

    Args:
        sample: the generated sample.
        out: the fine-tune run's folder.
        quick: the quick sample's shorter schedule.
        seed, device, progress, workers: as the `featstore finetune` options of those names.
    Returns:
        Every parameter of `cli.featstore_finetune.finetune` by name.
    """
    from cli.featstore_finetune import finetune

    epochs = VERBNET_EPOCHS[quick]
    return command_params(
        finetune, out=Path(out), annotations=sample.annotations, frames_root=sample.frames,
        video_info=sample.video_info, train_split=TRAIN_SETTINGS["train_split"], val_split=TRAIN_SETTINGS["val_split"],
        epochs=epochs, lr=VERBNET_LR, lr_steps=str(epochs), seed=seed, device=device, progress=progress,
        workers=workers, **VERBNET_STAGE1)


def verbnet_command(params: dict[str, Any]) -> str:
    """The `featstore finetune` command line of `verbnet_params` (printed, and in the run's config.json)."""
    from cli.featstore_finetune import finetune

    return format_command("featstore finetune", finetune, params, always=("backbone", "target"))


# Stage 1 of the detector (`featstore demo --train-detector`): MobileNetV3 at its own 320 short side
# from random weights on every 4th frame of the sample, 64 sampled proposals an image so that it fits a
# CPU. tests/finetune/test_detector.py holds its "Done when" on the same images at a cheaper setting
# (100 iterations at short side 240, 32 proposals an image).
TRAINED_DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"
TRAINED_DETECTOR_SIZE = (320, 427)
DETECTOR_STAGE1: dict[str, Any] = dict(
    image_pattern="rgb-frames", where="frame % 4 = 0", batch_size=4, lr=0.02, warmup_iterations=20,
    min_size=TRAINED_DETECTOR_SIZE[0], max_size=TRAINED_DETECTOR_SIZE[1], roi_batch_size=64, rpn_proposals=300)
DETECTOR_ITERATIONS = {False: 150, True: 30}  # full sample, --quick


def detector_params(sample: Sample, out: str | Path, *, quick: bool, seed: int = 0, device: str = "cpu",
                    progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """The `featstore finetune-detector` parameters of the demo's detector stage 1 (its boxes.csv as ground truth)."""
    from cli.featstore_finetune_detector import finetune_detector

    iterations = DETECTOR_ITERATIONS[quick]
    return command_params(
        finetune_detector, out=Path(out), objects=sample.boxes, images=sample.frames, detector=TRAINED_DETECTOR,
        iterations=iterations, eval_every=iterations, lr_steps=str(int(0.8 * iterations)), seed=seed,
        device=device, progress=progress, workers=workers, **DETECTOR_STAGE1)


def build_command(params: dict[str, Any]) -> str:
    """The `featstore build` command line of `build_params` (printed, and kept in the manifest)."""
    from cli.featstore_build import build

    return format_command("featstore build", build, params)


# What every head run shares: the paper's participant split and small batches for the small sample.
TRAIN_SETTINGS: dict[str, Any] = {"train_split": "epic55-lfb-train", "val_split": "epic55-lfb-val", "batch_size": 8}


@dataclass(frozen=True)
class DemoHead:
    """One head the demo trains, with the settings that suit the sample's features."""

    name: str  # the run directory under runs/
    settings: dict[str, Any]  # `heads train` parameters by name (model, lr, epochs, lr_steps, switches)
    quick: dict[str, Any] = field(default_factory=dict)  # what --quick changes (a shorter schedule)

    def params(self, store: str | Path, out: str | Path, *, seed: int, device: str, progress: bool = True,
               quick: bool = False) -> dict[str, Any]:
        """Every parameter of `cli.heads_cli.train` for this run (see `make_train_config`).

        Args:
            store: the demo store.
            out: the run directory.
            seed, device, progress: as the `heads train` options of those names.
            quick: the --quick schedule.
        Returns:
            parameter name -> value.
        """
        from cli.heads_cli import train

        return command_params(train, store=Path(store), out=Path(out), seed=seed, device=device, progress=progress,
                              **{**TRAIN_SETTINGS, **self.settings, **(self.quick if quick else {})})


def train_command(params: dict[str, Any]) -> str:
    """The `heads train` command line of `DemoHead.params` (printed)."""
    from cli.heads_cli import train

    return format_command("heads train", train, params, always=("model",))


# Random-weight features are far from centred (pooled ReLU outputs: a common part much larger than
# the differences between segments) and the detector's are ~20x larger than the backbone's, so the
# paper's schedule (lr 1e-4, 15 epochs) would not move the heads off the class prior here: the
# sample is small, the lr high, the epochs many. SAOA uses the report's L2 scheme (--normalize),
# so one lr suits both kinds of feature. --quick halves the schedules: four head runs must fit in
# its minute beside stage 1.
HEADS: tuple[DemoHead, ...] = (
    DemoHead("saoa", {"model": "saoa", "lr": 0.03, "epochs": 50, "lr_steps": (40,), "normalize": True},
            quick={"epochs": 25, "lr_steps": (20,)}),
    DemoHead("global", {"model": "global", "lr": 0.1, "epochs": 40, "lr_steps": (30,)},
            quick={"epochs": 20, "lr_steps": (15,)}),
)


# ------------------------------------------------------------------------------------------------
# the demo


DEMO_VERSION = 2  # bump when the sample, build or head settings change: older outputs are rebuilt
MARKER = "demo.json"  # marks a folder as a demo output (a rerun may reuse or replace what it holds)
# What a demo of other settings replaces.
OWNED = ("sample", "verbnet", "detector", "store", "store-random", "runs", "plots", "grid.toml", MARKER)
METRICS = tuple(m.key for m in list_metrics(table=True))  # the registry's Table 1 metrics, verb first
VERBNET = "verbnet"  # the stage-1 run's folder, and its row's key in `DemoReport.metrics`


@dataclass(frozen=True)
class StoreRun:
    """One of the demo's two stores: the features the heads of its row group train on."""

    key: str  # suffix of its head runs' names ('' for the main store)
    folder: str  # under the demo's folder
    label: str  # the table's "features" column
    stage1: bool  # built with the stage-1 verb net


STORES: tuple[StoreRun, ...] = (
    StoreRun("-random", "store-random", "random", stage1=False),  # before: stage 2 alone
    StoreRun("", "store", "stage 1", stage1=True),  # after: both stages
)


class DemoError(Exception):
    """The demo cannot run (a folder that is not a demo output, a failed build)."""


@dataclass(frozen=True)
class DemoConfig:
    """One `featstore demo` call."""

    out: Path = Path("demo-out")  # the output folder: sample/, verbnet/, store*/, runs/, plots/, grid.toml, demo.json
    quick: bool = False  # the small sample (for tests; its 16 validation segments make accuracies coarse)
    seed: int = 0  # the sample's, the models' and the heads' seed
    device: str = "cpu"  # 'cpu' or 'cuda', for the fine-tune runs, the builds and the heads
    progress: bool = True  # progress bars on stderr
    workers: int = 1  # decode processes of the builds and of the detector's stage 1 (the frames are small)
    train_detector: bool = False  # the detector's stage 1 too; the stores are built with it, without --boxes

    @property
    def spec(self) -> SampleSpec:
        return dataclasses.replace(QUICK_SAMPLE if self.quick else FULL_SAMPLE, motion=MOTION)

    def key(self) -> dict[str, Any]:
        """What an output folder must have been made with to be reused."""
        return {"version": DEMO_VERSION, "quick": self.quick, "seed": self.seed, "train_detector": self.train_detector}


@dataclass
class DemoReport:
    """What a demo did and where everything went."""

    out: Path
    sample: Sample
    verbnet: Path  # the stage-1 verb net's run
    stores: dict[str, Path]  # StoreRun.folder -> store
    runs: dict[str, Path]  # head run name -> run directory
    metrics: dict[str, dict[str, float]]  # head run name (and VERBNET) -> its Table 1 metrics
    chance: dict[str, float]  # the same keys: a uniform guess among the sample's classes
    plots: list[Path]
    grid: Path
    commands: list[str]  # the featstore / heads commands equivalent to what ran
    seconds: dict[str, float]  # wall time per stage
    reused: list[str] = field(default_factory=list)  # stages taken from an earlier run into the same folder
    n_val: int = 0

    @property
    def store(self) -> Path:
        """The store of both stages (built with the stage-1 verb net)."""
        return self.stores["store"]

    def results_table(self) -> str:
        return format_results(self.metrics, self.chance, n_val=self.n_val)

    def locations(self) -> str:
        """Where the sample, the stage-1 run, the stores, runs, plots and grid went (one line each)."""
        lines = [
            f"sample   {self.sample.root}  (JPEG frames, {self.sample.annotations.name}, {self.sample.boxes.name})",
            f"stage 1  {self.verbnet}  (the {VERB_BACKBONE} verb net: {CHECKPOINT_NAME}, {METRICS_NAME}, "
            f"{CURVES_NAME})",
        ]
        for store in STORES:
            what = "built with the stage-1 verb net" if store.stage1 else "random weights only"
            lines.append(f"store    {self.stores[store.folder]}  ({what})")
        for name, run in self.runs.items():
            lines.append(f"run      {run}  ({name}: {METRICS_NAME}, {PREDICTIONS_NAME}, {CURVES_NAME})")
        for plot in self.plots:
            lines.append(f"plot     {plot}")
        lines.append(f"grid     {self.grid}  (for heads ablate)")
        return "\n".join(lines)


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


@contextlib.contextmanager
def _head_threads(device: str) -> Iterator[None]:
    """One CPU thread while the heads train: their matrices are small, so a second thread gains
    little on an idle machine and costs a lot (thread synchronisation) on a busy one."""
    import torch

    if device != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(out: Path, state: dict[str, Any]) -> None:
    atomic_write_json(out / MARKER, state)


def prepare_out(config: DemoConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Check that the output folder may be used, and clear a demo of other settings from it.

    A folder that is new, empty, or holds a demo of the same settings is used as it is; one that
    holds a demo of other settings loses what that demo made (`OWNED`), and keeps anything else.

    Args:
        config: the demo's settings (their `DemoConfig.key` is compared with the recorded one).
        log: where the line saying that an older demo is replaced goes.
    Returns:
        The state recorded in the folder's marker: ``key`` and the ``done`` stages (empty when new).
    Raises:
        DemoError: ``out`` is a file, or a non-empty folder without a demo marker.
    """
    out = config.out
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} is a file; give a folder for the demo's output")
    if out.is_dir() and any(out.iterdir()):
        state = _read_marker(out)
        if state is None:
            raise DemoError(f"{out} is not empty and is not a featstore demo output (no {MARKER}); "
                            "give a new or empty folder, e.g. featstore demo demo-out")
        if state.get("key") == config.key():
            return state
        log(f"{out} holds a demo made with other settings ({state.get('key')}); replacing it")
        for name in OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    state = {"key": config.key(), "done": []}
    _write_marker(out, state)
    return state


def run_demo(config: DemoConfig, *, log: Callable[[str], None] = print) -> DemoReport:
    """Generate the sample, run stage 1, build both stores, train the heads, write the plots: `featstore demo`.

    A rerun into the same folder with the same settings reuses what is finished (the sample, the
    stage-1 runs, the stored segments, finished head runs) and resumes the rest; a demo of other
    settings there is replaced; any other non-empty folder is refused.

    Args:
        config: the demo's settings.
        log: where progress lines go.
    Returns:
        The report: metrics per head and store, the verb net's, chance, paths, equivalent commands, timings.
    Raises:
        DemoError: the folder cannot be used, or segments failed to build.
    """
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
    if config.device not in ("cpu", "cuda"):
        raise DemoError(f"device must be 'cpu' or 'cuda', got {config.device!r}")
    out = config.out
    steps = _DemoSteps(out, prepare_out(config, log), log)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    sample = _sample_step(config, steps)
    plots = [plot_sample(sample, out / "plots" / "sample.png")]
    seconds["sample"] = time.perf_counter() - started

    # Stage 1: the verb net (and the detector with --train-detector).
    started = time.perf_counter()
    verbnet = out / VERBNET
    verbnet_metrics = _stage1_verbnet(config, sample, verbnet, steps)
    seconds["verbnet"] = time.perf_counter() - started
    detector = None
    if config.train_detector:
        started = time.perf_counter()
        detector = _stage1_detector(config, sample, out / "detector", steps)
        seconds["detector"] = time.perf_counter() - started

    # Stage 2: the two stores, then the heads on each.
    started = time.perf_counter()
    stores = {store.folder: out / store.folder for store in STORES}
    for store in STORES:
        _build(config, sample, stores[store.folder], verbnet if store.stage1 else None, detector, steps)
    seconds["build"] = time.perf_counter() - started
    started = time.perf_counter()
    runs = {head.name + store.key: out / "runs" / (head.name + store.key) for store in STORES for head in HEADS}
    metrics = {head.name + store.key: _train_head(config, head, stores[store.folder], runs[head.name + store.key], steps)
               for store in STORES for head in HEADS}
    metrics[VERBNET] = verbnet_metrics
    seconds["train"] = time.perf_counter() - started

    # Results, plots, the grid for `heads ablate`.
    chance = chance_metrics(len(VERBS), len(NOUNS), len(VERBS) * len(NOUNS))
    plots.append(plot_results(metrics, chance, out / "plots" / "results.png"))
    plots += [verbnet / CURVES_NAME, *(run / CURVES_NAME for run in runs.values())]
    grid = write_grid(out / "grid.toml", store=stores["store"], out=out, seed=config.seed,
                      epochs=3 if config.quick else 25)
    spec = config.spec
    n_val = len(spec.val_participants) * spec.videos_per_participant * spec.segments_per_video
    steps.record(metrics=metrics, chance=chance, seconds=seconds, n_val=n_val)
    log(f"[5/5] plots: {', '.join(str(p) for p in plots[:2])}")
    return DemoReport(out=out, sample=sample, verbnet=verbnet, stores=stores, runs=runs, metrics=metrics,
                      chance=chance, plots=plots, grid=grid, commands=steps.commands, seconds=seconds,
                      reused=steps.reused, n_val=n_val)


def _sample_step(config: DemoConfig, steps: _DemoSteps) -> Sample:
    """[1/5]: generate the sample, or reuse the one an earlier demo of these settings finished."""
    spec = config.spec
    sample = sample_paths(config.out / "sample")
    if "sample" in steps.done and sample.annotations.is_file():
        steps.reused.append("sample")
        steps.log(f"[1/5] sample: reusing {sample.root}")
        return sample
    if sample.root.exists():
        shutil.rmtree(sample.root)
    steps.log(f"[1/5] sample: {spec.n_segments} segments ({len(VERBS)} verbs x {len(NOUNS)} nouns, "
              f"{len(spec.participants)} participants, motions at {spec.motion:.0%} of their travel), "
              f"{spec.n_segments * SHOT_FRAMES} JPEG frames -> {sample.root}")
    sample = generate_sample(sample.root, spec, seed=config.seed)
    steps.mark("sample")
    return sample


@dataclass
class _DemoSteps:
    """What a demo has finished (its marker's ``done`` stages), and the commands it ran and the stages it reused."""

    out: Path
    state: dict[str, Any]  # the marker's content (`prepare_out`)
    log: Callable[[str], None]
    commands: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    @property
    def done(self) -> set[str]:
        return set(self.state.get("done", []))

    def mark(self, stage: str) -> None:
        """``stage`` is finished: recorded in the marker at once, so that a crash after it keeps it."""
        self.record(done=sorted(self.done | {stage}))

    def record(self, **values: Any) -> None:
        self.state.update(values)
        _write_marker(self.out, self.state)

    def finished(self, step: str, stage: str, run: Path, command: str, *, name: str) -> bool:
        """Note ``command`` as run; True (logged as reused under ``name``) when ``stage`` finished into
        ``run`` in an earlier demo, else log the command about to run and return False."""
        self.commands.append(command)
        if stage in self.done and (run / METRICS_NAME).is_file():
            self.reused.append(name)
            self.log(f"{step}: reusing {run}")
            return True
        self.log(f"{step}: {command}")
        return False


def _stage1_verbnet(config: DemoConfig, sample: Sample, run: Path, steps: _DemoSteps) -> dict[str, float]:
    """Fine-tune the demo's verb net into ``run`` (or reuse a finished run); its verb metrics."""
    from cli.featstore_finetune import make_finetune_config
    from finetune.backbone import finetune

    params = verbnet_params(sample, run, quick=config.quick, seed=config.seed, device=config.device,
                            progress=config.progress)
    command = verbnet_command(params)
    if not steps.finished("[2/5] stage 1", VERBNET, run, command, name=VERBNET):
        started = time.perf_counter()
        resume = holds_run(run)
        finetune(make_finetune_config({**params, "resume": resume}, command=command), log=lambda _line: None)
        steps.mark(VERBNET)
        steps.log(f"      {params['epochs']} epochs in {time.perf_counter() - started:.1f} s")
    recorded = json.loads((run / METRICS_NAME).read_text())
    metrics = {k: recorded[k] for k in ("verb_top1", "verb_top5") if k in recorded}
    steps.log(f"      the verb net alone: verb top-1 {metrics.get('verb_top1', float('nan')):.1f} % on the held-out "
        f"participants (chance {100 / len(VERBS):.1f} %)")
    return metrics


def _stage1_detector(config: DemoConfig, sample: Sample, run: Path, steps: _DemoSteps) -> Path:
    """Fine-tune the demo's detector into ``run`` (or reuse a finished run); its checkpoint."""
    from cli.featstore_finetune_detector import finetune_detector as detector_command
    from cli.featstore_finetune_detector import make_detector_finetune_config
    from finetune.detector import finetune_detector

    params = detector_params(sample, run, quick=config.quick, seed=config.seed, device=config.device,
                             progress=config.progress, workers=config.workers)
    command = format_command("featstore finetune-detector", detector_command, params)
    if not steps.finished("[2/5] detector", "detector", run, command, name="detector"):
        started = time.perf_counter()
        resume = holds_run(run)
        metrics = finetune_detector(make_detector_finetune_config({**params, "resume": resume}, command=command),
                                    log=lambda _line: None)
        steps.mark("detector")
        steps.log(f"      {params['iterations']} iterations in {time.perf_counter() - started:.1f} s: "
            f"mAP@0.5 {metrics.get('map_50', 0):.1f} on the held-out participants")
    return run / CHECKPOINT_NAME


def _build(config: DemoConfig, sample: Sample, store: Path, verbnet: Path | None, detector: Path | None,
           steps: _DemoSteps) -> None:
    """Build (or finish) one demo store: with the stage-1 verb net when given, else random weights."""
    from cli.featstore_build import make_build_config
    from featstore.extract.config import RANDOM_WEIGHTS_NOTE
    from featstore.extract.service import build_store

    verb_backbone = VERB_BACKBONE if verbnet is None else f"{VERB_BACKBONE}:{verbnet / CHECKPOINT_NAME}"
    params = build_params(sample, store, verb_backbone=verb_backbone, seed=config.seed, device=config.device,
                          progress=config.progress, workers=config.workers)
    if detector is not None:
        params.update(detector=f"{TRAINED_DETECTOR}:{detector}", boxes=None,
                      det_min_size=TRAINED_DETECTOR_SIZE[0], det_max_size=TRAINED_DETECTOR_SIZE[1])
    command = build_command(params)
    steps.commands.append(command)
    log = steps.log
    log(f"[3/5] build: {command}")
    report = build_store(make_build_config(params, command=command))
    random = [w for w in report.warnings if RANDOM_WEIGHTS_NOTE in w]
    if random:
        # The build warns, rightly for real data; here it is the point: say what it means for the demo.
        log(f"      note: {len(random)} model(s) have RANDOM WEIGHTS (no weights can be downloaded); the sample "
            "is made so that even random features separate its motions and colours, if not every verb")
    for warning in report.warnings:
        if warning not in random:
            log(f"      warning: {warning}")
    log(f"      {report.summary()}")
    if report.failed:
        raise DemoError(f"{len(report.failed)} segment(s) failed to build; rerun the demo to retry them")
    if report.skipped == report.selected:
        steps.reused.append(store.name)


def _train_head(config: DemoConfig, head: DemoHead, store: Path, run: Path, steps: _DemoSteps) -> dict[str, float]:
    """Train (or reuse, or resume) one head run on ``store``; its Table 1 metrics."""
    from cli.heads_cli import make_train_config
    from heads.trainer import train

    params = head.params(store, run, seed=config.seed, device=config.device, progress=config.progress,
                         quick=config.quick)
    command = train_command(params)
    stage = f"run:{run.name}"
    if not steps.finished("[4/5] train", stage, run, command, name=f"runs/{run.name}"):
        started = time.perf_counter()
        resume = holds_run(run)
        with _head_threads(config.device):
            train(params["store"], params["out"], make_train_config(params), resume=resume,
                  progress=params["progress"], log=lambda _line: None)
        steps.mark(stage)
        steps.log(f"      {params['epochs']} epochs in {time.perf_counter() - started:.1f} s")
    return {k: v for k, v in json.loads((run / METRICS_NAME).read_text()).items() if k in METRICS}
