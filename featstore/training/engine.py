"""The training engine: one loop over epochs and steps, for one run or a group of runs, with hooks.

Modelled on detectron2's ``SimpleTrainer`` + ``HookBase`` (``engine/train_loop.py``): the engine owns
the loop and calls its hooks at fixed points; everything else a run does around its steps
(validation, checkpoints, the history file, log lines, progress bars, the check for a diverged loss)
is a hook (`featstore.training.hooks`), so a fix to the loop lands once for `heads train`, grouped
`heads ablate --parallel K` and the stage-1 fine-tuning of backbones and torchvision detectors.

The parts:

- a *trainable* (``Trainable``) is one run's model-side: the batches of an epoch (any iterable: index
  chunks into preloaded features, a ``DataLoader`` over decoded clips), one optimisation step
  (forward, backward, optimiser; AMP inside if it wants), and its ``state_dict`` for checkpoints;
- a ``RunState`` is the engine's view of one run: its epoch and step counters, the step losses of the
  current epoch, the history of finished epochs, its random-number stream and CUDA stream; hooks
  read and write it;
- ``Engine`` steps its runs: every round each unfinished run trains one epoch, the runs taking one
  step each in turn until all their batches are used (runs may differ in batch count and epochs);
- a ``World`` (`featstore.training.world`) is data parallelism under torchrun: a trainable shards its
  batches by rank and sums its gradients through it; the engine waits for every rank after each round.

Where a run's files go, and what they are called, is `featstore.training.run_folder`'s.

Invariants:

- Each run keeps its own torch random stream (CPU, and CUDA on a CUDA device): the engine swaps it in
  around everything the run does (its steps and its hooks) and out again, so a run trained in a group
  draws exactly the numbers it would draw alone. The stream starts from the process generator's state
  when the run is ``add``-ed: build a run's model (seeded) and add it before building the next one.
  ``Checkpointer`` saves and restores it, so a resumed run continues the stream where it stopped.
- No host-device synchronisation per step: ``train_step`` returns its loss as an unread device tensor;
  ``LossCheck`` reads an epoch's losses in one transfer after the epoch and names the epoch and step of
  the first non-finite one (the last checkpoint is then the one before that epoch).
- In a group on CUDA each run steps on its own CUDA stream, so the small kernels of K heads overlap.

Hook order is the order given to ``Engine.add``; within ``after_epoch`` a hook sees the fields that
hooks before it wrote into ``run.record`` (the epoch's history entry).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch

from featstore.training.world import World

__all__ = [
    "TrainingError",
    "Trainable",
    "RunState",
    "Hook",
    "Engine",
    "describe_error",
    "train_one",
]


class TrainingError(RuntimeError):
    """A run cannot start or cannot go on (bad selection, diverged loss, existing run directory)."""


class Trainable(Protocol):
    """One run's model-side, as the engine steps it."""

    device: torch.device  # where its steps run (the engine keeps its CUDA random stream there)

    def epoch_batches(self, epoch: int, world: World | None) -> Iterable[Any]:
        """Start 0-based ``epoch`` (learning rate, train mode, a seeded order) and return its batches.

        Under a ``world`` these are this rank's batches. Any iterable; with ``len`` the progress bar
        knows the total.
        """

    def train_step(self, batch: Any, world: World | None) -> torch.Tensor:
        """One optimisation step on ``batch``; returns its loss as a 0-d device tensor, unread."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the run (model, optimiser, scaler, settings)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the checkpoint also holds the engine's own keys)."""


@dataclass(eq=False)
class RunState:
    """The engine's view of one run; hooks read it and write ``record``.

    Attributes:
        name: the run's name, for messages.
        trainable: the run's model-side.
        epochs: how many epochs the run trains in all.
        hooks: its hooks, called in this order.
        world: the data-parallel world, or None.
        epoch: the 0-based index of the current epoch (during ``after_epoch``, the epoch just trained);
            equal to the number of finished epochs between epochs.
        step: steps taken in the current epoch (during ``after_step``, the 1-based number of that step).
        steps_in_epoch: the current epoch's number of batches when its iterable has a length.
        batch: the batch of the last step.
        loss: the last step's loss (a device tensor; reading it makes the host wait for the device).
        losses: the current epoch's step losses, unread.
        record: the current epoch's history entry (``epoch``, 1-based, and ``seconds`` from the engine;
            hooks add the rest), also the last item of ``history`` during ``after_epoch``.
        history: one record per finished epoch.
        seconds: time spent starting the current epoch and stepping it.
        error: why the run failed, or None.
        rng_state: the run's CPU random stream while it is swapped out.
        cuda_rng_state: its CUDA random stream (on a CUDA device).
        stream: its CUDA stream in a group on CUDA, else None (the default stream).
        batches: the iterator over the current epoch's batches.
    """

    name: str
    trainable: Trainable
    epochs: int
    hooks: tuple["Hook", ...]
    world: World | None = None
    epoch: int = 0
    step: int = 0
    steps_in_epoch: int | None = None
    batch: Any = None
    loss: torch.Tensor | None = None
    losses: list[torch.Tensor] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: BaseException | None = None
    rng_state: torch.Tensor | None = None
    cuda_rng_state: torch.Tensor | None = None
    stream: Any = None  # torch.cuda.Stream in a group on CUDA
    batches: Iterator[Any] | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.trainable.device)

    @property
    def active(self) -> bool:
        """Not failed and with epochs left."""
        return self.error is None and self.epoch < self.epochs

    @property
    def is_main(self) -> bool:
        return self.world is None or self.world.is_main


class Hook:
    """Called by the engine at fixed points of a run (detectron2's ``HookBase``); override what you need.

    Every method gets the run's ``RunState`` and runs with the run's random stream (and CUDA stream)
    in place. An exception fails the run (or, without ``keep_going``, the whole training).
    """

    def before_train(self, run: RunState) -> None:
        """Once, before the first epoch (e.g. resume from a checkpoint)."""

    def before_epoch(self, run: RunState) -> None:
        """After the epoch's batches were made, before its first step."""

    def after_step(self, run: RunState) -> None:
        """After each step (``run.loss`` is an unread device tensor: do not read it here)."""

    def after_epoch(self, run: RunState) -> None:
        """After the epoch's last step: check, validate, record, save, log."""

    def after_train(self, run: RunState) -> None:
        """Once at the end, also after a failure (``run.error``)."""


def describe_error(err: BaseException) -> str:
    """``Type: message`` for tables and logs (a KeyError's message unquoted, as the CLI prints it)."""
    text = str(err).strip() or repr(err)
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    return f"{type(err).__name__}: {text}"


class Engine:
    """Steps one run or a group of runs through their epochs, calling each run's hooks.

    Args:
        world: data parallelism (``World.from_environment``); None for one process.
        keep_going: when a run fails, record its ``error`` and go on with the others (a grid); when
            False the first failure propagates (one run).
        streams: step each run on its own CUDA stream; None: when more than one run is on CUDA.
        log: where the engine's own messages go (failures when ``keep_going``).
    """

    def __init__(self, *, world: World | None = None, keep_going: bool = False, streams: bool | None = None,
                 log: Callable[[str], None] = lambda message: print(message, file=sys.stderr)):
        if world is not None and keep_going:
            # A run that fails on one rank only would leave the other ranks waiting in a collective.
            raise ValueError("keep_going cannot be combined with data parallelism (a world)")
        self.world = world
        self.keep_going = keep_going
        self.streams = streams
        self.log = log
        self.runs: list[RunState] = []

    def add(self, trainable: Trainable, *, name: str, epochs: int, hooks: Sequence[Hook] = (),
            seed: int | None = None) -> RunState:
        """Add a run; its random stream starts from the process generator's state now, or from ``seed``.

        Args:
            trainable: the run's model-side (model already built and seeded).
            name: for messages.
            epochs: how many epochs it trains in all (a resumed run trains the ones left).
            hooks: called in this order.
            seed: start the run's CPU stream from this seed instead (a run that must not depend on
                what the process drew before, e.g. to retrace a resumed run from its settings alone).
        Returns:
            The run's state (filled in as it trains).
        """
        run = RunState(name=name, trainable=trainable, epochs=int(epochs), hooks=tuple(hooks), world=self.world)
        run.rng_state = torch.get_rng_state() if seed is None else torch.Generator().manual_seed(seed).get_state()
        if run.device.type == "cuda":
            run.cuda_rng_state = torch.cuda.get_rng_state(run.device)
        self.runs.append(run)
        return run

    # ---------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> list[RunState]:
        """Train every run to its last epoch (or failure).

        Returns:
            The runs' states; with ``keep_going``, failed runs carry their ``error``.
        """
        use_streams = self.streams if self.streams is not None else (
            len(self.runs) > 1 and any(r.device.type == "cuda" for r in self.runs))
        for run in self.runs:
            if use_streams and run.device.type == "cuda":
                run.stream = torch.cuda.Stream(run.device)
        started: list[RunState] = []
        try:
            for run in self.runs:
                started.append(run)
                self._guarded(run, self._call, run, "before_train")
            while True:
                active = [r for r in self.runs if r.active]
                if not active:
                    break
                for run in active:
                    self._guarded(run, self._begin_epoch, run)
                stepping = [r for r in active if r.error is None]
                while stepping:
                    stepping = [r for r in stepping if self._guarded(r, self._step, r) is True]
                for run in active:
                    if run.error is None:
                        self._guarded(run, self._end_epoch, run)
                if self.world is not None:
                    self.world.barrier()
        except BaseException:
            for run in started:
                try:
                    self._call(run, "after_train")
                except Exception as err:  # noqa: BLE001 - the error already propagating matters more
                    self.log(f"{run.name}: after a failure, a hook failed too: {describe_error(err)}")
            raise
        for run in started:
            self._guarded(run, self._call, run, "after_train")
        for run in self.runs:
            if run.stream is not None:
                # What reads the weights next (predictions, the caller) runs on the default stream.
                torch.cuda.current_stream(run.device).wait_stream(run.stream)
        return list(self.runs)

    def _guarded(self, run: RunState, action: Callable[..., Any], *args: Any) -> Any:
        """``action(*args)``; with ``keep_going`` a failure is recorded on ``run`` (returns None)."""
        try:
            return action(*args)
        except Exception as err:  # noqa: BLE001 - one run's failure must not stop the others
            if not self.keep_going:
                raise
            run.error = err
            self.log(f"{run.name}: failed: {describe_error(err)}")
            return None

    def _call(self, run: RunState, point: str) -> None:
        with self._inside(run):
            for hook in run.hooks:
                getattr(hook, point)(run)

    def _begin_epoch(self, run: RunState) -> None:
        if run.stream is not None:
            # Inputs were written on the default stream; the run's stream must see them.
            run.stream.wait_stream(torch.cuda.current_stream(run.device))
        run.seconds = 0.0
        with self._inside(run, timed=True):
            run.step, run.losses, run.batch, run.loss = 0, [], None, None
            batches = run.trainable.epoch_batches(run.epoch, self.world)
            run.steps_in_epoch = len(batches) if hasattr(batches, "__len__") else None
            run.batches = iter(batches)
            for hook in run.hooks:
                hook.before_epoch(run)

    def _step(self, run: RunState) -> bool:
        """One step of ``run``; False when its epoch has no batch left."""
        with self._inside(run, timed=True):
            try:
                batch = next(run.batches)
            except StopIteration:
                run.batches = None
                self._drain(run)  # once per epoch: the epoch's time includes its device work
                return False
            run.step += 1
            run.batch = batch
            run.loss = run.trainable.train_step(batch, self.world)
            run.losses.append(run.loss)
            for hook in run.hooks:
                hook.after_step(run)
        return True

    def _end_epoch(self, run: RunState) -> None:
        if run.stream is not None:
            torch.cuda.current_stream(run.device).wait_stream(run.stream)
        with self._inside(run):
            run.record = {"epoch": run.epoch + 1, "seconds": run.seconds}
            run.history.append(run.record)
            for hook in run.hooks:
                hook.after_epoch(run)
            run.epoch += 1
            run.batch = None

    @staticmethod
    def _drain(run: RunState) -> None:
        if run.stream is not None:
            run.stream.synchronize()
        elif run.device.type == "cuda":
            torch.cuda.synchronize(run.device)

    @contextmanager
    def _inside(self, run: RunState, *, timed: bool = False) -> Iterator[None]:
        """The run's random streams (and CUDA stream) in place; time added to ``run.seconds`` if timed."""
        saved = torch.get_rng_state()
        torch.set_rng_state(run.rng_state)
        saved_cuda = None
        if run.cuda_rng_state is not None:
            saved_cuda = torch.cuda.get_rng_state(run.device)
            torch.cuda.set_rng_state(run.cuda_rng_state, run.device)
        stream = torch.cuda.stream(run.stream) if run.stream is not None else nullcontext()
        started = time.perf_counter()
        try:
            with stream:
                yield
        finally:
            if timed:
                run.seconds += time.perf_counter() - started
            run.rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)
            if saved_cuda is not None:
                run.cuda_rng_state = torch.cuda.get_rng_state(run.device)
                torch.cuda.set_rng_state(saved_cuda, run.device)


def train_one(trainable: Trainable, *, name: str, epochs: int, hooks: Sequence[Hook], world: World | None = None,
              seed: int | None = None, log: Callable[[str], None] | None = None) -> RunState:
    """Train one run on an engine of its own (`heads train`, `featstore finetune`, the torchvision detector).

    Args:
        trainable: the run's model-side (model already built and seeded).
        name: for messages (the run folder).
        epochs: how many epochs it trains in all.
        hooks: called in this order.
        world: data parallelism (`featstore.training.world.World.from_environment`), or None.
        seed: start the run's random stream from this seed (see `Engine.add`).
        log: the engine's own messages; None: stderr.
    Returns:
        The run's state, trained (a failure propagates).
    """
    engine = Engine(world=world) if log is None else Engine(world=world, log=log)
    run = engine.add(trainable, name=name, epochs=epochs, hooks=hooks, seed=seed)
    engine.train()
    return run
