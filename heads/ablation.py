"""`heads ablate`: a grid of runs on one store, trained alone or K at a time, gathered in one table.

The grid file's format is in ``heads.grid``; the results table, report and chart in ``heads.results``.

Outputs in ``DIR``: one normal run directory per run (``heads.trainer`` layout), ``results.parquet``
(one row per run: status, error, every setting, every metric), ``results.md`` (Table 1 of the report:
Method | Model | Switches | Runs | Actions | Verbs | Nouns top-1/top-5, mean ± std over seeds, then
the failed runs) and ``results.png`` (top-1 / top-5 bars with the spread over seeds).

Resuming: a run is finished when its ``metrics.json`` exists; a rerun skips finished runs, continues
runs with a checkpoint from their last finished epoch, and retries failed runs. A finished or
checkpointed run whose recorded settings differ from the grid's (other than ``device``) is reported
as failed rather than silently reused or overwritten.

Grouped training (``parallel=K``): K runs share the preloaded features (``prepare(shared=...)``)
and one device, and are stepped together by one ``featstore.training.engine.Engine`` with the hooks of
``heads train`` (``heads.trainer.run_hooks``); each keeps its own seeded batch order, optimiser and
torch random stream, so a run trained in a group gives exactly the same results as the same run
trained alone (``heads.trainer.train``) on CPU (``tests/heads/test_ablation.py`` pins the
equality). On CUDA each run steps on its own stream, so the small kernels of K heads can overlap;
losses are read once per epoch (a non-finite loss fails the run at the end of that epoch, naming the
step; its last checkpoint is from the epoch before).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

from featstore.store.reader import FeatureStore
from featstore.store.schema import StoreError
from featstore.training.engine import Engine, RunState, describe_error
from featstore.training.run_folder import CONFIG_NAME, HISTORY_NAME, METRICS_NAME
from heads import data as head_data
from heads.grid import Grid, GridError, GridRun, load_grid
from heads.results import results_table, write_results
from heads.switches import recorded_switches, resolve_switches
from heads.trainer import (
    HeadTrainable,
    PreparedRun,
    TrainConfig,
    finish,
    prepare,
    run_hooks,
    run_store,
    write_config,
)

__all__ = ["GridResults", "run_grid", "ablate"]

# Settings that may differ between a recorded run and the grid without making the run another run.
_IGNORED_WHEN_COMPARING = ("device",)


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


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    values = TrainConfig.from_json(config).to_json()
    for key in _IGNORED_WHEN_COMPARING:
        values.pop(key, None)
    return values


def _effective_switches(config: TrainConfig, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The switches ``config``'s run trains with on a store of ``manifest`` (as config.json records them)."""
    if manifest is None:
        return dict(config.switches)
    try:
        return resolve_switches(config.model, config.switches, manifest).values
    except (KeyError, TypeError):  # an unknown head or switch: that run fails when it starts
        return dict(config.switches)


def _recorded_mismatch(out: Path, config: TrainConfig, store: str | os.PathLike,
                       manifest: dict[str, Any] | None = None) -> str | None:
    """Why the run directory ``out`` holds a different run than ``config`` on ``store``, or None.

    Switches compare by their effective values (config.json records every one; the grid names some).
    """
    path = out / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        recorded = {**_comparable(raw), "switches": recorded_switches(raw),
                    "store": str(run_store(out, raw).resolve()) if raw.get("store") else None}
    except (ValueError, TypeError) as err:
        return f"{path} is unreadable ({err})"
    wanted = {**_comparable(config.to_json()), "switches": _effective_switches(config, manifest),
              "store": str(Path(store).resolve())}
    # config.json records the dataset the trainer resolved from the store when the config left it None.
    derived = {"dataset"} if wanted.get("dataset") is None else set()
    differ = sorted(k for k in wanted if k not in derived and recorded.get(k) != wanted[k])
    if not differ:
        return None
    shown = ", ".join(f"{k}: recorded {recorded.get(k)!r}, grid {wanted[k]!r}" for k in differ[:4])
    return (f"{out} holds a run with other settings ({shown}); delete that directory or rename the run "
            f"to train it again")


@dataclass
class _Member:
    """One grid run inside a group: its prepared data, trainable and engine state."""

    run: GridRun
    out: Path
    prepared: PreparedRun
    head: HeadTrainable
    state: RunState


def _add_member(engine: Engine, store: str | os.PathLike, run: GridRun, out: Path, shared: dict,
                log: Callable[[str], None]) -> _Member:
    """``heads.trainer.train`` up to its first step: prepare, record the config, build the head and add
    it to the group's engine with the hooks of ``heads train`` (it resumes from its checkpoint if any)."""
    prepared = prepare(store, run.config, log=log, shared=shared)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, prepared)
    head = HeadTrainable(prepared)
    hooks = run_hooks(prepared, head, out, resume=True, log=log, label=f"{run.name}: ")
    # Added right after its head was built (seeded): the engine keeps the run's random stream from here.
    state = engine.add(head, name=run.name, epochs=prepared.config.epochs, hooks=hooks)
    return _Member(run, out, prepared, head, state)


def _history_seconds(out: Path) -> float | None:
    try:
        history = json.loads((out / HISTORY_NAME).read_text())
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
    todo, skipped = _runs_to_train(store, grid, out, failed=failed, seconds=seconds, log=log)
    if skipped:
        log(f"{len(skipped)} of {len(grid.runs)} run(s) already finished; skipping them")

    shared: dict = {}
    trained: list[str] = []
    pending = iter(todo)
    while True:
        # One engine per group of K: a failed run leaves it, the others go on (keep_going).
        engine = Engine(keep_going=True, log=log)
        members = _start_group(engine, store, pending, out, shared, parallel=parallel, failed=failed, log=log)
        if not members:
            break
        log(f"training {', '.join(m.run.name for m in members)}")
        engine.train()
        for member in members:
            trained.append(member.run.name)
            _finish_member(member, failed=failed, seconds=seconds)
        del members, engine
    table = results_table(grid, out, failed=failed, seconds=seconds)
    write_results(table, out)
    log(f"grid done in {time.perf_counter() - started:.1f}s: {len(trained)} trained, {len(skipped)} skipped, "
        f"{len(failed)} failed; results in {out / 'results.md'}")
    return GridResults(table, tuple(trained), tuple(skipped), failed, out)


def _runs_to_train(store: str | os.PathLike, grid: Grid, out: Path, *, failed: dict[str, str],
                   seconds: dict[str, float | None], log: Callable[[str], None]) -> tuple[list[GridRun], list[str]]:
    """The runs to train and the names of the finished ones; a run whose folder holds another run is failed."""
    skipped: list[str] = []
    todo: list[GridRun] = []
    try:
        manifest = FeatureStore.open(store).manifest
    except (OSError, StoreError):  # each run then fails with the store's own message
        manifest = None
    for run in grid.runs:
        run_dir = out / run.name
        mismatch = _recorded_mismatch(run_dir, run.config, store, manifest)
        if mismatch is not None:
            failed[run.name] = f"GridError: {mismatch}"
            log(f"{run.name}: {mismatch}")
        elif (run_dir / METRICS_NAME).is_file():
            skipped.append(run.name)
            seconds[run.name] = _history_seconds(run_dir)
        else:
            todo.append(run)
    return todo, skipped


def _start_group(engine: Engine, store: str | os.PathLike, pending: Iterator[GridRun], out: Path, shared: dict, *,
                 parallel: int, failed: dict[str, str], log: Callable[[str], None]) -> list[_Member]:
    """Up to ``parallel`` runs from ``pending`` added to ``engine``; a run that cannot start goes to ``failed``."""
    members: list[_Member] = []
    for run in pending:
        try:
            members.append(_add_member(engine, store, run, out / run.name, shared, log))
        except Exception as err:  # noqa: BLE001 - recorded; the other runs go on
            failed[run.name] = describe_error(err)
            log(f"{run.name}: cannot start: {failed[run.name]}")
            continue
        if len(members) == parallel:
            break
    return members


def _finish_member(member: _Member, *, failed: dict[str, str], seconds: dict[str, float | None]) -> None:
    """After its group trained: a run's folder finished (its time to ``seconds``), or its error to ``failed``."""
    if member.state.error is not None:
        failed[member.run.name] = describe_error(member.state.error)
        return
    try:
        finish(member.out, member.prepared, member.head.model, member.state.history)
    except Exception as err:  # noqa: BLE001
        failed[member.run.name] = describe_error(err)
        return
    seconds[member.run.name] = _history_seconds(member.out)


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
