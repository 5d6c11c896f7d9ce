"""The commands the reliability tests run are forked from a warm interpreter (`forkserver`): a forked
command must exit, write and die as the same command started fresh does, or every crash test would
check something other than what a user runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import write_feature_npzs
from tests.reliability import faults, forkserver
from tests.reliability.workloads import IMPORT_SHAPES, import_command

# Each command also started fresh, for comparison: seconds (CI runs it).
pytestmark = pytest.mark.slow


def _without_temporary_names(text: str) -> str:
    return re.sub(r"\.[0-9a-f]{32}\.tmp", ".<random>.tmp", text)


def test_a_forked_command_exits_writes_and_dies_as_a_fresh_one(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    segments = generate_segments(12, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(tmp_path / "npz", segments, shapes=IMPORT_SHAPES)

    # It really is forked (the comparisons below would otherwise compare fresh with fresh).
    started = faults.start(faults.command("featstore", "info", tmp_path / "missing"))
    assert isinstance(started, forkserver.ForkedProcess)
    started.communicate(timeout=60)

    # case: (argv, with {how} in the folder each run writes, run options, the exit status both must have)
    cases = {
        "a usage error (click's)": (faults.command("featstore", "info", tmp_path / "missing"), {}, 2),
        "a complete import, its line on stdout": (import_command(tmp_path / "{how}" / "ok", annotations, npz), {}, 0),
        "killed at an I/O point": (import_command(tmp_path / "{how}" / "killed", annotations, npz),
                                   {"fault": "lmdb.commit:3:kill"}, -9),
        "the command's own error": (import_command(tmp_path / "{how}" / "full", annotations, npz),
                                    {"fault": "parquet.write:2:enospc"}, 1),
    }
    for case, (argv, options, status) in cases.items():
        forked = faults.run([a.replace("{how}", "forked") for a in argv], **options)
        with monkeypatch.context() as fresh_only:
            fresh_only.setenv(forkserver.FRESH_ENV, "1")
            fresh = faults.run([a.replace("{how}", "fresh") for a in argv], **options)
        assert forked.returncode == fresh.returncode == status, (case, faults.describe(forked), faults.describe(fresh))
        assert forked.stdout == fresh.stdout, case
        forked_stderr = forked.stderr.replace(str(tmp_path / "forked"), str(tmp_path / "fresh"))
        assert _without_temporary_names(forked_stderr) == _without_temporary_names(fresh.stderr), case
