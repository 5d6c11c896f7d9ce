"""The run folder: the files every trainer writes, one name each, and how a run checks, opens and cleans it.

Every trainer writes one folder, ``OUT``: `heads train` (and each run of `heads ablate`),
`featstore finetune`, and `featstore finetune-detector` with a torchvision detector (on the engine)
or a detectron2 one (detectron2's trainer)::

    OUT/checkpoint.pt        the weights only: what `featstore build` loads (stage 1, ``NAME:OUT/checkpoint.pt``)
                             and what `heads eval` / `predict` read (heads); half precision on request
    OUT/checkpoints/last.pt  what a resume continues from (model, optimiser, epoch or iteration, history);
                             deleted when the run finishes unless it is kept (``--keep-resume-state``)
    OUT/config.json          every setting of the run, and the data it read
    OUT/metrics.json         the final metrics (stage 1: also per epoch or round, and ``complete``), and
                             ``warnings``: what looks wrong about the run (at chance, empty detections)
    OUT/history.json         heads: one record per epoch
    OUT/history.csv          the engine's trainers: the same records as a table (one row per epoch or round)
    OUT/predictions.parquet  heads: the validation logits
    OUT/failures.json        stage 1: the segments or images that could not be read
    OUT/curves.png           loss and validation metrics per epoch or round
    OUT/log.txt              stage 1: what the run printed
    OUT/per_class_ap.csv     detectors: per-class AP of the last validation
    OUT/predictions.png      detectors: predictions on a few validation images
    OUT/config.yaml          detectron2: the model's config, beside checkpoint.pt, where
                             `featstore build`'s detectron2 adapter looks for it

The names are the same for every backend: detectron2's adapter and its checkpointer read ``.pt`` as
they read ``.pth``. Every file is written through `featstore.io.atomic` (a hidden ``.NAME.HEX.tmp``
renamed into place), so a killed run leaves whole files and perhaps temporaries, which opening the
folder again deletes (`remove_run_temporaries`).

A trainer checks the folder before any work (`RunFolder.check`: a folder that holds a run is refused
unless resuming) and opens it once its inputs are known good (`RunFolder.open`: the folder made, the
temporaries of a killed predecessor removed, the log started), so a refused run leaves no trace.

Torch-free: the commands' ``--help`` and the configs' resume checks read it without loading torch.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from featstore.io.atomic import atomic_write_text, remove_temporaries
from featstore.io.folders import RUN_MARKERS, other_kind_refusal

if TYPE_CHECKING:
    from featstore.training.world import World

__all__ = [
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "CURVES_NAME",
    "DETECTRON2_CONFIG_NAME",
    "FAILURES_NAME",
    "HISTORY_CSV_NAME",
    "HISTORY_NAME",
    "LEGACY_NAMES",
    "LOG_NAME",
    "METRICS_NAME",
    "PER_CLASS_AP_NAME",
    "PREDICTIONS_NAME",
    "PREDICTION_IMAGES_NAME",
    "RESUME_STATE_NAME",
    "RUN_FILES",
    "RunFiles",
    "RunFolder",
    "RunLog",
    "finished_run",
    "holds_run",
    "record_path",
    "remove_run_temporaries",
    "resolve_recorded_path",
    "run_folder_files",
    "settings_differences",
]

CHECKPOINT_NAME = "checkpoint.pt"
RESUME_STATE_NAME = "checkpoints/last.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.json"
HISTORY_CSV_NAME = "history.csv"
PREDICTIONS_NAME = "predictions.parquet"
FAILURES_NAME = "failures.json"
CURVES_NAME = "curves.png"
LOG_NAME = "log.txt"
PER_CLASS_AP_NAME = "per_class_ap.csv"
PREDICTION_IMAGES_NAME = "predictions.png"
DETECTRON2_CONFIG_NAME = "config.yaml"  # = featstore.models.detectron2_rcnn.CONFIG_BESIDE_WEIGHTS

# Names earlier versions gave the resume state and the detectron2 checkpoint. A folder that holds
# them is renamed to the current names when its run resumes, so that it resumes as before.
LEGACY_NAMES = {
    "training_state.pt": RESUME_STATE_NAME,  # the torchvision detector's resume state
    "checkpoints/last.pth": RESUME_STATE_NAME,  # detectron2's resume state
    "checkpoint.pth": CHECKPOINT_NAME,  # detectron2's checkpoint for `featstore build`
}
# What makes a folder hold a run (a new run there is refused without resume).


@dataclass(frozen=True)
class RunFiles:
    """The files a trainer's finished run folder holds, paths relative to it.

    Attributes:
        trainer: ``heads``, ``backbone``, ``detector`` or ``detectron2``.
        always: written by every run.
        validation: written only by a run that validates.
        resume: what only a run that is not finished holds, or one that keeps it (``--keep-resume-state``).
    """

    trainer: str
    always: tuple[str, ...]
    validation: tuple[str, ...] = ()
    resume: tuple[str, ...] = (RESUME_STATE_NAME,)

    def expected(self, *, validated: bool, resume_state: bool = False) -> set[str]:
        """The finished folder's files: ``always``, ``validation`` when the run validated, and the
        resume state when it was kept."""
        return (set(self.always) | (set(self.validation) if validated else set())
                | (set(self.resume) if resume_state else set()))


_STAGE1 = (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, FAILURES_NAME, LOG_NAME)
RUN_FILES = {files.trainer: files for files in (
    RunFiles("heads", (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, HISTORY_NAME, HISTORY_CSV_NAME, CURVES_NAME),
             (PREDICTIONS_NAME,)),
    RunFiles("backbone", (*_STAGE1, HISTORY_CSV_NAME, CURVES_NAME)),
    RunFiles("detector", (*_STAGE1, HISTORY_CSV_NAME, CURVES_NAME), (PER_CLASS_AP_NAME, PREDICTION_IMAGES_NAME)),
    # detectron2's own trainer keeps its resume state (its checkpointer owns it).
    RunFiles("detectron2", (*_STAGE1, RESUME_STATE_NAME, DETECTRON2_CONFIG_NAME),
             (PER_CLASS_AP_NAME, PREDICTION_IMAGES_NAME), resume=()),
)}


def run_folder_files(out: str | os.PathLike) -> set[str]:
    """Every file below ``out`` (temporaries included), as paths relative to it with ``/``."""
    out = Path(out)
    return {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}


def holds_run(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a run (its config, checkpoint or resume state): a new run there needs resume."""
    return any((Path(out) / name).exists() for name in RUN_MARKERS)


def finished_run(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a finished run whose resume state was deleted (`RunFolder.drop_resume_state`):
    its weights and metrics, and nothing left to resume."""
    out = Path(out)
    return ((out / CHECKPOINT_NAME).is_file() and (out / METRICS_NAME).is_file()
            and not (out / RESUME_STATE_NAME).exists() and not any((out / old).exists() for old in LEGACY_NAMES))


def remove_run_temporaries(out: str | os.PathLike) -> list[Path]:
    """Delete every temporary that killed writes left in the run folder ``out`` (checkpoints are large).

    Every file of a run folder is written through `featstore.io.atomic`, so its temporaries are the
    writer's hidden ``.NAME.HEX.tmp`` files, in ``out`` and beside the resume state.

    Returns:
        The paths removed.
    """
    out = Path(out)
    removed = []
    for folder in {out, (out / RESUME_STATE_NAME).parent}:
        if folder.is_dir():
            removed += remove_temporaries(folder)
    return removed


def record_path(path: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """How a run folder records a path it read (its store): relative to the run when both lie below a
    common parent other than the filesystem's root (a project folder), so that moving the whole
    folder keeps the run readable; absolute otherwise.

    Args:
        path: the path to record.
        run_dir: the run folder.
    Returns:
        ``../../store`` or ``/abs/path/store`` (POSIX separators for a relative one).
    """
    target, run = Path(path).resolve(), Path(run_dir).resolve()
    try:
        common = Path(os.path.commonpath([target, run]))
    except ValueError:  # different drives
        return str(target)
    if common == Path(common.anchor):
        return str(target)
    return Path(os.path.relpath(target, run)).as_posix()


def resolve_recorded_path(recorded: str, run_dir: str | os.PathLike, *, fallback: str | None = None) -> Path:
    """The path a run recorded (`record_path`), as it is now.

    A relative record is taken from the run folder (where it was moved to, with its project); an
    absolute one (every run recorded before relative paths) as it is. When the relative one no
    longer exists, ``fallback`` (the absolute path the run also recorded) is tried.

    Args:
        recorded: the recorded path.
        run_dir: the run folder.
        fallback: an absolute path to use when ``recorded`` is relative and missing.
    Returns:
        The path (which may not exist: the caller's open names it).
    """
    path = Path(recorded)
    if path.is_absolute():
        return path
    found = (Path(run_dir) / path).resolve()
    if not found.exists() and fallback and Path(fallback).exists():
        return Path(fallback)
    return found


def settings_differences(now: Mapping[str, Any], recorded: Mapping[str, Any], resumable: Iterable[str], *,
                         paths: Iterable[str] = ()) -> list[str]:
    """What a resume may not change: ``"name: run has X, now Y"`` per setting that differs from the record.

    Args:
        now: the resuming call's settings (JSON types).
        recorded: the settings the run recorded.
        resumable: settings that may differ (how a run runs, not what it computes).
        paths: settings that are paths: compared resolved (``runs/a`` and ``./runs/a`` are one folder).
    Returns:
        One line per differing setting; empty when the run may be resumed.
    """
    resumable, paths = set(resumable), set(paths)

    def same(name: str) -> bool:
        if name in paths and isinstance(now[name], str) and isinstance(recorded.get(name), str):
            return Path(now[name]).resolve() == Path(recorded[name]).resolve()
        return recorded.get(name) == now[name]

    return [f"{name}: run has {json.dumps(recorded.get(name))}, now {json.dumps(now[name])}"
            for name in now if name not in resumable and not same(name)]


class RunLog:
    """A run's log: each line goes to ``OUT/log.txt`` and to ``echo`` (stderr by default).

    The file is rewritten whole and atomically for each line (a run logs a few lines per epoch); a
    resumed run appends to what its predecessor wrote.
    """

    def __init__(self, path: str | os.PathLike, *, echo: Callable[[str], None] | None = None) -> None:
        """
        Args:
            path: the log file.
            echo: also called with each line; None: print to stderr.
        """
        self.path = Path(path)
        self.echo = echo if echo is not None else _to_stderr
        self.lines: list[str] = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []

    def __call__(self, line: str) -> None:
        self.echo(line)
        self.lines.append(line)
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _quiet(_: str) -> None:
    """The log of processes other than the main one (which alone writes the run folder)."""


class RunFolder:
    """One run's folder: its files by their contract names; checked before the run's work, opened when it starts.

    Args:
        path: the folder (``OUT``).
        resume: the run continues what the folder holds.

    Attributes:
        main: this process writes the folder (the main process of a world); set by `open`.
        log: the run's log once opened: ``log.txt`` and the echo on the main process, nothing elsewhere.
        finished: resuming a run that finished and deleted its resume state (`finished_run`).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.resume = resume
        self.finished = False
        self.main = True
        self.log: Callable[[str], None] = _to_stderr

    @classmethod
    def check(cls, path: str | os.PathLike, *, resume: bool, error: type[Exception]) -> RunFolder:
        """The run's folder, refused when it holds a run and the run does not resume.

        Nothing is written; a resumed folder's files of earlier names (`LEGACY_NAMES`) take their
        current names, so that what the caller reads next (the resume state) is where it looks.

        A finished run whose resume state was deleted gets ``finished`` set: the trainer has nothing
        to do (`finished_metrics`).

        Raises:
            error: ``path`` already holds a run and ``resume`` is False.
        """
        folder = cls(path, resume=resume)
        refusal = other_kind_refusal(folder.path, "run")
        if refusal is not None:
            raise error(refusal)
        if not resume and holds_run(folder.path):
            raise error(f"{folder.path} already holds a run; pass --resume to continue it or choose another OUT")
        folder.finished = resume and finished_run(folder.path)
        if resume:
            folder._adopt_legacy_names()
        return folder

    def open(self, *, world: World | None = None, echo: Callable[[str], None] | None = None,
             log_file: bool = True) -> RunFolder:
        """Start writing the folder: make it, take over files of earlier names, remove killed writers' temporaries.

        Only the main process of ``world`` touches the folder; every other one gets a silent log.

        Args:
            world: the data-parallel world (`featstore.training.world.World.from_environment`), or None.
            echo: where the log's lines go besides ``log.txt`` (default stderr).
            log_file: keep ``log.txt``; False: the log is ``echo`` alone (``heads train``).
        Returns:
            The folder itself.
        """
        self.main = world is None or world.is_main
        if not self.main:
            self.log = _quiet
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        remove_run_temporaries(self.path)
        echo = echo if echo is not None else _to_stderr
        self.log = RunLog(self.path / LOG_NAME, echo=echo) if log_file else echo
        return self

    def _adopt_legacy_names(self) -> None:
        for old, new in LEGACY_NAMES.items():
            source, target = self.path / old, self.path / new
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(source, target)
                except FileNotFoundError:
                    pass  # another rank of the same run renamed it first

    def file(self, name: str) -> Path:
        """``OUT/name``."""
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def resume_state(self) -> Path:
        return self.path / RESUME_STATE_NAME

    def finished_metrics(self, *, asked: int, done: int, unit: str, error: type[Exception]) -> dict[str, Any]:
        """What resuming a finished run returns: its metrics.json, nothing trained (a rerun of a
        pipeline that resumes every run is a no-op); a run cannot be extended without its resume state.

        Args:
            asked: the epochs (iterations) the resuming call asks for.
            done: those the run trained.
            unit: ``epoch`` or ``iteration``, for the message.
            error: raised (a trainer's own type) when ``asked`` is more than ``done``.
        """
        if asked > done:
            raise error(f"{self.path} holds a run that finished after {done} {unit}s and deleted its resume state, "
                        f"so it cannot be extended to {asked} (train with --keep-resume-state to extend a run "
                        "later); choose another OUT to train again")
        return json.loads(self.file(METRICS_NAME).read_text())

    def drop_resume_state(self) -> bool:
        """Delete the resume state of a finished run (and its folder when empty): it holds the optimiser
        too, several times the weights, and nothing needs it once ``checkpoint.pt`` is written.

        Returns:
            Whether a file was deleted.
        """
        if not self.main or not self.resume_state.is_file():
            return False
        self.resume_state.unlink()
        try:
            self.resume_state.parent.rmdir()
        except OSError:
            pass  # not empty (a user's file): left
        return True
