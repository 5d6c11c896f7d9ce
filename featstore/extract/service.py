"""The extraction service behind `featstore build` (DESIGN section 4): segments in, a store out.

One call, `build_store(BuildConfig) -> BuildReport`:

1. Select segments (annotation file, optional split / WHERE / limit); a rank of a distributed build
   takes every ``world_size``-th of the sorted uids (`shard_uids`) and skips those already stored.
2. Decode in worker processes (`featstore.extract.decode`: a torch DataLoader over the segments'
   frames); a bad input fails its segment only.
3. In the main process, on the device (`featstore.extract.compute`): the VerbNet and NounNet on the
   same batched clip, the detector once per distinct frame of the batch. Decoding of the next batches
   overlaps with this compute.
   With temporal views (``--views K``, docs/views.md) a training segment is decoded with the clips
   of all its views at once; a clip two views share is computed once, and every detection frame of
   the views' windows is detected once (``run_detector``'s distinct frames).
4. Write each segment (all its views in one transaction) atomically into this rank's LMDB shard (``rank{rank}``) and Parquet parts:
   the store reads all shards as one, with no merge step. A crash loses only the segments in flight;
   a rerun skips stored segments and retries failed ones, after checking that it builds with the
   store's settings.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from featstore import __version__
from featstore.epic.annotations import read_segments
from featstore.epic.boxes import PrecomputedBoxes, describe_box_file
from featstore.epic.frames import MODALITY_CHANNELS, EpicJpegFrames, FrameSource, open_frame_source
from featstore.epic.metadata import find_video_info, read_video_info
from featstore.epic.sampling import SamplingConfig
from featstore.epic.splits import resolve_selection, select_segments
from featstore.epic.views import VIEW_CENTRE_RULE
from featstore.extract.compute import (
    BuiltModels,
    apply_map_choice,
    build_models,
    run_backbones,
    run_detector,
    segment_outputs,
    unstorable,
)
from featstore.extract.config import RANDOM_WEIGHTS_NOTE, BuildConfig, BuildError, BuildEstimate, BuildReport
from featstore.extract.decode import DecodedBatch, SegmentFrames, decoded_batches, probe_input_size
from featstore.extract.plan import ResolvedSampling, resolve_sampling, shard_uids, store_fields
from featstore.io.allocator import keep_freed_memory
from featstore.io.progress import progress_bar
from featstore.models import backbone_map_shape, file_sha256, get_backbone_record, parse_model_spec
from featstore.models.detectors import BOX_HEAD
from featstore.store.health import coverage_warning, detection_coverage
from featstore.store.local_pool import local_recipe
from featstore.store.reader import FeatureStore
from featstore.store.sizes import segment_bytes
from featstore.store.schema import MANIFEST_NAME, STATUS_OK, VERB_LOCAL, VERB_MAP, VIEW_COLUMN
from featstore.store.writer import StoreWriter

__all__ = ["build_store", "estimate_build"]


def _resolve_sampling(config: BuildConfig) -> ResolvedSampling:
    """The build's sampling (see `BuildConfig.sampling`), from the records without building a model."""
    verb_record = get_backbone_record(parse_model_spec(config.verb_backbone)[0])
    noun_record = get_backbone_record(parse_model_spec(config.noun_backbone)[0])
    if config.sampling is not None:
        return ResolvedSampling(config=config.sampling,
                                sources={name: "BuildConfig.sampling" for name in config.sampling.to_dict()})
    try:
        return resolve_sampling(verb_record, noun_record, modality=config.modality, given=config.sampling_overrides)
    except ValueError as err:
        raise BuildError(f"sampling: {err}") from err


def _detector_short_side(models: BuiltModels) -> int | None:
    """The short side the detector resizes its input to, when it says.

    Frames larger than that are shrunk in the decode workers: the detector would do the same, and
    sending 1080p frames between processes costs more than decoding them.
    """
    return None if models.detector is None else models.detector.input_short_side


# ------------------------------------------------------------------------------------------------
# the store: schema, provenance, resume checks


def _signature(config: BuildConfig, models: BuiltModels, boxes_record: Mapping[str, Any] | None,
               video_info: Mapping[str, Any]) -> dict[str, Any]:
    """What must not change between runs writing into one store (models, weights, sampling, fps)."""
    def model(entry: Mapping[str, Any] | None) -> Any:
        if entry is None:
            return None
        return {k: entry.get(k) for k in ("name", "checkpoint_sha256", "in_channels", "score_thresh",
                                          "min_size", "max_size") if k in entry}

    random_weights = any(
        (entry or {}).get("weights") == RANDOM_WEIGHTS_NOTE
        for entry in (models.provenance["verb_backbone"], models.provenance["noun_backbone"],
                      models.provenance["detector"])
    )
    return {
        "modality": config.modality,
        "verb_backbone": model(models.provenance["verb_backbone"]),
        "noun_backbone": model(models.provenance["noun_backbone"]),
        "noun_map": config.noun_map,
        "verb_map": config.map_mode,
        "local_pool": config.local_pool if config.stores_local else None,
        "detector": model(models.provenance["detector"]),
        "detector_feature": config.det_feature if config.detector is not None else None,
        "boxes": None if boxes_record is None else {"sha256": boxes_record["sha256"], "coords": boxes_record["coords"]},
        "sampling": config.sampling.to_dict(),
        "seed": config.seed if random_weights else None,
        "video_info_sha256": video_info.get("sha256"),
        "fallback_fps": config.fps,
        # Only with views, so that a one-view store's signature (and resuming it) is as before.
        **({"views": _views_record(config, rule=False)} if config.views > 1 else {}),
    }


def _views_record(config: BuildConfig, *, rule: bool = True) -> dict[str, Any]:
    """What the manifest records of a build's temporal views (docs/views.md)."""
    record: dict[str, Any] = {"count": config.views, "where": config.views_selection,
                              "where_given": config.views_where is not None, "seed": config.seed}
    if rule:
        record["centres"] = VIEW_CENTRE_RULE
    return record


def _provenance(config: BuildConfig, models: BuiltModels, signature: Mapping[str, Any], input_size: tuple[int, int],
                input_video: str, boxes_record: Mapping[str, Any] | None, video_info: Mapping[str, Any]) -> dict[str, Any]:
    sampling = config.sampling
    views = {"views": _views_record(config)} if config.views > 1 else {}
    return {
        **views,
        "source": "build",
        "featstore_version": __version__,
        "command": config.command,
        "modality": config.modality,
        "in_channels": MODALITY_CHANNELS[config.modality] * sampling.snippet_frames,
        **models.provenance,
        "noun_clip": "ours: the noun backbone runs on the verb backbone's clip (one clip, two models)",
        "boxes_file": boxes_record,
        "map": config.map_mode,  # --map: which of verb.map / verb.map_tmean the store keeps
        "verb_map_shape": list(backbone_map_shape(models.verb_record, clip_frames=sampling.clip_frames,
                                                  height=input_size[0], width=input_size[1])),
        "sampling": sampling.to_dict(),
        # Where each sampling value came from: "backbone:NAME" (the verb backbone's record), "flag", "default".
        "sampling_sources": dict(models.sampling.sources),
        "sampling_notes": list(models.sampling.notes),
        "clip_frames": sampling.clip_frames,
        "clip_stride": sampling.clip_stride,
        "clip_sampling": sampling.clip_sampling,
        "snippet_frames": sampling.snippet_frames,
        "size": sampling.size,
        "input_size": list(input_size),  # (H, W) every clip is resized to
        "input_size_from": input_video,
        "crop": None,  # no crop: the short side is resized to `size` (or the frame to size x size), then to input_size
        "resize": sampling.resize,
        "resample_fps": sampling.resample_fps,
        "det_fps": sampling.det_fps,
        "det_global_seconds": sampling.det_global_seconds,
        "det_local_seconds": sampling.det_local_seconds,
        "det_topk": sampling.det_topk,
        "det_global_slots": sampling.n_global_slots,
        "det_local_slots": sampling.n_local_slots,
        "fps_source": {
            "order": ["video info file", "video container", "--fps"],
            "video_info": video_info.get("path"),
            "container": config.videos_dir is not None,
            "fallback_fps": config.fps,
        },
        "dtype": {"features": "float16", "box": "float32", "score": "float32", "compute": _compute_dtype(config)},
        "seed": config.seed,
        "random_weights": any(RANDOM_WEIGHTS_NOTE in w for w in models.warnings),
        "warnings": list(models.warnings),
        "build_signature": dict(signature),
        "annotations": str(config.annotations.resolve()),
    }


def _compute_dtype(config: BuildConfig) -> str:
    if config.device == "cuda" and config.amp != "off":
        return f"autocast {config.amp}"
    return "float32"


def _check_resumable(store: FeatureStore, signature: Mapping[str, Any]) -> None:
    provenance = store.manifest.get("provenance", {})
    if provenance.get("source") != "build":
        raise BuildError(f"{store.path} was not made by `featstore build` (source: {provenance.get('source')!r}); "
                         "build into a new store directory")
    stored = dict(provenance.get("build_signature", {}))
    if isinstance(stored.get("sampling"), Mapping):
        # Stores built before a sampling field existed hold its default implicitly.
        stored["sampling"] = SamplingConfig.from_dict(stored["sampling"]).to_dict()
    if "detector_feature" not in stored:  # stores built before --det-feature hold the box head's
        stored["detector_feature"] = BOX_HEAD if stored.get("detector") is not None else None
    # JSON round trips turn tuples into lists; compare as JSON.
    differ = [key for key in sorted(set(signature) | set(stored))
              if json.dumps(stored.get(key), sort_keys=True) != json.dumps(signature.get(key), sort_keys=True)]
    if differ:
        details = "; ".join(f"{key}: store has {json.dumps(stored.get(key))}, this run {json.dumps(signature.get(key))}"
                            for key in differ)
        raise BuildError(f"{store.path} was built with other settings, so its segments would not be comparable "
                         f"({details}). Use a new store directory, or rerun with the store's settings.")


def _wait_for_manifest(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path / MANIFEST_NAME).is_file():
        if time.monotonic() > deadline:
            raise BuildError(f"rank 0 did not create {path / MANIFEST_NAME} within {timeout_s:.0f} s; "
                             "see rank 0's error")
        time.sleep(0.2)


def _open_store(config: BuildConfig, models: BuiltModels, selection: Sequence[Mapping[str, Any]], source: FrameSource,
                boxes_record: Mapping[str, Any] | None, video_info: Mapping[str, Any]) -> FeatureStore:
    """Create the store (rank 0, first run) or open it and check that this run may write into it.

    Ranks > 0 wait for rank 0's manifest and take the input size from it, so that all ranks write
    one schema without a process group.
    """
    signature = _signature(config, models, boxes_record, video_info)
    detector_dim = models.detector_record.feature_dim if models.detector_record is not None else None

    def fields_for(input_size: tuple[int, int]):
        return store_fields(verb_record=models.verb_record, noun_record=models.noun_record,
                            sampling=config.sampling, input_size=input_size, detector_dim=detector_dim,
                            noun_map=config.noun_map, verb_map=config.map_mode, verb_local=config.stores_local)

    def derived_for(input_size: tuple[int, int]):
        if not config.stores_local:
            return None
        shape = backbone_map_shape(models.verb_record, clip_frames=config.sampling.clip_frames,
                                   height=input_size[0], width=input_size[1])
        return {VERB_LOCAL: local_recipe(pool=config.local_pool, source=VERB_MAP, source_shape=shape)}

    if config.rank != 0:
        _wait_for_manifest(config.store, config.manifest_timeout_s)
    if (config.store / MANIFEST_NAME).is_file():
        store = FeatureStore.open(config.store)
        _check_resumable(store, signature)
        input_size = tuple(store.manifest["provenance"]["input_size"])
        # create() on an existing store checks that the field schema is identical.
        store = FeatureStore.create(config.store, fields=fields_for(input_size))  # type: ignore[arg-type]
    else:
        input_size, input_video = probe_input_size(selection, source, config.sampling)
        provenance = _provenance(config, models, signature, input_size, input_video, boxes_record, video_info)
        store = FeatureStore.create(config.store, fields=fields_for(input_size), provenance=provenance,
                                    derived=derived_for(input_size))
    return store


def _record_run(store: FeatureStore, config: BuildConfig) -> None:
    """Append this run to the manifest's ``runs`` (rank 0, while it holds its shard's writer lock,
    so that a build refused because another one is writing the store leaves no trace)."""
    if config.rank != 0:
        return
    store.manifest = FeatureStore.open(store.path).manifest  # the newest, not the one read at start
    runs = list(store.manifest.get("provenance", {}).get("runs", []))
    runs.append({"command": config.command, "annotations": str(config.annotations.resolve()),
                 "split": config.split, "where": config.where, "limit": config.limit,
                 **({"views": config.views, "views_where": config.views_selection} if config.views > 1 else {}),
                 "world_size": config.world_size, "featstore_version": __version__,
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    store.update_provenance(runs=runs)


# ------------------------------------------------------------------------------------------------
# the service


def _select(config: BuildConfig) -> tuple[list[dict[str, Any]], set[str]]:
    """The selected segments, and the uids among them that get ``config.views`` views.

    The views' selection goes through `select_segments` like any other (one checked expression
    bound as a filter, never pasted into SQL).
    """
    table = read_segments(config.annotations)
    try:
        table = select_segments(table, resolve_selection(config.split, config.where))
    except ValueError as err:
        raise BuildError(str(err)) from err
    if config.limit is not None:
        table = table.slice(0, config.limit)
    with_views: set[str] = set()
    if config.views > 1:
        try:
            with_views = {str(uid) for uid in select_segments(table, config.views_selection).column("uid").to_pylist()}
        except ValueError as err:
            raise BuildError(f"--views-where: {err}") from err
    return table.to_pylist(), with_views


def _video_info(config: BuildConfig) -> tuple[dict[str, float], dict[str, Any]]:
    path = config.video_info if config.video_info is not None else find_video_info(config.annotations)
    if path is None:
        return {}, {"path": None, "sha256": None}
    return read_video_info(path), {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def build_store(config: BuildConfig, *, on_segment: Callable[[str], None] | None = None) -> BuildReport:
    """Extract features of the selected segments into a store (this rank's share), resumably.

    Args:
        config: the build (see `BuildConfig`).
        on_segment: called with each uid after its row (ok or failed) is committed; tests use it
            to interrupt a build part-way.
    Returns:
        The report. Failed segments are also in the store (``status = 'failed'``, reason in ``error``).
    Raises:
        BuildError: options that cannot work, a store built with other settings, no readable video.
        AnnotationError: an unreadable annotation file.
        CheckpointError / UnknownModelError: a model spec that cannot be built.
        BoxesFileError: an unusable ``--boxes`` file.
    """
    _check_device(config)
    sampling = _resolve_sampling(config)
    config = replace(config, sampling=sampling.config, sampling_overrides={})
    if config.views > 1 and config.sampling.clip_sampling != "centred":
        raise BuildError(f"temporal views move a centred clip (3D CNNs); {config.verb_backbone} samples "
                         f"{config.sampling.clip_sampling!r} (TSN / TSM), which has no centre to move: build it "
                         "without --views")
    selection, with_views = _select(config)
    report = BuildReport(store=config.store, shard=config.shard, rank=config.rank, world_size=config.world_size)
    if not selection:
        report.warnings.append("no segment matches the selection; nothing to do")
        return report
    fps_by_video, video_info = _video_info(config)
    try:
        source = open_frame_source(frames_root=config.frames_root, videos_dir=config.videos_dir,
                                   modality=config.modality, fps_by_video=fps_by_video)
    except ValueError as err:
        raise BuildError(str(err)) from err

    models = build_models(config, sampling)
    report.warnings.extend(models.warnings)
    boxes = boxes_record = None
    if config.boxes is not None:
        boxes = PrecomputedBoxes.read(config.boxes, coords=config.boxes_coords,
                                      videos={str(row["video_id"]) for row in selection})
        boxes_record = describe_box_file(boxes, file_sha256(config.boxes))

    by_uid = {str(row["uid"]): row for row in selection}
    store = _open_store(config, models, [by_uid[uid] for uid in sorted(by_uid)], source, boxes_record, video_info)
    todo = _todo(store, by_uid, config, report)
    det_source: FrameSource | None = None
    if models.detector is not None:
        # Detections always come from RGB frames; a flow store reads them beside its flow folders.
        det_source = source if config.modality == "rgb" else EpicJpegFrames(
            config.frames_root, modality="rgb", fps_by_video=fps_by_video)  # type: ignore[arg-type]
    dataset = SegmentFrames(todo, source=source, det_source=det_source, sampling=config.sampling,
                            fallback_fps=config.fps, input_size=tuple(store.manifest["provenance"]["input_size"]),
                            det_short_side=_detector_short_side(models),
                            views=[config.views if str(row["uid"]) in with_views else 1 for row in todo],
                            views_seed=config.seed)
    _write_segments(store, dataset, models, boxes, report, config, on_segment)
    # A detector that finds nothing still builds a store; say so before a head trains on padding.
    empty_boxes = coverage_warning(detection_coverage(store), where=str(config.store))
    if empty_boxes is not None:
        report.warnings.append(empty_boxes)
    return report


def estimate_build(config: BuildConfig) -> BuildEstimate:
    """What `build_store` would store, without running a model on a frame (`featstore build --dry-run`).

    The models are built (their records and the detector's feature size set the fields), one frame
    is read to size the input (or the store's own size when it exists), and the selection and its
    views are counted; nothing is written.

    Returns:
        The estimate: segments, views, fields and bytes per view and in all.
    Raises:
        BuildError: as `build_store` would, before its first segment.
    """
    _check_device(config)
    sampling = _resolve_sampling(config)
    config = replace(config, sampling=sampling.config, sampling_overrides={})
    if config.views > 1 and config.sampling.clip_sampling != "centred":
        raise BuildError("temporal views move a centred clip; this backbone samples segments (TSN / TSM)")
    selection, with_views = _select(config)
    if not selection:
        raise BuildError("no segment matches the selection; nothing to estimate")
    models = build_models(config, sampling)
    stored = 0
    if (config.store / MANIFEST_NAME).is_file():
        store = FeatureStore.open(config.store)
        input_size = tuple(store.manifest["provenance"]["input_size"])
        stored = len(set(store.uids()) & {str(row["uid"]) for row in selection})
    else:
        fps_by_video, _ = _video_info(config)
        try:
            source = open_frame_source(frames_root=config.frames_root, videos_dir=config.videos_dir,
                                       modality=config.modality, fps_by_video=fps_by_video)
        except ValueError as err:
            raise BuildError(str(err)) from err
        input_size, _ = probe_input_size(sorted(selection, key=lambda row: str(row["uid"])), source, config.sampling)
    detector_dim = models.detector_record.feature_dim if models.detector_record is not None else None
    fields = store_fields(verb_record=models.verb_record, noun_record=models.noun_record, sampling=config.sampling,
                          input_size=input_size, detector_dim=detector_dim,  # type: ignore[arg-type]
                          noun_map=config.noun_map, verb_map=config.map_mode, verb_local=config.stores_local)
    sizes = segment_bytes(fields)
    return BuildEstimate(segments=len(selection), with_views=len(with_views), views=config.views,
                         views_where=config.views_selection,
                         fields={name: (spec.dtype, spec.shape) for name, spec in sorted(fields.items())},
                         bytes_per_view={name: size["lmdb"] for name, size in sizes.items()}, stored=stored)


def _check_device(config: BuildConfig) -> None:
    """Refuse a device this machine does not have; on the CPU, keep freed memory for the next batch."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
    if config.device == "cuda" and config.local_rank >= torch.cuda.device_count():
        raise BuildError(f"local rank {config.local_rank} has no GPU: torch sees {torch.cuda.device_count()}")
    if config.device == "cpu":
        keep_freed_memory()  # the models' activations are fresh CPU blocks on every call: see featstore/io/allocator.py


def _todo(store: FeatureStore, by_uid: Mapping[str, Mapping[str, Any]], config: BuildConfig,
          report: BuildReport) -> list[Mapping[str, Any]]:
    """This rank's segments that are not stored yet, in video then time order (counted in ``report``)."""
    mine = shard_uids(by_uid, rank=config.rank, world_size=config.world_size)
    report.selected = len(mine)
    # Opening the shard's writer re-exports what a killed predecessor committed but had not indexed,
    # so the set of stored segments is read after that. The writer is then closed again until the
    # decode workers are forked: a forked worker would inherit the writer's lock descriptor and, when
    # this process is killed, hold the shard's lock until it notices its parent is gone.
    with store.writer(config.shard, flush_every=config.flush_every):
        pass
    done = set(store.uids(status=STATUS_OK))
    todo = [by_uid[uid] for uid in mine if uid not in done]
    report.skipped = len(mine) - len(todo)
    # Video then time order: consecutive segments share files (page cache, neighbouring frames).
    todo.sort(key=lambda row: (str(row["video_id"]), int(row["start_frame"]), str(row["uid"])))
    return todo


def _write_segments(store: FeatureStore, dataset: SegmentFrames, models: BuiltModels, boxes: PrecomputedBoxes | None,
                    report: BuildReport, config: BuildConfig, on_segment: Callable[[str], None] | None) -> None:
    """The batch loop: decode ahead, compute, write each segment into this rank's shard (timed in ``report``)."""
    # With views a batch holds up to --batch-size segments' worth of clips (K each), so that the
    # detector still sees many frames per call; the backbones take them --batch-size at a time.
    batches = decoded_batches(dataset, batch_size=config.batch_size * config.views, workers=config.workers,
                              pin_memory=config.device == "cuda")  # starts the workers
    bar = progress_bar(total=len(dataset), desc=f"build {config.shard}" if config.world_size > 1 else "build",
                       unit="seg", enabled=config.progress, position=config.rank if config.world_size > 1 else None)
    started = time.perf_counter()
    try:
        with store.writer(config.shard, flush_every=config.flush_every) as writer, torch.inference_mode():
            _record_run(store, config)
            for batch in batches:
                _process_batch(batch, dataset.rows, models, boxes, writer, report, config, on_segment)
                bar.update(len(batch.items))
                if report.failed:
                    bar.set_postfix(failed=len(report.failed), refresh=False)
    finally:
        report.seconds = time.perf_counter() - started
        bar.close()
        del batches  # shuts the workers down now rather than at garbage collection


def _process_batch(
    batch: DecodedBatch,
    todo: Sequence[Mapping[str, Any]],
    models: BuiltModels,
    boxes: PrecomputedBoxes | None,
    writer: StoreWriter,
    report: BuildReport,
    config: BuildConfig,
    on_segment: Callable[[str], None] | None,
) -> None:
    """Run the models on one batch and write each of its segments (stored, or failed with its reason)."""
    good = [item for item in batch.items if item.error is None]
    rows = [todo[item.index] for item in good]
    outputs: dict[str, np.ndarray] = {}
    detections = None
    if batch.clips is not None:
        outputs = run_backbones(models, batch.clips, config)
        if models.detector is not None:
            detections = run_detector(models, good, rows, boxes, config)
    at = batch.first_rows or {}
    for item in batch.items:  # in to-do order, failed ones included
        row = todo[item.index]
        uid = str(row["uid"])
        error = item.error
        views: list[tuple[dict[str, Any], dict[str, np.ndarray], dict[str, list] | None]] = []
        for view, plan in enumerate(item.plans if error is None else ()):
            tensors, box_rows = segment_outputs(item, row, outputs, at[item.index], detections, models, config,
                                                view=view)
            error = unstorable(tensors, writer.store.fields)
            if error is not None:
                error = error if len(item.plans) == 1 else f"view {view}: {error}"
                break
            apply_map_choice(tensors, map_mode=config.map_mode,
                             local_pool=config.local_pool if config.stores_local else None)
            views.append(({**row, VIEW_COLUMN: view, "clip_start_frame": min(plan.clip_frames),
                           "clip_stop_frame": max(plan.clip_frames), "clip_center": plan.clip_center,
                           "window_center": plan.windows_center},
                          tensors, box_rows))
        if error is None:
            if writer.views:
                writer.put_views(views)  # every view of the segment, or none of them
            else:
                writer.put(row, views[0][1], boxes=views[0][2])
            report.built += 1
            report.views += len(views)
        else:
            writer.fail(row, error)
            report.failed.append((uid, error))
        if on_segment is not None:
            on_segment(uid)

