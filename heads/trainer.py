"""The head trainer: `heads train` as a Python call.

One run = one head on one store selection. Features are preloaded once (``heads.data``); each
epoch is a seeded permutation of the training rows cut into batches; after each epoch the run is
evaluated on the validation selection and an atomic checkpoint is written, so ``resume=True``
continues an interrupted run to exactly the result of an uninterrupted one (on CPU).

The loop is ``featstore.training.engine.Engine``'s: ``HeadTrainable`` is the run's trainable (its
batches and SGD step) and ``run_hooks`` its hooks (loss check, validation, checkpoint, history, log
line, progress), the same for `heads train` and for the runs `heads ablate` trains in groups.

Run directory (DESIGN section 6; names from `featstore.training.run_folder`): ``config.json``,
``metrics.json``, ``predictions.parquet`` (with a validation selection), ``history.json``,
``history.csv``, ``checkpoint.pt`` (the weights, written when the run finishes; half precision on
request), ``checkpoints/last.pt`` (the resume state, deleted when the run finishes unless kept),
``curves.png``.

config.json records the store relative to the run when both lie in one project folder
(`featstore.training.run_folder.record_path`), so a project moved whole still evaluates; `run_store`
reads it back (an absolute path as before, ``--store`` overriding). metrics.json's ``warnings`` list
what looks wrong about the finished run (`run_warnings`: a head at chance, a store without detections);
the run also prints them.

config.json records every head switch with its effective value and where it came from
(``switch_sources``: the user, the store, the head's default; ``heads.switches``). metrics.json
holds, besides the metrics, ``normalize`` (the I3D scheme's value and why) for heads that have the
switch, and ``many_shot_actions`` (EPIC-55: the list the class-aware action metrics used).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from featstore.epic.splits import resolve_selection
from featstore.io.atomic import atomic_write_json, atomic_write_torch
from featstore.store.reader import FeatureStore
from featstore.store.health import coverage_warning, detection_coverage
from featstore.store.schema import (
    BOX_PARTS,
    BOX_SETS,
    DET_GLOBAL_FEAT,
    DET_LOCAL_FEAT,
    NOUN_GLOBAL,
    VERB_GLOBAL,
    det_field,
)
from featstore.training.engine import Hook, TrainingError, train_one
from featstore.training.hooks import (
    Checkpointer,
    EpochCallback,
    EpochLog,
    HistoryCSV,
    HistoryFile,
    LearningRate,
    LossCheck,
    ProgressBar,
    TensorBoard,
    Validation,
    require_tensorboard,
)
from featstore.training.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    CURVES_NAME,
    HISTORY_CSV_NAME,
    HISTORY_NAME,
    METRICS_NAME,
    PREDICTIONS_NAME,
    RESUME_STATE_NAME,
    RunFolder,
    record_path,
    remove_run_temporaries,
    resolve_recorded_path,
)
from featstore.training.world import World
from heads import data as head_data
from heads.actions import rank_classes
from heads.evaluation import NUM_CLASSES, ScoringContext, TrainingLabels, scoring_context
from heads.metric_registry import epoch_line
from heads.metrics import chance_top1
from heads.models import FeatureDims, build_head, check_fields, get_head, head_loss
from heads.predictions import Predictions, write_predictions
from heads.switches import ResolvedSwitches, recorded_switches, resolve_switches
from heads.views import TrainingViews, resolve_view_mode

__all__ = [
    "TrainingError",
    "TrainConfig",
    "lr_at",
    "feature_dims",
    "store_dataset",
    "default_meta_dir",
    "PreparedRun",
    "training_labels",
    "run_training_labels",
    "run_config",
    "run_store",
    "run_scoring",
    "prepare",
    "predict",
    "evaluate",
    "HeadBatch",
    "HeadTrainable",
    "run_hooks",
    "train",
    "write_config",
    "uses_detections",
    "run_warnings",
    "write_weights",
    "finish",
    "load_run",
    "predict_selection",
    "RunEvaluation",
    "run_evaluation",
    "evaluate_run",
]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one run (made at the edge, unpacked once; recorded in config.json)."""

    model: str = "saoa"  # registered head name
    switches: dict[str, Any] = field(default_factory=dict)  # the head's ablation switches
    train_split: str | None = None  # named split (featstore.epic.splits), ANDed with train_where
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
    # Temporal views (docs/views.md): 'random' reads one view of each training segment per epoch,
    # 'first' view 0 only; None: 'random' on a store with views. Evaluation always reads view 0.
    views: str | None = None

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
        field_shapes=tuple((name, spec.shape) for name, spec in sorted(fields.items())),
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


@dataclass
class PreparedRun:
    """Everything a run needs before its first step; several runs may share ``train``/``val`` data.

    Attributes:
        config: the run's settings.
        store: the opened store.
        dims: feature sizes of the store.
        fields: the store fields the head reads.
        train: the training features (``PreloadedFeatures`` or ``StreamingFeatures``).
        val: the validation features, or None.
        scoring: dataset, class counts and lists, prior and training pairs (``scoring_context``).
        switches: every switch's effective value and source (``config.switches`` holds the values).
    """

    config: TrainConfig
    store: FeatureStore
    dims: FeatureDims
    fields: tuple[str, ...]
    train: Any  # PreloadedFeatures | StreamingFeatures
    val: Any | None
    scoring: ScoringContext
    switches: ResolvedSwitches | None = None
    views: TrainingViews | None = None  # the training segments' view draws (heads.views)

    @property
    def dataset(self) -> str:
        return self.scoring.dataset

    @property
    def num_verbs(self) -> int:
        return self.scoring.num_verbs

    @property
    def num_nouns(self) -> int:
        return self.scoring.num_nouns


def training_labels(store: FeatureStore, config: TrainConfig) -> head_data.SegmentLabels:
    """The labelled segments of the run's training selection.

    Raises:
        TrainingError: the selection is empty or holds unlabelled segments.
    """
    train_where = resolve_selection(config.train_split, config.train_where)
    labels = head_data.selection_labels(store, train_where)
    if not labels.uids:
        raise TrainingError(f"the training selection ({train_where or 'all'}) holds no stored segments")
    if not labels.labelled:
        raise TrainingError("the training selection has segments without verb/noun labels (a test set?)")
    return labels


def _split_labels(store: FeatureStore, config: TrainConfig, labels: head_data.SegmentLabels) -> TrainingLabels:
    where = resolve_selection(config.train_split, config.train_where)
    return TrainingLabels(labels.verb.numpy(), labels.noun.numpy(),
                          f"the training selection ({where or 'all segments'}) of {store.path}")


def run_store(run_dir: str | os.PathLike, recorded: Mapping[str, Any] | None = None, *,
              store: str | os.PathLike | None = None) -> Path:
    """The store a recorded run trained on, where it is now.

    Args:
        run_dir: the run folder.
        recorded: its config.json (read when None).
        store: an override (``--store``): the store moved on its own, or a copy of it.
    Returns:
        ``store`` when given; else the recorded path, taken from the run folder when relative (a
        project moved whole), else as recorded (runs recorded before relative paths: absolute).
    """
    if store is not None:
        return Path(store)
    if recorded is None:
        recorded = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    return resolve_recorded_path(recorded["store"], run_dir, fallback=recorded.get("store_resolved"))


def run_config(path: str | os.PathLike) -> tuple[TrainConfig, Path]:
    """A recorded run's settings, to train it again (`heads train --config`).

    Args:
        path: the run's ``config.json``, or its folder.
    Returns:
        Its `TrainConfig` and its store (`run_store`). The switches are the ones its user gave; any
        other whose value the store and the head's defaults would now resolve differently is pinned
        to the value the run trained with, so the run trains again exactly (and records the same
        sources when nothing changed).
    Raises:
        TrainingError: not a head run's config.json.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TrainingError(f"{path}: not a readable config.json ({err})") from err
    if not isinstance(recorded, dict) or "model" not in recorded or "store" not in recorded:
        raise TrainingError(f"{path} is not the config.json of a heads run (no model / store)")
    store = run_store(path.parent, recorded)
    trained = recorded_switches(recorded)
    sources = recorded.get("switch_sources") or {}
    switches = {name: value for name, value in trained.items() if not sources or sources.get(name) == "given"}
    try:
        now = resolve_switches(str(recorded["model"]), switches, FeatureStore.open(store).manifest).values
        switches.update({name: value for name, value in trained.items() if now.get(name) != value})
    except Exception:  # noqa: BLE001 - an unknown head or an unreadable store: the run's own start says why
        switches = trained
    return TrainConfig.from_json({**recorded, "switches": switches}), store


def run_training_labels(run_dir: str | os.PathLike, *, store_path: str | os.PathLike | None = None) -> TrainingLabels:
    """The training split of a recorded run: its store's labels of its training selection.

    Args:
        run_dir: the run folder.
        store_path: the run's store when it is not where the run recorded it.
    Raises:
        StoreError: the run's store cannot be opened; TrainingError: its selection is empty there.
    """
    recorded = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    store = FeatureStore.open(run_store(run_dir, recorded, store=store_path))
    config = TrainConfig.from_json(recorded)
    return _split_labels(store, config, training_labels(store, config))


def run_scoring(store: FeatureStore, config: TrainConfig, *, train_labels: head_data.SegmentLabels | None = None,
                dataset: str | None = None, training: TrainingLabels | None = None,
                num_verbs: int | None = None, num_nouns: int | None = None) -> ScoringContext:
    """How a run scores: its dataset and class lists, its training split's pairs, and the prior.

    The many-shot actions are always restricted to the pairs of the run's training selection; the
    prior is counted on that selection, or on ``training`` when given.

    Args:
        store: the run's store.
        config: the run's settings (``dataset``, ``meta_dir``, ``action_prior``, the training selection).
        train_labels: its training selection's labels when already read (else read here).
        dataset: the dataset when already resolved (a run's config.json); else from config / store.
        training: count the prior on these labels instead (``--action-prior-from``; kind ``lfb``).
        num_verbs: V of the predictions when known.
        num_nouns: Nn.
    Returns:
        The scoring context.
    """
    dataset = dataset or config.dataset or store_dataset(store)
    if dataset not in NUM_CLASSES:
        raise TrainingError(f"unknown dataset {dataset!r}; use epic55 or epic100")
    train_labels = train_labels if train_labels is not None else training_labels(store, config)
    split = _split_labels(store, config, train_labels)
    return scoring_context(dataset, meta_dir=config.meta_dir or default_meta_dir(store), training=split,
                           action_prior=config.action_prior, num_verbs=num_verbs, num_nouns=num_nouns,
                           prior_labels=training)


def prepare(store_path: str | os.PathLike, config: TrainConfig, *, log: Callable[[str], None] = head_data.default_log,
            shared: dict | None = None) -> PreparedRun:
    """Open the store, resolve selections, check fields, load features (shared across runs via ``shared``)."""
    store = FeatureStore.open(store_path)
    try:
        record = get_head(config.model)
        switches = resolve_switches(record, config.switches, store.manifest)
    except (KeyError, TypeError) as err:  # the registry's own messages name the head and switches
        raise TrainingError(err.args[0]) from err
    for note in switches.notes.values():
        log(note)
    config = dataclasses.replace(config, switches=switches.values)
    check_fields(config.model, store.fields, **config.switches)
    fields = record.required_fields(**config.switches)
    dataset = config.dataset or store_dataset(store)
    if dataset not in NUM_CLASSES:
        raise TrainingError(f"unknown dataset {dataset!r}; use epic55 or epic100")
    train_labels = training_labels(store, config)
    val_where = resolve_selection(config.val_split, config.val_where)
    val_labels = head_data.selection_labels(store, val_where) if (val_where is not None) else None
    if val_labels is not None and not val_labels.uids:
        raise TrainingError(f"the validation selection ({val_where}) holds no stored segments")
    shared = {} if shared is None else shared
    try:
        view_mode = resolve_view_mode(config.views, store.max_views)
    except ValueError as err:
        raise TrainingError(str(err)) from err

    def features(labels, views=False):
        # Keyed by the budget as configured, not as computed: the default (half the free memory)
        # shrinks once the first run's features are loaded, and a key holding it made every later
        # run of a grid load its features again.
        key = (str(store.path), labels.uids, tuple(sorted(fields)), config.pool, config.device,
               config.memory_budget_gb, views)
        if key not in shared:
            budget = (head_data.default_memory_budget(config.device) if config.memory_budget_gb is None
                      else int(config.memory_budget_gb * 2**30))
            shared[key] = head_data.load_features(store, labels, fields, device=config.device, memory_budget=budget,
                                                  pool=config.pool, log=log, views=views)
        return shared[key]

    train = features(train_labels, views=view_mode == "random")
    views = TrainingViews.of(train_labels.uids, train.views.counts, mode=view_mode, seed=config.seed,
                             store_views=store.max_views, stored_counts=store.view_counts(train_labels.uids))
    val = features(val_labels) if val_labels is not None else None
    scoring = run_scoring(store, config, train_labels=train_labels, dataset=dataset)
    return PreparedRun(config, store, feature_dims(store), tuple(fields), train, val, scoring, switches, views)


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
    metrics = run.scoring.score(verb_logits, noun_logits, labels.verb.numpy(), labels.noun.numpy(),
                                participants=labels.table.column("participant_id").to_pylist())
    return preds, metrics


class HeadBatch(NamedTuple):
    """One training step's data: this process's rows of a batch of ``rows`` rows."""

    inputs: dict[str, torch.Tensor] | None
    verbs: torch.Tensor  # (B,) int64
    nouns: torch.Tensor  # (B,) int64
    rows: int  # the whole batch's rows over every rank (the loss is this process's share of its mean)


class EpochBatches:
    """An epoch's batches: chunks of row numbers gathered from the features one step at a time."""

    def __init__(self, features: Any, chunks: Sequence[torch.Tensor], rows: Sequence[int]):
        self.features, self.chunks, self.rows = features, chunks, rows

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[HeadBatch]:
        for (inputs, verbs, nouns), rows in zip(self.features.batches_of(self.chunks), self.rows):
            yield HeadBatch(inputs, verbs, nouns, rows)


class HeadTrainable:
    """One head run as the engine steps it (``featstore.training.engine.Trainable``): model, SGD, seeded batch order.

    Building it seeds torch's generator with the run's seed and draws the initial weights, so add it to
    the engine before building another run.
    """

    def __init__(self, run: PreparedRun):
        config = run.config
        self.run = run
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.model = build_head(config.model, dims=run.dims, num_verbs=run.num_verbs, num_nouns=run.num_nouns,
                                **config.switches).to(config.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)

    def epoch_batches(self, epoch: int, world: World | None) -> EpochBatches:
        """Set epoch ``epoch``'s lr and return its batches: a permutation seeded by (seed, epoch), each
        segment read at the view drawn for it this epoch (``heads.views``; view 0 without views).

        Under data parallelism every rank cuts the same batches and takes its share of each one.
        """
        config = self.run.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(config, epoch)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(self.run.train), generator=generator)
        if self.run.views is not None and self.run.views.mode == "random":
            # The features' rows of this epoch's views: an index into the stored views, no copy.
            order = self.run.train.views.rows_of(order, self.run.views.draw(epoch).index_select(0, order))
        self.model.train()
        chunks = head_data.chunk_order(order, config.batch_size)
        rows = [len(c) for c in chunks]
        if world is not None:
            chunks = [world.shard(c) for c in chunks]
        return EpochBatches(self.run.train, chunks, rows)

    def train_step(self, batch: HeadBatch, world: World | None) -> torch.Tensor:
        """One SGD step on this process's share of a batch.

        Under data parallelism each rank's loss is its share of the batch's mean loss, and the
        gradients are summed across ranks, which gives exactly the one-process gradient.

        Returns:
            The batch's mean loss as a 0-d tensor on the device, unread (``LossCheck`` reads an
            epoch's losses at once).
        """
        self.optimizer.zero_grad(set_to_none=False)
        loss_value = torch.zeros((), device=self.device)
        if batch.inputs is not None and len(batch.verbs):
            loss = head_loss(self.model(batch.inputs), batch.verbs, batch.nouns)["total"] * (
                len(batch.verbs) / batch.rows)
            loss.backward()
            loss_value = loss.detach()
        for param in self.model.parameters():
            if param.grad is None:  # unused this step: a zero gradient, so every rank steps the same way
                param.grad = torch.zeros_like(param)
        if world is not None:
            loss_value = world.sum_gradients(self.model.parameters(), loss_value)
        self.optimizer.step()
        return loss_value

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": self.run.config.to_json()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


DIVERGED_HINT = ": lower --lr, or check the store for extreme values (featstore verify)"


def run_hooks(run: PreparedRun, head: HeadTrainable, out: Path, *, resume: bool, log: Callable[[str], None],
              label: str = "", progress: bool = False, main_process: bool = True,
              after_epoch: Callable[[int], None] | None = None,
              tensorboard: str | os.PathLike | None = None) -> list[Hook]:
    """The hooks of a head run, in order: progress, loss check, lr, validation, checkpoint, history
    (JSON and CSV), TensorBoard, log.

    Files are written and validation runs on the main process only; every process resumes.

    Args:
        run: the prepared run.
        head: its trainable.
        out: the run directory.
        resume: continue from the resume state (``out/checkpoints/last.pt``) when it exists.
        log: one-line messages (the epoch line, "resuming ...").
        label: put before each message (a grid's run name).
        progress: a progress bar per epoch.
        main_process: this process validates and writes.
        after_epoch: called with the number of finished epochs, last (tests kill here).
        tensorboard: also write each epoch's scalars there (TensorBoard event files), or None.
    Returns:
        The hooks.
    """
    hooks: list[Hook] = []
    if progress and main_process:
        hooks.append(ProgressBar(label=label))
    hooks += [LossCheck(hint=DIVERGED_HINT), LearningRate(head.optimizer)]
    if run.val is not None and main_process:
        hooks.append(Validation(lambda: evaluate(run, head.model)[1]))
    hooks.append(Checkpointer(out / RESUME_STATE_NAME, resume=resume, save=main_process,
                              on_resume=lambda state: log(f"{label}resuming {'' if label else f'{out} '}after "
                                                          f"epoch {state.epoch}")))
    if main_process:
        hooks += [HistoryFile(out / HISTORY_NAME), HistoryCSV(out / HISTORY_CSV_NAME)]
        if tensorboard is not None:
            hooks.append(TensorBoard(tensorboard, error=TrainingError))
        hooks.append(EpochLog(log, epoch_line, prefix=label))
    if after_epoch is not None:
        hooks.append(EpochCallback(after_epoch))
    return hooks


def train(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = head_data.default_log,
    after_epoch: Callable[[int], None] | None = None,
    tensorboard: str | os.PathLike | None = None,
    half_checkpoint: bool = False,
    keep_resume_state: bool = False,
) -> dict[str, Any]:
    """Train one head and write its run directory.

    Args:
        store_path: the feature store.
        out_dir: the run directory.
        config: the run's settings.
        resume: continue the run in ``out_dir`` (from its ``checkpoints/last.pt`` when it has one).
        progress: progress bars on stderr.
        log: where one-line messages go.
        after_epoch: called with the number of finished epochs after each checkpoint (tests kill here).
        tensorboard: also write each epoch's scalars to this folder as TensorBoard events.
        half_checkpoint: write ``checkpoint.pt``'s floating weights in half precision.
        keep_resume_state: keep ``checkpoints/last.pt`` when the run finishes (to extend it later).
    Returns:
        The metrics.json object: the final metrics, the run's records (`run_records`) and its
        ``warnings`` (empty when nothing looks wrong).
    """
    out = Path(out_dir)
    if tensorboard is not None:
        require_tensorboard(TrainingError)  # before anything is written
    folder = RunFolder.check(out, resume=resume, error=TrainingError)
    if folder.finished:
        recorded = json.loads(folder.file(CONFIG_NAME).read_text())
        log(f"{out} is finished; nothing to resume")
        return folder.finished_metrics(asked=config.epochs, done=int(recorded["epochs"]), unit="epoch",
                                       error=TrainingError)
    # Under torchrun every rank trains on its share of each batch; rank 0 alone writes the run.
    world = World.from_environment(config.device)
    main_process = world is None or world.is_main
    if world is not None:
        config = dataclasses.replace(config, device=world.local_device(config.device))
    run = prepare(store_path, config, log=log if main_process else (lambda _: None))
    folder.open(world=world, echo=log, log_file=False)  # only once the store opened: a refused run leaves no trace
    if main_process:
        write_config(out, run)
    head = HeadTrainable(run)
    state = train_one(head, name=str(out), epochs=config.epochs, world=world, log=log,
                      hooks=run_hooks(run, head, out, resume=resume, log=log, progress=progress,
                                      main_process=main_process, after_epoch=after_epoch, tensorboard=tensorboard))
    if not main_process:
        return {}
    return finish(out, run, head.model, state.history, half_checkpoint=half_checkpoint,
                  keep_resume_state=keep_resume_state, log=log)


def write_config(out: Path, run: PreparedRun) -> None:
    atomic_write_json(out / CONFIG_NAME, {
        **run.config.to_json(),
        # Relative to the run inside one project folder (moved whole, it still opens); the absolute
        # path too, for a run moved without its store.
        "store": record_path(run.store.path, out),
        "store_resolved": str(run.store.path.resolve()),
        "manifest_sha256": run.store.manifest_hash,
        "n_train": len(run.train),
        "n_val": len(run.val) if run.val is not None else 0,
        "data_mode": run.train.mode,
        "dataset": run.dataset,
        "num_verbs": run.num_verbs,
        "num_nouns": run.num_nouns,
        "fields": list(run.fields),
        "dims": dataclasses.asdict(run.dims),
        "class_lists": getattr(run.scoring.class_sets, "source", "official"),
        "switch_sources": {} if run.switches is None else run.switches.sources,
    })


def run_records(run: PreparedRun) -> dict[str, Any]:
    """metrics.json's entries besides the metrics: ``normalize`` (value, source, why; heads with the
    switch) and ``many_shot_actions`` (EPIC-55: the list used, its size and source)."""
    records: dict[str, Any] = dict(run.scoring.records())
    normalize = None if run.switches is None else run.switches.record("normalize")
    if normalize is not None:
        records["normalize"] = normalize
    if run.views is not None and (run.views.store_views > 1 or run.config.views is not None):
        records["views"] = run.views.record(run.config.epochs)  # stores without views: as before
    return records


def uses_detections(fields: Sequence[str]) -> bool:
    """Whether a head reading ``fields`` reads the detector's boxes (its object branches)."""
    detection_fields = {det_field(box_set, part) for box_set in BOX_SETS for part in BOX_PARTS}
    return any(field in detection_fields for field in fields)


def run_warnings(run: PreparedRun, metrics: Mapping[str, Any], preds: Predictions | None) -> list[str]:
    """What looks wrong about a finished run, one line each (metrics.json's ``warnings``).

    - a store whose detection slots are almost all empty, for a head that reads them
      (`featstore.store.health.coverage_warning`);
    - a verb or noun top-1 at or below chance (`heads.metrics.chance_top1`: the better of always
      answering the most frequent training class and a uniform guess), and a head that answers one
      class for every validation segment.
    """
    warnings = []
    if uses_detections(run.fields):
        empty = coverage_warning(detection_coverage(run.store), where=str(run.store.path))
        if empty is not None:
            warnings.append(empty)
    if preds is None or not run.val.labels.labelled:
        return warnings
    for task, logits in (("verb", preds.verb_logits), ("noun", preds.noun_logits)):
        top1 = metrics.get(f"{task}_top1")
        if top1 is None:
            continue
        chance = chance_top1(getattr(run.train.labels, task).numpy(), getattr(run.val.labels, task).numpy())
        answered = np.unique(rank_classes(logits)[:, 0]) if len(logits) > 1 else np.array([])
        constant = (f"it answers {task} class {int(answered[0])} for all {len(logits)} validation segments"
                    if len(answered) == 1 else "")
        if top1 <= chance + 1e-6:
            warnings.append(f"{task} top-1 {top1:.1f} % is at chance ({chance:.1f} %: always the most frequent "
                            f"training class, or a uniform guess){'; ' + constant if constant else ''}: the head "
                            "learnt nothing usable")
        elif constant:
            warnings.append(f"{task} top-1 {top1:.1f} %, but {constant}: the head ignores its input")
    return warnings


def write_weights(path: str | os.PathLike, model: torch.nn.Module, *, half: bool = False) -> Path:
    """``checkpoint.pt``: the head's weights only (``{"model": state_dict}``), what `load_run` reads.

    Args:
        path: the file.
        model: the trained head.
        half: floating tensors in float16 (half the size; loading casts them back to the model's dtype).
    """
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if half:
        state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    return atomic_write_torch(path, {"model": state, "half": half})


def finish(out: Path, run: PreparedRun, model: torch.nn.Module, history: Sequence[dict[str, Any]], *,
           half_checkpoint: bool = False, keep_resume_state: bool = False,
           log: Callable[[str], None] = head_data.default_log) -> dict[str, Any]:
    """Write predictions, metrics, curves and weights of a finished run; delete its resume state.

    Args:
        out: the run directory.
        run: the prepared run.
        model: the trained head.
        history: one record per epoch (``RunState.history``).
        half_checkpoint: ``checkpoint.pt`` in half precision.
        keep_resume_state: keep ``checkpoints/last.pt`` (else deleted once ``checkpoint.pt`` is written).
        log: where the run's warnings are printed.
    Returns:
        The metrics.json object: the metrics, the run's records (`run_records`) and ``warnings``.
    """
    metrics: dict[str, Any] = {}
    preds = None
    try:
        if run.val is not None:
            preds, metrics = evaluate(run, model)
            labels = run.val.labels
            write_predictions(out / PREDICTIONS_NAME, preds, verb_labels=labels.verb.numpy(),
                              noun_labels=labels.noun.numpy(), prior=run.scoring.prior)
        warnings = run_warnings(run, metrics, preds)
        metrics = {**metrics, **run_records(run), "warnings": warnings}
        atomic_write_json(out / METRICS_NAME, metrics)
        from heads.plots import plot_training_curves

        plot_training_curves(history, out / CURVES_NAME, title=f"{run.config.model} on {run.store.path.name}")
        write_weights(out / CHECKPOINT_NAME, model, half=half_checkpoint)
    except BaseException:
        remove_run_temporaries(out)  # predictions and curves write their own temporaries
        raise
    for warning in warnings:
        log(f"WARNING: {out}: {warning}")
    if not keep_resume_state:
        RunFolder(out).drop_resume_state()
    return metrics


def load_run(run_dir: str | os.PathLike, *, device: str | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """A finished (or checkpointed) run's recorded config and its model, ready for inference.

    The weights are ``checkpoint.pt``'s (a finished run), else the resume state's (a run not
    finished yet, or recorded before runs wrote ``checkpoint.pt``).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    checkpoint = next((run_dir / name for name in (CHECKPOINT_NAME, RESUME_STATE_NAME) if (run_dir / name).is_file()),
                      None)
    if not config_path.is_file() or checkpoint is None:
        raise TrainingError(f"{run_dir} is not a run directory ({CONFIG_NAME} and {CHECKPOINT_NAME} or "
                            f"{RESUME_STATE_NAME} expected)")
    recorded = json.loads(config_path.read_text())
    config = TrainConfig.from_json(recorded)
    model = build_head(config.model, dims=FeatureDims(**recorded["dims"]), num_verbs=recorded["num_verbs"],
                       num_nouns=recorded["num_nouns"], **recorded_switches(recorded))
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
    store = FeatureStore.open(run_store(run_dir, recorded, store=store_path))
    check_fields(recorded["model"], store.fields, **recorded_switches(recorded))
    labels = head_data.selection_labels(store, resolve_selection(split, where))
    if not labels.uids:
        raise TrainingError(f"the selection ({where or split or 'all'}) holds no stored segments of {store.path}")
    features = head_data.load_features(store, labels, recorded["fields"], device=device or recorded["device"],
                                       pool=recorded.get("pool", "avg"), log=log)
    verb_logits, noun_logits = predict(model, features)
    return Predictions(labels.uids, verb_logits, noun_logits), labels


@dataclass(frozen=True)
class RunEvaluation:
    """A trained run evaluated on a selection: what `heads eval` prints and its ``--per-class`` report reads.

    Attributes:
        metrics: metric -> percent.
        predictions: the logits of the selection's segments.
        labels: their ``SegmentLabels`` (verb, noun, participants).
        scoring: how they were scored (dataset, class lists, prior).
        meta_dir: the folder of the class lists the run scored with, or None.
        annotations: the annotation file the store was built from (its provenance), or None.
    """

    metrics: dict[str, float]
    predictions: Predictions
    labels: Any
    scoring: ScoringContext
    meta_dir: str | None
    annotations: str | None = None


def run_evaluation(run_dir: str | os.PathLike, *, where: str | None = None, split: str | None = None,
                   device: str | None = None, store_path: str | os.PathLike | None = None,
                   log: Callable[[str], None] = head_data.default_log) -> RunEvaluation:
    """A trained run on a selection of its store (the run's validation selection by default).

    Args:
        run_dir: the run folder.
        where: a DuckDB WHERE over the store's segments.
        split: a named split instead.
        device: default the run's.
        store_path: the run's store when it is not where the run recorded it (``--store``).
        log: one-line messages.
    """
    recorded = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    if where is None and split is None:
        split, where = recorded.get("val_split"), recorded.get("val_where")
    config = TrainConfig.from_json({**recorded, "val_split": split, "val_where": where, "epochs": 0,
                                    "switches": recorded_switches(recorded)})
    run = prepare(run_store(run_dir, recorded, store=store_path), config, log=log)
    _, model = load_run(run_dir, device=device)
    if run.val is None:
        raise TrainingError("no evaluation selection: pass --where or --split")
    preds, metrics = evaluate(run, model)
    return RunEvaluation(metrics, preds, run.val.labels, run.scoring, config.meta_dir or default_meta_dir(run.store),
                         run.store.manifest.get("provenance", {}).get("annotations"))


def evaluate_run(run_dir: str | os.PathLike, *, where: str | None = None, split: str | None = None,
                 device: str | None = None, store_path: str | os.PathLike | None = None,
                 log: Callable[[str], None] = head_data.default_log) -> dict[str, float]:
    """Metrics of a trained run on a selection of its store (the run's validation selection by default);
    ``store_path`` overrides where the run recorded its store."""
    return run_evaluation(run_dir, where=where, split=split, device=device, store_path=store_path, log=log).metrics
