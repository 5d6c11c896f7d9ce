"""Stage 1 of the detector with detectron2's own trainer: `finetune_detectron2`.

``featstore finetune-detector --detector detectron2:CONFIG[:INIT]`` comes here. The EPIC objects
(`featstore.epic.objects.ObjectLabels`, split by ``config.val_where``) are registered as detectron2
datasets (``DatasetCatalog`` / ``MetadataCatalog`` with ``thing_classes``), read by a
``DatasetMapper`` (ResizeShortestEdge to ``min_size`` / ``max_size``, random horizontal flip, the
draws seeded from ``config.seed``) through ``build_detection_train_loader`` (all three in
`finetune.detectron2_data`), and trained by
detectron2's ``SimpleTrainer`` (``AMPTrainer`` on CUDA with AMP) with hooks for the learning rate
(`DetectorFinetuneConfig.lr_at`: the recipe's steps and warm-up), progress, and every
``eval_every`` iterations a validation (pycocotools mAP, `featstore.epic.detection_metrics`) and a
resume state (detectron2's ``DetectionCheckpointer`` reads it; it is written by the one atomic
writer, `featstore.io.atomic.atomic_write_torch`). Under torchrun the world starts as every
trainer's does (`featstore.training.world.World.from_environment`), plus detectron2's local group.

The run folder uses the names of the torchvision backend's (`featstore.training.run_folder`)::

    OUT/checkpoint.pt         {"model": state_dict, "num_classes", "class_names", "finetune": record}:
                              what `featstore build --detector detectron2:OUT/checkpoint.pt` loads
    OUT/config.yaml           the detectron2 config of that model (beside it, where the adapter looks)
    OUT/checkpoints/last.pt   what a resume continues from (model, optimiser, iteration, lr schedule)
    OUT/config.json           every setting, the recipe, the warm-up, the init's sha256, the config yaml
    OUT/metrics.json          map_50 / map_50_95 per validation round (``history``) and final
    OUT/per_class_ap.csv      per-class AP of the last validation
    OUT/predictions.png       predictions on a few validation images
    OUT/failures.json         images that could not be read (skipped)
    OUT/log.txt               what the run printed

Class ids are the ground truth's own (EPIC ``noun_class``): the model has ``num_classes`` foreground
classes, ids 0..num_classes-1, so no mapping sits between the labels, the model and the store.
"""
from __future__ import annotations

import json
import math
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featstore import __version__
from featstore.epic.annotations import AnnotationError
from featstore.epic.boxes import BoxesFileError
from featstore.epic.detection_metrics import ImagePredictions, detection_ap
from featstore.epic.metadata import read_class_list
from featstore.epic.objects import ImageLayout, ObjectLabels, read_objects
from featstore.io.atomic import atomic_write_json, atomic_write_text, atomic_write_torch
from featstore.io.progress import progress_bar
from featstore.models import CheckpointError, file_sha256
from featstore.models.checkpoints import FINETUNE_RECORD_KEY
from featstore.training.hooks import refuse_non_finite
from featstore.training.run_folder import (
    CONFIG_NAME,
    DETECTRON2_CONFIG_NAME,
    FAILURES_NAME,
    METRICS_NAME,
    PER_CLASS_AP_NAME,
    PREDICTION_IMAGES_NAME,
    RESUME_STATE_NAME,
    RunFolder,
    holds_run,
)
from featstore.training.world import World
from finetune.detection_report import detection_entry, plot_predictions, write_per_class_ap
from finetune.detector_config import DetectorFinetuneConfig, DetectorFinetuneError, detector_resume_differences
from finetune.detectron2_data import dataset_dicts, readable_images, register_dataset, train_loader, unregister_datasets

__all__ = ["finetune_detectron2"]

_PREDICTOR_PREFIX = "roi_heads.box_predictor."
_PREDICTION_IMAGES = 4  # validation images drawn in predictions.png
_VAL_BATCH = 4


def _checkpointer(model: torch.nn.Module, state: Path | None = None, **checkpointables: Any) -> Any:
    """detectron2's ``DetectionCheckpointer`` (its loading: name heuristics, the checkpointables) whose
    ``save`` writes the resume state ``state`` through the one atomic writer; None: loading only."""
    from detectron2.checkpoint import DetectionCheckpointer

    class ResumeStateCheckpointer(DetectionCheckpointer):
        def save(self, name: str = "last", **kwargs: Any) -> None:
            """Write the model, the checkpointables and ``kwargs`` to ``state`` (``name`` is detectron2's, unused)."""
            if state is None or not self.save_to_disk:
                return
            data = {"model": self.model.state_dict()}
            data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
            data.update(kwargs)
            atomic_write_torch(state, data)

    return ResumeStateCheckpointer(model, **checkpointables)


# ------------------------------------------------------------------------------------------------
# classes


def _class_names(config: DetectorFinetuneConfig, labels: ObjectLabels) -> tuple[str, ...]:
    """Class id -> name: the class table's keys, else the ids as text (``num_classes`` or max id + 1)."""
    if config.class_names is not None:
        names = read_class_list(config.class_names)
        if config.num_classes is not None and config.num_classes != len(names):
            raise DetectorFinetuneError(f"num_classes={config.num_classes} but {config.class_names} lists "
                                        f"{len(names)} classes")
        return tuple(names)
    counts = labels.class_counts()
    top = max(counts) + 1 if counts else 1
    n = config.num_classes if config.num_classes is not None else top
    if n < top:
        raise DetectorFinetuneError(f"num_classes={n} but {config.objects} has class id {top - 1}")
    return tuple(str(i) for i in range(n))


# ------------------------------------------------------------------------------------------------
# model


def _detectron2_cfg(config: DetectorFinetuneConfig, num_classes: int) -> Any:
    """The detectron2 config of the run: the named file, the class count, the resize, the solver."""
    import yaml
    from detectron2.config import get_cfg

    from featstore.models.detectron2_rcnn import resolve_detectron2_config

    name = config.detector.split(":", 1)[1] if ":" in config.detector else ""
    try:
        path = resolve_detectron2_config(name)
    except CheckpointError as err:
        raise DetectorFinetuneError(str(err)) from err
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(path), allow_unsafe=False)
    except (KeyError, ValueError, TypeError, yaml.YAMLError) as err:
        raise DetectorFinetuneError(f"detectron2 config {str(path)!r} cannot be used: {err}") from err
    cfg.MODEL.WEIGHTS = ""  # init weights come from config.init only; nothing is ever downloaded
    cfg.MODEL.DEVICE = "cpu" if config.device == "cpu" else f"cuda:{config.local_rank}"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = config.score_threshold
    cfg.INPUT.MIN_SIZE_TRAIN = (config.min_size,)
    cfg.INPUT.MAX_SIZE_TRAIN = config.max_size
    cfg.INPUT.MIN_SIZE_TEST = config.min_size
    cfg.INPUT.MAX_SIZE_TEST = config.max_size
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.SOLVER.BASE_LR = config.lr
    cfg.SOLVER.MOMENTUM = config.momentum
    cfg.SOLVER.WEIGHT_DECAY = config.weight_decay
    cfg.SOLVER.IMS_PER_BATCH = config.batch_size
    cfg.SOLVER.MAX_ITER = config.iterations
    cfg.SOLVER.STEPS = tuple(step - 1 for step in config.lr_steps)  # detectron2's milestones are 0-based
    cfg.SOLVER.WARMUP_ITERS = config.warmup_iterations
    cfg.SOLVER.WARMUP_FACTOR = config.warmup_factor
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.CHECKPOINT_PERIOD = config.eval_every
    cfg.SOLVER.AMP.ENABLED = config.device == "cuda" and config.amp != "off"
    cfg.TEST.EVAL_PERIOD = config.eval_every if config.val_where is not None else 0
    cfg.DATALOADER.NUM_WORKERS = config.workers
    cfg.SEED = config.seed
    cfg.OUTPUT_DIR = str(config.out)
    cfg.freeze()
    return cfg


def _load_init(model: torch.nn.Module, init: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Load ``init`` through detectron2's checkpointer; the box predictor is dropped when the classes differ.

    Raises:
        DetectorFinetuneError: an unreadable file, or keys / shapes that do not fit outside the predictor.
    """
    from featstore.models.detectron2_rcnn import read_detectron2_checkpoint

    try:
        state_dict, heuristics = read_detectron2_checkpoint(init)
    except CheckpointError as err:
        raise DetectorFinetuneError(f"init checkpoint: {err}") from err
    checkpointer = _checkpointer(model)
    incompatible = checkpointer._load_model({"model": state_dict, "matching_heuristics": heuristics})
    dropped = [key for key, _, _ in incompatible.incorrect_shapes if key.startswith(_PREDICTOR_PREFIX)]
    misfit = [f"{key} (file {tuple(file_shape)}, model {tuple(model_shape)})"
              for key, file_shape, model_shape in incompatible.incorrect_shapes if key not in dropped]
    missing = [key for key in incompatible.missing_keys if key not in dropped]
    unexpected = list(incompatible.unexpected_keys)
    if misfit or missing or unexpected:
        parts = [f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                 for what, items in (("with other shapes", misfit), ("missing", missing), ("unexpected", unexpected))
                 if items]
        raise DetectorFinetuneError(f"init checkpoint {str(init)!r} does not fit the detectron2 model: "
                                    + "; ".join(parts))
    if dropped:
        log(f"init {init}: its box predictor ({', '.join(sorted(dropped))}) has another class count; "
            "dropped, trained from random init")
    else:
        log(f"init {init}: all {len(state_dict)} tensors loaded")
    return {"file": str(init), "sha256": file_sha256(init), "dropped": sorted(dropped)}


# ------------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def _predict(model: torch.nn.Module, dicts: Sequence[dict[str, Any]], cfg: Any) -> tuple[list[ImagePredictions],
                                                                                      list[np.ndarray]]:
    """Predictions in original pixels for each image, and the first few images as RGB (for the picture)."""
    from detectron2.data import detection_utils
    from detectron2.data.transforms import ResizeShortestEdge

    resize = ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    was_training = model.training
    model.eval()
    predictions, pictures = [], []
    try:
        for start in range(0, len(dicts), _VAL_BATCH):
            inputs = []
            for record in dicts[start:start + _VAL_BATCH]:
                image = detection_utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
                if len(pictures) < _PREDICTION_IMAGES:
                    pictures.append(image[:, :, ::-1].copy() if cfg.INPUT.FORMAT == "BGR" else image.copy())
                resized = resize.get_transform(image).apply_image(image)
                inputs.append({"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                               "height": record["height"], "width": record["width"]})
            for output in model(inputs):
                instances = output["instances"].to("cpu")
                predictions.append(ImagePredictions(boxes=instances.pred_boxes.tensor.numpy(),
                                                    scores=instances.scores.numpy(),
                                                    labels=instances.pred_classes.numpy()))
    finally:
        model.train(was_training)
    return predictions, pictures


# ------------------------------------------------------------------------------------------------
# the run


class _Run:
    """One detectron2 run: its data, model, trainer and run folder."""

    def __init__(self, config: DetectorFinetuneConfig, log: Callable[[str], None] | None,
                 world: World | None) -> None:
        from detectron2.utils import comm

        self.config = config
        self.out = config.out
        self.folder = self._check_folder()
        comm.synchronize()  # every rank has looked at the folder before the main process writes to it
        self.folder.open(world=world, echo=log)
        self.main, self.log = self.folder.main, self.folder.log
        self.failures: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.dataset_names: list[str] = []

    def _check_folder(self) -> RunFolder:
        """The run folder, checked: a resume needs the run's config.json (its init, its settings)."""
        if not self.config.resume and holds_run(self.out):
            # The contract's rule (`RunFolder.check`), in this backend's words since its first release.
            raise DetectorFinetuneError(f"{self.out} already holds a run ({CONFIG_NAME} or checkpoints); pass "
                                        "resume to continue it or choose another folder")
        folder = RunFolder.check(self.out, resume=self.config.resume, error=DetectorFinetuneError)
        if self.config.resume:
            config_file = folder.file(CONFIG_NAME)
            if not config_file.is_file():
                raise DetectorFinetuneError(f"nothing to resume in {self.out}: no {CONFIG_NAME}")
            recorded = json.loads(config_file.read_text(encoding="utf-8")).get("settings", {})
            differences = detector_resume_differences(self.config, recorded)
            if differences:
                raise DetectorFinetuneError(f"resume of {self.out} with other settings: " + "; ".join(differences))
        return folder

    # data ---------------------------------------------------------------------------------------
    def read_data(self) -> None:
        config = self.config
        try:
            labels = read_objects(config.objects, coords=config.coords).select(config.where)
        except (AnnotationError, BoxesFileError, ValueError) as err:
            raise DetectorFinetuneError(str(err)) from err
        self.class_names = _class_names(config, labels)
        try:
            train, val = labels.split(config.val_where) if config.val_where is not None else (labels, None)
        except ValueError as err:
            raise DetectorFinetuneError(str(err)) from err
        if config.limit is not None:
            train = ObjectLabels(train.images[:config.limit], train.source)
            val = None if val is None else ObjectLabels(val.images[:config.limit], val.source)
        self.train_counts = train.class_counts()
        layout = ImageLayout(config.images, config.image_pattern)
        train_records = readable_images(layout, train.images, "train", self.failures)
        val_records = [] if val is None else readable_images(layout, val.images, "val", self.failures)
        total = len(train) + (0 if val is None else len(val))
        self._write_failures()
        if len(self.failures) > config.max_failed_fraction * total or not train_records:
            first = self.failures[0] if self.failures else {"file": "", "reason": "no images"}
            raise DetectorFinetuneError(
                f"{len(self.failures)} of {total} images cannot be read (more than max_failed_fraction="
                f"{config.max_failed_fraction}); first: {first['file']}: {first['reason']} (all in failures.json)")
        self.val_truth = [record[0] for record in val_records]
        self.train_dicts, self.val_dicts = dataset_dicts(train_records), dataset_dicts(val_records)
        tag = uuid.uuid4().hex[:8]
        self.train_name, self.val_name = f"featstore_objects_{tag}_train", f"featstore_objects_{tag}_val"
        register_dataset(self.train_name, self.train_dicts, self.class_names)
        register_dataset(self.val_name, self.val_dicts, self.class_names)
        self.dataset_names = [self.train_name, self.val_name]
        self.log(f"objects: {len(train_records)} training images ({train.n_boxes} boxes), {len(val_records)} "
                 f"validation images, {len(self.class_names)} classes, {len(self.failures)} unreadable")

    def _loader(self) -> Any:
        config = self.config
        return train_loader(self.train_name, min_size=config.min_size, max_size=config.max_size,
                            image_format=self.cfg.INPUT.FORMAT, batch_size=config.batch_size, workers=config.workers,
                            seed=config.seed)

    # model --------------------------------------------------------------------------------------
    def build(self) -> None:
        from detectron2.modeling import build_model
        from detectron2.solver import build_optimizer
        from detectron2.utils import comm
        from detectron2.utils.env import seed_all_rng

        config = self.config
        seed_all_rng(config.seed + comm.get_rank())
        self.cfg = _detectron2_cfg(config, len(self.class_names))
        self.model = build_model(self.cfg)
        self.init = _load_init(self.model, config.init, self.log) if config.init is not None and not config.resume \
            else None
        if config.resume:
            self.init = json.loads(self.folder.file(CONFIG_NAME).read_text(encoding="utf-8")).get("init")
        self.optimizer = build_optimizer(self.cfg, self.model)
        self.trained = self.model
        if comm.get_world_size() > 1:
            device_ids = [config.local_rank] if config.device == "cuda" else None
            self.trained = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids,
                                                                     broadcast_buffers=False)

    def trainer(self) -> Any:
        from detectron2.engine import AMPTrainer, SimpleTrainer, hooks

        config = self.config
        loader = self._loader()
        if self.cfg.SOLVER.AMP.ENABLED:
            trainer = AMPTrainer(self.trained, loader, self.optimizer,
                                 precision=torch.bfloat16 if config.amp == "bf16" else torch.float16)
        else:
            trainer = SimpleTrainer(self.trained, loader, self.optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: config.lr_at(i) / config.lr)
        self.checkpointer = _checkpointer(self.model, self.folder.resume_state, trainer=weakref.proxy(trainer))
        trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(optimizer=self.optimizer, scheduler=scheduler),
                                _Progress(self), _Rounds(self)])
        return trainer

    # outputs ------------------------------------------------------------------------------------
    def write_config(self, start_iter: int) -> None:
        if not self.main:
            return
        config = self.config
        import detectron2

        record = {
            "settings": config.to_json(),
            "backend": "detectron2",
            "detectron2_version": detectron2.__version__,
            "featstore_version": __version__,
            "recipe": config.recipe,
            "warmup": {"kind": "linear", "iterations": config.warmup_iterations, "factor": config.warmup_factor,
                       "lr_at_0": config.lr_at(0)},
            "lr_schedule": {"lr": config.lr, "steps_1_based": list(config.lr_steps), "decay": 0.1,
                            "scheduler": "LambdaLR(lr_at): detectron2 WarmupMultiStepLR's numbers"},
            "init": self.init,
            "class_names": list(self.class_names),
            "num_classes": len(self.class_names),
            "data": {"train_images": len(self.train_dicts), "val_images": len(self.val_dicts),
                     "train_boxes": sum(self.train_counts.values()), "unreadable": len(self.failures),
                     "train_dataset": self.train_name, "val_dataset": self.val_name},
            "detectron2_config": self.cfg.dump(),
            "started_at_iteration": start_iter,
        }
        atomic_write_json(self.folder.file(CONFIG_NAME), record)

    def _write_failures(self) -> None:
        if self.main:
            atomic_write_json(self.folder.file(FAILURES_NAME), self.failures)

    def validate(self, iteration: int, loss: float | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"iteration": iteration, "loss": loss}
        if not self.val_dicts:
            self.history.append(entry)
            return entry
        started = time.perf_counter()
        predictions, pictures = _predict(self.model, self.val_dicts, self.cfg)
        try:
            result = detection_ap(self.val_truth, predictions)
        except ValueError as err:  # validation images without a single box: AP undefined
            self.log(f"iteration {iteration}: no AP ({err})")
            self.history.append(entry)
            return entry
        entry.update(detection_entry(result))
        entry["val_seconds"] = round(time.perf_counter() - started, 2)
        self.history.append(entry)
        write_per_class_ap(self.folder.file(PER_CLASS_AP_NAME), result, class_names=self.class_names,
                           train_counts=self.train_counts)
        plot_predictions(self.folder.file(PREDICTION_IMAGES_NAME), pictures, self.val_truth[:len(pictures)],
                         predictions[:len(pictures)], class_names=self.class_names,
                         title=f"{self.config.detector} iteration {iteration}")
        self.log(f"iteration {iteration}: loss {loss if loss is None else round(loss, 4)}, mAP@0.5 "
                 f"{_fmt(entry['map_50'])}, mAP@[.5:.95] {_fmt(entry['map_50_95'])}")
        return entry

    def export(self, iteration: int) -> Path:
        """``OUT/checkpoint.pt`` + ``OUT/config.yaml``: what `featstore build` loads."""
        payload = {
            "model": {key: value.detach().cpu() for key, value in self.model.state_dict().items()},
            "iteration": iteration,
            "num_classes": len(self.class_names) + 1,  # with background, as the build counts
            "class_names": list(self.class_names),
            FINETUNE_RECORD_KEY: json.loads(json.dumps({
                "backend": "detectron2", "detector": self.config.detector, "iteration": iteration,
                "class_names": list(self.class_names), "num_classes": len(self.class_names) + 1,
                "metrics": self.history[-1] if self.history else None, "out": str(self.out)}, default=str)),
        }
        refuse_non_finite(payload["model"], what=f"at iteration {iteration}")
        path = atomic_write_torch(self.folder.checkpoint, payload)
        atomic_write_text(self.folder.file(DETECTRON2_CONFIG_NAME), self.cfg.dump())
        return path

    def write_metrics(self, *, complete: bool) -> dict[str, Any]:
        validated = [entry for entry in self.history if "map_50" in entry]
        final = dict(validated[-1]) if validated else {}
        metrics = {"backend": "detectron2", "detector": self.config.detector, "complete": complete,
                   "iterations": self.history[-1]["iteration"] if self.history else 0,
                   "map_50": final.get("map_50"), "map_50_95": final.get("map_50_95"),
                   "n_classes_evaluated": final.get("n_classes_evaluated"), "history": self.history}
        atomic_write_json(self.folder.file(METRICS_NAME), metrics)
        return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


# Defined by `_make_hooks` on detectron2's HookBase (imported lazily: this module imports without detectron2).
_Progress: Any = None
_Rounds: Any = None


def _make_hooks() -> None:
    """Define `_Progress` and `_Rounds` on detectron2's ``HookBase``."""
    global _Progress, _Rounds
    from detectron2.engine import HookBase

    class Progress(HookBase):
        """A bar over the iterations (main process; ``featstore.io.progress``), the loss on it; a non-finite loss stops."""

        def __init__(self, run: _Run) -> None:
            self.run = run
            self.bar = None

        def before_train(self) -> None:
            if self.run.main and self.run.config.progress:
                self.bar = progress_bar(total=self.trainer.max_iter, initial=self.trainer.start_iter, unit="it",
                                        desc="detectron2")

        def after_step(self) -> None:
            loss = _latest_loss(self.trainer)
            if loss is not None and not math.isfinite(loss):
                raise DetectorFinetuneError(f"loss is {loss} at iteration {self.trainer.iter + 1}; lower the lr "
                                            "or lengthen the warm-up")
            if self.bar is not None:
                self.bar.update(1)
                if loss is not None:
                    self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        def after_train(self) -> None:
            if self.bar is not None:
                self.bar.close()

    class Rounds(HookBase):
        """Every eval_every iterations and at the end: validate (main process), checkpoint, export, metrics."""

        def __init__(self, run: _Run) -> None:
            self.run = run

        def after_step(self) -> None:
            from detectron2.utils import comm

            done = self.trainer.iter + 1
            if done % self.run.config.eval_every and done != self.trainer.max_iter:
                return
            if self.run.main:
                self.run.validate(done, _latest_loss(self.trainer))
                self.run.write_metrics(complete=done == self.trainer.max_iter)
                self.run.export(done)
                self.run.checkpointer.save("last", history=self.run.history)
            comm.synchronize()

    _Progress, _Rounds = Progress, Rounds



def _latest_loss(trainer: Any) -> float | None:
    latest = trainer.storage.latest()
    return float(latest["total_loss"][0]) if "total_loss" in latest else None


def _detectron2_world(config: DetectorFinetuneConfig) -> World | None:
    """The run's world, started as every trainer's is, with the local process group detectron2's ``comm`` needs.

    A process group detectron2's own ``launch`` started is taken as it is (``launch`` made the local
    group too).
    """
    from detectron2.utils import comm

    world = World.from_environment(config.device)
    if world is not None and world.owns_group:
        comm.create_local_process_group(world.local_size)
    return world


def finetune_detectron2(config: DetectorFinetuneConfig, *, log: Callable[[str], None] | None = None) -> dict:
    """Train a detectron2 detector on EPIC objects with detectron2's trainer; see the module docstring.

    Args:
        config: the run (``config.backend == "detectron2"``; ``config.detector == "detectron2:CONFIG"``).
        log: called with each log line (also written to ``OUT/log.txt``); None: stderr.
    Returns:
        The final metrics (what ``OUT/metrics.json`` holds).
    Raises:
        DetectorFinetuneError: detectron2 missing, bad data or settings, an init that does not fit,
            too many unreadable images, a NaN / infinite loss (naming the iteration), a run folder
            that already holds a run (without resume).
    """
    try:
        import detectron2  # noqa: F401
    except ImportError as err:
        raise DetectorFinetuneError("detectron2 is not installed: pip install .[detectron2] (see README)") from err
    if config.backend != "detectron2":
        raise DetectorFinetuneError(f"{config.detector!r} is not a detectron2 detector (detectron2:CONFIG)")
    _make_hooks()
    world = _detectron2_world(config)
    run: _Run | None = None
    try:
        run = _Run(config, log, world)
        run.read_data()
        run.build()
        trainer = run.trainer()
        start_iter = 0
        if config.resume:
            last = run.folder.resume_state
            if not last.is_file():
                raise DetectorFinetuneError(f"nothing to resume in {run.out}: no {RESUME_STATE_NAME}")
            state = run.checkpointer.load(str(last))  # the model, and the trainer's iteration, optimiser, lr
            run.history = list(state.get("history", []))
            start_iter = trainer.iter + 1
            run.log(f"resumed {run.out} after {start_iter} iterations")
        run.write_config(start_iter)
        run.log(f"training {config.detector} for {config.iterations} iterations, batch {config.batch_size}, "
                f"lr {config.lr} (x0.1 at {list(config.lr_steps)}, warm-up {config.warmup_iterations})")
        started = time.perf_counter()
        if start_iter < config.iterations:
            try:
                trainer.train(start_iter, config.iterations)
            except FloatingPointError as err:
                raise DetectorFinetuneError(f"stopped: {str(err).splitlines()[0]}") from err
        run.log(f"trained in {time.perf_counter() - started:.1f}s")
        metrics = run.write_metrics(complete=True) if run.main else {}
        return metrics
    finally:
        if run is not None:
            unregister_datasets(run.dataset_names)
        if world is not None:
            world.close()
