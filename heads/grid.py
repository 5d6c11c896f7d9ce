"""The grid file of `heads ablate`: a TOML of runs, expanded into ``TrainConfig`` s.

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
    name = "saoa-centre-clip"
    model = "saoa"
    views = "first"          # temporal views (docs/views.md): view 0 only; "random": one per epoch

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
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heads.models import all_switches, get_head
from heads.trainer import TrainConfig

__all__ = ["GridError", "GridRun", "Grid", "parse_grid", "load_grid"]

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
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


def _split_settings(table: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any], list[int] | None]:
    """Split one [base] / [[run]] table into TrainConfig settings, switches and seeds.

    Returns:
        (settings, switches, seeds or None).
    """
    known_switches = all_switches()
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
