"""The run-folder contract: what refuses a run, what opening a folder does, temporaries, legacy names, resume checks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from featstore.io.atomic import atomic_write_torch, temporary_name
from featstore.training.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    DETECTRON2_CONFIG_NAME,
    LEGACY_NAMES,
    LOG_NAME,
    METRICS_NAME,
    RESUME_STATE_NAME,
    RUN_FILES,
    RunFolder,
    RunLog,
    finished_run,
    holds_run,
    record_path,
    remove_run_temporaries,
    resolve_recorded_path,
    run_folder_files,
    settings_differences,
)
from featstore.training.world import World


class Refused(Exception):
    pass


@pytest.mark.parametrize("marker", [CONFIG_NAME, CHECKPOINT_NAME, RESUME_STATE_NAME, *LEGACY_NAMES])
def test_a_folder_holding_a_run_is_refused_without_resume_and_nothing_is_written(tmp_path: Path, marker: str) -> None:
    out = tmp_path / "run"
    RunFolder.check(out, resume=False, error=Refused)  # a new folder: fine
    assert not out.exists()  # checking writes nothing
    (out / marker).parent.mkdir(parents=True, exist_ok=True)
    (out / marker).write_bytes(b"x")
    assert holds_run(out)
    with pytest.raises(Refused, match="already holds a run; pass --resume"):
        RunFolder.check(out, resume=False, error=Refused)
    assert RunFolder.check(out, resume=True, error=Refused).resume


def test_opening_makes_the_folder_removes_every_temporary_and_starts_the_log(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    kept = [out / CONFIG_NAME, out / RESUME_STATE_NAME, out / "notes.tmp"]  # notes.tmp: not hidden, not ours
    left = [temporary_name(out / name) for name in (CHECKPOINT_NAME, CONFIG_NAME, "training_state.pt")]
    left.append(temporary_name(out / RESUME_STATE_NAME))
    for path in kept + left:
        path.write_bytes(b"partial")
    folder = RunFolder.check(out, resume=True, error=Refused).open(echo=lambda _: None)
    assert folder.main and all(p.exists() for p in kept) and not any(p.exists() for p in left)
    folder.log("first line")
    assert (out / LOG_NAME).read_text() == "first line\n"
    assert remove_run_temporaries(out) == []


def test_only_the_main_process_touches_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    heard: list[str] = []
    folder = RunFolder(out).open(world=World(rank=1, size=2), echo=heard.append)
    folder.log("from rank 1")
    assert not folder.main and not out.exists() and heard == []


def test_the_temporary_a_killed_checkpoint_write_leaves_is_one_the_next_open_removes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    used: list[Path] = []

    class Killed(BaseException):  # what SIGKILL is to the writer: nothing after it runs
        pass

    def save_then_die(payload: object, path: str | os.PathLike) -> None:
        used.append(Path(path))
        raise Killed

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(Killed):
        atomic_write_torch(out / RESUME_STATE_NAME, {"epoch": 1})
    # The writer removes its temporary on any exception; SIGKILL would not: put back what it leaves.
    [temporary] = used
    temporary.write_bytes(b"torn")
    assert run_folder_files(out) == {temporary.relative_to(out).as_posix()}
    RunFolder(out, resume=True).open(echo=lambda _: None)
    assert run_folder_files(out) == set()  # the log file appears with its first line


def test_a_failed_checkpoint_write_names_the_file(tmp_path: Path) -> None:
    class Unwritable:
        def __reduce__(self):
            raise RuntimeError("enforce fail at inline_container.cc: unexpected pos")

    with pytest.raises(OSError, match=f"cannot write the checkpoint {tmp_path / CHECKPOINT_NAME}"):
        atomic_write_torch(tmp_path / CHECKPOINT_NAME, {"x": Unwritable()})
    assert run_folder_files(tmp_path) == set()


@pytest.mark.parametrize("legacy", [("checkpoint.pt", "training_state.pt"),  # the torchvision detector's
                                    ("checkpoint.pth", "checkpoints/last.pth")])  # detectron2's
def test_a_resume_takes_over_the_files_of_earlier_names(tmp_path: Path, legacy: tuple[str, str]) -> None:
    out = tmp_path / "run"
    for old in legacy:
        (out / old).parent.mkdir(parents=True, exist_ok=True)
        (out / old).write_text(old)
    RunFolder.check(out, resume=True, error=Refused)
    assert run_folder_files(out) == {CHECKPOINT_NAME, RESUME_STATE_NAME}
    assert (out / RESUME_STATE_NAME).read_text() == legacy[1]
    # Without resume nothing is renamed: the run is refused.
    (out / RESUME_STATE_NAME).rename(out / legacy[1])
    with pytest.raises(Refused):
        RunFolder.check(out, resume=False, error=Refused)
    assert (out / legacy[1]).is_file()


def test_resume_settings_compare_paths_resolved_and_skip_what_may_change(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recorded = {"out": "runs/a", "lr": 0.01, "workers": 2, "annotations": str(tmp_path / "labels.csv")}
    same = {"out": "./runs/../runs/a", "lr": 0.01, "workers": 4, "annotations": "labels.csv"}
    assert settings_differences(same, recorded, ["workers"], paths=["out", "annotations"]) == []
    # As text these differ: only the resolved comparison lets the resume through.
    assert len(settings_differences(same, recorded, ["workers"])) == 2
    other = {**same, "out": "runs/b", "lr": 0.02}
    assert settings_differences(other, recorded, ["workers"], paths=["out", "annotations"]) == [
        'out: run has "runs/a", now "runs/b"', "lr: run has 0.01, now 0.02"]


def test_the_log_appends_across_runs(tmp_path: Path) -> None:
    RunLog(tmp_path / LOG_NAME, echo=lambda _: None)("first")
    RunLog(tmp_path / LOG_NAME, echo=lambda _: None)("second")  # a resumed run appends
    assert (tmp_path / LOG_NAME).read_text().splitlines() == ["first", "second"]


def test_the_contract_names_what_featstore_build_reads() -> None:
    from featstore.models.detectron2_rcnn import CONFIG_BESIDE_WEIGHTS

    assert DETECTRON2_CONFIG_NAME == CONFIG_BESIDE_WEIGHTS
    # Every backend writes the same checkpoint; the engine's trainers delete their resume state when
    # finished (kept on request), detectron2's trainer keeps its own.
    for files in RUN_FILES.values():
        assert CHECKPOINT_NAME in files.always, files.trainer
        assert RESUME_STATE_NAME in set(files.always) | set(files.resume), files.trainer
        assert RESUME_STATE_NAME not in files.expected(validated=True) or files.trainer == "detectron2"
        assert RESUME_STATE_NAME in files.expected(validated=True, resume_state=True)


def test_a_finished_run_loses_its_resume_state_and_resuming_it_does_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    atomic_write_torch(out / RESUME_STATE_NAME, {"epoch": 2})
    (out / CHECKPOINT_NAME).write_text("x")
    (out / METRICS_NAME).write_text('{"verb_top1": 40.0}')
    folder = RunFolder.check(out, resume=True, error=Refused).open(echo=lambda _: None)
    assert not finished_run(out) and not folder.finished
    assert folder.drop_resume_state() and not (out / RESUME_STATE_NAME).parent.exists()
    assert finished_run(out) and holds_run(out) and not folder.drop_resume_state()
    again = RunFolder.check(out, resume=True, error=Refused)
    assert again.finished
    assert again.finished_metrics(asked=2, done=2, unit="epoch", error=Refused) == {"verb_top1": 40.0}
    with pytest.raises(Refused, match="finished after 2 epochs.*cannot be extended to 3.*--keep-resume-state"):
        again.finished_metrics(asked=3, done=2, unit="epoch", error=Refused)


def test_paths_are_recorded_relative_inside_a_project_and_read_back_after_it_moved(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "store").mkdir(parents=True)
    run = project / "runs" / "saoa"
    assert record_path(project / "store", run) == "../../store"
    assert record_path("/", run) == "/"  # nothing in common but the root: absolute
    moved = tmp_path / "elsewhere"
    project.rename(moved)
    assert resolve_recorded_path("../../store", moved / "runs" / "saoa") == (moved / "store").resolve()
    # An absolute record (every run before relative paths) reads as it is.
    assert resolve_recorded_path(str(moved / "store"), tmp_path / "x") == moved / "store"
    # A run moved without its store: the absolute path it also recorded.
    assert resolve_recorded_path("../../store", tmp_path / "lone" / "run", fallback=str(moved / "store")) == \
        moved / "store"
