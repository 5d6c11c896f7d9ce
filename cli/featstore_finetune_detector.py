"""`featstore finetune-detector`: stage 1 for the detector, on EPIC object annotations or a boxes file.

Thin: parse the options, make the frozen `DetectorFinetuneConfig` (a recipe's values, each overridden
by its flag), call `finetune.detector.finetune_detector` (which hands a ``detectron2:CONFIG`` detector
to detectron2's own trainer), print the metrics. Registered into the `featstore` group by
`cli.featstore_cli`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli.common import (
    LEARNING_RATE,
    MOMENTUM,
    WEIGHT_DECAY,
    FiniteFloatRange,
    command_line,
    domain_errors,
    removed_on_early_failure,
    stage1_run_options,
)
from finetune.detector_config import detector_recipes_help, list_detector_recipes

_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def make_detector_finetune_config(params: dict[str, Any], *, command: str | None = None):
    """The `DetectorFinetuneConfig` of parsed `finetune-detector` options (scripts that drive the command use it too).

    Returns:
        A `finetune.detector_config.DetectorFinetuneConfig`, rank / world size from the torchrun environment.
    """
    from featstore.extract.config import distributed_env
    from finetune.detector_config import make_detector_config

    lr_steps = params.pop("lr_steps")
    if lr_steps is not None:
        try:
            params["lr_steps"] = tuple(int(part) for part in lr_steps.split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated iterations, got {lr_steps!r}",
                                     param_hint="--lr-steps") from None
    rank, world_size, local_rank = distributed_env()
    return make_detector_config(rank=rank, world_size=world_size, local_rank=local_rank, command=command, **params)


@click.command("finetune-detector", context_settings={"max_content_width": 110})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--objects", required=True, type=_EXISTING_FILE,
              help="Ground truth: EPIC_train_object_labels.csv, or a boxes file in the `featstore build --boxes` "
                   "format with a label column (CSV / Parquet).")
@click.option("--images", required=True, type=_EXISTING_DIR, help="Root folder of the images.")
@click.option("--image-pattern", default="object-detection", show_default=True,
              help="Where an image is under --images: 'object-detection' (<participant>/<video>/<frame:010d>.jpg), "
                   "'rgb-frames' (the EPIC frame folders featstore build reads), or a format string over "
                   "{participant_id}, {video_id} and {frame}.")
@click.option("--detector", required=True, metavar="NAME[:INIT] | detectron2[:CONFIG][:INIT]",
              help="Registered torchvision Faster R-CNN, optionally with a local checkpoint to start from (COCO, "
                   "Visual Genome; a box predictor for other classes is dropped); or detectron2 with a model-zoo "
                   "/ local .yaml config, trained by detectron2's own trainer. Nothing is downloaded.")
@click.option("--recipe", type=click.Choice(list_detector_recipes()), default="epic-train", show_default=True,
              help=f"The report's recipe whose values the flags marked [recipe] override. {detector_recipes_help()}.")
@click.option("--class-names", type=_EXISTING_FILE,
              help="Class list (EPIC_noun_classes.csv): names and count of the classes (default: EPIC-55's 352 "
                   "nouns for object labels, else the largest label + 1).")
@click.option("--num-classes", type=click.IntRange(min=1), help="Object classes without background.")
@click.option("--coords", type=click.Choice(["pixel", "normalized"]), default="pixel", show_default=True,
              help="Boxes files: pixel or normalised coordinates.")
@click.option("--where", help="DuckDB WHERE over the image table (participant_id, video_id, frame, n_objects): "
                              "the images used at all.")
@click.option("--val-where", help="DuckDB WHERE of the held-out images, 'none' for no validation  [recipe: "
                                  "participant_id >= 'P26' for epic-train, none for epic-trainval]")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images of training and of validation.")
@click.option("--iterations", type=click.IntRange(min=0), help="Optimiser steps.  [recipe]")
@click.option("--lr", type=LEARNING_RATE, help="Base learning rate.  [recipe]")
@click.option("--lr-steps", metavar="I1,I2", help="1-based iterations from which the lr is x0.1 per step.  [recipe]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per step over all processes.  [recipe]")
@click.option("--momentum", type=MOMENTUM, help="SGD momentum.  [recipe]")
@click.option("--weight-decay", type=WEIGHT_DECAY, help="SGD weight decay.  [recipe]")
@click.option("--warmup-iterations", type=click.IntRange(min=0), help="Linear warm-up steps.  [recipe]")
@click.option("--warmup-factor", type=FiniteFloatRange(min=0, max=1, min_open=True), help="lr at iteration 0 as a fraction of --lr.  [recipe]")
@click.option("--eval-every", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Iterations between validations and checkpoints.")
@click.option("--min-size", type=click.IntRange(min=1), default=800, show_default=True,
              help="The detector's resize: short side.")
@click.option("--max-size", type=click.IntRange(min=1), default=1333, show_default=True,
              help="The detector's resize: cap on the long side.")
@click.option("--roi-batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Proposals sampled per training image for the box head.")
@click.option("--rpn-proposals", type=click.IntRange(min=1), default=2000, show_default=True,
              help="RPN proposals kept per training image.")
@stage1_run_options(items="images", seeds="the model, the image order and every flip")
@domain_errors
def finetune_detector(**params: Any) -> None:
    """Stage 1: fine-tune the object detector; OUT/checkpoint.pt is what `featstore build --detector` loads.

    OUT gets checkpoint.pt (with its class count and names), config.json (every setting, the recipe,
    the warm-up, the init checkpoint's sha256), metrics.json (COCO mAP@0.5 and mAP@[.5:.95] of the
    held-out images per round, by pycocotools; warnings), per_class_ap.csv, predictions.png, curves.png,
    history.csv, failures.json and log.txt. Example (the report's detector, from a local Visual Genome checkpoint):

    \b
        featstore finetune-detector runs/det --objects EPIC_train_object_labels.csv \\
            --images object_detection_images/ --detector fasterrcnn_resnet50_fpn:vg_frcnn.pth \\
            --recipe epic-trainval --class-names EPIC_noun_classes.csv --device cuda
        featstore build STORE ... --detector fasterrcnn_resnet50_fpn:runs/det/checkpoint.pt
    """
    from featstore.training.run_folder import CHECKPOINT_NAME
    from finetune.detector import finetune_detector as run_finetune
    from finetune.detector_config import DetectorFinetuneError

    try:
        config = make_detector_finetune_config(params, command=command_line())
        with removed_on_early_failure(config.out, "run"):
            metrics = run_finetune(config)
    except DetectorFinetuneError as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(metrics, indent=2))
    model = "detectron2" if config.backend == "detectron2" else config.detector
    spec = f"{model}:{config.out / CHECKPOINT_NAME}"
    click.echo(f"run written to {config.out}; build with --detector {spec}", err=True)
