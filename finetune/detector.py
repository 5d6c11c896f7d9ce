"""Stage 1 for the detector: fine-tune a registered torchvision Faster R-CNN on EPIC object annotations.

The run is iteration-based (the report counts iterations, DESIGN 4.5) and runs on the shared training
engine (`featstore.training.engine`): an engine "epoch" is a round of ``eval_every`` iterations, after
which the hooks check the losses, validate (on the main rank only, on every held-out image), write
the resume state and the run folder. The pieces:

- the data (`finetune.detector_data`): `ObjectImageDataset`, one image and its boxes per key
  ``(iteration, index)``, flipped from a seeded draw, decoded in DataLoader workers; and
  `IterationBatchSampler`, the global batch of every iteration from seeded permutations, this rank's
  share under torchrun;
- `DetectorTrainable`: the engine's `Trainable`: the lr of each iteration (warm-up, then steps),
  SGD, AMP on CUDA, gradients averaged over a torchrun world (`featstore.training.world.World`);
- `finetune_detector(config)`: checks and opens the run folder, builds it all and trains; a
  ``detectron2:CONFIG`` detector goes to `finetune.detectron2_training` instead (detectron2's own
  trainer), whose folder uses the same names (`featstore.training.run_folder.RUN_FILES`).

The run folder (names: `featstore.training.run_folder`): ``checkpoint.pt`` (``{"model": state_dict,
"classes": ..., "finetune": record}``: what ``featstore build --detector NAME:OUT/checkpoint.pt``
loads, its class count read from the classifier and its class names recorded in the store's
manifest), ``checkpoints/last.pt`` (resume), ``config.json``, ``metrics.json``, ``per_class_ap.csv``
and ``predictions.png`` (with validation images), ``curves.png``, ``failures.json``, ``log.txt``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from featstore import __version__
from featstore.epic.detection_metrics import ImagePredictions, detection_ap
from featstore.epic.metadata import NUM_CLASSES
from featstore.epic.objects import ImageLayout, ObjectImage, ObjectLabels, read_objects
from featstore.io.atomic import atomic_write_json, atomic_write_torch
from featstore.models import build_detector, file_sha256, read_state_dict
from featstore.models.checkpoints import FINETUNE_RECORD_KEY, apply_state_dict
from featstore.training.engine import Hook, RunState, train_one
from featstore.training.hooks import (
    Checkpointer,
    EpochCallback,
    EpochLog,
    HistoryCSV,
    LearningRate,
    LossCheck,
    ProgressBar,
    TensorBoard,
    refuse_non_finite,
    require_tensorboard,
)
from featstore.training.run_folder import (
    CONFIG_NAME,
    CURVES_NAME,
    FAILURES_NAME,
    HISTORY_CSV_NAME,
    METRICS_NAME,
    PER_CLASS_AP_NAME,
    PREDICTION_IMAGES_NAME,
    RunFolder,
)
from featstore.training.world import World
from finetune.clips import FailureLog
from finetune.detection_report import detection_entry, plot_predictions, write_per_class_ap
from finetune.detector_config import (
    DetectorFinetuneConfig,
    DetectorFinetuneError,
    detector_resume_differences,
    get_detector_recipe,
)
from finetune.detector_data import (
    DetectionBatch,
    IterationBatchSampler,
    ObjectImageDataset,
    collate_detections,
    read_image,
)
from finetune.outputs import half_weights, plot_curves

__all__ = [
    "MIN_MAP_50",
    "detector_warnings",
    "DetectorTrainable",
    "class_table",
    "finetune_detector",
]

EPIC55_OBJECT_CLASSES = NUM_CLASSES["epic55"][1]  # EPIC-55's nouns, the classes of its object annotations
_BOX_PREDICTOR = "roi_heads.box_predictor."
_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# classes and the model


def class_table(config: DetectorFinetuneConfig, labels: ObjectLabels) -> tuple[str, ...]:
    """The object classes (index -> name) a run trains: a class list file, else EPIC-55's count, else
    the ground truth's largest id + 1 (named ``class_<id>``).

    Raises:
        DetectorFinetuneError: a ground-truth label outside the classes.
    """
    from featstore.epic.metadata import read_class_list

    names: tuple[str, ...] | None = read_class_list(config.class_names) if config.class_names is not None else None
    largest = max(labels.class_counts(), default=-1)
    count = config.num_classes or (len(names) if names is not None else None)
    if count is None:
        count = EPIC55_OBJECT_CLASSES if largest < EPIC55_OBJECT_CLASSES and labels.source.endswith(
            "object_labels.csv") else largest + 1
    if largest >= count:
        raise DetectorFinetuneError(f"{labels.source} has class {largest}, outside the {count} classes "
                                    "(--num-classes / --class-names)")
    if names is None or len(names) != count:
        names = tuple(names[i] if names is not None and i < len(names) else f"class_{i}" for i in range(count))
    return names


def _build_model(config: DetectorFinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, str]:
    """The detector with a box predictor for ``num_classes`` + background, and what its init loaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        detector, _ = build_detector(config.detector, num_classes=num_classes + 1, min_size=config.min_size,
                                     max_size=config.max_size, score_thresh=config.score_threshold)
    detector.set_training_sampling(rpn_proposals=config.rpn_proposals, roi_batch_size=config.roi_batch_size)
    if config.init is None:
        return detector, "init: random weights (no init checkpoint)"
    state = read_state_dict(config.init)
    classifier = state.get(f"{_BOX_PREDICTOR}cls_score.weight")
    drop = classifier is not None and int(classifier.shape[0]) != num_classes + 1
    if drop:
        # A COCO / Visual Genome predictor has other classes: the new one keeps its fresh weights,
        # everything else must fit exactly.
        fresh = {key: value for key, value in detector.state_dict().items() if key.startswith(_BOX_PREDICTOR)}
        state = {**{key: value for key, value in state.items() if not key.startswith(_BOX_PREDICTOR)}, **fresh}
    report = apply_state_dict(detector, state, source=repr(str(config.init)), model_name=config.detector)
    if drop:
        return detector, (f"init: {report.loaded - len(fresh)} tensors loaded from {config.init}; its box predictor "
                          f"({int(classifier.shape[0])} classes) was dropped for {num_classes + 1}")
    return detector, f"init: {report.loaded} tensors loaded from {config.init}"


# ------------------------------------------------------------------------------------------------
# the trainable


class DetectorTrainable:
    """What the engine steps: the model, SGD with the recipe's schedule, AMP, failures.

    Args:
        config: the run.
        model: a `featstore.models.detectors.TorchvisionFasterRCNN` (with ``losses``).
        train_data: the training images.
        failures: where unreadable images are recorded.
        log: the run's log.
    """

    def __init__(self, config: DetectorFinetuneConfig, model: torch.nn.Module, train_data: ObjectImageDataset, *,
                 failures: FailureLog, log: Callable[[str], None]) -> None:
        self.config = config
        self.device = torch.device(f"cuda:{config.local_rank}" if config.device == "cuda" else "cpu")
        self.model = model.to(self.device)
        self.train_data = train_data
        self.failures = failures
        self.log = log
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(parameters, lr=config.lr_at(0), momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.device == "cuda" and config.amp == "fp16")
        self.sampler = IterationBatchSampler(len(train_data), config.batch_size, seed=config.seed, rank=config.rank,
                                             world_size=config.world_size)

    def epoch_batches(self, epoch: int, world: World | None) -> torch.utils.data.DataLoader:
        """The iterations of round ``epoch`` (``eval_every`` of them; the last round may be shorter)."""
        start = epoch * self.config.eval_every
        self.sampler.set_range(start, min(start + self.config.eval_every, self.config.iterations))
        self.model.train()
        workers = self.config.workers
        return torch.utils.data.DataLoader(self.train_data, batch_sampler=self.sampler, num_workers=workers,
                                           collate_fn=collate_detections, pin_memory=self.device.type == "cuda",
                                           prefetch_factor=2 if workers > 0 else None)

    def train_step(self, batch: DetectionBatch, world: World | None) -> torch.Tensor:
        """One SGD step at the batch's iteration lr; its unreadable images go to the failures."""
        round_ = batch.iteration // self.config.eval_every
        for index, reason in batch.failed:
            record = self.train_data.images[index]
            self.failures.add(uid=f"{record.video_id}/{record.frame}", epoch=round_, phase="train", reason=reason)
            self.log(f"iteration {batch.iteration + 1}: skipped training image {self.train_data.layout.path(record)}: "
                     f"{reason}")
        if batch.failed and world is None:
            self.failures.check(round_, "train", self.config.eval_every * self.config.batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(batch.iteration)
        self.optimizer.zero_grad(set_to_none=True)
        if len(batch):
            images = [image.to(self.device, non_blocking=True).float().div_(255.0) for image in batch.images]
            targets = [{key: value.to(self.device) for key, value in target.items()} for target in batch.targets]
            with self._autocast():
                losses = self.model.losses(images, targets)
            loss = sum(value.float() for value in losses.values())
            self.scaler.scale(loss).backward()
        else:
            loss = torch.zeros((), device=self.device)  # nothing readable: an idle step (still in step with the world)
        if world is not None:
            loss = world.average_gradients([p for group in self.optimizer.param_groups for p in group["params"]],
                                           loss.detach())
        if len(batch) or world is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 4) -> list[ImagePredictions]:
        """The detector's output on (H, W, 3) uint8 images, boxes in their pixels, labels 0..K-1."""
        self.model.eval()
        out: list[ImagePredictions] = []
        with torch.inference_mode():
            for lo in range(0, len(images), batch_size):
                chunk = [torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.device).float() / 255.0
                         for image in images[lo:lo + batch_size]]
                with self._autocast():
                    detections = self.model.detect(chunk, topk=100)
                for image, found in zip(chunk, detections):
                    height, width = image.shape[1:]
                    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
                    out.append(ImagePredictions(boxes=(found.boxes.float().cpu() * scale).numpy(),
                                                scores=found.scores.float().cpu().numpy(),
                                                labels=found.labels.cpu().numpy() - 1))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "failures": list(self.failures.entries),
                "settings": self.config.to_json()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.failures.entries = list(state.get("failures", []))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.config.amp != "off":
            return torch.autocast(device_type="cuda", dtype=_AMP_DTYPES[self.config.amp])
        return contextlib.nullcontext()  # the CPU trains in fp32


# ------------------------------------------------------------------------------------------------
# validation and the run folder


class _DetectorValidation(Hook):
    """After each round: mAP on the held-out images, into the record; the report files on the main rank."""

    def __init__(self, trainable: DetectorTrainable, val: ObjectLabels, layout: ImageLayout, *,
                 class_names: Sequence[str], train_counts: Mapping[int, int], out: Path,
                 failures: FailureLog, log: Callable[[str], None]) -> None:
        self.trainable, self.val, self.layout = trainable, val, layout
        self.class_names, self.train_counts, self.out = class_names, train_counts, out
        self.failures, self.log = failures, log
        self.images: list[np.ndarray] | None = None
        self.truths: list[ObjectImage] = []

    def _load(self, epoch: int) -> None:
        self.images, self.truths = [], []
        for record in self.val:
            try:
                self.images.append(read_image(self.layout.path(record)))
                self.truths.append(record)
            except OSError as err:
                self.failures.add(uid=f"{record.video_id}/{record.frame}", epoch=epoch, phase="val", reason=str(err))
                self.log(f"skipped validation image {self.layout.path(record)}: {err}")
        self.failures.check(epoch, "val", len(self.val))

    def after_epoch(self, run: RunState) -> None:
        if not len(self.val) or not run.is_main:
            return
        if self.images is None:
            self._load(run.epoch)
        predictions = self.trainable.predict(self.images)
        try:
            result = detection_ap(self.truths, predictions)
        except ValueError as err:  # validation images without a single box
            raise DetectorFinetuneError(f"the validation images cannot be scored: {err}") from err
        run.record.update(detection_entry(result))
        write_per_class_ap(self.out / PER_CLASS_AP_NAME, result, class_names=self.class_names,
                           train_counts=self.train_counts)
        shown = [i for i, truth in enumerate(self.truths) if len(truth)][:8] or list(range(min(8, len(self.truths))))
        plot_predictions(self.out / PREDICTION_IMAGES_NAME, [self.images[i] for i in shown], [self.truths[i] for i in shown],
                         [predictions[i] for i in shown], class_names=self.class_names,
                         title=f"iteration {run.record['iteration']}")


class _RoundRecord(Hook):
    """The round's iteration count, images and failures, at the start of its record."""

    def __init__(self, config: DetectorFinetuneConfig, failures: FailureLog) -> None:
        self.config, self.failures = config, failures

    def after_epoch(self, run: RunState) -> None:
        iteration = min((run.epoch + 1) * self.config.eval_every, self.config.iterations)
        steps = run.step
        run.record.update({"iteration": iteration, "images_per_s": steps * self.config.batch_size / run.seconds
                           if run.seconds > 0 else 0.0, "train_failed": self.failures.count(run.epoch, "train")})
        self.failures.check(run.epoch, "train", steps * self.config.batch_size)


class _DetectorRunOutputs(Hook):
    """After each round (main rank): the deliverable checkpoint, metrics.json, failures.json, curves.png."""

    def __init__(self, trainable: DetectorTrainable, *, folder: RunFolder, record: dict[str, Any],
                 classes: dict[str, Any], failures: FailureLog, n_train: int, n_val: int) -> None:
        self.trainable, self.folder, self.record, self.classes = trainable, folder, record, classes
        self.failures, self.n_train, self.n_val = failures, n_train, n_val

    def write(self, run: RunState, *, complete: bool, warnings: Sequence[str] = ()) -> dict[str, Any]:
        last = run.history[-1] if run.history else {}
        metrics = {key: last[key] for key in ("map_50", "map_50_95") if key in last}
        weights = {key: value.detach().cpu() for key, value in self.trainable.model.state_dict().items()}
        payload = {
            "model": half_weights(weights) if self.trainable.config.half_checkpoint else weights,
            "classes": self.classes,
            FINETUNE_RECORD_KEY: json.loads(json.dumps({
                "format": 1, "kind": "detector", "run": str(self.folder.path.resolve()),
                "iteration": last.get("iteration", 0), "metrics": metrics, "classes": self.classes,
                "config": {key: value for key, value in self.record.items() if key != "classes"}}, default=str)),
        }
        refuse_non_finite(payload["model"], what=f"for {self.folder.checkpoint}")
        atomic_write_torch(self.folder.checkpoint, payload)
        atomic_write_json(self.folder.file(METRICS_NAME), {
            **metrics, "complete": complete, "iterations_done": last.get("iteration", 0),
            "n_train_images": self.n_train, "n_val_images": self.n_val, "warnings": list(warnings),
            "history": run.history})
        atomic_write_json(self.folder.file(FAILURES_NAME), self.failures.entries)
        return metrics

    def after_epoch(self, run: RunState) -> None:
        if not run.is_main:
            return
        self.write(run, complete=run.epoch + 1 >= run.epochs)
        plot_curves(run.history, self.folder.file(CURVES_NAME), target="detector", x="iteration", ylabel="mAP (%)",
                    metrics=[("map_50", "mAP@0.5"), ("map_50_95", "mAP@[.5:.95]")],
                    title=f"{self.record['settings']['detector']} on {Path(self.record['settings']['objects']).name}")


MIN_MAP_50 = 1.0  # mAP@0.5 (%) under which a detector finds (almost) nothing


def detector_warnings(metrics: Mapping[str, Any], *, n_val: int) -> list[str]:
    """A detector that finds (almost) nothing on the held-out images: the stores built with it have
    empty box slots, and the heads' object branches learn nothing (say so before that happens)."""
    map_50 = metrics.get("map_50")
    if not n_val or map_50 is None or map_50 >= MIN_MAP_50:
        return []
    return [f"mAP@0.5 is {map_50:.2f} % on the {n_val} held-out images (under {MIN_MAP_50:.0f} %): the detector "
            "finds (almost) nothing, and a store built with it will hold (almost) no valid boxes; train longer, "
            "start from a pretrained checkpoint, or build with a --boxes file"]


def _round_line(entry: Mapping[str, Any]) -> str:
    parts = [f"iteration {entry['iteration']}", f"lr {entry['lr']:.2g}", f"loss {entry['loss']:.4f}",
             f"{entry['images_per_s']:.1f} images/s"]
    if entry.get("map_50") is not None:
        parts += [f"mAP@0.5 {entry['map_50']:.2f}", f"mAP@[.5:.95] {entry['map_50_95']:.2f}"]
    if entry.get("train_failed"):
        parts.append(f"skipped {entry['train_failed']} training images")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------------
# the run


def _read_labels(config: DetectorFinetuneConfig) -> tuple[ObjectLabels, ObjectLabels]:
    from featstore.epic.annotations import AnnotationError

    try:
        labels = read_objects(config.objects, coords=config.coords).select(config.where)
        if config.val_where is None:
            train, val = labels, labels.select("false")
        else:
            train, val = labels.split(config.val_where)
    except (AnnotationError, ValueError) as err:
        raise DetectorFinetuneError(str(err)) from err
    if config.limit is not None:
        train = ObjectLabels(images=train.images[:config.limit], source=train.source)
        val = ObjectLabels(images=val.images[:config.limit], source=val.source)
    if not len(train):
        raise DetectorFinetuneError(f"{config.objects} holds no training images (--where / --val-where)")
    return train, val


def finetune_detector(config: DetectorFinetuneConfig, *, log: Callable[[str], None] | None = None,
                      after_round: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tune a detector and write its run folder (see the module docstring).

    Args:
        config: the run.
        log: where the run's lines are echoed besides ``OUT/log.txt`` (default: stderr).
        after_round: called with the number of finished rounds after each (tests interrupt here).
    Returns:
        The final metrics (``map_50``, ``map_50_95`` in percent when there are validation images).
    Raises:
        DetectorFinetuneError: bad settings or data, an existing run without resume, a NaN loss,
            too many unreadable images.
        CheckpointError: an init checkpoint that does not fit (what does not is listed).
    """
    if config.backend == "detectron2":
        try:
            from finetune.detectron2_training import finetune_detectron2
        except ImportError as err:
            raise DetectorFinetuneError(f"the detectron2 backend is not available: {err}") from err
        return finetune_detectron2(config, log=log)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise DetectorFinetuneError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
    out = Path(config.out)
    if config.tensorboard is not None:
        require_tensorboard(DetectorFinetuneError)  # before anything is written
    folder = RunFolder.check(out, resume=config.resume, error=DetectorFinetuneError)
    if folder.finished:
        recorded = folder.finished_metrics(asked=config.iterations, done=int(json.loads(
            folder.file(METRICS_NAME).read_text())["iterations_done"]), unit="iteration", error=DetectorFinetuneError)
        return {key: recorded[key] for key in ("map_50", "map_50_95") if key in recorded}
    _check_detector_resume(config, folder)

    train, val = _read_labels(config)
    layout = ImageLayout(config.images, config.image_pattern)
    names = class_table(config, train)
    model, init_line = _build_model(config, len(names))
    world = World.from_environment(config.device, size=config.world_size)
    folder.open(world=world, echo=log)  # only once inputs and init are known good
    main, run_log = folder.main, folder.log
    failures = FailureLog(max_fraction=config.max_failed_fraction, items="images", period="round")
    train_data = ObjectImageDataset(train.images, layout=layout, train=True, seed=config.seed)
    trainable = DetectorTrainable(config, model, train_data, failures=failures, log=run_log)
    classes = {"num_classes": len(names), "names": list(names), "background": 0, "label_offset": 1}
    record = _detector_config_record(config, train, val, classes, init_line)
    if main:
        atomic_write_json(folder.file(CONFIG_NAME), record)
        run_log(init_line)
        run_log(f"{config.detector}, recipe {config.recipe}: {len(train)} training images ({train.n_boxes} boxes), "
                f"{len(val)} validation images, {len(names)} classes, {config.iterations} iterations of "
                f"{config.batch_size} images on {trainable.device}")

    outputs = _DetectorRunOutputs(trainable, folder=folder, record=record, classes=classes, failures=failures,
                          n_train=len(train), n_val=len(val))
    validation = _DetectorValidation(trainable, val, layout, class_names=names, train_counts=train.class_counts(),
                                     out=out, failures=failures, log=run_log)
    hooks = _detector_hooks(config, trainable, folder, validation=validation, outputs=outputs, failures=failures,
                            after_round=after_round)
    # The run's torch stream (the RPN's and box head's proposal sampling draw from it) starts from the
    # seed, not from whatever the process drew before, so that a resumed run retraces the first one.
    run = train_one(trainable, name=str(out), epochs=config.epochs, hooks=hooks, world=world, seed=config.seed,
                    log=run_log)
    if not main:
        return {}
    warnings = detector_warnings(run.history[-1] if run.history else {}, n_val=len(val))
    metrics = outputs.write(run, complete=True, warnings=warnings)
    run_log(f"finished {out}: " + (", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if v is not None)
                                   or "no validation") + f"; {len(failures.entries)} unreadable image(s) skipped")
    for warning in warnings:
        run_log(f"WARNING: {warning}")
    if not config.keep_resume_state:
        folder.drop_resume_state()
    return metrics


def _check_detector_resume(config: DetectorFinetuneConfig, folder: RunFolder) -> None:
    """Refuse a resume whose recorded settings differ from the run's."""
    if config.resume and folder.resume_state.exists():
        recorded = torch.load(folder.resume_state, map_location="cpu", weights_only=False).get("settings", {})
        differences = detector_resume_differences(config, recorded)
        if differences:
            raise DetectorFinetuneError(f"{Path(config.out)} was trained with other settings, so resuming would not "
                                        f"reproduce it ({'; '.join(differences)}); rerun with the run's settings or "
                                        "use another OUT")


def _detector_config_record(config: DetectorFinetuneConfig, train: ObjectLabels, val: ObjectLabels,
                            classes: dict[str, Any], init_line: str) -> dict[str, Any]:
    """What config.json holds: every setting, the recipe, the warm-up, the init, the data, the classes."""
    return {
        "settings": config.to_json(),
        "recipe": get_detector_recipe(config.recipe).to_dict(),
        "warmup": f"warm-up: linear from {config.warmup_factor} x lr to lr over the first {config.warmup_iterations} iterations "
                  "(detectron2's default; the report gives none)",
        "init": None if config.init is None else {"path": str(Path(config.init).resolve()),
                                                  "sha256": file_sha256(config.init), "report": init_line},
        "data": {"objects": str(Path(config.objects).resolve()), "objects_sha256": file_sha256(config.objects),
                 "n_train_images": len(train), "n_val_images": len(val), "n_train_boxes": train.n_boxes,
                 "n_val_boxes": val.n_boxes, "dropped_boxes": train.dropped_boxes},
        "classes": classes,
        "augmentation": "horizontal flip with probability 1/2; the detector's own resize "
                        f"(short side {config.min_size}, long side at most {config.max_size})",
        "featstore_version": __version__, "torch_version": str(torch.__version__),
    }


def _detector_hooks(config: DetectorFinetuneConfig, trainable: DetectorTrainable, folder: RunFolder, *,
                    validation: Hook, outputs: Hook, failures: FailureLog,
                    after_round: Callable[[int], None] | None) -> list[Hook]:
    """The run's hooks, in the order the engine calls them after each round."""
    out, main, log = Path(config.out), folder.main, folder.log
    # The resume state is written after the hooks that fill the round's record (its history is saved
    # with it); it is loaded before any round, whatever its place.
    hooks: list[Hook] = [
        LossCheck(hint=": lower --lr, check the init checkpoint, or use --amp bf16 instead of fp16",
                  where=lambda epoch, step: f"iteration {(epoch - 1) * config.eval_every + step}",
                  error=DetectorFinetuneError, every=config.check_every),
        LearningRate(trainable.optimizer),
        _RoundRecord(config, failures),
        validation,
        Checkpointer(folder.resume_state, resume=config.resume, save=main,
                     on_resume=lambda run: log(f"resuming {out} after iteration "
                                               f"{min(run.epoch * config.eval_every, config.iterations)}")),
        outputs,
        EpochLog(log, _round_line),
    ]
    if main:
        hooks.insert(-1, HistoryCSV(folder.file(HISTORY_CSV_NAME)))
        if config.tensorboard is not None:
            hooks.insert(-1, TensorBoard(config.tensorboard, step="iteration", error=DetectorFinetuneError))
    if config.progress and main:
        hooks.append(ProgressBar(unit="image", count=lambda batch: len(batch) + len(batch.failed)))
    if after_round is not None:
        hooks.append(EpochCallback(after_round))
    return hooks

