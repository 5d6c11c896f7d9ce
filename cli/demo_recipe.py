"""What each step of `featstore demo` runs: the sample's, the backbones' and the detector's settings.

Every step is given as the parameters of its command (`featstore finetune`, `featstore build`,
`heads train`); the commands' own config builders (``cli.featstore_finetune.make_finetune_config``,
``cli.featstore_build.make_build_config``, ``cli.heads_cli.make_train_config``) make the library
configs from them, and ``cli.common.format_command`` the command lines the demo prints, so the two
cannot disagree. ``cli.demo`` runs the steps, ``cli.demo_results`` tabulates and plots what they gave.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.common import command_params, format_command
from featstore.samples.kitchens import Sample
from heads.metric_registry import list_metrics

__all__ = [
    "HEADS",
    "METRICS",
    "STORES",
    "TRAIN_SETTINGS",
    "VERBNET",
    "DemoHead",
    "StoreRun",
    "build_command",
    "build_params",
    "detector_params",
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


def build_params(sample: Sample, store: str | Path, *, verb_backbone: str = VERB_BACKBONE,
                 trained_detector: Path | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
                 workers: int = 1) -> dict[str, Any]:
    """The `featstore build` parameters the demo builds its stores with.

    Args:
        sample: the generated sample (frames, annotations, video info, boxes).
        store: the store to build.
        verb_backbone: the verb backbone's spec (the stage-1 verb net as ``r3d_18:CHECKPOINT``).
        trained_detector: the detector's stage-1 checkpoint (`detector_params`), which then finds its
            own boxes at its own input size; None for the random `DETECTOR` at the sample's boxes.
        seed, device, progress, workers: as the `featstore build` options of those names.
    Returns:
        Every parameter of `cli.featstore_build.build` by name, for `make_build_config` and
        `format_command`.
    """
    from cli.featstore_build import build

    params = command_params(
        build, store=Path(store), annotations=sample.annotations, frames_root=sample.frames,
        video_info=sample.video_info, verb_backbone=verb_backbone, noun_backbone=NOUN_BACKBONE, detector=DETECTOR,
        boxes=sample.boxes, det_min_size=DET_MIN_SIZE, det_max_size=DET_MAX_SIZE, batch_size=BUILD_BATCH_SIZE,
        workers=workers, seed=seed, device=device, progress=progress, **SAMPLING,
    )
    if trained_detector is not None:
        params.update(detector=f"{TRAINED_DETECTOR}:{trained_detector}", boxes=None,
                      det_min_size=TRAINED_DETECTOR_SIZE[0], det_max_size=TRAINED_DETECTOR_SIZE[1])
    return params


# Stage 1 of the verb net: the r50-3d recipe's optimiser (SGD, momentum 0.9, weight decay 1e-4)
# from random weights, at the build's clip (`CLIP`): random crops of the clip's side from frames
# whose short side is drawn up to an eighth larger, the centre crop for validation. Few epochs at a
# high lr, dropped for the last one: what a 2-core CPU allows within the demo's minutes.
VERBNET_STAGE1: dict[str, Any] = dict(
    backbone=VERB_BACKBONE, target="verb", recipe="r50-3d", clip_frames=CLIP["clip_frames"],
    clip_stride=CLIP["clip_stride"], crop=CLIP["size"], scale_range=f"{CLIP['size']},{CLIP['size'] * 9 // 8}",
    test_size=CLIP["size"], batch_size=8,
    # Half-precision weights: the r3d_18's 33 M parameters take 64 MB instead of 127 (a demo folder
    # stays small); the build casts them back.
    half_checkpoint=True)
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
    min_size=TRAINED_DETECTOR_SIZE[0], max_size=TRAINED_DETECTOR_SIZE[1], roi_batch_size=64, rpn_proposals=300,
    half_checkpoint=True)
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

        # Half-precision weights: SAOA's are 13 MB in float32, and a demo folder stays small.
        return command_params(train, store=Path(store), out=Path(out), seed=seed, device=device, progress=progress,
                              half_checkpoint=True,
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
# the demo's result rows: its stage-1 run and its two stores


METRICS = tuple(m.key for m in list_metrics(table=True))  # the registry's Table 1 metrics, verb first
VERBNET = "verbnet"  # the stage-1 run's folder, and its row's key in `cli.demo.DemoReport.metrics`


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

