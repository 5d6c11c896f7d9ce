"""`featstore demo`: both stages of the job on a small generated sample, nothing downloaded.

The demo's orchestration sits in ``cli`` because it drives every library (``finetune`` trains the
verb net, ``featstore`` builds, ``heads`` trains), which none may do for another:

1. ``featstore.samples.kitchens.generate_sample``: EPIC-layout JPEG frames of synthetic kitchens,
   annotations, video info and a boxes file (see that module for what the sample holds), with the
   actions' motions cut to ``cli.demo_recipe.MOTION`` of their travel so that random-weight
   features no longer separate the verbs on their own (at full travel they do: nothing would be
   left for stage 1).
2. Stage 1, ``finetune.backbone.finetune`` (what `featstore finetune` runs): a ``r3d_18`` VerbNet
   trained from random weights on the training participants' verbs, on the build's own clips
   (``cli.demo_recipe.CLIP``); with ``--train-detector`` also the detector (``featstore
   finetune-detector``).
3. Stage 2, ``featstore.extract.service.build_store`` (what `featstore build` runs) twice: ``store/``
   with the stage-1 verb net, ``store-random/`` with random weights only (the "before"); the noun
   backbone is a random ``r3d_18`` in both, the detector a random ``fasterrcnn_resnet50_fpn``
   pooling its features at the sample's boxes (or the stage-1 detector, finding its own).
4. ``heads.trainer.train`` of ``saoa`` and ``global`` on each store on the paper's participant
   split (``epic55-lfb-train`` = P01-P25, ``epic55-lfb-val`` = P26+), then the before/after table
   with chance, plots, and an ablation grid for ``heads ablate``.

What each step runs, as the parameters of its command, is the recipe (``cli.demo_recipe``: the
commands' own config builders make the library configs from it, and ``cli.common.format_command``
the command lines the demo prints, so the two cannot disagree); the table, plots and grid are
``cli.demo_results``. This module runs the steps into the output folder, reusing what an earlier
demo of the same settings finished (its marker, `MARKER`).
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

from cli.common import format_command
from cli.demo_recipe import (
    HEADS,
    METRICS,
    MOTION,
    STORES,
    VERB_BACKBONE,
    VERBNET,
    DemoHead,
    build_command,
    build_params,
    detector_params,
    train_command,
    verbnet_command,
    verbnet_params,
)
from cli.demo_results import chance_metrics, format_results, plot_results, write_grid
from featstore.io.atomic import atomic_write_json
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
from featstore.training.run_folder import (
    CHECKPOINT_NAME,
    CURVES_NAME,
    METRICS_NAME,
    PREDICTIONS_NAME,
    holds_run,
)

__all__ = [
    "DemoConfig",
    "DemoError",
    "DemoReport",
    "prepare_out",
    "run_demo",
]

# ------------------------------------------------------------------------------------------------
# the demo


DEMO_VERSION = 3  # bump when the sample, build or head settings change: older outputs are rebuilt
MARKER = "demo.json"  # marks a folder as a demo output (a rerun may reuse or replace what it holds)
# What a demo of other settings replaces.
OWNED = ("sample", "verbnet", "detector", "store", "store-random", "runs", "plots", "grid.toml", MARKER)


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
    # What looks wrong: a build's empty detections, a stage-1 run or a head at chance (the runs'
    # metrics.json `warnings`), each prefixed with where it comes from.
    warnings: list[str] = field(default_factory=list)

    @property
    def store(self) -> Path:
        """The store of both stages (built with the stage-1 verb net)."""
        return self.stores["store"]

    def results_table(self) -> str:
        return format_results(self.metrics, self.chance, n_val=self.n_val)

    def warnings_text(self) -> str:
        """The warnings as lines to print beside the table (empty when there are none)."""
        if not self.warnings:
            return ""
        return "\n".join([f"WARNING ({len(self.warnings)}): what looks wrong in this demo's runs:",
                           *(f"  - {warning}" for warning in self.warnings)])

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
                      reused=steps.reused, n_val=n_val, warnings=steps.warnings)


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
    warnings: list[str] = field(default_factory=list)

    @property
    def done(self) -> set[str]:
        return set(self.state.get("done", []))

    def mark(self, stage: str) -> None:
        """``stage`` is finished: recorded in the marker at once, so that a crash after it keeps it."""
        self.record(done=sorted(self.done | {stage}))

    def record(self, **values: Any) -> None:
        self.state.update(values)
        _write_marker(self.out, self.state)

    def warn(self, name: str, warning: str) -> None:
        """Note ``warning`` of ``name`` for the end, once (a store's empty detections are also each of
        its head runs' warning)."""
        if not any(noted.endswith(f": {warning}") for noted in self.warnings):
            self.warnings.append(f"{name}: {warning}")

    def run_warnings(self, run: Path, name: str) -> None:
        """Collect a finished run's metrics.json ``warnings``, each prefixed with ``name``."""
        try:
            recorded = json.loads((run / METRICS_NAME).read_text()).get("warnings") or []
        except (OSError, ValueError):
            return
        for warning in recorded:
            self.warn(name, warning)

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
    steps.run_warnings(run, VERBNET)
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
    steps.run_warnings(run, "detector")
    return run / CHECKPOINT_NAME


def _build(config: DemoConfig, sample: Sample, store: Path, verbnet: Path | None, detector: Path | None,
           steps: _DemoSteps) -> None:
    """Build (or finish) one demo store: with the stage-1 verb net when given, else random weights."""
    from cli.featstore_build import make_build_config
    from featstore.extract.config import RANDOM_WEIGHTS_NOTE
    from featstore.extract.service import build_store

    verb_backbone = VERB_BACKBONE if verbnet is None else f"{VERB_BACKBONE}:{verbnet / CHECKPOINT_NAME}"
    params = build_params(sample, store, verb_backbone=verb_backbone, trained_detector=detector, seed=config.seed,
                          device=config.device, progress=config.progress, workers=config.workers)
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
            steps.warn(store.name, warning)
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
                  progress=params["progress"], log=lambda _line: None, half_checkpoint=params["half_checkpoint"])
        steps.mark(stage)
        steps.log(f"      {params['epochs']} epochs in {time.perf_counter() - started:.1f} s")
    steps.run_warnings(run, f"runs/{run.name}")
    return {k: v for k, v in json.loads((run / METRICS_NAME).read_text()).items() if k in METRICS}
