"""`featstore build`: extract backbone and detection features of annotated segments into a store.

Thin: parse the options, make the frozen `BuildConfig`, call `featstore.extract.service.build_store`,
print the summary. Registered into the `featstore` group by `cli.featstore_cli`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cli.common import (
    AMP_RULE,
    COUNT,
    FRACTION,
    POSITIVE,
    SEED,
    command_line,
    domain_errors,
    removed_on_early_failure,
)

_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
# Options that set a SamplingConfig field; unset ones come from the verb backbone's record (clip) or the
# paper's defaults (detection windows), and the manifest's sampling_sources says which.
SAMPLING_OPTIONS = ("clip_frames", "clip_stride", "size", "resize", "clip_sampling", "snippet_frames", "resample_fps",
                    "det_fps", "det_global_seconds", "det_local_seconds", "det_topk")


def make_build_config(params: dict[str, Any], *, command: str | None = None):
    """The `BuildConfig` of parsed `build` options (also used by scripts that drive the command).

    Args:
        params: click's parsed parameters of the `build` command.
        command: the command line, for the manifest.
    Returns:
        A `featstore.extract.config.BuildConfig`, with rank / world size from the torchrun environment.
    """
    from featstore.extract.config import BuildConfig, distributed_env

    if (params["frames_root"] is None) == (params["videos_dir"] is None):
        raise click.UsageError("give exactly one of --frames ROOT (EPIC JPEG folders) or --videos DIR (video files)")
    if params["detector"] is None:
        raise click.UsageError(
            "give --detector SPEC (its box features are stored), optionally with --boxes FILE to pool "
            "them at precomputed boxes instead of the detector's own"
        )
    rank, world_size, local_rank = distributed_env()
    return BuildConfig(
        store=params["store"],
        annotations=params["annotations"],
        verb_backbone=params["verb_backbone"],
        noun_backbone=params["noun_backbone"],
        frames_root=params["frames_root"],
        videos_dir=params["videos_dir"],
        modality=params["modality"],
        detector=params["detector"],
        boxes=params["boxes"],
        boxes_coords=params["boxes_coords"],
        det_score_thresh=params["det_score_thresh"],
        det_min_size=params["det_min_size"],
        det_max_size=params["det_max_size"],
        det_batch_size=params["det_batch_size"],
        det_feature=params["det_feature"],
        noun_map=params["noun_map"],
        sampling_overrides={name: params[name] for name in SAMPLING_OPTIONS if params.get(name) is not None},
        verb_map=params["verb_map"],
        local_pool=params["local_pool"],
        fps=params["fps"],
        video_info=params["video_info"],
        split=params["split"],
        where=params["where"],
        limit=params["limit"],
        views=params["views"],
        views_where=params["views_where"],
        device=params["device"],
        amp=params["amp"],
        batch_size=params["batch_size"],
        workers=params["workers"],
        seed=params["seed"],
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        flush_every=params["flush_every"],
        progress=params["progress"],
        command=command,
    )


@click.command("build")
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--annotations", required=True, type=_EXISTING_FILE,
              help="EPIC-55 / EPIC-100 annotation file (CSV or pkl).")
@click.option("--frames", "frames_root", type=_EXISTING_DIR,
              help="Root of EPIC JPEG frames: ROOT/<participant>/{rgb,flow}_frames/<video>/.")
@click.option("--videos", "videos_dir", type=_EXISTING_DIR, help="Folder of video files (decoded with PyAV; RGB).")
@click.option("--modality", type=click.Choice(["rgb", "flow"]), default="rgb", show_default=True,
              help="One store per modality; flow feeds the backbones 2 channels (u, v).")
@click.option("--verb-backbone", required=True, metavar="SPEC", help="NAME or NAME:/local/checkpoint.pt.")
@click.option("--noun-backbone", required=True, metavar="SPEC",
              help="NAME or NAME:/path; runs on the verb backbone's clip (one clip, two models).")
@click.option("--noun-map/--no-noun-map", default=False, show_default=True, help="Also store noun.map.")
@click.option("--map", "verb_map", type=click.Choice(["none", "time-mean", "full"]), default=None,
              help="What of the verb map to keep beside verb.local (the map pooled at the det.local boxes, "
                   "all SAOA reads): none (default: the smallest store SAOA trains from), time-mean "
                   "(verb.map_tmean [C, H, W]) or full (verb.map [C, T, H, W]). See `featstore info` for sizes.")
@click.option("--local-pool", type=click.Choice(["avg", "max"]), default="avg", show_default=True,
              help="verb.local's pooling of its 7x7 RoIAlign bins (ours: avg; SlowFast/LFB: max); in the manifest.")
@click.option("--detector", metavar="SPEC",
              help="Detector NAME or NAME:/local/checkpoint (box features); detectron2 as "
                   "detectron2:CONFIG[:WEIGHTS] (CONFIG a local .yaml or a model-zoo name such as "
                   "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml; WEIGHTS a .pth or model-zoo .pkl) or "
                   "detectron2:DIR/model_final.pth with DIR/config.yaml.")
@click.option("--boxes", type=_EXISTING_FILE,
              help="CSV/Parquet of video_id, frame, x1, y1, x2, y2, score[, label]: pool --detector "
                   "features at these boxes (no proposals).")
@click.option("--boxes-coords", type=click.Choice(["pixel", "normalized"]), default="pixel", show_default=True,
              help="Units of the --boxes coordinates.")
@click.option("--det-score-thresh", type=FRACTION, default=0.05, show_default=True,
              help="Minimum score of a detection (detector path; --boxes are pooled as given).")
@click.option("--det-min-size", type=COUNT, help="Detector input short side (default: the model's).")
@click.option("--det-max-size", type=COUNT, help="Detector input long-side cap (default: the model's).")
@click.option("--det-batch-size", type=COUNT, default=16, show_default=True, help="Frames per detector forward.")
@click.option("--det-feature", type=click.Choice(["box-head", "roi"]), default="box-head", show_default=True,
              help="Per-box feature: box-head (the box head's representation; C4 models: res5 averaged over the "
                   "box) or roi (the box pooler's RoIAlign output averaged over its bins; C4: before res5). "
                   "In the manifest.")
@click.option("--clip-frames", type=COUNT,
              help="Clip samples (TSN / TSM: segments) [default: the verb backbone's record, e.g. 64 for r3d_50].")
@click.option("--clip-stride", type=COUNT,
              help="Frames between clip samples; with segment sampling, between a snippet's frames "
                   "[default: the verb backbone's record].")
@click.option("--size", type=COUNT, help="Short side of the clip frames, no crop [default: the verb backbone's record].")
@click.option("--resize", type=click.Choice(["short-side", "square"]),
              help="short-side: the short side to --size, aspect kept; square: --size x --size without cropping "
                   "(the report's R(2+1)D-34 input, 128 x 128) [default: short-side].")
@click.option("--clip-sampling", type=click.Choice(["centred", "segments"]),
              help="centred: consecutive frames around the segment centre (3D CNNs); segments: the middle "
                   "of each of N equal parts (TSN / TSM) [default: the verb backbone's record].")
@click.option("--snippet-frames", type=COUNT,
              help="Frames stacked as channels per sample (5 for TSN / TSM flow) [default: the verb "
                   "backbone's record for the modality].")
@click.option("--resample-fps", type=POSITIVE,
              help="Take the clip's frames by time, as if each video were decoded at this rate (the report: "
                   "60), so a 64 x 2 clip spans the same seconds whatever the video's rate [default: the "
                   "video's own frames].")
@click.option("--det-fps", type=POSITIVE, help="Detection frames per second [default: 2].")
@click.option("--det-global-seconds", type=POSITIVE, help="Global detection window, s [default: 6].")
@click.option("--det-local-seconds", type=POSITIVE, help="Local detection window, s [default: 4].")
@click.option("--det-topk", type=COUNT, help="Detections kept per frame [default: 5].")
@click.option("--fps", type=POSITIVE, help="Frame rate when neither the video info file nor the container has one.")
@click.option("--video-info", type=_EXISTING_FILE,
              help="EPIC_video_info.csv / EPIC_100_video_info.csv (default: found beside --annotations).")
@click.option("--split", help="A named split (e.g. epic55-lfb-val).")
@click.option("--where", help="DuckDB WHERE over the annotation columns, e.g. \"participant_id = 'P01'\".")
@click.option("--limit", type=COUNT, help="Only the first N selected segments.")
@click.option("--views", type=COUNT, default=1, show_default=True,
              help="Temporal views per training segment (docs/views.md): view 0 the centre clip, the others "
                   "clips centred on frames drawn inside the segment (seeded by --seed, uid and view), each with "
                   "its own detection windows; the heads draw one per epoch. 1: one centre clip per segment.")
@click.option("--views-where", metavar="SQL",
              help="DuckDB WHERE over the annotation columns: the segments that get --views views, the others "
                   "one [default: the validation protocols' training halves, i.e. EPIC-55 P01-P25 and "
                   "EPIC-100's training file: not the held-out participants, validation or test].")
@click.option("--dry-run", is_flag=True,
              help="Print what the build would store (segments, views, fields, bytes per view and in all) and exit.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the backbones and the detector run (under torchrun: the rank's local GPU).")
@click.option("--amp", type=click.Choice(["fp16", "bf16", "off"]), default="fp16", show_default=True,
              help=f"Autocast dtype on CUDA. {AMP_RULE}")
@click.option("--batch-size", type=COUNT, default=8, show_default=True,
              help="Segments per batch and clips per backbone forward (with --views a batch holds its segments' views).")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True, help="Decode worker processes (0: none).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of randomly initialised models.")
@click.option("--flush-every", type=COUNT, default=256, show_default=True, help="Segments between Parquet exports.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@domain_errors
def build(**params: Any) -> None:
    """Extract features of annotated segments into STORE (created, or resumed).

    Per segment: verb.global, noun.global, det.{global,local}.{feat,box,score} and verb.local (the
    verb map averaged over time and RoI-pooled at the det.local boxes), plus verb.map with --map
    full or its time mean verb.map_tmean with --map time-mean (README.md, "The store"). Clip length,
    stride, input size, sampling mode and normalisation come from the verb backbone's record
    unless a flag sets them (the manifest's sampling_sources says which); the noun backbone runs on
    the same clip. A rerun skips stored segments and retries failed ones; a bad input fails its
    segment only, and the command exits 1 when any failed. Under torchrun each rank builds its
    share into its own shard. Example:

    \b
        featstore build STORE --annotations EPIC_train_action_labels.csv --frames EPIC/ \\
            --verb-backbone r3d_50:verb.pt --noun-backbone r3d_50:noun.pt \\
            --detector fasterrcnn_resnet50_fpn:frcnn.pth --device cuda
        torchrun --nproc_per_node 8 --no-python featstore build STORE ...   # a shard per GPU
    """
    from featstore.extract.service import build_store, estimate_build

    dry_run = params.pop("dry_run", False)
    config = make_build_config(params, command=command_line())
    if dry_run:
        click.echo(estimate_build(config).summary())
        return
    with removed_on_early_failure(config.store, "store"):
        report = build_store(config)
    for warning in report.warnings:
        click.echo(f"WARNING: {warning}", err=True)
    click.echo(report.summary())
    if report.failed:
        sys.exit(1)
