"""The `featstore` commands, run for real on small generated stores."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.featstore_cli import main
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.reader import FeatureStore
from tests.corruption import flip_live_byte

SMALL = feature_shapes(verb_dim=8, noun_dim=8, det_dim=4, n_global=6, n_local=4, map_size=None)


def _sample(tmp_path: Path, n: int, *, shapes=SMALL) -> tuple[Path, Path]:
    segments = generate_segments(n, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    npz_dir = write_feature_npzs(tmp_path / "npz", segments, shapes=shapes)
    return annotations, npz_dir


def _invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_every_command_has_help() -> None:
    for command in [[]] + [[name] for name in main.commands]:
        result = _invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_import_2000_segments_then_query_count_csv(tmp_path: Path) -> None:
    annotations, npz_dir = _sample(tmp_path, 2000)
    store = tmp_path / "store"
    result = _invoke("import", store, "--annotations", annotations, "--from", npz_dir, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "imported 2000" in result.output
    result = _invoke("query", store, "select count(*) as n from segments where status = 'ok'", "--format", "csv")
    assert result.exit_code == 0
    assert result.output.strip().splitlines() == ["n", "2000"]
    # Labels came from the annotation file, joined on uid.
    rows = json.loads(_invoke("query", store, "select uid, verb_class, noun_class, participant_id from segments "
                                              "where uid in ('0', '1999') order by uid", "--format", "json").output)
    segments = {s.uid: s for s in generate_segments(2000, num_verbs=5, num_nouns=7)}
    for row in rows:
        seg = segments[row["uid"]]
        assert (row["verb_class"], row["noun_class"], row["participant_id"]) == (
            seg.verb_class, seg.noun_class, seg.participant_id)
    # 6 global + 4 local box rows per segment.
    count = _invoke("query", store, "select count(*) as n from boxes", "--format", "csv")
    assert count.output.strip().splitlines()[1] == str(2000 * 10)
    # A rerun does no work.
    again = _invoke("import", store, "--annotations", annotations, "--from", npz_dir, "--no-progress")
    assert "imported 0, already stored 2000" in again.output


def test_import_reports_unmatched_files_and_fails_bad_segments(tmp_path: Path) -> None:
    annotations, npz_dir = _sample(tmp_path, 12)
    (npz_dir / "3.npz").unlink()
    arrays = dict(np.load(npz_dir / "0.npz"))
    np.savez(npz_dir / "stray.npz", **arrays)
    arrays["verb.global"][2] = np.nan
    np.savez(npz_dir / "5.npz", **arrays)
    (npz_dir / "7.npz").write_bytes(b"not a zip")
    result = _invoke("import", tmp_path / "store", "--annotations", annotations, "--from", npz_dir, "--no-progress")
    assert result.exit_code == 1
    assert "1 npz files without an annotation row: stray" in result.output
    assert "1 annotation rows without an npz file: 3" in result.output
    assert "failed 5: field verb.global holds NaN" in result.output
    assert "failed 7: unreadable npz" in result.output
    errors = json.loads(_invoke("query", tmp_path / "store", "select uid, error from segments where status = 'failed' "
                                                             "order by uid", "--format", "json").output)
    assert [e["uid"] for e in errors] == ["5", "7"]


def test_import_refuses_a_segment_whose_shape_differs(tmp_path: Path) -> None:
    annotations, npz_dir = _sample(tmp_path, 6)
    arrays = dict(np.load(npz_dir / "4.npz"))
    arrays["det.global.feat"] = np.zeros((7, 4), np.float32)
    np.savez(npz_dir / "4.npz", **arrays)
    result = _invoke("import", tmp_path / "store", "--annotations", annotations, "--from", npz_dir, "--no-progress")
    assert result.exit_code == 1
    assert "4.npz: field det.global.feat has shape [7, 4]" in result.output
    assert "Traceback" not in result.output


_KILLING_IMPORT = """
import os, signal, sys
from featstore.store.importer import import_npz
store, annotations, npz, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
count = [0]
def maybe_die(uid):
    count[0] += 1
    if count[0] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
import_npz(store, annotations, npz, progress=False, flush_every=7, on_segment=maybe_die)
"""


@pytest.mark.parametrize("kill_after", [1, 9, 23])
def test_import_killed_part_way_then_rerun_stores_every_segment_once(tmp_path: Path, kill_after: int) -> None:
    annotations, npz_dir = _sample(tmp_path, 30)
    store = tmp_path / "store"
    args = [sys.executable, "-c", _KILLING_IMPORT, str(store), str(annotations), str(npz_dir)]
    killed = subprocess.run(args + [str(kill_after)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    finished = subprocess.run(args + ["0"], capture_output=True)
    assert finished.returncode == 0, finished.stderr.decode()
    with FeatureStore.open(store).connect() as con:
        assert con.execute("select count(*), count(distinct uid) from segments where status = 'ok'").fetchone() == (30, 30)
        assert con.execute("select count(*) from boxes").fetchone() == (300,)
    assert _invoke("verify", store, "--no-progress").exit_code == 0


def test_info_json_and_verify_exit_code(tmp_path: Path) -> None:
    annotations, npz_dir = _sample(tmp_path, 10)
    store = tmp_path / "store"
    _invoke("import", store, "--annotations", annotations, "--from", npz_dir, "--no-progress")
    info = json.loads(_invoke("info", store, "--json").output)
    assert set(info) >= {"segments", "fields", "bytes", "manifest"}
    assert info["segments"] == {"ok": 10, "failed": 0}
    assert info["fields"]["det.global.feat"] == {"dtype": "float16", "shape": [6, 4]}
    assert info["fields"]["det.global.box"]["dtype"] == "float32"
    assert info["bytes"] > 0 and info["manifest"]["provenance"]["source"] == "import"
    text = _invoke("info", store).output
    assert "10 ok, 0 failed" in text
    good = _invoke("verify", store, "--no-progress")
    assert good.exit_code == 0 and "10 segments verified" in good.output
    opened = FeatureStore.open(store)
    needle = opened.read("4", ["det.local.box"])["det.local.box"].tobytes()
    flip_live_byte(store / "lmdb" / "0" / "data.mdb", needle, 3,
                   lambda: _invoke("verify", store, "--no-progress").exit_code == 1)
    bad = _invoke("verify", store, "--no-progress")
    assert bad.exit_code == 1 and bad.stdout.splitlines() == ["4\tchecksum mismatch"]


def test_query_refusal_is_a_clear_error_and_nonzero_exit(tmp_path: Path) -> None:
    annotations, npz_dir = _sample(tmp_path, 3)
    _invoke("import", tmp_path / "store", "--annotations", annotations, "--from", npz_dir, "--no-progress")
    result = _invoke("query", tmp_path / "store", "select * from read_csv('/etc/passwd')")
    assert result.exit_code == 1 and "Error: query failed" in result.output
    result = _invoke("query", tmp_path / "store", "create table x as select 1")
    assert result.exit_code == 1 and "only SELECT is allowed" in result.output
    result = _invoke("query", tmp_path / "nowhere", "select 1")
    assert result.exit_code == 2


def test_convert_checkpoint_command(tmp_path: Path) -> None:
    import argparse

    import torch

    published = tmp_path / "tsn_epic55.pth.tar"
    torch.save({"state_dict": {"base_model.conv1.weight": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)},
               published)
    result = _invoke("convert-checkpoint", published, tmp_path / "tsn_epic55.pt")
    assert result.exit_code == 0, result.output
    assert "wrote 1 tensors" in result.output and "left out: args" in result.output and "sha256 " in result.output
    assert torch.load(tmp_path / "tsn_epic55.pt", weights_only=True)["base_model.conv1.weight"].tolist() == [1, 1]

    from fractions import (
        Fraction,  # harmless, but not something a checkpoint holds: not on the allow-list
    )

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Fraction(1, 3)}, tmp_path / "bad.pth")
    refused = CliRunner().invoke(main, ["convert-checkpoint", str(tmp_path / "bad.pth"), str(tmp_path / "o.pt")])
    assert refused.exit_code == 1 and "refused to rebuild fractions.Fraction" in refused.output
