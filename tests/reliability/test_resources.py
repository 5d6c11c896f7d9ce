"""Resources: a store that outgrows its LMDB map many times over, and commands on a full or
read-only disk, which must fail with a clear error, leave nothing half-written, and let a rerun
(with room again) finish the job.

A full disk is made two ways: ``RLIMIT_FSIZE`` (the kernel refuses every write past the limit, with
EFBIG, for LMDB, Parquet and torch alike; needs no privileges) and the shim's ``enospc`` action
(``OSError(ENOSPC)`` after part of the bytes, at one exact write). A read-only disk is a read-only
bind mount where the tests may mount, else a directory without write permission (not root).
"""
from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import os
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main
from cli.heads_cli import main as heads_main
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import write_feature_npzs
from featstore.store.reader import FeatureStore
from tests.reliability import faults
from tests.reliability.invariants import (
    assert_parts_complete,
    assert_same_run,
    assert_store_consistent,
    leftover_temporaries,
)
from tests.reliability.store_processes import MAP_FIELDS, N_BIG, map_row, read_all_after_growth
from tests.reliability.workloads import (
    IMPORT_BOXES_PER_SEGMENT,
    IMPORT_SHAPES,
    TRAIN_WHERE,
    VAL_WHERE,
    import_command,
    train_command,
)

# Full disks and a map outgrown hundreds of times, mostly in subprocesses: minutes in all (CI runs them).
# heads train runs in this process too: one thread.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_a_store_outgrows_its_lmdb_map_hundreds_of_times_while_a_reader_holds_it_open(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    store = FeatureStore.create(path, fields=MAP_FIELDS)
    spawn = mp.get_context("spawn")
    opened, grown, results = spawn.Event(), spawn.Event(), spawn.Queue()
    with store.writer(map_size=1 << 16, flush_every=16) as writer:
        writer.put(map_row(0), {"verb.map": np.zeros((64, 32, 32))})
        writer.flush()
        reader = spawn.Process(target=read_all_after_growth, args=(path, opened, grown, results))
        reader.start()
        assert opened.wait(120)
        for i in range(1, N_BIG):
            writer.put(map_row(i), {"verb.map": np.full((64, 32, 32), i % 2048)})
        assert writer.map_grows >= 8
        map_size = writer.env.info()["map_size"]
    grown.set()
    n, firsts, bad = results.get(timeout=300)
    reader.join(60)
    assert reader.exitcode == 0 and n == N_BIG and bad == []
    assert firsts == [float(i % 2048) for i in range(N_BIG)]
    assert FeatureStore.open(path).verify() == []
    # The map is address space, not disk: the file holds about the data, not the last doubling.
    data_bytes = N_BIG * 64 * 32 * 32 * 2
    assert map_size >= data_bytes and FeatureStore.open(path).disk_bytes() < 1.5 * data_bytes


# ------------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture(scope="module")
def import_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("full-disk")
    segments = generate_segments(300, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    return annotations, write_feature_npzs(root / "npz", segments, shapes=IMPORT_SHAPES)


FULL_DISK_IMPORTS = {
    # how, (run options, words of the error)
    "LMDB file past the size limit": ({"fsize_limit": 768 * 1024}, "writing LMDB shard '0' failed"),
    "ENOSPC in an LMDB commit": ({"fault": "lmdb.commit:150:enospc"}, "No space left on device"),
    "ENOSPC half-way through a Parquet part": ({"fault": "parquet.write:2:enospc"}, "No space left on device"),
    "ENOSPC renaming a Parquet part into place": ({"fault": "os.replace:3:enospc"}, "No space left on device"),
}


@pytest.mark.parametrize("how", list(FULL_DISK_IMPORTS))
def test_an_import_on_a_full_disk_fails_cleanly_and_a_rerun_completes(import_sample, tmp_path: Path,
                                                                       how: str) -> None:
    annotations, npz = import_sample
    store = tmp_path / "store"
    options, words = FULL_DISK_IMPORTS[how]
    failed = faults.run(import_command(store, annotations, npz), **options)
    assert failed.returncode == 1, faults.describe(failed)
    assert failed.stderr.startswith("Error: ") and words in failed.stderr, faults.describe(failed)
    assert "Traceback" not in failed.stderr
    assert str(store) in failed.stderr, faults.describe(failed)  # which file could not be written
    # Nothing half-written: every visible part complete, no temporary left, and whatever the index
    # lists reads back with its checksum.
    assert_parts_complete(store)
    assert leftover_temporaries(store) == []
    assert FeatureStore.open(store).verify() == []
    rerun = faults.run(import_command(store, annotations, npz))
    assert rerun.returncode == 0, faults.describe(rerun)
    assert_store_consistent(store, [str(i) for i in range(300)], n_fields=len(IMPORT_SHAPES),
                            boxes_per_segment=IMPORT_BOXES_PER_SEGMENT)


FULL_DISK_TRAINING = {
    "checkpoint past the size limit": ({"fsize_limit": 64 * 1024}, "cannot write the checkpoint", 0),
    "ENOSPC half-way through the epoch-2 checkpoint": ({"fault": "torch.save:2:enospc"}, "No space left on device", 1),
}


@pytest.mark.parametrize("how", list(FULL_DISK_TRAINING))
def test_training_on_a_full_disk_fails_cleanly_and_resumes_to_the_same_result(train_reference: dict,
                                                                              tmp_path: Path, how: str) -> None:
    out = tmp_path / "run"
    options, words, epochs_kept = FULL_DISK_TRAINING[how]
    failed = faults.run(train_command(train_reference["store"], out), **options)
    assert failed.returncode == 1, faults.describe(failed)
    assert "Error: " in failed.stderr and words in failed.stderr and "Traceback" not in failed.stderr, \
        faults.describe(failed)
    error_line = next(line for line in failed.stderr.splitlines() if line.startswith("Error: "))
    assert str(out) in error_line, faults.describe(failed)  # which file could not be written
    assert sorted(p.name for p in out.rglob(".*.tmp")) == []
    checkpoint = out / "checkpoints" / "last.pt"
    if epochs_kept:
        import torch

        assert torch.load(checkpoint, weights_only=False)["epoch"] == epochs_kept  # the last good one, whole
    else:
        assert not checkpoint.exists()
    resumed = faults.run(train_command(train_reference["store"], out, "--resume"))
    assert resumed.returncode == 0, faults.describe(resumed)
    assert_same_run(out, train_reference["run"])


# ------------------------------------------------------------------------------------------------
# a read-only disk


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` read-only for this process: a read-only bind mount (root, where mounting is
    allowed), else taking away write permission (which binds everyone but root)."""
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
        if mounted:
            try:
                if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
                    pytest.skip("cannot remount read-only here")
                yield
            finally:
                # A lazy unmount if something (a memory map) still holds it: the mount must not outlive the test.
                if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
                    subprocess.run(["umount", "-l", str(folder)], capture_output=True)
            return
        pytest.skip("running as root without permission to mount: no way to make a read-only folder")
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if not p.is_symlink()}
    for p, mode in modes.items():
        p.chmod(mode & ~0o222)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_a_read_only_disk_fails_writes_cleanly_and_still_serves_reads(import_sample, tmp_path: Path) -> None:
    annotations, npz = import_sample
    disk = tmp_path / "disk"
    store = disk / "store"
    imported = faults.run(import_command(store, annotations, npz))
    assert imported.returncode == 0, faults.describe(imported)
    (disk / "runs").mkdir()
    before = sorted(p.relative_to(disk) for p in disk.rglob("*"))
    with read_only(disk):
        train = CliRunner().invoke(heads_main, [
            "train", str(store), "--model", "global", "--train-where", TRAIN_WHERE, "--val-where", VAL_WHERE,
            "--epochs", "1", "--out", str(disk / "runs" / "r"), "--no-progress"])
        assert train.exit_code == 1 and "Traceback" not in train.output, train.output
        assert any(f"Error: [Errno {code}] {os.strerror(code)}" in train.output for code in (errno.EROFS, errno.EACCES))
        new_store = CliRunner().invoke(featstore_main, [
            "import", str(disk / "new"), "--annotations", str(annotations), "--from", str(npz), "--no-progress"])
        assert new_store.exit_code == 1 and new_store.output.startswith("Error: "), new_store.output
        # Reading needs no write: the index, the tensors (LMDB without its reader lock) and training
        # with the run written elsewhere.
        for args in (["info", str(store)], ["verify", str(store), "--no-progress"],
                     ["query", str(store), "select count(*) as n from segments", "--format", "csv"]):
            result = CliRunner().invoke(featstore_main, args)
            assert result.exit_code == 0, (args, result.output)
        verify = CliRunner().invoke(featstore_main, ["verify", str(store), "--no-progress"])
        assert "300 segments verified" in verify.output
        elsewhere = CliRunner().invoke(heads_main, [
            "train", str(store), "--model", "global", "--train-where", "verb_class < 3",
            "--val-where", "verb_class >= 3", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
        assert elsewhere.exit_code == 0, elsewhere.output
        FeatureStore.open(store).close()  # this process's LMDB maps of the read-only files
    assert sorted(p.relative_to(disk) for p in disk.rglob("*")) == before
