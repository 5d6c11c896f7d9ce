"""The head trainer: `heads train` as a Python call.

One run = one head on one store selection. Features are preloaded once (``heads.data``); each
epoch is a seeded permutation of the training rows cut into batches; after each epoch the run is
evaluated on the validation selection and an atomic checkpoint is written, so ``resume=True``
continues an interrupted run to exactly the result of an uninterrupted one (on CPU).

Run directory (DESIGN section 6): ``config.json``, ``metrics.json``, ``predictions.parquet``,
``history.json``, ``checkpoints/last.pt``, ``curves.png``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featstore.atomic import atomic_write, atomic_write_json, remove_temporaries
from featstore.schema import DET_GLOBAL_FEAT, DET_LOCAL_FEAT, NOUN_GLOBAL, VERB_GLOBAL
from featstore.splits import resolve_selection
from featstore.store import FeatureStore
from heads import data as head_data
from heads.evaluation import (
    NUM_CLASSES,
    action_prior_for,
    load_class_sets,
    many_shot_from_training,
    score,
)
from heads.models import FeatureDims, build_head, check_fields, get_head, head_loss
from heads.predictions import Predictions, write_predictions


class TrainingError(RuntimeError):
    """A run cannot start or cannot go on (bad selection, diverged loss, existing run directory)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one run (made at the edge, unpacked once; recorded in config.json)."""

    model: str = "saoa"  # registered head name
    switches: dict[str, Any] = field(default_factory=dict)  # the head's ablation switches
    train_split: str | None = None  # named split (featstore.splits), ANDed with train_where
    train_where: str | None = None  # DuckDB WHERE over segments
    val_split: str | None = None
    val_where: str | None = None
    epochs: int = 15  # paper: 15
    batch_size: int = 32  # paper: 32
    lr: float = 1e-4  # paper: 1e-4 constant, 1e-3 then 1e-4 (I3D)
    lr_steps: tuple[int, ...] = ()  # epochs (1-based) at whose start the lr drops x0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    action_prior: str = "lfb"  # 'lfb' | 'none'
    dataset: str | None = None  # epic55 | epic100; from the store's segments when None
    meta_dir: str | None = None  # class / many-shot / tail lists; the annotation file's folder when None
    memory_budget_gb: float | None = None  # above it, stream from LMDB; None: half the device's free memory
    pool: str = "avg"  # local alignment pooling after RoIAlign (ours: avg; SlowFast/LFB: max)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lr_steps"] = list(self.lr_steps)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["lr_steps"] = tuple(values.get("lr_steps", ()))
        return cls(**values)


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: x0.1 for each step in ``lr_steps`` already reached."""
    drops = sum(1 for step in config.lr_steps if epoch + 1 >= step)
    return config.lr * (0.1 ** drops)


def feature_dims(store: FeatureStore) -> FeatureDims:
    """Head dimensions from the store's field schema (nothing hard-codes 2048)."""
    fields = store.fields

    def dim(name: str, axis: int, default: int = 0) -> int:
        return int(fields[name].shape[axis]) if name in fields else default

    return FeatureDims(
        verb_dim=dim(VERB_GLOBAL, 0), noun_dim=dim(NOUN_GLOBAL, 0),
        det_dim=dim(DET_GLOBAL_FEAT, -1, dim(DET_LOCAL_FEAT, -1)),
        n_global=dim(DET_GLOBAL_FEAT, 0, 60), n_local=dim(DET_LOCAL_FEAT, 0, 40),
    )


def store_dataset(store: FeatureStore) -> str:
    with store.connect() as con:
        found = [r[0] for r in con.execute("select distinct dataset from segments where dataset is not null").fetchall()]
    if len(found) == 1:
        return found[0]
    if not found:
        return "epic55"
    raise TrainingError(f"{store.path} mixes datasets {found}; pass --dataset")


def default_meta_dir(store: FeatureStore) -> str | None:
    annotations = store.manifest.get("provenance", {}).get("annotations")
    return str(Path(annotations).parent) if annotations else None


def _save_checkpoint(path: Path, payload: Any) -> None:
    def write(tmp: Path) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a failed write (full disk, file size limit) as an
            # "enforce fail ... unexpected pos" RuntimeError that names neither file nor cause.
            raise TrainingError(f"cannot write the checkpoint {path} (is the disk full?): {err}") from err

    atomic_write(path, write)


def _remove_temporaries(out: Path) -> None:
    """Delete the hidden ``.NAME.HEX.tmp`` files of the run's own writes that a killed or failed run
    never finished (checkpoint, JSON, predictions): nothing reads them, and a checkpoint's can be large."""
    remove_temporaries(out, ("config.json", "history.json", "metrics.json", "predictions.parquet", "curves.png"))
    remove_temporaries(out / "checkpoints", ("last.pt",))


@dataclass
class PreparedRun:
    """Everything a run needs before its first step; several runs may share ``train``/``val`` data."""

    config: TrainConfig
    store: FeatureStore
    dims: FeatureDims
    num_verbs: int
    num_nouns: int
    dataset: str
    fields: tuple[str, ...]
    train: Any  # PreloadedFeatures | StreamingFeatures
    val: Any | None
    class_sets: Any
    prior: np.ndarray | None
    train_pairs: set[tuple[int, int]]


def prepare(store_path: str | os.PathLike, config: TrainConfig, *, log: Callable[[str], None] = head_data.default_log,
            shared: dict | None = None) -> PreparedRun:
    """Open the store, resolve selections, check fields, load features (shared across runs via ``shared``)."""
    store = FeatureStore.open(store_path)
    try:
        record = get_head(config.model)
        record.check_switches(config.switches)
    except (KeyError, TypeError) as err:  # the registry's own messages name the head and switches
        raise TrainingError(err.args[0]) from err
    check_fields(config.model, store.fields, **config.switches)
    fields = record.required_fields(**config.switches)
    dataset = config.dataset or store_dataset(store)
    if dataset not in NUM_CLASSES:
        raise TrainingError(f"unknown dataset {dataset!r}; use epic55 or epic100")
    num_verbs, num_nouns = NUM_CLASSES[dataset]
    train_where = resolve_selection(config.train_split, config.train_where)
    val_where = resolve_selection(config.val_split, config.val_where)
    train_labels = head_data.selection_labels(store, train_where)
    if not train_labels.uids:
        raise TrainingError(f"the training selection ({train_where or 'all'}) holds no stored segments")
    if not train_labels.labelled:
        raise TrainingError("the training selection has segments without verb/noun labels (a test set?)")
    val_labels = head_data.selection_labels(store, val_where) if (val_where is not None) else None
    if val_labels is not None and not val_labels.uids:
        raise TrainingError(f"the validation selection ({val_where}) holds no stored segments")
    shared = {} if shared is None else shared

    def features(labels):
        # Keyed by the budget as configured, not as computed: the default (half the free memory)
        # shrinks once the first run's features are loaded, and a key holding it made every later
        # run of a grid load its features again.
        key = (str(store.path), labels.uids, tuple(sorted(fields)), config.pool, config.device,
               config.memory_budget_gb)
        if key not in shared:
            budget = (head_data.default_memory_budget(config.device) if config.memory_budget_gb is None
                      else int(config.memory_budget_gb * 2**30))
            shared[key] = head_data.load_features(store, labels, fields, device=config.device, memory_budget=budget,
                                                  pool=config.pool, log=log)
        return shared[key]

    train = features(train_labels)
    val = features(val_labels) if val_labels is not None else None
    verbs, nouns = train_labels.verb.numpy(), train_labels.noun.numpy()
    meta = load_class_sets(config.meta_dir or default_meta_dir(store), dataset)
    if meta is not None:
        num_verbs, num_nouns = meta.num_verbs, meta.num_nouns
    class_sets = meta if meta is not None else many_shot_from_training(verbs, nouns, dataset)
    prior = action_prior_for(config.action_prior, verbs, nouns, num_verbs, num_nouns)
    return PreparedRun(config, store, feature_dims(store), num_verbs, num_nouns, dataset, tuple(fields), train, val,
                       class_sets, prior, {(int(v), int(n)) for v, n in zip(verbs, nouns)})


@torch.no_grad()
def predict(model: torch.nn.Module, features, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every row of ``features``, in order: ((N, V), (N, Nn)) float32."""
    model.eval()
    verbs, nouns = [], []
    order = torch.arange(len(features))
    for batch, _, _ in features.batches(order, batch_size):
        out = model(batch)
        verbs.append(out["verb_logits"].float().cpu())
        nouns.append(out["noun_logits"].float().cpu())
    model.train()
    return torch.cat(verbs).numpy(), torch.cat(nouns).numpy()


def evaluate(run: PreparedRun, model: torch.nn.Module) -> tuple[Predictions, dict[str, float]]:
    """Predictions and metrics on the run's validation selection."""
    verb_logits, noun_logits = predict(model, run.val)
    labels = run.val.labels
    preds = Predictions(labels.uids, verb_logits, noun_logits)
    if not labels.labelled:
        return preds, {}
    metrics = score(verb_logits, noun_logits, labels.verb.numpy(), labels.noun.numpy(), dataset=run.dataset,
                    class_sets=run.class_sets, participants=labels.table.column("participant_id").to_pylist(),
                    prior=run.prior, train_pairs=run.train_pairs)
    return preds, metrics


class RunState:
    """Model, optimiser and history of one run, with checkpointing."""

    def __init__(self, run: PreparedRun, out_dir: Path):
        config = run.config
        self.run = run
        self.out_dir = out_dir
        torch.manual_seed(config.seed)
        self.model = build_head(config.model, dims=run.dims, num_verbs=run.num_verbs, num_nouns=run.num_nouns,
                                **config.switches).to(config.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    def save(self) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(self.checkpoint_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
            "history": self.history, "config": self.run.config.to_json(),
        })
        atomic_write_json(self.out_dir / "history.json", self.history)

    def load(self) -> None:
        state = torch.load(self.checkpoint_path, map_location=self.run.config.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])

    def begin_epoch(self) -> list[torch.Tensor]:
        """Set this epoch's lr and return its batches of training rows (a seeded permutation)."""
        config = self.run.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(config, self.epoch)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.run.train), generator=generator)
        self.model.train()
        return head_data.chunk_order(order, config.batch_size)

    def step(self, batch: dict[str, torch.Tensor] | None, verbs: torch.Tensor, nouns: torch.Tensor, *,
             batch_rows: int, world: "Distributed | None" = None) -> torch.Tensor:
        """One SGD step on ``batch``: this process's share of a batch of ``batch_rows`` rows.

        Under data parallelism each rank's loss is its share of the batch's mean loss, and the
        gradients are summed across ranks, which gives exactly the one-process gradient.

        Returns:
            The batch's mean loss as a 0-d tensor on the device. It is not read here: reading it
            would make the host wait for the device every step; ``epoch_loss`` checks them all.
        """
        self.optimizer.zero_grad(set_to_none=False)
        loss_value = torch.zeros((), device=self.run.config.device)
        if batch is not None and len(verbs):
            loss = head_loss(self.model(batch), verbs, nouns)["total"] * (len(verbs) / batch_rows)
            loss.backward()
            loss_value = loss.detach()
        for param in self.model.parameters():
            if param.grad is None:  # unused this step: a zero gradient, so every rank steps the same way
                param.grad = torch.zeros_like(param)
        if world is not None:
            loss_value = world.sum_gradients(self.model, loss_value)
        self.optimizer.step()
        return loss_value

    def epoch_loss(self, losses: list[torch.Tensor]) -> float:
        """The mean of an epoch's step losses.

        Raises:
            TrainingError: a step's loss was NaN or inf, naming the epoch and the step.
        """
        values = torch.stack(losses).float().cpu().tolist() if losses else []
        for step, value in enumerate(values, start=1):
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at epoch {self.epoch + 1}, step {step}: lower --lr, or check the "
                    f"store for extreme values (featstore verify)")
        return sum(values) / max(len(values), 1)

    def end_epoch(self, loss: float, seconds: float, *, log: Callable[[str], None] | None = None,
                  main_process: bool = True) -> dict[str, Any]:
        """After an epoch's steps: validate, append to the history, checkpoint (main process only).

        Returns:
            The epoch's history entry.
        """
        config = self.run.config
        entry: dict[str, Any] = {"epoch": self.epoch + 1, "loss": loss, "lr": lr_at(config, self.epoch),
                                 "seconds": seconds}
        if self.run.val is not None and main_process:
            _, metrics = evaluate(self.run, self.model)
            entry.update({f"val_{k}": v for k, v in metrics.items()})
        self.epoch += 1
        self.history.append(entry)
        if main_process:
            self.save()
            if log is not None:
                log(_epoch_line(entry))
        return entry

    def train_epoch(self, progress: bool = False, world: "Distributed | None" = None) -> float:
        """One epoch; returns the mean training loss."""
        chunks = self.begin_epoch()
        if world is not None:
            sizes = [len(c) for c in chunks]
            chunks = [c[world.rank::world.size] for c in chunks]
        else:
            sizes = [len(c) for c in chunks]
        bar = _bar(len(chunks), f"epoch {self.epoch + 1}/{self.run.config.epochs}", progress)
        losses = []
        for (batch, verbs, nouns), rows in zip(self.run.train.batches_of(chunks), sizes):
            losses.append(self.step(batch, verbs, nouns, batch_rows=rows, world=world))
            bar.update(1)
        bar.close()
        return self.epoch_loss(losses)


class Distributed:
    """Data parallelism under torchrun: gloo on CPU, nccl on GPU; gradients summed by all-reduce."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    @classmethod
    def from_environment(cls, device: str) -> "Distributed | None":
        """A context when launched by torchrun with more than one process, else None."""
        return cls(device) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    def sum_gradients(self, model: torch.nn.Module, loss_value: torch.Tensor) -> torch.Tensor:
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss_value.reshape(1).to(grads[0].dtype)])
        self.dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return flat[-1]

    def barrier(self) -> None:
        self.dist.barrier()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr, leave=False)


def train(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = head_data.default_log,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train one head and write its run directory.

    Args:
        store_path: the feature store.
        out_dir: the run directory.
        config: the run's settings.
        resume: continue from ``out_dir/checkpoints/last.pt``.
        progress: progress bars on stderr.
        log: where one-line messages go.
        after_epoch: called with the number of finished epochs after each checkpoint (tests kill here).
    Returns:
        The final metrics (also in metrics.json).
    """
    out = Path(out_dir)
    if (out / "checkpoints" / "last.pt").exists() and not resume:
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    # Under torchrun every rank trains on its share of each batch; rank 0 alone writes the run.
    world = Distributed.from_environment(config.device)
    main_process = world is None or world.is_main
    if world is not None and config.device.startswith("cuda"):
        config = dataclasses.replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    run = prepare(store_path, config, log=log if main_process else (lambda _: None))
    out.mkdir(parents=True, exist_ok=True)  # only once the store opened: a refused run leaves no trace
    if main_process:
        _remove_temporaries(out)
    state = RunState(run, out)
    if resume and state.checkpoint_path.exists():
        state.load()
        log(f"resuming {out} after epoch {state.epoch}")
    if main_process:
        write_config(out, run)
    while state.epoch < config.epochs:
        started = time.perf_counter()
        loss = state.train_epoch(progress and main_process, world=world)
        state.end_epoch(loss, time.perf_counter() - started, log=log, main_process=main_process)
        if world is not None:
            world.barrier()
        if after_epoch is not None:
            after_epoch(state.epoch)
    if not main_process:
        return {}
    return finish(out, run, state)


def _epoch_line(entry: dict[str, Any]) -> str:
    parts = [f"epoch {entry['epoch']}", f"loss {entry['loss']:.4f}"]
    for key in ("val_verb_top1", "val_noun_top1", "val_action_top1"):
        if key in entry:
            parts.append(f"{key[4:]} {entry[key]:.2f}")
    return "  ".join(parts)


def write_config(out: Path, run: PreparedRun) -> None:
    atomic_write_json(out / "config.json", {
        **run.config.to_json(),
        "store": str(run.store.path.resolve()),
        "manifest_sha256": run.store.manifest_hash,
        "n_train": len(run.train),
        "n_val": len(run.val) if run.val is not None else 0,
        "data_mode": run.train.mode,
        "dataset": run.dataset,
        "num_verbs": run.num_verbs,
        "num_nouns": run.num_nouns,
        "fields": list(run.fields),
        "dims": dataclasses.asdict(run.dims),
        "class_lists": getattr(run.class_sets, "source", "official"),
    })


def finish(out: Path, run: PreparedRun, state: RunState) -> dict[str, float]:
    """Write predictions, metrics and curves of a finished run."""
    metrics: dict[str, float] = {}
    try:
        if run.val is not None:
            preds, metrics = evaluate(run, state.model)
            write_predictions(out / "predictions.parquet", preds)
        atomic_write_json(out / "metrics.json", metrics)
        from heads.plots import plot_training_curves

        plot_training_curves(state.history, out / "curves.png", title=f"{run.config.model} on {run.store.path.name}")
    except BaseException:
        _remove_temporaries(out)  # predictions and curves write their own temporaries
        raise
    return metrics


def load_run(run_dir: str | os.PathLike, *, device: str | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """A finished (or checkpointed) run's recorded config and its model, ready for inference."""
    run_dir = Path(run_dir)
    config_path, checkpoint = run_dir / "config.json", run_dir / "checkpoints" / "last.pt"
    if not config_path.is_file() or not checkpoint.is_file():
        raise TrainingError(f"{run_dir} is not a run directory (config.json and checkpoints/last.pt expected)")
    recorded = json.loads(config_path.read_text())
    config = TrainConfig.from_json(recorded)
    model = build_head(config.model, dims=FeatureDims(**recorded["dims"]), num_verbs=recorded["num_verbs"],
                       num_nouns=recorded["num_nouns"], **config.switches)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return recorded, model.to(device or config.device).eval()


def predict_selection(run_dir: str | os.PathLike, *, store_path: str | os.PathLike | None = None,
                      where: str | None = None, split: str | None = None, device: str | None = None,
                      log: Callable[[str], None] = head_data.default_log) -> tuple[Predictions, Any]:
    """Logits of a trained run on any selection of a store (its own store by default).

    Returns:
        (predictions, the selection's ``SegmentLabels``).
    """
    recorded, model = load_run(run_dir, device=device)
    store = FeatureStore.open(store_path or recorded["store"])
    check_fields(recorded["model"], store.fields, **recorded["switches"])
    labels = head_data.selection_labels(store, resolve_selection(split, where))
    if not labels.uids:
        raise TrainingError(f"the selection ({where or split or 'all'}) holds no stored segments of {store.path}")
    features = head_data.load_features(store, labels, recorded["fields"], device=device or recorded["device"],
                                       pool=recorded.get("pool", "avg"), log=log)
    verb_logits, noun_logits = predict(model, features)
    return Predictions(labels.uids, verb_logits, noun_logits), labels


def evaluate_run(run_dir: str | os.PathLike, *, where: str | None = None, split: str | None = None,
                 device: str | None = None, log: Callable[[str], None] = head_data.default_log) -> dict[str, float]:
    """Metrics of a trained run on a selection of its store (the run's validation selection by default)."""
    recorded = json.loads((Path(run_dir) / "config.json").read_text())
    if where is None and split is None:
        split, where = recorded.get("val_split"), recorded.get("val_where")
    config = TrainConfig.from_json({**recorded, "val_split": split, "val_where": where, "epochs": 0})
    run = prepare(recorded["store"], config, log=log)
    _, model = load_run(run_dir, device=device)
    if run.val is None:
        raise TrainingError("no evaluation selection: pass --where or --split")
    return evaluate(run, model)[1]
