"""Stage 1 as a Python call: fine-tune one backbone (VerbNet or NounNet) and write its run folder.

The run goes through the shared training engine (`featstore.training.engine`), as `heads train` and the
detector's stage 1 (`finetune.detector`) do; this module supplies its parts:

- `BackboneTrainable`, the engine's `Trainable`: each epoch's batches (a DataLoader over
  `finetune.clips.ClipDataset`, decoding in worker processes, pinned memory on CUDA) with that
  epoch's learning rate set; one SGD step (AMP on CUDA, a gradient scaler for fp16, gradients summed
  over a torchrun `World`), the batch's unreadable segments recorded in the run's failures;
  validation; its ``state_dict`` for the resume checkpoint;
- hooks for what is the backbone run's own: the epoch's clip counts and failures (gathered over a
  world), and its outputs (the checkpoint `featstore build` loads, metrics.json, failures.json,
  curves.png); the loss check (every ``check_every`` steps), learning rate, validation, resume
  checkpoint, log line and progress bar are the shared hooks (`featstore.training.hooks`);
- `finetune(config)` checks and opens the run folder (`featstore.training.run_folder`), starts the
  torchrun world (`featstore.training.world.World.from_environment`), builds them and trains.

Reproducibility: the model is built under the run's seed, every sample's clip, scale and crop come
from (seed, epoch, index) (`finetune.clips.sample_rng`) and the order of an epoch from (seed, epoch),
so a run resumed from the checkpoint of epoch k trains epoch k + 1 exactly as an uninterrupted run
(on the CPU, where the kernels are deterministic).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from featstore import __version__
from featstore.epic.annotations import detect_dataset, read_segments
from featstore.epic.frames import FrameError, FrameSource, open_frame_source
from featstore.epic.metadata import NUM_CLASSES, find_video_info, read_video_info
from featstore.epic.splits import resolve_selection, select_segments
from featstore.io.allocator import keep_freed_memory
from featstore.io.atomic import atomic_write_json
from featstore.io.progress import progress_bar
from featstore.models import file_sha256
from featstore.training.engine import Hook, RunState, train_one
from featstore.training.hooks import (
    Checkpointer,
    EpochLog,
    HistoryCSV,
    LearningRate,
    LossCheck,
    ProgressBar,
    StepCallback,
    TensorBoard,
    Validation,
    require_tensorboard,
)
from featstore.training.run_folder import (
    CONFIG_NAME,
    CURVES_NAME,
    FAILURES_NAME,
    HISTORY_CSV_NAME,
    METRICS_NAME,
    RunFolder,
)
from featstore.training.world import World
from finetune.clips import ClipBatch, ClipDataset, EpochBatchSampler, FailureLog, collate_clips
from finetune.config import FinetuneConfig, FinetuneError, resume_differences
from finetune.model import InitReport, VideoClassifier, build_video_classifier
from finetune.outputs import load_training_state, plot_curves, write_finetuned_checkpoint
from finetune.recipes import get_recipe
from heads.metrics import chance_top1, topk_accuracy

__all__ = ["BackboneTrainable", "Selection", "finetune", "select_training_data"]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RECORD_FORMAT = 1  # of the run record inside checkpoint.pt


# ------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Selection:
    """The segments a run trains and validates on.

    Attributes:
        train: training rows (`featstore.epic.annotations.read_segments` columns), file order.
        val: validation rows, file order; empty when the run has no validation selection.
        dataset: ``"epic55"`` or ``"epic100"``.
        num_classes: classifier outputs.
        train_where, val_where: the selections as SQL (for config.json).
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    dataset: str
    num_classes: int
    train_where: str | None
    val_where: str | None


def select_training_data(config: FinetuneConfig) -> Selection:
    """Select and check the training and validation segments.

    ``split`` / ``where`` select what both draw from (as `featstore build`); ``train_*`` and
    ``val_*`` select each (as `heads train`). Without a training selection the run trains on
    everything selected that is not in the validation selection. ``limit`` keeps the first N of each.

    Raises:
        FinetuneError: a bad selection, an empty training selection, unlabelled segments, or a
            label outside the classifier.
    """
    table = read_segments(config.annotations)
    try:
        base = select_segments(table, resolve_selection(config.split, config.where))
        val_where = resolve_selection(config.val_split, config.val_where)
        val_table = select_segments(base, val_where) if val_where is not None else base.slice(0, 0)
        train_where = resolve_selection(config.train_split, config.train_where)
        train_table = select_segments(base, train_where)
    except ValueError as err:
        raise FinetuneError(str(err)) from err
    val = val_table.to_pylist()[:config.limit] if config.limit is not None else val_table.to_pylist()
    val_uids = {row["uid"] for row in val_table.to_pylist()}
    train = train_table.to_pylist()
    if train_where is None and val_uids:
        train = [row for row in train if row["uid"] not in val_uids]
    if config.limit is not None:
        train = train[:config.limit]
    if not train:
        raise FinetuneError(f"the training selection ({train_where or 'everything not in validation'}) of "
                            f"{config.annotations} holds no segments")
    dataset = detect_dataset(table)
    num_classes = config.num_classes or NUM_CLASSES[dataset][0 if config.target == "verb" else 1]
    column = f"{config.target}_class"
    for name, rows in (("training", train), ("validation", val)):
        for row in rows:
            label = row[column]
            if label is None:
                raise FinetuneError(f"{name} segment {row['uid']} of {config.annotations} has no {column} "
                                    "(a test set?): stage 1 needs labelled segments")
            if not 0 <= int(label) < num_classes:
                raise FinetuneError(f"{name} segment {row['uid']}: {column} {label} is outside the classifier's "
                                    f"{num_classes} classes (--num-classes)")
    return Selection(train=train, val=val, dataset=dataset, num_classes=num_classes,
                     train_where=train_where, val_where=val_where)


def _frame_source(config: FinetuneConfig, videos: Sequence[str]) -> tuple[FrameSource, dict[str, Any]]:
    """The build's frame source, and the video info file it took frame rates from.

    Raises:
        FinetuneError: videos without a frame rate anywhere (the clips' sampling plans need one).
    """
    path = config.video_info if config.video_info is not None else find_video_info(config.annotations)
    fps_by_video = read_video_info(path) if path is not None else {}
    source = open_frame_source(frames_root=config.frames_root, videos_dir=config.videos_dir,
                               modality=config.modality, fps_by_video=fps_by_video)
    if config.fps is None:
        unknown = []
        for video in videos:
            try:
                if source.fps(video) is None:
                    unknown.append(video)
            except FrameError:
                pass  # an unreadable video fails its segments, with the reason, when they are read
        if unknown:
            raise FinetuneError(f"no frame rate for {len(unknown)} video(s) ({', '.join(unknown[:5])}"
                                f"{', ...' if len(unknown) > 5 else ''}): they are not in the video info file "
                                f"({path or 'none found beside the annotations'}); give --fps or --video-info")
    info = {"path": None if path is None else str(Path(path).resolve()),
            "sha256": None if path is None else file_sha256(path)}
    return source, info


# ------------------------------------------------------------------------------------------------
# the trainable


@dataclass
class _EpochCounts:
    """What one epoch's steps saw, in this process."""

    steps: int = 0  # optimiser steps (the same in every process)
    clips: int = 0  # readable training clips
    failed: int = 0  # unreadable training segments


class BackboneTrainable:
    """What the engine steps: the video classifier, SGD with the recipe's epoch schedule, AMP, failures.

    Args:
        config: the run.
        model: the backbone with its classifier, on the CPU.
        train_data, val_data: the training and validation clips.
        failures: where unreadable segments are recorded.
        log: the run's log (rank 0's; other ranks log nothing).
        record: the run's config record, kept in the resume checkpoint (a resume compares its
            settings with it before anything is built).
    """

    def __init__(self, config: FinetuneConfig, model: VideoClassifier, train_data: ClipDataset,
                 val_data: ClipDataset, *, failures: FailureLog, log: Callable[[str], None],
                 record: Mapping[str, Any]) -> None:
        self.config, self.record = config, record
        self.device = torch.device(f"cuda:{config.local_rank}" if config.device == "cuda" else "cpu")
        self.model = model.to(self.device)
        if config.uses_channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        self.module: torch.nn.Module = torch.compile(self.model) if config.compile else self.model
        self.train_data, self.val_data = train_data, val_data
        self.failures, self.log = failures, log
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.device == "cuda" and config.amp == "fp16")
        self.sampler = EpochBatchSampler(len(train_data), config.batch_size, shuffle=True, seed=config.seed,
                                         rank=config.rank, world_size=config.world_size)
        self.val_sampler = EpochBatchSampler(len(val_data), config.batch_size, shuffle=False, rank=config.rank,
                                             world_size=config.world_size)
        self._loaders: dict[str, torch.utils.data.DataLoader] = {}  # 'train' / 'val', made on first use
        self.counts = _EpochCounts()
        self.epoch = 0  # the epoch being trained (0-based)

    # -- the engine's Trainable ---------------------------------------------------------------

    def epoch_batches(self, epoch: int, world: World | None) -> torch.utils.data.DataLoader:
        """The batches of 0-based ``epoch`` (this process's share), with the epoch's lr set.

        The DataLoader's workers decode the next batches while the steps compute.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(epoch)
        self.model.train()
        self.sampler.set_epoch(epoch)
        self.epoch, self.counts = epoch, _EpochCounts()
        return self._loader("train")

    def train_step(self, batch: ClipBatch, world: World | None) -> torch.Tensor:
        """One SGD step; the batch's unreadable segments go to the failures.

        Returns:
            The batch's mean loss (0-d, on the device, unread; under a world the mean over the
            ranks), zero when no clip of the batch was readable.
        Raises:
            TooManyFailures: more unreadable segments this epoch than allowed (one process; under a
                world the counts are gathered at the end of the epoch).
        """
        self._record_failures(batch, "train", epoch=self.epoch)
        if batch.failed and world is None:
            self.failures.check(self.epoch, "train", len(self.train_data))
        self.counts.steps += 1
        self.counts.clips += len(batch)
        self.counts.failed += len(batch.failed)
        self.optimizer.zero_grad(set_to_none=True)
        if len(batch):
            clips = self._on_device(batch.clips)  # (B, C, T, H, W) float in [0, 1]
            labels = batch.labels.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.module(clips)  # (B, K)
            loss = F.cross_entropy(logits.float(), labels)
            self.scaler.scale(loss).backward()
            loss = loss.detach()
        else:
            # Nothing readable: no gradient from this process (under a world it still joins the sum).
            loss = torch.zeros((), device=self.device)
        if world is not None:
            # The mean over the ranks (one all-reduce), so the lr means the same with any process count.
            loss = world.average_gradients(self.model.parameters(), loss)
        if len(batch) or world is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser, scaler and failures (tensors and plain containers: loadable with weights_only)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "failures": list(self.failures.entries), "config": self.record}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.failures.entries = list(state["failures"])

    # -- validation ---------------------------------------------------------------------------

    def validate(self, world: World | None) -> dict[str, Any]:
        """Top-1 / top-5 of the target on the validation selection (the centre clip, centre crop).

        Under a world each process scores its share and the logits are gathered.

        Returns:
            ``{"{target}_top1", "{target}_top5"}`` in percent, ``val_clips`` scored and ``val_failed``.
        Raises:
            TooManyFailures: more unreadable validation segments than allowed.
        """
        config = self.config
        self.val_sampler.set_epoch(self.epoch)
        logits, labels = [], []
        failed = 0
        bar = progress_bar(total=len(self.val_data) // config.world_size, desc=f"validate {self.epoch + 1}",
                           unit="clip", leave=False, enabled=config.progress and config.rank == 0, plain="slow")
        self.model.eval()
        try:
            with torch.inference_mode():
                for batch in self._loader("val"):
                    self._record_failures(batch, "val", epoch=self.epoch)
                    failed += len(batch.failed)
                    bar.update(len(batch) + len(batch.failed))
                    if not len(batch):
                        continue
                    with self._autocast():
                        logits.append(self.model(self._on_device(batch.clips)).float().cpu())  # (B, K)
                    labels.append(batch.labels)
        finally:
            self.model.train()
            bar.close()
        scores = torch.cat(logits).numpy() if logits else np.zeros((0, self.model.classifier.out_features), np.float32)
        truth = torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64)
        if world is not None:
            parts = world.gather((scores, truth, failed))
            scores = np.concatenate([part[0] for part in parts])
            truth = np.concatenate([part[1] for part in parts])
            failed = sum(part[2] for part in parts)
            self.failures.entries = _merge_epoch_failures(self.failures.entries, world.gather(
                _epoch_failures(self.failures.entries, self.epoch, "val")), self.epoch, "val")
        self.failures.check(self.epoch, "val", len(self.val_data))
        target = config.target
        top1, top5 = topk_accuracy(scores, truth, (1, 5)) if len(truth) else (math.nan, math.nan)
        return {f"{target}_top1": top1, f"{target}_top5": top5, "val_clips": int(len(truth)), "val_failed": failed}

    # -- internals ----------------------------------------------------------------------------

    def _loader(self, which: str) -> torch.utils.data.DataLoader:
        """The training or validation loader, made once: its workers persist across epochs, since
        starting a worker process (a fresh interpreter importing torch) costs seconds, per loader and
        epoch. The samplers run in the main process and the dataset's keys carry the epoch, so
        `set_epoch` reaches the workers' draws all the same."""
        if which not in self._loaders:
            workers = self.config.workers
            dataset, sampler = (self.train_data, self.sampler) if which == "train" else (self.val_data, self.val_sampler)
            self._loaders[which] = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_clips,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=2 if workers > 0 else None)
        return self._loaders[which]

    def _on_device(self, clips: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (4x less than float). (B, T, H, W, C) -> (B, C, T, H, W) is a
        # view whose memory is channels_last_3d already; .float() keeps those strides.
        x = clips.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3).float().div_(255.0)
        return x if self.config.uses_channels_last else x.contiguous()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.config.amp != "off":
            return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[self.config.amp])
        return contextlib.nullcontext()  # the CPU trains in fp32

    def _record_failures(self, batch: ClipBatch, phase: str, *, epoch: int) -> None:
        rows = self.train_data.rows if phase == "train" else self.val_data.rows
        for index, reason in batch.failed:
            self.failures.add(uid=str(rows[index]["uid"]), epoch=epoch, phase=phase, reason=reason)
            self.log(f"epoch {epoch + 1}: skipped {phase} segment {rows[index]['uid']}: {reason}")


def _epoch_failures(entries: list[dict[str, Any]], epoch: int, phase: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["epoch"] == epoch + 1 and entry["phase"] == phase]


def _merge_epoch_failures(entries: list[dict[str, Any]], parts: Sequence[list[dict[str, Any]]], epoch: int,
                          phase: str) -> list[dict[str, Any]]:
    """``entries`` with this process's failures of (epoch, phase) replaced by every process's, by uid."""
    kept = [entry for entry in entries if not (entry["epoch"] == epoch + 1 and entry["phase"] == phase)]
    return kept + sorted((entry for part in parts for entry in part), key=lambda entry: entry["uid"])


# ------------------------------------------------------------------------------------------------
# the run's own hooks


class _EpochRecord(Hook):
    """The epoch's steps, clips and failures (summed over a world), its clips/s, and the failure check.

    Under a world the processes also average their BatchNorm statistics here, before the model is
    validated and saved.
    """

    def __init__(self, trainable: BackboneTrainable) -> None:
        self.trainable = trainable

    def after_epoch(self, run: RunState) -> None:
        trainable, counts = self.trainable, self.trainable.counts
        steps, clips, failed = counts.steps, counts.clips, counts.failed
        if run.world is not None:
            clips, failed = (int(v) for v in run.world.sum_counts([clips, failed]))  # steps: the same in each
            trainable.failures.entries = _merge_epoch_failures(trainable.failures.entries, run.world.gather(
                _epoch_failures(trainable.failures.entries, run.epoch, "train")), run.epoch, "train")
            run.world.average_buffers(trainable.model)
        trainable.failures.check(run.epoch, "train", len(trainable.train_data))
        run.record.update({"steps": steps, "train_clips": clips, "train_failed": failed,
                           "clips_per_s": clips / run.seconds if run.seconds > 0 else 0.0})


class _BackboneRunOutputs(Hook):
    """After each epoch (main process): the checkpoint `featstore build` loads, metrics, failures, curves."""

    def __init__(self, trainable: BackboneTrainable, *, folder: RunFolder, record: dict[str, Any],
                 majority_top1: float | None, title: str) -> None:
        self.trainable, self.folder, self.record = trainable, folder, record
        self.majority_top1, self.title = majority_top1, title

    def after_epoch(self, run: RunState) -> None:
        if not run.is_main:
            return
        self.write(run, complete=run.epoch + 1 >= run.epochs)
        plot_curves(run.history, self.folder.file(CURVES_NAME), target=self.trainable.config.target, title=self.title)

    def write(self, run: RunState, *, complete: bool, warnings: Sequence[str] = ()) -> dict[str, Any]:
        """``checkpoint.pt``, ``metrics.json`` and ``failures.json`` as of the last finished epoch.

        Args:
            run: the run.
            complete: the run finished.
            warnings: what looks wrong about the run (metrics.json's ``warnings``).
        Returns:
            The latest validation top-1 / top-5 (empty without validation).
        """
        trainable, target = self.trainable, self.trainable.config.target
        last = run.history[-1] if run.history else {}
        metrics = {key: last[key] for key in (f"{target}_top1", f"{target}_top5") if key in last}
        epochs_done = len(run.history)
        write_finetuned_checkpoint(self.folder.checkpoint, backbone=trainable.model.backbone.state_dict(),
                                   classifier=trainable.model.classifier.state_dict(), record={
                                       "format": RECORD_FORMAT, "run": str(self.folder.path.resolve()),
                                       "epoch": epochs_done, "metrics": metrics, "config": self.record},
                                   half=trainable.config.half_checkpoint)
        atomic_write_json(self.folder.file(METRICS_NAME), {
            **metrics, "target": target, "complete": complete, "epochs_done": epochs_done,
            "n_train": len(trainable.train_data), "n_val": len(trainable.val_data),
            "majority_top1": self.majority_top1, "warnings": list(warnings), "history": run.history})
        atomic_write_json(self.folder.file(FAILURES_NAME), trainable.failures.entries)
        return metrics


def _epoch_line(entry: Mapping[str, Any], target: str) -> str:
    parts = [f"epoch {entry['epoch']}", f"lr {entry['lr']:.2g}", f"loss {entry['loss']:.4f}",
             f"{entry['clips_per_s']:.1f} clips/s"]
    for k in (1, 5):
        if f"{target}_top{k}" in entry:
            parts.append(f"{target} top-{k} {entry[f'{target}_top{k}']:.2f}")
    if entry.get("train_failed") or entry.get("val_failed"):
        parts.append(f"skipped {entry.get('train_failed', 0)} train / {entry.get('val_failed', 0)} val segments")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------------
# the run


def _check_resume_settings(config: FinetuneConfig, out: Path) -> None:
    """Refuse a resume whose settings differ from the run's."""
    state = load_training_state(out) if config.resume else None
    if state is not None:
        differences = resume_differences(config, state.get("config", {}).get("settings", {}))
        if differences:
            raise FinetuneError(f"{out} was trained with other settings, so resuming would not reproduce it "
                                f"({'; '.join(differences)}); rerun with the run's settings or use another OUT")


def _chance_warnings(config: FinetuneConfig, selection: Selection, metrics: Mapping[str, Any]) -> list[str]:
    """A run whose validation top-1 is at or below chance (`heads.metrics.chance_top1`) learnt nothing."""
    top1 = metrics.get(f"{config.target}_top1")
    if top1 is None or not selection.val:
        return []
    column = f"{config.target}_class"
    chance = chance_top1(np.array([int(row[column]) for row in selection.train]),
                         np.array([int(row[column]) for row in selection.val]))
    if top1 > chance + 1e-6:
        return []
    return [f"{config.target} top-1 {top1:.1f} % is at chance ({chance:.1f} %: always the most frequent training "
            f"class, or a uniform guess): the {config.target} net learnt nothing; check the lr, the epochs, the "
            "labels and the clips (curves.png)"]


def _majority_top1(config: FinetuneConfig, selection: Selection) -> float | None:
    """Top-1 of always answering the training selection's most frequent class (the floor to beat)."""
    if not selection.val:
        return None
    column = f"{config.target}_class"
    counts = np.bincount([int(row[column]) for row in selection.train])
    majority = int(counts.argmax())
    return 100.0 * float(np.mean([int(row[column]) == majority for row in selection.val]))


def _config_record(config: FinetuneConfig, selection: Selection, record: Any, init: InitReport,
                   video_info: dict[str, Any]) -> dict[str, Any]:
    """What config.json holds: every setting, the recipe, the backbone record, the init, the data."""
    payload = {
        "settings": config.to_json(),
        "recipe": get_recipe(config.recipe).to_dict(),
        "backbone_record": dataclasses.asdict(record),
        "init": None if init.checkpoint is None else {
            "path": str(init.checkpoint.resolve()), "sha256": file_sha256(init.checkpoint),
            "loaded": init.loaded, "dropped": list(init.dropped)},
        "data": {
            "annotations": str(config.annotations.resolve()), "annotations_sha256": file_sha256(config.annotations),
            "dataset": selection.dataset, "num_classes": selection.num_classes,
            "train_where": selection.train_where, "val_where": selection.val_where,
            "n_train": len(selection.train), "n_val": len(selection.val), "video_info": video_info,
        },
        "augmentation": {
            "train": f"clip centre uniform in the segment; short side uniform in {list(config.scale_range)}; "
                     f"random {config.crop}x{config.crop} crop, the same for every frame",
            "val": f"centre clip; short side {config.test_size}; centre {config.crop}x{config.crop} crop",
            "dropout": None,
        },
        "featstore_version": __version__,
        "torch_version": str(torch.__version__),
    }
    # JSON types only: the record travels inside checkpoints read back with weights_only=True.
    return json.loads(json.dumps(payload, default=str))


def _clips(config: FinetuneConfig, rows: list[dict[str, Any]], source: FrameSource, *, train: bool) -> ClipDataset:
    return ClipDataset(rows, source=source, target=config.target, clip_frames=config.clip_frames,
                       clip_stride=config.clip_stride, crop=config.crop, train=train, scale_range=config.scale_range,
                       test_size=config.test_size, fallback_fps=config.fps, seed=config.seed,
                       clip_sampling=config.clip_sampling, snippet_frames=config.snippet_frames)


def finetune(config: FinetuneConfig, *, log: Callable[[str], None] | None = None,
             after_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fine-tune a backbone on the shared training engine and write its run folder (see `finetune.outputs`).

    The folder is checked first (an existing run needs ``resume``, with the same settings), opened
    once the data and the init checkpoint are known good (`featstore.training.run_folder.RunFolder`).

    Args:
        config: the run.
        log: where the run's lines are echoed besides ``OUT/log.txt`` (default: stderr).
        after_step: called with (0-based epoch, step within the epoch) after each step; tests
            interrupt a run here.
    Returns:
        The final metrics (``{target}_top1`` / ``{target}_top5`` when there is a validation selection).
    Raises:
        FinetuneError: settings or data that cannot work, an existing run without ``resume``, a NaN /
            inf loss (naming the epoch and step), too many unreadable segments.
        CheckpointError: an init checkpoint that does not fit (listing what does not).
    """
    out = Path(config.out)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
    if config.tensorboard is not None:
        require_tensorboard(FinetuneError)  # before anything is written
    folder = RunFolder.check(out, resume=config.resume, error=FinetuneError)
    if folder.finished:
        recorded = folder.finished_metrics(asked=config.epochs, done=int(json.loads(
            folder.file(METRICS_NAME).read_text())["epochs_done"]), unit="epoch", error=FinetuneError)
        return {key: recorded[key] for key in (f"{config.target}_top1", f"{config.target}_top5") if key in recorded}
    _check_resume_settings(config, out)
    selection = select_training_data(config)
    videos = sorted({str(row["video_id"]) for row in selection.train + selection.val})
    source, video_info = _frame_source(config, videos)
    model, record, init_report = build_video_classifier(
        config.backbone, num_classes=selection.num_classes, in_channels=config.in_channels, init=config.init,
        seed=config.seed)
    world = World.from_environment(config.device, size=config.world_size)
    folder.open(world=world, echo=log)  # only once inputs and init are known good
    main, run_log = folder.main, folder.log
    if config.device == "cpu":
        keep_freed_memory()  # activations are fresh CPU blocks every step: see featstore/io/allocator.py

    config_record = _config_record(config, selection, record, init_report, video_info)
    failures = FailureLog(max_fraction=config.max_failed_fraction)
    trainable = BackboneTrainable(config, model, _clips(config, selection.train, source, train=True),
                                  _clips(config, selection.val, source, train=False), failures=failures, log=run_log,
                                  record=config_record)
    if main:
        atomic_write_json(folder.file(CONFIG_NAME), config_record)
        run_log(init_report.describe())
        run_log(f"{config.backbone} {config.target} net, recipe {config.recipe}: {len(selection.train)} training and "
                f"{len(selection.val)} validation segments, {selection.num_classes} classes, {config.epochs} epochs "
                f"on {trainable.device}")
    outputs = _BackboneRunOutputs(trainable, folder=folder, record=config_record,
                          majority_top1=_majority_top1(config, selection),
                          title=f"{config.backbone} {config.target} net ({config.recipe}) on {config.annotations.name}")
    hooks = _backbone_hooks(config, trainable, folder, outputs=outputs, validate=bool(selection.val),
                            n_train=len(selection.train), world=world, after_step=after_step)
    # The run's torch stream starts from the seed, not from whatever the process drew before, so a
    # resumed run continues exactly the stream of the first one.
    run = train_one(trainable, name=str(out), epochs=config.epochs, hooks=hooks, world=world, seed=config.seed,
                    log=run_log)
    if not main:
        return {}
    last = run.history[-1] if run.history else {}
    warnings = _chance_warnings(config, selection, last)
    metrics = outputs.write(run, complete=True, warnings=warnings)  # also with epochs = 0: the init weights
    run_log(f"finished {out}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            + f"; {len(failures.entries)} unreadable segment(s) skipped")
    for warning in warnings:
        run_log(f"WARNING: {warning}")
    if not config.keep_resume_state:
        folder.drop_resume_state()
    return metrics


def _backbone_hooks(config: FinetuneConfig, trainable: BackboneTrainable, folder: RunFolder, *, outputs: Hook,
                    validate: bool, n_train: int, world: World | None,
                    after_step: Callable[[int, int], None] | None) -> list[Hook]:
    """The run's hooks, in the order the engine calls them after each epoch."""
    out, main, run_log = Path(config.out), folder.main, folder.log
    hooks: list[Hook] = [
        LossCheck(hint=": lower --lr, check the init checkpoint, or use --amp bf16 instead of fp16",
                  every=config.check_every, error=FinetuneError),
        LearningRate(trainable.optimizer),
        _EpochRecord(trainable),
    ]
    if validate:
        hooks.append(Validation(lambda: trainable.validate(world), prefix=""))
    hooks += [
        # The resume state is written after the hooks that fill the epoch's record (its history is
        # saved with it), and before the outputs that point at it.
        Checkpointer(folder.resume_state, resume=config.resume, save=main,
                     on_resume=lambda run: run_log(f"resuming {out} after epoch {run.epoch}")),
        outputs,
        EpochLog(run_log, lambda entry: _epoch_line(entry, config.target)),
    ]
    if main:
        hooks.insert(-1, HistoryCSV(folder.file(HISTORY_CSV_NAME)))
        if config.tensorboard is not None:
            hooks.insert(-1, TensorBoard(config.tensorboard, error=FinetuneError))
    if config.progress and main:
        share = n_train // config.world_size
        hooks.append(ProgressBar(unit="clip", count=lambda batch: len(batch) + len(batch.failed),
                                 total=lambda run: share))
    if after_step is not None:
        hooks.append(StepCallback(after_step))
    return hooks
