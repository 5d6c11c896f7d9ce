"""Stage 1 as a Python call: fine-tune one backbone (VerbNet or NounNet) and write its run folder.

`FinetuneRun` holds everything of a run and exposes it in the pieces a training engine drives:

- ``train_batches(epoch)``: the epoch's batches (a DataLoader over `finetune.clips.ClipDataset`,
  decoding in worker processes, pinned memory on CUDA), with that epoch's learning rate set;
- ``step(batch)``: one optimiser step (AMP on CUDA, a gradient scaler for fp16), the batch's
  unreadable segments recorded in the run's failures, the losses checked for NaN every
  ``check_every`` steps;
- ``end_epoch()``: the epoch's checks, validation, history, checkpoint and run-folder files;
- ``state_dict()`` / ``load_state_dict()``: everything a resume needs.

`finetune(config)` runs it with a plain epoch loop. That loop is interim wiring: the shared training
engine (``heads/engine.py``) is meant to replace it, calling the same four pieces.

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from featstore import __version__
from featstore.allocator import keep_freed_memory
from featstore.annotations import detect_dataset, find_video_info, read_segments, read_video_info
from featstore.atomic import atomic_write_json
from featstore.frames import FrameError, FrameSource, open_frame_source
from featstore.models import file_sha256
from featstore.splits import resolve_selection, select_segments
from finetune.clips import ClipBatch, ClipDataset, EpochBatchSampler, FailureLog, collate_clips
from finetune.config import FinetuneConfig, FinetuneError, resume_differences
from finetune.model import InitReport, build_video_classifier
from finetune.outputs import (
    CHECKPOINT_NAME,
    RunLog,
    load_training_state,
    plot_curves,
    remove_run_temporaries,
    save_training_state,
    write_finetuned_checkpoint,
)
from finetune.recipes import get_recipe
from heads.evaluation import NUM_CLASSES
from heads.metrics import topk_accuracy

__all__ = ["FinetuneRun", "Selection", "finetune", "select_training_data"]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RECORD_FORMAT = 1  # of the run record inside checkpoint.pt


# ------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Selection:
    """The segments a run trains and validates on.

    Attributes:
        train: training rows (`featstore.annotations.read_segments` columns), file order.
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
# the run


class FinetuneRun:
    """One stage-1 run: data, model, optimiser, history and failures, driven step by step.

    Args:
        config: the run's settings.
        log: where the run's lines are echoed besides ``OUT/log.txt`` (default: stderr).
    Raises:
        FinetuneError: settings or data that cannot work, or an existing run without ``resume``.
        CheckpointError: an init checkpoint that does not fit (listing what does not).
    """

    def __init__(self, config: FinetuneConfig, *, log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        self.main_process = config.rank == 0
        if config.device == "cuda" and not torch.cuda.is_available():
            raise FinetuneError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
        state = load_training_state(self.out)
        if (state is not None or (self.out / CHECKPOINT_NAME).exists()) and not config.resume:
            raise FinetuneError(f"{self.out} already holds a run; pass --resume to continue it or choose another OUT")
        if state is not None:
            recorded = state.get("config", {}).get("settings", {})
            differences = resume_differences(config, recorded)
            if differences:
                raise FinetuneError(f"{self.out} was trained with other settings, so resuming would not reproduce "
                                    f"it ({'; '.join(differences)}); rerun with the run's settings or use another OUT")

        self.selection = select_training_data(config)
        videos = sorted({str(row["video_id"]) for row in self.selection.train + self.selection.val})
        self.source, self.video_info = _frame_source(config, videos)
        self.model, self.record, self.init_report = build_video_classifier(
            config.backbone, num_classes=self.selection.num_classes, in_channels=config.in_channels,
            init=config.init, seed=config.seed)
        self.out.mkdir(parents=True, exist_ok=True)  # only once inputs and init are known good
        if self.main_process:
            remove_run_temporaries(self.out)
        self.log: Callable[[str], None] = RunLog(self.out / "log.txt", echo=log) if self.main_process else _quiet
        if config.device == "cpu":
            keep_freed_memory()  # activations are fresh CPU blocks every step: see featstore/allocator.py
        self.device = torch.device(f"cuda:{config.local_rank}" if config.device == "cuda" else "cpu")
        self.model.to(self.device)
        if config.uses_channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.device == "cuda" and config.amp == "fp16")
        self.world = _DataParallel.from_config(config)
        self.train_module = self.model if self.world is None else self.world.wrap(self.model)
        if config.compile:
            self.train_module = torch.compile(self.train_module)

        self.train_data = ClipDataset(self.selection.train, source=self.source, target=config.target,
                                      clip_frames=config.clip_frames, clip_stride=config.clip_stride,
                                      crop=config.crop, train=True, scale_range=config.scale_range,
                                      test_size=config.test_size, fallback_fps=config.fps, seed=config.seed,
                                      clip_sampling=config.clip_sampling, snippet_frames=config.snippet_frames)
        self.val_data = ClipDataset(self.selection.val, source=self.source, target=config.target,
                                    clip_frames=config.clip_frames, clip_stride=config.clip_stride,
                                    crop=config.crop, train=False, test_size=config.test_size,
                                    fallback_fps=config.fps, seed=config.seed,
                                    clip_sampling=config.clip_sampling, snippet_frames=config.snippet_frames)
        self.train_sampler = EpochBatchSampler(len(self.train_data), config.batch_size, shuffle=True,
                                               seed=config.seed, rank=config.rank, world_size=config.world_size)

        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        self.failures = FailureLog(max_fraction=config.max_failed_fraction)
        self._epoch_stats = _EpochStats()
        self.record_config = self._config_record()
        if state is not None:
            self.load_state_dict(state)
            self.log(f"resuming {self.out} after epoch {self.epoch}")
        if self.main_process:
            atomic_write_json(self.out / "config.json", self.record_config)
            self.log(self.init_report.describe())
            self.log(f"{config.backbone} {config.target} net, recipe {config.recipe}: {len(self.selection.train)} "
                     f"training and {len(self.selection.val)} validation segments, {self.selection.num_classes} "
                     f"classes, {config.epochs} epochs on {self.device}")

    # -- what a training engine drives --------------------------------------------------------

    def train_batches(self, epoch: int) -> Iterator[ClipBatch]:
        """The batches of 0-based ``epoch`` (this process's share), with the epoch's lr set.

        Starts the decode workers; the batches are decoded ahead while the steps compute.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(epoch)
        self.model.train()
        self.train_sampler.set_epoch(epoch)
        self._epoch_stats = _EpochStats(epoch=epoch, started=time.perf_counter())
        return iter(self._loader(self.train_data, self.train_sampler))

    def step(self, batch: ClipBatch) -> torch.Tensor | None:
        """One SGD step on a batch; its unreadable segments go to the run's failures.

        Returns:
            The batch's mean loss (0-d, on the device, not read here so the host does not wait for
            the device every step), or None when no clip of the batch was readable.
        Raises:
            FinetuneError: too many unreadable segments this epoch, or a NaN / inf loss (naming the
                epoch and the step) found at a check.
        """
        stats = self._epoch_stats
        self._record_failures(batch, "train", len(self.train_data))
        stats.clips += len(batch)
        stats.failed += len(batch.failed)
        stats.batches += 1
        if not len(batch):
            if self.world is None:
                return None
            # Every process must join each gradient all-reduce, also with nothing readable to train on.
            self.world.idle_step(self.train_module, self.optimizer, self._empty_clip())
            return None
        stats.steps += 1
        clips = self._on_device(batch.clips)  # (B, C, T, H, W) float in [0, 1]
        labels = batch.labels.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.train_module(clips)  # (B, K)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss = loss.detach()
        stats.pending.append((stats.steps, loss))
        if len(stats.pending) >= self.config.check_every:
            stats.check(self._epoch_stats.epoch, self.world)
        return loss

    def end_epoch(self) -> dict[str, Any]:
        """After the epoch's steps: check losses and failures, validate, checkpoint, write the run files.

        Under data parallelism every process calls it (validation is shared out too); the first
        process alone writes the run folder.

        Returns:
            The epoch's history entry.
        Raises:
            FinetuneError: a NaN / inf loss, or too many unreadable segments.
        """
        stats = self._epoch_stats
        epoch = stats.epoch
        stats.check(epoch, self.world)
        seconds = time.perf_counter() - stats.started
        validation = self.validate(epoch) if len(self.val_data) else {}
        if self.world is not None:
            stats = self.world.sum_stats(stats, self.device)
            self.failures.entries = self.world.gather_failures(self.failures.entries, epoch)
        self.failures.check(epoch, "train", len(self.train_data))
        self.failures.check(epoch, "val", len(self.val_data))
        entry: dict[str, Any] = {
            "epoch": epoch + 1, "lr": self.config.lr_at(epoch),
            "loss": stats.loss_sum / stats.steps if stats.steps else math.nan,
            "steps": stats.batches, "train_clips": stats.clips, "train_failed": stats.failed,
            "seconds": seconds, "clips_per_s": stats.clips / seconds if seconds > 0 else 0.0,
            **validation,
        }
        self.epoch = epoch + 1
        self.history.append(entry)
        if self.main_process:
            self.save()
            self.log(_epoch_line(entry, self.config.target))
        if self.world is not None:
            self.world.barrier()
        return entry

    def validate(self, epoch: int) -> dict[str, Any]:
        """Top-1 / top-5 of the target on the validation selection (the centre clip, centre crop).

        Under data parallelism each process scores its share and the logits are gathered.

        Returns:
            ``{"{target}_top1", "{target}_top5"}`` in percent, ``val_clips`` scored and ``val_failed``.
        """
        config = self.config
        sampler = EpochBatchSampler(len(self.val_data), config.batch_size, shuffle=False, rank=config.rank,
                                    world_size=config.world_size)
        sampler.set_epoch(epoch)
        logits, labels = [], []
        failed = 0
        from tqdm import tqdm

        bar = tqdm(total=len(self.val_data) // config.world_size, desc=f"validate {epoch + 1}", unit="clip",
                   leave=False, disable=not (config.progress and self.main_process), file=sys.stderr,
                   dynamic_ncols=True)
        self.model.eval()
        try:
            with torch.inference_mode():
                for batch in self._loader(self.val_data, sampler):
                    self._record_failures(batch, "val", len(self.val_data), epoch=epoch)
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
        scores = torch.cat(logits).numpy() if logits else np.zeros((0, self.selection.num_classes), np.float32)
        truth = torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64)
        if self.world is not None:
            scores, truth, failed = self.world.gather_scores(scores, truth, failed)
        target = config.target
        top1, top5 = topk_accuracy(scores, truth, (1, 5)) if len(truth) else (math.nan, math.nan)
        return {f"{target}_top1": top1, f"{target}_top5": top5, "val_clips": int(len(truth)), "val_failed": failed}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (tensors and plain containers: loadable with weights_only)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "history": list(self.history),
            "failures": list(self.failures.entries), "config": self.record_config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` (model, optimiser, scaler, epoch, history, failures)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.failures.entries = list(state["failures"])

    # -- the run folder -----------------------------------------------------------------------

    def save(self) -> None:
        """Write the resume state, then the deliverable checkpoint, metrics, failures and curves."""
        save_training_state(self.out, self.state_dict())
        self.write_checkpoint()
        self.write_metrics(complete=self.epoch >= self.config.epochs)
        atomic_write_json(self.out / "failures.json", self.failures.entries)
        if self.history:
            plot_curves(self.history, self.out / "curves.png", target=self.config.target,
                        title=f"{self.config.backbone} {self.config.target} net ({self.config.recipe}) on "
                              f"{self.config.annotations.name}")

    def write_checkpoint(self) -> Path:
        """``OUT/checkpoint.pt``: the backbone (what `featstore build` loads), the classifier, the run record."""
        last = self.history[-1] if self.history else {}
        target = self.config.target
        record = {
            "format": RECORD_FORMAT, "run": str(self.out.resolve()), "epoch": self.epoch,
            "metrics": {key: last[key] for key in (f"{target}_top1", f"{target}_top5") if key in last},
            "config": self.record_config,
        }
        return write_finetuned_checkpoint(self.out / CHECKPOINT_NAME, backbone=self.model.backbone.state_dict(),
                                          classifier=self.model.classifier.state_dict(), record=record)

    def write_metrics(self, *, complete: bool) -> dict[str, Any]:
        """``OUT/metrics.json``: the latest validation top-1 / top-5 and every epoch's entry."""
        target = self.config.target
        last = self.history[-1] if self.history else {}
        metrics: dict[str, Any] = {key: last[key] for key in (f"{target}_top1", f"{target}_top5") if key in last}
        payload = {**metrics, "target": target, "complete": complete, "epochs_done": self.epoch,
                   "n_train": len(self.train_data), "n_val": len(self.val_data),
                   "majority_top1": self._majority_top1(), "history": self.history}
        atomic_write_json(self.out / "metrics.json", payload)
        return metrics

    def finish(self) -> dict[str, Any]:
        """After the last epoch: the final metrics (also in metrics.json, with ``complete: true``)."""
        if not self.main_process:
            return {}
        if not (self.out / CHECKPOINT_NAME).exists():  # no epoch ran (epochs = 0): the init weights
            self.write_checkpoint()
        metrics = self.write_metrics(complete=True)
        atomic_write_json(self.out / "failures.json", self.failures.entries)
        self.log(f"finished {self.out}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
                 + f"; {len(self.failures.entries)} unreadable segment(s) skipped")
        return metrics

    # -- internals ----------------------------------------------------------------------------

    def _majority_top1(self) -> float | None:
        """Top-1 of always answering the training selection's most frequent class (the floor to beat)."""
        if not self.selection.val:
            return None
        column = f"{self.config.target}_class"
        counts = np.bincount([int(row[column]) for row in self.selection.train])
        majority = int(counts.argmax())
        return 100.0 * float(np.mean([int(row[column]) == majority for row in self.selection.val]))

    def _config_record(self) -> dict[str, Any]:
        config = self.config
        init: InitReport = self.init_report
        record = {
            "settings": config.to_json(),
            "recipe": get_recipe(config.recipe).to_dict(),
            "backbone_record": dataclasses.asdict(self.record),
            "init": None if init.checkpoint is None else {
                "path": str(init.checkpoint.resolve()), "sha256": file_sha256(init.checkpoint),
                "loaded": init.loaded, "dropped": list(init.dropped)},
            "data": {
                "annotations": str(config.annotations.resolve()), "annotations_sha256": file_sha256(config.annotations),
                "dataset": self.selection.dataset, "num_classes": self.selection.num_classes,
                "train_where": self.selection.train_where, "val_where": self.selection.val_where,
                "n_train": len(self.selection.train), "n_val": len(self.selection.val),
                "video_info": self.video_info,
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
        return json.loads(json.dumps(record, default=str))

    def _loader(self, dataset: ClipDataset, sampler: EpochBatchSampler) -> torch.utils.data.DataLoader:
        workers = self.config.workers
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_clips,
            pin_memory=self.device.type == "cuda", prefetch_factor=2 if workers > 0 else None)

    def _on_device(self, clips: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (4x less than float). (B, T, H, W, C) -> (B, C, T, H, W) is a
        # view whose memory is channels_last_3d already; .float() keeps those strides.
        x = clips.to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3).float().div_(255.0)
        return x if self.config.uses_channels_last else x.contiguous()

    def _empty_clip(self) -> torch.Tensor:
        """One black clip of the run's input shape, (1, C, T, crop, crop)."""
        config = self.config
        return torch.zeros(1, config.in_channels, config.clip_frames, config.crop, config.crop, device=self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.config.amp != "off":
            return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[self.config.amp])
        return contextlib.nullcontext()  # the CPU trains in fp32

    def _record_failures(self, batch: ClipBatch, phase: str, total: int, *, epoch: int | None = None) -> None:
        if not batch.failed:
            return
        epoch = batch.epoch if epoch is None else epoch
        rows = self.train_data.rows if phase == "train" else self.val_data.rows
        for index, reason in batch.failed:
            self.failures.add(uid=str(rows[index]["uid"]), epoch=epoch, phase=phase, reason=reason)
            if self.main_process:
                self.log(f"epoch {epoch + 1}: skipped {phase} segment {rows[index]['uid']}: {reason}")
        if self.world is None:
            # Stop as soon as the epoch is certain to fail. Under data parallelism each process only
            # sees its share: the check waits for the counts gathered at the end of the epoch.
            self.failures.check(epoch, phase, total)


@dataclass
class _EpochStats:
    """What the steps of one epoch add up (the losses stay on the device until checked)."""

    epoch: int = 0
    started: float = 0.0
    steps: int = 0  # steps with a loss (this process)
    batches: int = 0  # optimiser steps (the same in every process)
    clips: int = 0
    failed: int = 0
    loss_sum: float = 0.0
    pending: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)

    def check(self, epoch: int, world: "_DataParallel | None" = None) -> None:
        """Read the pending losses (one host-device sync) and stop at the first NaN / inf.

        Under data parallelism the processes agree first, so that all of them stop together.
        """
        values = torch.stack([loss for _, loss in self.pending]).float().cpu().tolist() if self.pending else []
        bad = [(step, value) for (step, _), value in zip(self.pending, values) if not math.isfinite(value)]
        advice = "lower --lr, check the init checkpoint, or use --amp bf16 instead of fp16"
        if world is not None and world.any(bool(bad)) and not bad:
            raise FinetuneError(f"the loss of another process became NaN or inf at epoch {epoch + 1} by step "
                                f"{self.steps}: {advice}")
        if bad:
            step, value = bad[0]
            raise FinetuneError(f"loss is {value} at epoch {epoch + 1}, step {step}: {advice}")
        self.loss_sum += sum(values)
        self.pending = []


class _DataParallel:
    """Data parallelism under torchrun: DistributedDataParallel, gloo on the CPU, nccl on GPUs."""

    def __init__(self, config: FinetuneConfig) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.device = config.device
        self.local_rank = config.local_rank
        if config.device == "cuda":
            torch.cuda.set_device(config.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if config.device == "cuda" else "gloo")
        if dist.get_world_size() != config.world_size:
            raise FinetuneError(f"the process group has {dist.get_world_size()} processes, the config says "
                                f"{config.world_size}")

    @classmethod
    def from_config(cls, config: FinetuneConfig) -> "_DataParallel | None":
        return cls(config) if config.world_size > 1 else None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        device_ids = [self.local_rank] if self.device == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def idle_step(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: torch.Tensor) -> None:
        """Join a step's all-reduce with zero gradients (this process's share of the batch was unreadable).

        BatchNorm layers are put in eval mode for it, so that the black clip leaves their running
        statistics alone.
        """
        norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        for norm in norms:
            norm.eval()
        try:
            optimizer.zero_grad(set_to_none=True)
            (module(clip).float().sum() * 0.0).backward()
            optimizer.step()
        finally:
            for norm in norms:
                norm.train()

    def sum_stats(self, stats: _EpochStats, device: torch.device) -> _EpochStats:
        totals = torch.tensor([stats.loss_sum, stats.steps, stats.clips, stats.failed], dtype=torch.float64,
                              device=device)
        self.dist.all_reduce(totals)
        # The epoch's loss: the mean of every process's step losses.
        return dataclasses.replace(stats, loss_sum=float(totals[0]), steps=int(totals[1]), clips=int(totals[2]),
                                   failed=int(totals[3]))

    def gather_failures(self, entries: list[dict[str, Any]], epoch: int) -> list[dict[str, Any]]:
        """Every process's failures of 0-based ``epoch`` (earlier epochs were gathered before)."""
        this_epoch = [entry for entry in entries if entry["epoch"] == epoch + 1]
        gathered: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(gathered, this_epoch)
        merged = sorted((entry for part in gathered for entry in part), key=lambda e: (e["phase"] != "train", e["uid"]))
        return [entry for entry in entries if entry["epoch"] != epoch + 1] + merged

    def gather_scores(self, scores: np.ndarray, truth: np.ndarray, failed: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Every process's validation logits (N, K), labels (N,) and failure count."""
        gathered: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(gathered, (scores, truth, failed))
        return (np.concatenate([part[0] for part in gathered]), np.concatenate([part[1] for part in gathered]),
                sum(part[2] for part in gathered))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process."""
        value = torch.tensor([int(flag)], device=torch.device(f"cuda:{self.local_rank}") if self.device == "cuda"
                             else torch.device("cpu"))
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        self.dist.barrier()


def _quiet(_: str) -> None:
    """The log of processes other than rank 0 (which alone writes the run folder)."""


def _epoch_line(entry: dict[str, Any], target: str) -> str:
    parts = [f"epoch {entry['epoch']}", f"lr {entry['lr']:.2g}", f"loss {entry['loss']:.4f}",
             f"{entry['clips_per_s']:.1f} clips/s"]
    for k in (1, 5):
        if f"{target}_top{k}" in entry:
            parts.append(f"{target} top-{k} {entry[f'{target}_top{k}']:.2f}")
    if entry.get("train_failed") or entry.get("val_failed"):
        parts.append(f"skipped {entry.get('train_failed', 0)} train / {entry.get('val_failed', 0)} val segments")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------------
# the loop (interim: the shared training engine replaces it)


def finetune(config: FinetuneConfig, *, log: Callable[[str], None] | None = None,
             after_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fine-tune a backbone and write its run folder (see `finetune.outputs`).

    Args:
        config: the run.
        log: where the run's lines are echoed besides ``OUT/log.txt`` (default: stderr).
        after_step: called with (0-based epoch, step within the epoch) after each step; tests
            interrupt a run here.
    Returns:
        The final metrics (``{target}_top1`` / ``{target}_top5`` when there is a validation selection).
    Raises:
        FinetuneError: see `FinetuneRun` and its ``step`` / ``end_epoch``.
    """
    from tqdm import tqdm

    run = FinetuneRun(config, log=log)
    while run.epoch < config.epochs:
        epoch = run.epoch
        share = len(run.train_data) // config.world_size
        bar = tqdm(total=share, desc=f"epoch {epoch + 1}/{config.epochs}", unit="clip", leave=False,
                   disable=not (config.progress and run.main_process), file=sys.stderr, dynamic_ncols=True)
        try:
            for step, batch in enumerate(run.train_batches(epoch), start=1):
                run.step(batch)
                bar.update(len(batch) + len(batch.failed))
                if after_step is not None:
                    after_step(epoch, step)
        finally:
            bar.close()
        run.end_epoch()
    return run.finish()

