"""The hooks every trainer shares: what a run does around its steps, at the engine's fixed points.

Each is a `featstore.training.engine.Hook`; a trainer lists the ones it needs, in order (a hook's
``after_epoch`` sees what the hooks before it wrote into ``run.record``):

- ``LossCheck``: the epoch's losses read in one transfer, the first non-finite one named; the mean;
- ``LearningRate``: the epoch's learning rate into the record;
- ``Validation``: a trainer's metrics into the record;
- ``Checkpointer``: the resume state (`featstore.training.run_folder.RESUME_STATE_NAME`), loaded before
  the first epoch and written after each, with the run's random streams; it refuses to write
  non-finite weights (`refuse_non_finite`, which every checkpoint writer calls), so no finished
  run ever holds a NaN;
- ``HistoryFile``, ``HistoryCSV``, ``EpochLog``: the history as JSON and as a CSV table
  (`featstore.training.run_folder.HISTORY_CSV_NAME`), one log line per epoch;
- ``TensorBoard``: each epoch's numbers as TensorBoard scalars (the optional ``tensorboard`` package,
  imported only when asked for: `require_tensorboard` says clearly what to install);
- ``EpochCallback``, ``StepCallback``: a caller's function (tests stop or kill a run there);
- ``ProgressBar``: a bar per epoch (tqdm on a terminal, a few lines in a log).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from featstore.io.atomic import atomic_write_csv, atomic_write_json, atomic_write_torch
from featstore.io.progress import progress_bar
from featstore.training.engine import Hook, RunState, TrainingError

__all__ = [
    "non_finite_tensors",
    "refuse_non_finite",
    "LossCheck",
    "LearningRate",
    "Validation",
    "Checkpointer",
    "HistoryFile",
    "HistoryCSV",
    "history_rows",
    "TensorBoard",
    "TENSORBOARD_MISSING",
    "require_tensorboard",
    "EpochLog",
    "EpochCallback",
    "StepCallback",
    "ProgressBar",
]


def non_finite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """The names (``model.conv1.weight``) of the floating tensors in ``tree`` that hold a nan or an inf.

    Args:
        tree: a tensor, or dicts / lists / tuples of them (a state dict, a checkpoint payload).
        prefix: the name of ``tree`` itself.
    """
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            return [] if bool(torch.isfinite(tree).all()) else [prefix or "tensor"]
        return []
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    found = []
    for key, value in items:
        found += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def refuse_non_finite(tree: Any, *, what: str, error: type[Exception] = TrainingError, hint: str = "") -> None:
    """Stop before a checkpoint with a nan or inf is written: a finished run never holds one.

    Args:
        tree: what is about to be written.
        what: names the moment for the message (``"after epoch 3"``).
        error: the exception type raised (a trainer's own).
        hint: appended to the message (what the user can do).
    Raises:
        error: naming how many tensors and the first few.
    """
    bad = non_finite_tensors(tree)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise error(f"the weights are not finite {what} ({len(bad)} tensor(s): {shown}); nothing was written, "
                    f"the last checkpoint is the previous one's{hint or '; lower the learning rate (--lr)'}")


class LossCheck(Hook):
    """After each epoch: read its step losses in one transfer, fail on a non-finite one, record the mean.

    Args:
        hint: appended to the error message (what the user can do about it).
        where: ``where(epoch, step)`` (both 1-based) names the step in the message; default
            ``"epoch E, step S"`` (an iteration-based trainer names its iteration).
        error: the exception type raised (a trainer's own error type).
        every: also check every this many steps within an epoch (one host-device transfer each), so
            a long epoch stops soon after its loss diverges; None: after the epoch only. Under a
            world every rank must see the same losses (``World.sum_gradients`` returns the summed
            one), so that all ranks stop at the same step.
    """

    def __init__(self, *, hint: str = "", where: Callable[[int, int], str] | None = None,
                 error: type[Exception] = TrainingError, every: int | None = None):
        self.hint = hint
        self.where = where or (lambda epoch, step: f"epoch {epoch}, step {step}")
        self.error = error
        self.every = every
        self.values: list[float] = []  # the current epoch's losses read so far

    def before_epoch(self, run: RunState) -> None:
        self.values = []

    def after_step(self, run: RunState) -> None:
        if self.every is not None and run.step % self.every == 0:
            self._read(run)

    def after_epoch(self, run: RunState) -> None:
        self._read(run)
        run.record["loss"] = sum(self.values) / max(len(self.values), 1)

    def _read(self, run: RunState) -> None:
        pending = run.losses[len(self.values):]
        values = torch.stack(pending).float().cpu().tolist() if pending else []
        for step, value in enumerate(values, start=len(self.values) + 1):
            if not math.isfinite(value):
                raise self.error(f"loss is {value} at {self.where(run.epoch + 1, step)}{self.hint}")
        self.values.extend(values)


class LearningRate(Hook):
    """Records the learning rate the epoch trained with (the first parameter group's)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def after_epoch(self, run: RunState) -> None:
        run.record["lr"] = self.optimizer.param_groups[0]["lr"]


class Validation(Hook):
    """After each epoch: ``evaluate()``'s metrics into the record, each key prefixed (``val_verb_top1``).

    Args:
        evaluate: returns metric name -> value on the validation data.
        prefix: put before each key.
    """

    def __init__(self, evaluate: Callable[[], Mapping[str, Any]], *, prefix: str = "val_"):
        self.evaluate, self.prefix = evaluate, prefix

    def after_epoch(self, run: RunState) -> None:
        run.record.update({f"{self.prefix}{k}": v for k, v in self.evaluate().items()})


class Checkpointer(Hook):
    """Resume from ``path`` before training; write it after every epoch.

    The checkpoint holds the trainable's ``state_dict`` plus ``epoch`` (finished epochs), ``history``
    and ``rng`` (the run's random streams), so a resumed run reaches the uninterrupted run's result.

    Args:
        path: the checkpoint file.
        resume: load ``path`` before the first epoch when it exists.
        save: write it after each epoch (False on ranks other than the main one).
        on_resume: called after loading (e.g. to log "resuming after epoch N").
        error: raised (a trainer's own type) when the weights to write are not finite.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = True, save: bool = True,
                 on_resume: Callable[[RunState], None] | None = None, error: type[Exception] = TrainingError):
        self.path, self.resume, self.save, self.on_resume = Path(path), resume, save, on_resume
        self.error = error

    def before_train(self, run: RunState) -> None:
        if not (self.resume and self.path.exists()):
            return
        state = torch.load(self.path, map_location=run.device, weights_only=False)
        run.trainable.load_state_dict(state)
        run.epoch = int(state["epoch"])
        run.history = list(state.get("history", []))
        rng = state.get("rng") or {}
        if rng.get("cpu") is not None:
            torch.set_rng_state(rng["cpu"].cpu())
        if rng.get("cuda") is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), run.device)
        if self.on_resume is not None:
            self.on_resume(run)

    def after_epoch(self, run: RunState) -> None:
        state = run.trainable.state_dict()
        # Every rank checks (their weights are the same), so that all stop together.
        refuse_non_finite(state, what=f"after epoch {run.epoch + 1}", error=self.error)
        if not self.save:
            return
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
        atomic_write_torch(self.path, {**state, "epoch": run.epoch + 1, "history": run.history, "rng": rng})


class HistoryFile(Hook):
    """Writes the history (one record per finished epoch) as JSON after every epoch, atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def after_epoch(self, run: RunState) -> None:
        atomic_write_json(self.path, run.history)


def history_rows(history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The history as a table: every key in order of first appearance; a missing or None value is an
    empty cell, a list or dict its JSON (a spreadsheet reads the numbers, a program the JSON).

    Returns:
        (columns, rows).
    """
    columns: list[str] = []
    for record in history:
        columns += [key for key in record if key not in columns]

    def cell(value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, (list, tuple, dict)):
            return json.dumps(value)
        return value

    return columns, [[cell(record.get(key)) for key in columns] for record in history]


class HistoryCSV(Hook):
    """Writes the history as a CSV table (one row per finished epoch or round) after every epoch, atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def after_epoch(self, run: RunState) -> None:
        atomic_write_csv(self.path, *history_rows(run.history))


TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package, which is not installed: "
                       "pip install 'featstore[tensorboard]' (or pip install tensorboard)")


def require_tensorboard(error: type[Exception] = TrainingError) -> Callable[..., Any]:
    """torch's ``SummaryWriter`` class, imported now (the ``tensorboard`` package is an optional extra).

    A trainer calls it before any work, so that a missing package stops the run before it writes anything.

    Raises:
        error: the package is missing, saying what to install.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise error(TENSORBOARD_MISSING) from err
    return SummaryWriter


class TensorBoard(Hook):
    """Each epoch's numbers (loss, learning rate, validation metrics, speed) as TensorBoard scalars.

    The scalars are the epoch record's numeric entries, tagged by their key (``val_`` keys under
    ``val/``), at the record's ``step`` entry (``epoch``; ``iteration`` for a detector). A resumed run
    purges what a killed predecessor wrote after its last checkpoint, so the curves have no doubled steps.

    Args:
        log_dir: the event files' folder (``--tensorboard DIR``).
        step: the record key that is the x axis.
        writer: ``writer(log_dir, purge_step)`` makes the writer; default torch's ``SummaryWriter``
            (`require_tensorboard`).
        error: raised (a trainer's own type) when the package is missing.
    """

    def __init__(self, log_dir: str | os.PathLike, *, step: str = "epoch",
                 writer: Callable[[str, int | None], Any] | None = None, error: type[Exception] = TrainingError):
        self.log_dir, self.step = Path(log_dir), step
        if writer is None:
            summary_writer = require_tensorboard(error)

            def writer(log_dir: str, purge_step: int | None) -> Any:
                return summary_writer(log_dir=log_dir, purge_step=purge_step)

        self.make_writer = writer
        self.writer: Any = None

    def after_epoch(self, run: RunState) -> None:
        step = int(run.record.get(self.step, run.epoch + 1))
        if self.writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # Steps from here on that a killed predecessor wrote are dropped (None: a fresh run).
            self.writer = self.make_writer(str(self.log_dir), step if run.epoch > 0 else None)
        for key, value in run.record.items():
            if key == self.step or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                tag = f"val/{key[4:]}" if key.startswith("val_") else key
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def after_train(self, run: RunState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EpochLog(Hook):
    """One line per epoch: ``log(prefix + line(record))``."""

    def __init__(self, log: Callable[[str], None], line: Callable[[Mapping[str, Any]], str], *, prefix: str = ""):
        self.log, self.line, self.prefix = log, line, prefix

    def after_epoch(self, run: RunState) -> None:
        self.log(self.prefix + self.line(run.record))


class EpochCallback(Hook):
    """Calls ``callback(finished_epochs)`` after each epoch, last (tests stop or kill a run here)."""

    def __init__(self, callback: Callable[[int], None]):
        self.callback = callback

    def after_epoch(self, run: RunState) -> None:
        self.callback(run.epoch + 1)


class StepCallback(Hook):
    """Calls ``callback(epoch, step)`` (0-based epoch, 1-based step) after each step (tests interrupt here)."""

    def __init__(self, callback: Callable[[int, int], None]):
        self.callback = callback

    def after_step(self, run: RunState) -> None:
        self.callback(run.epoch, run.step)


class ProgressBar(Hook):
    """A bar per epoch on stderr: steps, or items (clips, segments) when ``count`` is given.

    On a terminal it is tqdm's; in a log (stderr a file or pipe) a slow epoch gets a line at its
    quarters and a fast one none, since ``EpochLog`` writes each epoch's line
    (``featstore.io.progress``).

    Args:
        unit: what is counted (``step``, ``clip``); tqdm shows it per second.
        count: ``count(batch) -> int`` items of a batch (read on the host, e.g. ``len(labels)``);
            None counts steps.
        total: ``total(run) -> int | None`` items of the epoch; None: its number of batches when
            counting steps, unknown otherwise.
        label: put before ``epoch E/N`` in the bar (e.g. the run's name in a group).
    """

    def __init__(self, *, unit: str = "step", count: Callable[[Any], int] | None = None,
                 total: Callable[[RunState], int | None] | None = None, label: str = ""):
        self.unit, self.count, self.total, self.label = unit, count, total, label
        self.bar = None

    def before_epoch(self, run: RunState) -> None:
        total = self.total(run) if self.total is not None else (run.steps_in_epoch if self.count is None else None)
        self.bar = progress_bar(total=total, desc=f"{self.label}epoch {run.epoch + 1}/{run.epochs}", unit=self.unit,
                                leave=False, plain="slow")

    def after_step(self, run: RunState) -> None:
        if self.bar is not None:
            self.bar.update(1 if self.count is None else self.count(run.batch))

    def after_epoch(self, run: RunState) -> None:
        self.after_train(run)

    def after_train(self, run: RunState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
