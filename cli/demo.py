"""`featstore demo`: the whole job on a small generated sample, nothing downloaded.

The demo's orchestration sits in ``cli`` because it drives both libraries (``featstore`` builds,
``heads`` trains), which neither may do for the other:

1. ``featstore.samples.kitchens.generate_sample``: EPIC-layout JPEG frames of synthetic kitchens,
   annotations, video info and a boxes file (see that module for what the sample holds).
2. ``featstore.extraction.build_store`` (what `featstore build` runs) with torchvision ``r3d_18``
   backbones and a ``fasterrcnn_resnet50_fpn`` detector, all with random weights, pooling detector
   features at the boxes of the boxes file.
3. ``heads.trainer.train`` of ``saoa`` and ``global`` on the paper's participant split
   (``epic55-lfb-train`` = P01-P25, ``epic55-lfb-val`` = P26+), then a results table with chance,
   plots, and an ablation grid for ``heads ablate``.

Steps 2 and 3 are given as the parameters of the `featstore build` and `heads train` commands;
the commands' own config builders (``cli.featstore_build.make_build_config``,
``cli.heads_cli.make_train_config``) make the library configs from them, and
``cli.common.format_command`` the command lines the demo prints, so the two cannot disagree.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cli.common import command_params, format_command
from featstore.atomic import atomic_write_json, atomic_write_text
from featstore.figures import pyplot, save_figure
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
    "HeadRun",
    "build_command",
    "build_params",
    "chance_metrics",
    "format_results",
    "prepare_out",
    "run_demo",
    "train_command",
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

# Short clips and few detection frames: the sample's segments last 2 s at 8 fps. The clip (8 frames
# at stride 2, short side 64) spans the 16 annotated frames. Detections at 1 fps: the global window
# (2 s) takes 2 frames, a quarter and three quarters into the action; the local window (1 s) 1
# frame, which falls on the global grid (the later one), so the detector runs twice per segment.
# Top 3 per frame: the three objects of a shot. The detector's share of the build is the largest;
# these windows keep the demo within minutes on a 2-core CPU.
SAMPLING: dict[str, Any] = {"clip_frames": 8, "clip_stride": 2, "size": 64, "det_fps": 1.0,
                            "det_global_seconds": 2.0, "det_local_seconds": 1.0, "det_topk": 3}


def build_params(sample: Sample, store: str | Path, *, seed: int = 0, device: str = "cpu", progress: bool = True,
                 workers: int = 1) -> dict[str, Any]:
    """The `featstore build` parameters the demo builds its store with.

    Args:
        sample: the generated sample (frames, annotations, video info, boxes).
        store: the store to build.
        seed, device, progress, workers: as the `featstore build` options of those names.
    Returns:
        Every parameter of `cli.featstore_build.build` by name, for `make_build_config` and
        `format_command`.
    """
    from cli.featstore_build import build

    return command_params(
        build, store=Path(store), annotations=sample.annotations, frames_root=sample.frames,
        video_info=sample.video_info, verb_backbone=VERB_BACKBONE, noun_backbone=NOUN_BACKBONE, detector=DETECTOR,
        boxes=sample.boxes, det_min_size=DET_MIN_SIZE, det_max_size=DET_MAX_SIZE, batch_size=BUILD_BATCH_SIZE,
        workers=workers, seed=seed, device=device, progress=progress, **SAMPLING,
    )


# Stage 1 of the detector (`featstore demo --train-detector`): the settings of the test that holds
# its "Done when" (tests/finetune/test_detector.py): MobileNetV3 at its own 320 short side from random
# weights on every 4th frame of the sample, 64 sampled proposals an image so that it fits a CPU.
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
class HeadRun:
    """One head the demo trains, with the settings that suit the sample's features."""

    name: str  # the run directory under runs/
    settings: dict[str, Any]  # `heads train` parameters by name (model, lr, epochs, lr_steps, switches)

    def params(self, store: str | Path, out: str | Path, *, seed: int, device: str,
               progress: bool = True) -> dict[str, Any]:
        """Every parameter of `cli.heads_cli.train` for this run (see `make_train_config`).

        Args:
            store: the demo store.
            out: the run directory.
            seed, device, progress: as the `heads train` options of those names.
        Returns:
            parameter name -> value.
        """
        from cli.heads_cli import train

        return command_params(train, store=Path(store), out=Path(out), seed=seed, device=device, progress=progress,
                              **{**TRAIN_SETTINGS, **self.settings})


def train_command(params: dict[str, Any]) -> str:
    """The `heads train` command line of `HeadRun.params` (printed)."""
    from cli.heads_cli import train

    return format_command("heads train", train, params, always=("model",))


# Random-weight features are far from centred (pooled ReLU outputs: a common part much larger than
# the differences between segments) and the detector's are ~20x larger than the backbone's, so the
# paper's schedule (lr 1e-4, 15 epochs) would not move the heads off the class prior here: the
# sample is small, the lr high, the epochs many. SAOA uses the report's L2 scheme (--normalize),
# so one lr suits both kinds of feature.
HEADS: tuple[HeadRun, ...] = (
    HeadRun("saoa", {"model": "saoa", "lr": 0.03, "epochs": 50, "lr_steps": (40,), "normalize": True}),
    HeadRun("global", {"model": "global", "lr": 0.1, "epochs": 40, "lr_steps": (30,)}),
)


# ------------------------------------------------------------------------------------------------
# the demo


DEMO_VERSION = 1  # bump when the sample, build or head settings change: older outputs are rebuilt
MARKER = "demo.json"  # marks a folder as a demo output (a rerun may reuse or replace what it holds)
OWNED = ("sample", "detector", "store", "runs", "plots", "grid.toml", MARKER)  # what a demo of other settings replaces
METRICS = tuple(m.key for m in list_metrics(table=True))  # the registry's Table 1 metrics, verb first


class DemoError(Exception):
    """The demo cannot run (a folder that is not a demo output, a failed build)."""


@dataclass(frozen=True)
class DemoConfig:
    """One `featstore demo` call."""

    out: Path = Path("demo-out")  # the output folder: sample/, store/, runs/, plots/, grid.toml, demo.json
    quick: bool = False  # the small sample (for tests; its 16 validation segments make accuracies coarse)
    seed: int = 0  # the sample's, the models' and the heads' seed
    device: str = "cpu"  # 'cpu' or 'cuda', for the build and the heads
    progress: bool = True  # progress bars on stderr
    workers: int = 1  # decode processes of the build (the sample's frames are small)
    train_detector: bool = False  # stage 1 of the detector first; the store is built with it, without --boxes

    @property
    def spec(self) -> SampleSpec:
        return QUICK_SAMPLE if self.quick else FULL_SAMPLE

    def key(self) -> dict[str, Any]:
        """What an output folder must have been made with to be reused."""
        return {"version": DEMO_VERSION, "quick": self.quick, "seed": self.seed, "train_detector": self.train_detector}


@dataclass
class DemoReport:
    """What a demo did and where everything went."""

    out: Path
    sample: Sample
    store: Path
    runs: dict[str, Path]  # head run name -> run directory
    metrics: dict[str, dict[str, float]]  # head run name -> metrics.json
    chance: dict[str, float]  # the same keys: a uniform guess among the sample's classes
    plots: list[Path]
    grid: Path
    commands: list[str]  # the featstore / heads commands equivalent to what ran
    seconds: dict[str, float]  # wall time per stage
    reused: list[str] = field(default_factory=list)  # stages taken from an earlier run into the same folder
    n_val: int = 0

    def results_table(self) -> str:
        return format_results(self.metrics, self.chance, n_val=self.n_val)

    def locations(self) -> str:
        """Where the sample, store, runs, plots and grid went (one line each)."""
        lines = [
            f"sample   {self.sample.root}  (JPEG frames, {self.sample.annotations.name}, {self.sample.boxes.name})",
            f"store    {self.store}",
        ]
        for name, run in self.runs.items():
            lines.append(f"run      {run}  ({name}: metrics.json, predictions.parquet, curves.png)")
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


def format_results(metrics: dict[str, dict[str, float]], chance: dict[str, float], *, n_val: int = 0) -> str:
    """The results table: one row per head, then chance; verb / noun / action top-1 and top-5 (%)."""
    header = f"{'head':<10}" + "".join(f"{what + ' ' + k:>14}" for what in ("verb", "noun", "action")
                                      for k in ("top-1", "top-5"))
    lines = [header]
    for name, values in list(metrics.items()) + [("chance", chance)]:
        cells = "".join(f"{values[m]:>14.1f}" if m in values else f"{'-':>14}" for m in METRICS)
        lines.append(f"{name:<10}{cells}")
    if n_val:
        lines.append(f"(validation: the {n_val} segments of participants P26+ (epic55-lfb-val); chance: a uniform "
                     "guess among the sample's classes)")
    return "\n".join(lines)


def plot_results(metrics: dict[str, dict[str, float]], chance: dict[str, float], path: str | Path) -> Path:
    """Bars of verb / noun / action top-1 per head, with chance marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    groups = ("verb_top1", "noun_top1", "action_top1")
    width = 0.8 / max(len(metrics), 1)
    for i, (name, values) in enumerate(metrics.items()):
        xs = np.arange(len(groups)) + (i - (len(metrics) - 1) / 2) * width
        ax.bar(xs, [values.get(g, 0.0) for g in groups], width, label=name)
    for j, g in enumerate(groups):
        ax.hlines(chance[g], j - 0.45, j + 0.45, colors="k", linestyles="--", label="chance" if j == 0 else None)
    ax.set_xticks(np.arange(len(groups)), ["verb top-1", "noun top-1", "action top-1"])
    ax.set(ylabel="accuracy (%)", ylim=(0, 118), yticks=range(0, 101, 20),
           title="featstore demo: validation accuracy (P26+)")
    ax.legend(fontsize="small", loc="upper center", ncol=len(metrics) + 1, frameon=False)
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
    """Generate the sample, build the store, train the heads, write the plots: `featstore demo`.

    A rerun into the same folder with the same settings reuses what is finished (the sample, the
    stored segments, finished runs) and resumes the rest; a demo of other settings there is
    replaced; any other non-empty folder is refused.

    Args:
        config: the demo's settings.
        log: where progress lines go.
    Returns:
        The report: metrics per head, chance, paths, equivalent commands, timings.
    Raises:
        DemoError: the folder cannot be used, or segments failed to build.
    """
    import torch

    from cli.featstore_build import make_build_config
    from cli.heads_cli import make_train_config
    from featstore.extraction import RANDOM_WEIGHTS_NOTE, build_store
    from heads.trainer import train

    if config.device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
    if config.device not in ("cpu", "cuda"):
        raise DemoError(f"device must be 'cpu' or 'cuda', got {config.device!r}")
    out = config.out
    state = prepare_out(config, log)
    done = set(state.get("done", []))
    seconds: dict[str, float] = {}
    reused: list[str] = []
    spec = config.spec

    def mark(stage: str) -> None:
        done.add(stage)
        state["done"] = sorted(done)
        _write_marker(out, state)

    # 1. the sample
    started = time.perf_counter()
    sample = sample_paths(out / "sample")
    n_frames = spec.n_segments * SHOT_FRAMES
    if "sample" in done and sample.annotations.is_file():
        reused.append("sample")
        log(f"[1/4] sample: reusing {sample.root}")
    else:
        if sample.root.exists():
            shutil.rmtree(sample.root)
        log(f"[1/4] sample: {spec.n_segments} segments ({len(VERBS)} verbs x {len(NOUNS)} nouns, "
            f"{len(spec.participants)} participants), {n_frames} JPEG frames -> {sample.root}")
        sample = generate_sample(sample.root, spec, seed=config.seed)
        mark("sample")
    plots = [plot_sample(sample, out / "plots" / "sample.png")]
    seconds["sample"] = time.perf_counter() - started

    # 2. the store (after the detector's stage 1 with --train-detector)
    started = time.perf_counter()
    store = out / "store"
    params = build_params(sample, store, seed=config.seed, device=config.device, progress=config.progress,
                          workers=config.workers)
    commands = []
    if config.train_detector:
        from cli.featstore_finetune_detector import finetune_detector as detector_command
        from cli.featstore_finetune_detector import make_detector_finetune_config
        from finetune.detector import finetune_detector

        run = out / "detector"
        det_params = detector_params(sample, run, quick=config.quick, seed=config.seed, device=config.device,
                                     progress=config.progress, workers=config.workers)
        det_command = format_command("featstore finetune-detector", detector_command, det_params)
        commands.append(det_command)
        if "detector" in done and (run / "metrics.json").is_file():
            reused.append("detector")
            log(f"[2/4] detector: reusing {run}")
        else:
            log(f"[2/4] detector: {det_command}")
            det_started = time.perf_counter()
            resume = (run / "training_state.pt").is_file()
            metrics = finetune_detector(make_detector_finetune_config({**det_params, "resume": resume},
                                                                      command=det_command), log=lambda _line: None)
            mark("detector")
            log(f"      {det_params['iterations']} iterations in {time.perf_counter() - det_started:.1f} s: "
                f"mAP@0.5 {metrics.get('map_50', 0):.1f} on the held-out participants")
        params.update(detector=f"{TRAINED_DETECTOR}:{run / 'checkpoint.pt'}", boxes=None,
                      det_min_size=TRAINED_DETECTOR_SIZE[0], det_max_size=TRAINED_DETECTOR_SIZE[1])
        seconds["detector"] = time.perf_counter() - started
        started = time.perf_counter()
    command = build_command(params)
    log(f"[2/4] build: {command}")
    report = build_store(make_build_config(params, command=command))
    random = [w for w in report.warnings if RANDOM_WEIGHTS_NOTE in w]
    if random:
        # The build warns, rightly for real data; here it is the point: say what it means for the demo.
        log(f"      note: {len(random)} model(s) have RANDOM WEIGHTS (no weights can be downloaded); the sample "
            "is made so that even random features separate its motions and colours")
    for warning in report.warnings:
        if warning not in random:
            log(f"      warning: {warning}")
    log(f"      {report.summary()}")
    if report.failed:
        raise DemoError(f"{len(report.failed)} segment(s) failed to build; rerun the demo to retry them")
    if report.skipped == report.selected:
        reused.append("store")
    seconds["build"] = time.perf_counter() - started

    # 3. the heads
    started = time.perf_counter()
    runs: dict[str, Path] = {}
    metrics: dict[str, dict[str, float]] = {}
    commands.append(command)
    for head in HEADS:
        run = out / "runs" / head.name
        runs[head.name] = run
        params = head.params(store, run, seed=config.seed, device=config.device, progress=config.progress)
        head_command = train_command(params)
        commands.append(head_command)
        if (run / "metrics.json").is_file() and f"run:{head.name}" in done:
            reused.append(f"runs/{head.name}")
            log(f"[3/4] train: reusing {run}")
        else:
            log(f"[3/4] train: {head_command}")
            head_started = time.perf_counter()
            resume = (run / "checkpoints" / "last.pt").is_file()
            with _head_threads(config.device):
                train(params["store"], params["out"], make_train_config(params), resume=resume,
                      progress=params["progress"], log=lambda _line: None)
            mark(f"run:{head.name}")
            log(f"      {params['epochs']} epochs in {time.perf_counter() - head_started:.1f} s")
        metrics[head.name] = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k in METRICS}
    seconds["train"] = time.perf_counter() - started

    # 4. results, plots, the grid for `heads ablate`
    chance = chance_metrics(len(VERBS), len(NOUNS), len(VERBS) * len(NOUNS))
    plots.append(plot_results(metrics, chance, out / "plots" / "results.png"))
    plots.extend(run / "curves.png" for run in runs.values())
    grid = write_grid(out / "grid.toml", store=store, out=out, seed=config.seed, epochs=3 if config.quick else 25)
    n_val = len(spec.val_participants) * spec.videos_per_participant * spec.segments_per_video
    state.update(metrics=metrics, chance=chance, seconds=seconds, n_val=n_val)
    _write_marker(out, state)
    log(f"[4/4] plots: {', '.join(str(p) for p in plots[:2])}")
    return DemoReport(out=out, sample=sample, store=store, runs=runs, metrics=metrics, chance=chance, plots=plots,
                      grid=grid, commands=commands, seconds=seconds, reused=reused, n_val=n_val)
