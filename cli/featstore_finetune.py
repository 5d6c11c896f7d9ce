"""`featstore finetune`: stage 1, fine-tune a VerbNet or NounNet backbone on annotated segments.

Thin: parse the options, make the frozen `FinetuneConfig` (a recipe's values, each overridden by its
flag), call `finetune.backbone.finetune`, print the metrics. Registered into the `featstore` group
by `cli.featstore_cli`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli.common import (
    LEARNING_RATE,
    MOMENTUM,
    POSITIVE,
    WEIGHT_DECAY,
    command_line,
    domain_errors,
    removed_on_early_failure,
    stage1_run_options,
)
from finetune.recipes import list_recipes, recipes_help

_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None


def make_finetune_config(params: dict[str, Any], *, command: str | None = None):
    """The `FinetuneConfig` of parsed `finetune` options (also used by scripts that drive the command).

    Args:
        params: click's parsed parameters of the `finetune` command.
        command: the command line, for config.json.
    Returns:
        A `finetune.config.FinetuneConfig`, with rank / world size from the torchrun environment.
    """
    from featstore.extract.config import distributed_env
    from finetune.config import make_config

    if (params["frames_root"] is None) == (params["videos_dir"] is None):
        raise click.UsageError("give exactly one of --frames ROOT (EPIC JPEG folders) or --videos DIR (video files)")
    scale_range = _int_list(params.pop("scale_range"), "--scale-range")
    if scale_range is not None and len(scale_range) != 2:
        raise click.BadParameter("expected LOW,HIGH (two integers)", param_hint="--scale-range")
    lr_steps = _int_list(params.pop("lr_steps"), "--lr-steps")
    rank, world_size, local_rank = distributed_env()
    return make_config(scale_range=scale_range, lr_steps=lr_steps, rank=rank, world_size=world_size,
                       local_rank=local_rank, command=command, **params)


@click.command("finetune", context_settings={"max_content_width": 110})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--annotations", required=True, type=_EXISTING_FILE,
              help="EPIC-55 / EPIC-100 annotation file (CSV or pkl) with verb_class / noun_class.")
@click.option("--frames", "frames_root", type=_EXISTING_DIR,
              help="Root of EPIC JPEG frames: ROOT/<participant>/{rgb,flow}_frames/<video>/.")
@click.option("--videos", "videos_dir", type=_EXISTING_DIR, help="Folder of video files (decoded with PyAV; RGB).")
@click.option("--backbone", required=True, metavar="NAME[:INIT.pt]",
              help="Registered backbone, optionally with a local checkpoint to start from (Kinetics, "
                   "IG-65M...; its classifier is dropped). Nothing is downloaded.")
@click.option("--init", type=_EXISTING_FILE,
              help="Local checkpoint to start from, as NAME:INIT.pt in --backbone (give one of the two).")
@click.option("--target", required=True, type=click.Choice(["verb", "noun"]),
              help="Train a VerbNet (verb labels) or a NounNet (noun labels).")
@click.option("--recipe", type=click.Choice(list_recipes()),
              help=f"The report's recipe whose values the flags below override (default: the backbone's). "
                   f"{recipes_help()}.")
@click.option("--modality", type=click.Choice(["rgb", "flow"]), help="rgb, or flow u/v stacks (2 channels).  [recipe]")
@click.option("--split", help="Named split both selections draw from (as featstore build --split).")
@click.option("--where", help="DuckDB WHERE over the annotation columns ANDed into both selections.")
@click.option("--train", "train_split", help="Named training split, e.g. epic55-lfb-train.")
@click.option("--train-where", help="DuckDB WHERE selecting training segments (default: all not in validation).")
@click.option("--val", "val_split", help="Named validation split, e.g. epic55-lfb-val.")
@click.option("--val-where", help="DuckDB WHERE selecting validation segments (none: no validation).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N segments of each selection.")
@click.option("--epochs", type=click.IntRange(min=0), help="[recipe]")
@click.option("--lr", type=LEARNING_RATE, help="Initial learning rate.  [recipe]")
@click.option("--lr-steps", metavar="E1,E2", help="1-based epochs at whose start the lr drops x0.1.  [recipe]")
@click.option("--momentum", type=MOMENTUM, help="SGD momentum.  [recipe]")
@click.option("--weight-decay", type=WEIGHT_DECAY, help="SGD weight decay.  [recipe]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Clips per step, over all processes.  [recipe]")
@click.option("--clip-frames", type=click.IntRange(min=1), help="Frames per clip.  [recipe]")
@click.option("--clip-stride", type=click.IntRange(min=1), help="Frames between clip frames.  [recipe]")
@click.option("--crop", type=click.IntRange(min=1), help="Square training crop (and validation centre crop).  [recipe]")
@click.option("--scale-range", metavar="LOW,HIGH", help="Training short side, drawn uniformly.  [recipe]")
@click.option("--test-size", type=click.IntRange(min=1), help="Validation short side before the centre crop.  [recipe]")
@click.option("--num-classes", type=click.IntRange(min=1), help="Classifier outputs (default: the dataset's).")
@click.option("--fps", type=POSITIVE, help="Frame rate when neither the video info file nor the container has one.")
@click.option("--video-info", type=_EXISTING_FILE,
              help="EPIC_video_info.csv / EPIC_100_video_info.csv (default: found beside --annotations).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last_3d memory format (default: on with CUDA, off on the CPU).")
@click.option("--compile", is_flag=True, help="torch.compile the model.")
@stage1_run_options(items="segments", seeds="the model, the clip order and every augmentation draw")
@domain_errors
def finetune(**params: Any) -> None:
    """Stage 1: fine-tune a backbone on the target data; OUT/checkpoint.pt is what `featstore build` loads.

    Options marked [recipe] default to the --recipe's value. OUT gets checkpoint.pt, config.json,
    metrics.json (top-1 / top-5 on the validation selection, per epoch; warnings), history.csv,
    failures.json, curves.png and log.txt. Example (the report's ResNet50-3D VerbNet on the LFB split):

    \b
        featstore finetune runs/verb-r50 --annotations EPIC_train_action_labels.csv --frames EPIC/ \\
            --backbone r3d_50:kinetics_r3d50.pth --target verb --recipe r50-3d \\
            --train epic55-lfb-train --val epic55-lfb-val --device cuda
        featstore build STORE ... --verb-backbone r3d_50:runs/verb-r50/checkpoint.pt
    """
    from featstore.training.run_folder import CHECKPOINT_NAME
    from finetune.backbone import finetune as run_finetune
    from finetune.config import FinetuneError

    try:
        config = make_finetune_config(params, command=command_line())
        with removed_on_early_failure(config.out, "run"):
            metrics = run_finetune(config)
    except FinetuneError as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"run written to {config.out}; build with --{config.target}-backbone "
               f"{config.backbone}:{config.out / CHECKPOINT_NAME}", err=True)
