"""`heads ablate`: a grid of runs on one store, trained alone or K at a time, gathered in one table.

Grid file (TOML, read with ``tomllib``)::

    # Settings every run starts from: any TrainConfig field (`heads train` settings).
    [base]
    train_where = "participant_id <= 'P25'"   # or train_split = "epic55-lfb-train"
    val_where = "participant_id > 'P25'"
    epochs = 15
    lr = 1e-3
    lr_steps = [11]
    seeds = [0, 1, 2]        # optional: every run is trained once per seed

    [[run]]
    name = "saoa"            # the run directory (DIR/saoa/...) and the "Method" row of results.md
    model = "saoa"

    [[run]]
    name = "saoa-no-gating"
    model = "saoa"
    no_gating = true         # flat switch: `no_<switch> = true` means `<switch> = false`

    [[run]]
    name = "sap-no-relation"
    model = "sap"
    switches = { relation = false }   # the same as a table

    [[run]]
    name = "global"
    model = "global"
    seeds = [0]              # a run's own `seeds` (or `seed`) replaces the base's

Rules:

- A ``[[run]]`` holds ``name`` and overrides of any ``[base]`` setting. Switches may be a
  ``switches`` table or flat keys: a switch name (``gating = false``) or ``no_<switch> = true``.
  Switches set in ``[base]`` apply only to runs whose head has them (so ``no_gating = true`` in the
  base does not break a ``global`` run); switches set in a ``[[run]]`` are passed as given and a head
  refuses one it does not have (that run fails, the others go on).
- ``seeds = [0, 1, 2]`` expands a run into one run per seed, written to ``DIR/<name>/seed<s>/`` and
  named ``<name>/seed<s>``; without ``seeds`` the run is ``DIR/<name>/`` with the base's (or its
  own) ``seed`` (TrainConfig default 0). results.md reports mean ± standard deviation over the seeds
  of each ``name``.
- Unknown keys, duplicate names and malformed values are refused up front (``GridError``); a run
  that cannot start (unknown model, bad WHERE clause, missing store field) or that fails while
  training is recorded as failed and does not stop the others.

Outputs in ``DIR``: one normal run directory per run (``heads.trainer`` layout), ``results.parquet``
(one row per run: status, error, every setting, every metric), ``results.md`` (Table 1 of the report:
Method | Model | Switches | Runs | Actions | Verbs | Nouns top-1/top-5, mean ± std over seeds, then
the failed runs) and ``results.png`` (top-1 / top-5 bars with the spread over seeds).

Resuming: a run is finished when its ``metrics.json`` exists; a rerun skips finished runs, continues
runs with a checkpoint from their last finished epoch, and retries failed runs. A finished or
checkpointed run whose recorded settings differ from the grid's (other than ``device``) is reported
as failed rather than silently reused or overwritten.

Grouped training (``parallel=K``): K runs share the preloaded features (``prepare(shared=...)``)
and one device, and are stepped together inside one loop over steps; each keeps its own seeded batch
order, optimiser and torch RNG stream, so a run trained in a group gives exactly the same results as
the same run trained alone (``heads.trainer.train``) on CPU. On CUDA each run steps on its own stream,
so the small kernels of K heads can overlap, and losses are read once per epoch instead of per step
(a non-finite loss therefore fails the run at the end of that epoch, not at the step itself; the
run's last checkpoint is from the epoch before either way). The step loop mirrors
``RunState.train_epoch`` line for line; ``tests/heads/test_ablation.py`` pins the equality.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from featstore.atomic import atomic_write, atomic_write_text
from featstore.figures import pyplot, save_figure
from heads import data as head_data
from heads.models import get_head, list_heads
from heads.trainer import (
    PreparedRun,
    RunState,
    TrainConfig,
    finish,
    prepare,
    write_config,
)

__all__ = [
    "GridError",
    "GridRun",
    "Grid",
    "GridResults",
    "parse_grid",
    "load_grid",
    "run_grid",
    "ablate",
    "results_table",
    "write_results",
    "switch_label",
    "write_results_markdown",
    "plot_grid_results",
    "TABLE_METRICS",
]

# The columns of the report's Table 1, in its order: Actions, Verbs, Nouns; top-1, top-5.
TABLE_METRICS = ("action_top1", "action_top5", "verb_top1", "verb_top5", "noun_top1", "noun_top5")
# Settings that may differ between a recorded run and the grid without making the run another run.
_IGNORED_WHEN_COMPARING = ("device",)
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Keys of [base] / [[run]] that are not TrainConfig fields.
_GRID_KEYS = {"seeds", "switches"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class GridError(ValueError):
    """The grid file is malformed (unknown key, duplicate name, bad value); nothing was trained."""


@dataclass(frozen=True)
class GridRun:
    """One run of a grid.

    Attributes:
        name: its directory under the grid's output folder, e.g. ``saoa`` or ``saoa/seed1``.
        method: the ``[[run]]`` name it came from (results.md aggregates seeds per method).
        config: its full settings.
    """

    name: str
    method: str
    config: TrainConfig


@dataclass(frozen=True)
class Grid:
    """The expanded runs of a grid file, in file order (seeds expanded in the order given)."""

    runs: tuple[GridRun, ...]
    source: str | None = None

    def __post_init__(self) -> None:
        names = [r.name for r in self.runs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise GridError(f"duplicate run name(s): {', '.join(duplicated)}")


@dataclass(frozen=True)
class GridResults:
    """What ``run_grid`` did.

    Attributes:
        table: the results.parquet table (one row per run, grid order).
        trained: names of the runs trained (or continued) by this call.
        skipped: names of the runs already finished before this call.
        failed: name -> error of the runs that failed.
        out: the grid's output folder.
    """

    table: pa.Table
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: dict[str, str]
    out: Path


# --------------------------------------------------------------------------------------------------
# grid file


def _all_switches() -> dict[str, Any]:
    """Every switch name any registered head has -> a default (for recognising flat switch keys)."""
    names: dict[str, Any] = {}
    for head in list_heads():
        names.update(get_head(head).switches())
    return names


def _split_settings(table: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any], list[int] | None]:
    """Split one [base] / [[run]] table into TrainConfig settings, switches and seeds.

    Returns:
        (settings, switches, seeds or None).
    """
    known_switches = _all_switches()
    settings: dict[str, Any] = {}
    switches: dict[str, Any] = {}
    seeds = None

    def set_switch(name: str, value: Any, key: str) -> None:
        if name in switches and switches[name] != value:
            raise GridError(f"{where}: switch {name!r} is set twice with different values (last by {key!r})")
        switches[name] = value

    for key, value in table.items():
        if key == "name":
            continue
        if key == "seeds":
            if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                   for s in value):
                raise GridError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
            if len(set(value)) != len(value):
                raise GridError(f"{where}: seeds {value} repeat a seed")
            seeds = list(value)
        elif key == "switches":
            if not isinstance(value, dict):
                raise GridError(f"{where}: switches must be a table, e.g. switches = {{ gating = false }}")
            for name, switch_value in value.items():
                set_switch(name, switch_value, f"switches.{name}")
        elif key in _CONFIG_FIELDS:
            settings[key] = value
        elif key in known_switches:
            set_switch(key, value, key)
        elif key.startswith("no_") and key[3:] in known_switches:
            if not isinstance(value, bool):
                raise GridError(f"{where}: {key} must be true or false, got {value!r}")
            set_switch(key[3:], not value, key)
        else:
            raise GridError(
                f"{where}: unknown key {key!r}; use a TrainConfig field ({', '.join(sorted(_CONFIG_FIELDS))}), "
                f"seeds, switches, or a switch ({', '.join(sorted(known_switches))}, or no_<switch>)")
    if "seed" in settings and seeds is not None:
        raise GridError(f"{where}: give either seed or seeds, not both")
    if "lr_steps" in settings:
        steps = settings["lr_steps"]
        if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
            raise GridError(f"{where}: lr_steps must be a list of integers, got {steps!r}")
        settings["lr_steps"] = tuple(steps)
    return settings, switches, seeds


def _head_switches(model: Any) -> set[str] | None:
    """The switch names of head ``model``; None when it is not a registered head (that run will fail)."""
    try:
        return set(get_head(str(model)).switches())
    except KeyError:
        return None


def parse_grid(data: dict[str, Any], *, device: str | None = None, source: str | None = None) -> Grid:
    """Expand a parsed grid (the TOML's dict) into runs.

    Args:
        data: ``{"base": {...}, "run": [{...}, ...]}`` as ``tomllib`` returns it.
        device: when given, replaces every run's ``device`` (the CLI's ``--device``).
        source: where the grid came from, for messages.
    Returns:
        The grid; raises ``GridError`` on any malformed entry.
    """
    where = source or "grid"
    unknown = sorted(set(data) - {"base", "run"})
    if unknown:
        raise GridError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; expected [base] and [[run]]")
    base_table = data.get("base", {})
    entries = data.get("run", [])
    if not isinstance(base_table, dict):
        raise GridError(f"{where}: [base] must be a table")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise GridError(f"{where}: no runs; add [[run]] entries with a name")
    if "name" in base_table:
        raise GridError(f"{where}: [base] cannot have a name; names belong to [[run]] entries")
    base, base_switches, base_seeds = _split_settings(base_table, f"{where} [base]")
    runs: list[GridRun] = []
    for position, entry in enumerate(entries, start=1):
        name = entry.get("name")
        label = f"{where} [[run]] #{position}" + (f" ({name})" if name else "")
        if not isinstance(name, str) or not _NAME.match(name):
            raise GridError(f"{label}: needs a name of letters, digits and _ . + = - (it names a directory), "
                            f"got {name!r}")
        settings, switches, seeds = _split_settings(entry, label)
        merged = {**base, **settings}
        if "seed" in settings:
            seeds = None  # the run's own single seed replaces the base's seed list
        elif seeds is None:
            seeds = base_seeds
        model = merged.get("model", TrainConfig.model)
        has = _head_switches(model)
        # Base switches are defaults for every head that has them; the run's own are taken as given.
        inherited = {k: v for k, v in base_switches.items() if has is None or k in has}
        merged["switches"] = {**inherited, **switches}
        if device is not None:
            merged["device"] = device
        try:
            config = TrainConfig(**merged)
        except TypeError as err:
            raise GridError(f"{label}: {err}") from err
        if seeds is None:
            runs.append(GridRun(name, name, config))
        else:
            runs.extend(GridRun(f"{name}/seed{s}", name, dataclasses.replace(config, seed=s)) for s in seeds)
    return Grid(tuple(runs), source)


def load_grid(path: str | os.PathLike, *, device: str | None = None) -> Grid:
    """Read and expand a grid TOML file (see the module docstring for the format).

    Args:
        path: the TOML file.
        device: when given, replaces every run's device.
    Returns:
        The grid.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"{path}: not valid TOML ({err})") from err
    except OSError as err:
        raise GridError(f"{path}: cannot read the grid file ({err})") from err
    return parse_grid(data, device=device, source=str(path))


# --------------------------------------------------------------------------------------------------
# training K runs together


@dataclass
class _Member:
    """One run being trained inside a group, with its pieces of the step loop."""

    run: GridRun
    out: Path
    prepared: PreparedRun
    state: RunState
    rng: torch.Tensor  # the run's own CPU RNG state, swapped in around its steps
    cuda_rng: torch.Tensor | None
    stream: Any  # torch.cuda.Stream on CUDA, else None
    seconds: float = 0.0
    error: str | None = None
    # per-epoch state
    batches: Any = None
    losses: list = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.error is not None or self.state.epoch >= self.prepared.config.epochs


def _device_of(config: TrainConfig) -> torch.device:
    return torch.device(config.device)


class _RunContext:
    """Swap the member's RNG state (and CUDA stream) in for its steps, and back out afterwards.

    Heads may draw random numbers while training (dropout); interleaving K runs on the process-wide
    generator would then change each run's draws. Each run keeps the stream it would have had alone.
    """

    def __init__(self, member: _Member):
        self.member = member
        self.stream_context = torch.cuda.stream(member.stream) if member.stream is not None else nullcontext()

    def __enter__(self) -> None:
        member = self.member
        self.saved = torch.get_rng_state()
        torch.set_rng_state(member.rng)
        if member.cuda_rng is not None:
            device = _device_of(member.prepared.config)
            self.saved_cuda = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(member.cuda_rng, device)
        self.stream_context.__enter__()
        self.started = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        member = self.member
        member.seconds += time.perf_counter() - self.started
        self.stream_context.__exit__(*exc)
        member.rng = torch.get_rng_state()
        torch.set_rng_state(self.saved)
        if member.cuda_rng is not None:
            device = _device_of(member.prepared.config)
            member.cuda_rng = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(self.saved_cuda, device)


def _start_epoch(member: _Member) -> None:
    """The trainer's own epoch start: same lr, same seeded batch order as a solo run."""
    member.batches = iter(member.prepared.train.batches_of(member.state.begin_epoch()))
    member.losses = []
    member.seconds = 0.0


def _step(member: _Member) -> bool:
    """One optimiser step of ``member`` (the trainer's ``RunState.step``); False when its epoch is over."""
    try:
        batch, verbs, nouns = next(member.batches)
    except StopIteration:
        return False
    member.losses.append(member.state.step(batch, verbs, nouns, batch_rows=len(verbs)))
    return True


def _end_epoch(member: _Member, log: Callable[[str], None]) -> None:
    """The trainer's per-epoch bookkeeping: validation, history entry, checkpoint."""
    loss = member.state.epoch_loss(member.losses)
    member.state.end_epoch(loss, member.seconds, log=lambda line: log(f"{member.run.name}: {line}"))


def train_group(members: Sequence[_Member], *, log: Callable[[str], None] = head_data.default_log) -> None:
    """Train prepared runs together: one loop over steps, each run with its own batch order.

    Every round each unfinished run trains its next epoch; inside the round the runs take one step
    each in turn until all their batches are used (runs may have different batch sizes or epochs).
    A run that fails gets its ``error`` set and leaves the group; the others go on.

    Args:
        members: the runs (from ``_prepare_member``), already loaded from a checkpoint if resuming.
        log: one-line progress messages.
    """

    def fail(member: _Member, err: BaseException) -> None:
        member.error = _error_text(err)
        log(f"{member.run.name}: failed: {member.error}")

    while True:
        active = [m for m in members if not m.done]
        if not active:
            break
        for member in active:
            if member.stream is not None:
                # The features were written on the default stream; the run's stream must see them.
                member.stream.wait_stream(torch.cuda.current_stream(_device_of(member.prepared.config)))
            with _RunContext(member):
                _start_epoch(member)
        stepping = list(active)
        while stepping:
            still = []
            for member in stepping:
                try:
                    with _RunContext(member):
                        more = _step(member)
                except Exception as err:  # noqa: BLE001 - one run's failure must not stop the others
                    fail(member, err)
                    continue
                if more:
                    still.append(member)
            stepping = still
        for member in active:
            if member.error is not None:
                continue
            if member.stream is not None:
                torch.cuda.current_stream(_device_of(member.prepared.config)).wait_stream(member.stream)
            try:
                with _RunContext(member):
                    _end_epoch(member, log)
            except Exception as err:  # noqa: BLE001
                fail(member, err)
    for member in members:
        if member.stream is not None:
            # finish() reads the weights on the default stream.
            torch.cuda.current_stream(_device_of(member.prepared.config)).wait_stream(member.stream)


def _error_text(err: BaseException) -> str:
    text = str(err).strip() or repr(err)
    # KeyError quotes its message; unquote it so the table reads like the CLI would.
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    return f"{type(err).__name__}: {text}"


# --------------------------------------------------------------------------------------------------
# the grid


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    values = TrainConfig.from_json(config).to_json()
    for key in _IGNORED_WHEN_COMPARING:
        values.pop(key, None)
    return values


def _recorded_mismatch(out: Path, config: TrainConfig, store: str | os.PathLike) -> str | None:
    """Why the run directory ``out`` holds a different run than ``config`` on ``store``, or None."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        recorded = {**_comparable(raw), "store": raw.get("store")}
    except (ValueError, TypeError) as err:
        return f"{path} is unreadable ({err})"
    wanted = {**_comparable(config.to_json()), "store": str(Path(store).resolve())}
    # config.json records the dataset the trainer resolved from the store when the config left it None.
    derived = {"dataset"} if wanted.get("dataset") is None else set()
    differ = sorted(k for k in wanted if k not in derived and recorded.get(k) != wanted[k])
    if not differ:
        return None
    shown = ", ".join(f"{k}: recorded {recorded.get(k)!r}, grid {wanted[k]!r}" for k in differ[:4])
    return (f"{out} holds a run with other settings ({shown}); delete that directory or rename the run "
            f"to train it again")


def _prepare_member(store: str | os.PathLike, run: GridRun, out: Path, shared: dict,
                    log: Callable[[str], None]) -> _Member:
    """``heads.trainer.train`` up to its first step: prepare, build (or resume), record the config."""
    prepared = prepare(store, run.config, log=log, shared=shared)
    out.mkdir(parents=True, exist_ok=True)
    state = RunState(prepared, out)
    # RunState seeded the global generator and drew the initial weights; from here on the run's
    # draws come from its own copy of that generator state.
    rng = torch.get_rng_state()
    device = _device_of(run.config)
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    if state.checkpoint_path.exists():
        state.load()
        log(f"{run.name}: resuming after epoch {state.epoch}")
    write_config(out, prepared)
    return _Member(run, out, prepared, state, rng, cuda_rng, stream)


def _history_seconds(out: Path) -> float | None:
    try:
        history = json.loads((out / "history.json").read_text())
        return float(sum(h.get("seconds", 0.0) for h in history))
    except (OSError, ValueError, TypeError):
        return None


def run_grid(
    store: str | os.PathLike,
    grid: Grid,
    out: str | os.PathLike,
    *,
    parallel: int = 1,
    log: Callable[[str], None] = head_data.default_log,
) -> GridResults:
    """Train every unfinished run of ``grid`` on ``store`` and write the results table, report and chart.

    Args:
        store: the feature store.
        grid: the runs (``load_grid`` / ``parse_grid``).
        out: the grid's output folder; run ``r`` goes to ``out / r.name``.
        parallel: how many runs train together in one loop over steps (1: one after another). Features
            are loaded once per distinct selection and shared by every run of the call either way.
        log: one-line progress messages.
    Returns:
        What was trained, skipped and failed, and the results table.
    """
    if parallel < 1:
        raise GridError(f"parallel must be at least 1, got {parallel}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed: dict[str, str] = {}
    seconds: dict[str, float | None] = {}
    skipped: list[str] = []
    todo: list[GridRun] = []
    for run in grid.runs:
        run_dir = out / run.name
        mismatch = _recorded_mismatch(run_dir, run.config, store)
        if mismatch is not None:
            failed[run.name] = f"GridError: {mismatch}"
            log(f"{run.name}: {mismatch}")
        elif (run_dir / "metrics.json").is_file():
            skipped.append(run.name)
            seconds[run.name] = _history_seconds(run_dir)
        else:
            todo.append(run)
    if skipped:
        log(f"{len(skipped)} of {len(grid.runs)} run(s) already finished; skipping them")

    shared: dict = {}
    trained: list[str] = []
    pending = iter(todo)
    while True:
        members: list[_Member] = []
        # Fill the group to K with runs that could be prepared; a run that cannot start is recorded.
        for run in pending:
            try:
                members.append(_prepare_member(store, run, out / run.name, shared, log))
            except Exception as err:  # noqa: BLE001 - recorded; the other runs go on
                failed[run.name] = _error_text(err)
                log(f"{run.name}: cannot start: {failed[run.name]}")
                continue
            if len(members) == parallel:
                break
        if not members:
            break
        log(f"training {', '.join(m.run.name for m in members)}")
        train_group(members, log=log)
        for member in members:
            trained.append(member.run.name)
            if member.error is not None:
                failed[member.run.name] = member.error
                continue
            try:
                finish(member.out, member.prepared, member.state)
            except Exception as err:  # noqa: BLE001
                failed[member.run.name] = _error_text(err)
                continue
            seconds[member.run.name] = _history_seconds(member.out)
        del members
    table = results_table(grid, out, failed=failed, seconds=seconds)
    write_results(table, out)
    log(f"grid done in {time.perf_counter() - started:.1f}s: {len(trained)} trained, {len(skipped)} skipped, "
        f"{len(failed)} failed; results in {out / 'results.md'}")
    return GridResults(table, tuple(trained), tuple(skipped), failed, out)


def ablate(
    store: str | os.PathLike,
    grid: str | os.PathLike | Grid,
    out: str | os.PathLike,
    *,
    parallel: int = 1,
    device: str | None = None,
    log: Callable[[str], None] = head_data.default_log,
) -> GridResults:
    """``heads ablate`` as a Python call: load the grid file (or take a ``Grid``) and run it.

    Args:
        store: the feature store.
        grid: a grid TOML file, or an already expanded ``Grid``.
        out: the output folder.
        parallel: runs trained together.
        device: replaces every run's device when given.
        log: one-line progress messages.
    Returns:
        See ``run_grid``.
    """
    if not isinstance(grid, Grid):
        grid = load_grid(grid, device=device)
    elif device is not None:
        grid = Grid(tuple(dataclasses.replace(r, config=dataclasses.replace(r.config, device=device))
                          for r in grid.runs), grid.source)
    return run_grid(store, grid, out, parallel=parallel, log=log)


# --------------------------------------------------------------------------------------------------
# results


def _setting_type(field: dataclasses.Field) -> pa.DataType:
    """Arrow type of a TrainConfig field (its annotation is a string under postponed evaluation)."""
    annotation = str(field.type)
    if annotation.startswith("tuple"):
        return pa.list_(pa.int64())
    if annotation.startswith("dict"):
        return pa.string()  # switches: JSON text, since their keys differ between heads
    if annotation.startswith("int"):
        return pa.int64()
    if annotation.startswith("float"):
        return pa.float64()
    return pa.string()


def _setting_value(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_list(kind):
        return [int(v) for v in value]
    if pa.types.is_int64(kind):
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if pa.types.is_float64(kind):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def switch_label(model: str, switches: dict[str, Any]) -> str:
    """Table text for a run's switches: what differs from the head's defaults, e.g. ``no gating``."""
    try:
        defaults = get_head(model).switches()
    except KeyError:
        defaults = {}
    parts = []
    for name in sorted(switches):
        value = switches[name]
        if name in defaults and defaults[name] == value:
            continue
        if isinstance(value, bool):
            parts.append(name.replace("_", " ") if value else f"no {name.replace('_', ' ')}")
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts) if parts else "-"


def results_table(grid: Grid, out: Path, *, failed: dict[str, str] | None = None,
                  seconds: dict[str, float | None] | None = None) -> pa.Table:
    """One row per run of ``grid``: name, method, seed, status, error, settings, switches, metrics.

    Metrics are read from each finished run's ``metrics.json``; a run neither finished nor in
    ``failed`` (it was never tried) gets status ``pending``.

    Args:
        grid: the runs, in the order of the rows.
        out: the grid's output folder.
        failed: name -> error of the runs that failed.
        seconds: name -> training seconds (sum over epochs) where known.
    Returns:
        The table written to results.parquet.
    """
    failed = failed or {}
    seconds = seconds or {}
    fields = dataclasses.fields(TrainConfig)
    types = {f.name: _setting_type(f) for f in fields}
    rows: list[dict[str, Any]] = []
    metric_names: list[str] = []
    for run in grid.runs:
        run_dir = out / run.name
        metrics: dict[str, float] = {}
        if run.name in failed:
            status, error = "failed", failed[run.name]
        elif (run_dir / "metrics.json").is_file():
            status, error = "ok", None
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            status, error = "pending", None
        for key in metrics:
            if key not in metric_names:
                metric_names.append(key)
        settings = run.config.to_json()
        row = {"name": run.name, "method": run.method, "status": status, "error": error,
               "run_dir": str(run_dir), "switch_label": switch_label(run.config.model, run.config.switches),
               "seconds": seconds.get(run.name)}
        row.update({name: _setting_value(settings[name], types[name]) for name in types})
        row["metrics"] = metrics
        rows.append(row)
    # Table 1's metrics first, then the rest in the order runs reported them.
    ordered = [m for m in TABLE_METRICS if m in metric_names] + [m for m in metric_names if m not in TABLE_METRICS]
    ordered = ordered or list(TABLE_METRICS)  # keep the columns even when no run finished
    columns: dict[str, pa.Array] = {}
    fixed = (("name", pa.string()), ("method", pa.string()), ("status", pa.string()), ("error", pa.string()),
             ("run_dir", pa.string()), ("switch_label", pa.string()), ("seconds", pa.float64()))
    for name, kind in fixed:
        columns[name] = pa.array([row[name] for row in rows], kind)
    for name, kind in types.items():
        columns[name] = pa.array([row[name] for row in rows], kind)
    for name in ordered:
        columns[name] = pa.array([row["metrics"].get(name) for row in rows], pa.float64())
    return pa.table(columns)


def _summary(table: pa.Table) -> list[dict[str, Any]]:
    """Per method (grid order): model, switches, counts, and mean / std of each Table-1 metric."""
    rows = table.to_pylist()
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    summary = []
    for method, group in methods.items():
        done = [r for r in group if r["status"] == "ok"]
        stats = {}
        for metric in TABLE_METRICS:
            values = np.array([r[metric] for r in done if r.get(metric) is not None], dtype=np.float64)
            if values.size == 0:
                stats[metric] = (None, None)
            else:
                # Sample standard deviation: the seeds are a sample of the run-to-run spread.
                spread = float(values.std(ddof=1)) if values.size > 1 else None
                stats[metric] = (float(values.mean()), spread)
        summary.append({
            "method": method, "model": group[0]["model"], "switches": group[0]["switch_label"],
            "n": len(group), "ok": len(done), "failed": sum(r["status"] == "failed" for r in group),
            "seeds": [r["seed"] for r in done], "stats": stats,
        })
    return summary


def _cell(mean: float | None, spread: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" if spread is None else f"{mean:.1f} ± {spread:.1f}"


def write_results_markdown(table: pa.Table, path: str | os.PathLike, *, title: str = "Ablation results") -> Path:
    """results.md: the report's Table 1 layout, mean ± std over seeds, then the failed runs.

    Args:
        table: a ``results_table``.
        path: the Markdown file to write.
        title: the heading.
    Returns:
        ``path``.
    """
    path = Path(path)
    header = ("| Method | Model | Switches | Runs | Actions top-1 | Actions top-5 | Verbs top-1 | Verbs top-5 "
              "| Nouns top-1 | Nouns top-5 |")
    lines = [f"# {title}", "", "Top-1 / top-5 accuracy (%) on the validation selection; mean ± standard deviation "
             "over the seeds of each method (sample std, shown when there are two or more).", "", header,
             "|" + "---|" * 3 + "---:|" * 7]
    for entry in _summary(table):
        runs = f"{entry['ok']}" if entry["ok"] == entry["n"] else f"{entry['ok']}/{entry['n']}"
        if entry["failed"]:
            runs += f" ({entry['failed']} failed)"
        cells = [_cell(*entry["stats"][m]) for m in TABLE_METRICS]
        lines.append(f"| {entry['method']} | {entry['model']} | {entry['switches']} | {runs} | " + " | ".join(cells)
                     + " |")
    failures = [r for r in table.to_pylist() if r["status"] != "ok"]
    if failures:
        lines += ["", "## Runs without results", "", "| Run | Status | Error |", "|---|---|---|"]
        for row in failures:
            error = (row["error"] or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['name']} | {row['status']} | {error} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return path


def plot_grid_results(table: pa.Table, path: str | os.PathLike, *, title: str = "") -> Path:
    """results.png: per method, bars of action / verb / noun top-1 and top-5 with the spread over seeds.

    Args:
        table: a ``results_table``.
        path: the PNG to write.
        title: figure title.
    Returns:
        ``path``.
    """
    plt = pyplot()
    path = Path(path)
    summary = _summary(table)
    methods = [entry["method"] for entry in summary]
    x = np.arange(len(methods))
    width = 0.26
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(methods) + 4), 4.2), sharey=False)
    for ax, k in zip(axes, ("top1", "top5")):
        for offset, (what, label) in enumerate((("action", "actions"), ("verb", "verbs"), ("noun", "nouns"))):
            stats = [entry["stats"][f"{what}_{k}"] for entry in summary]
            means = [s[0] if s[0] is not None else 0.0 for s in stats]
            errors = [s[1] if s[1] is not None else 0.0 for s in stats]
            ax.bar(x + (offset - 1) * width, means, width, yerr=errors, capsize=3, label=label)
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set(ylabel=f"{k.replace('top', 'top-')} (%)", title=k.replace("top", "top-"))
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def write_results(table: pa.Table, out: str | os.PathLike) -> dict[str, Path]:
    """results.parquet, results.md and results.png in ``out``.

    Returns:
        kind -> path written.
    """
    out = Path(out)
    parquet = out / "results.parquet"
    atomic_write(parquet, lambda tmp: pq.write_table(table, tmp))
    return {"parquet": parquet, "markdown": write_results_markdown(table, out / "results.md",
                                                                   title=f"Ablation results ({out.name})"),
            "png": plot_grid_results(table, out / "results.png", title=out.name)}
