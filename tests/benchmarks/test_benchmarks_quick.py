"""Smoke test of the benchmark runner: `--quick` runs every benchmark and writes well-formed JSON.

It asserts that the runner works, never a speed: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.run import ALIASES, ALL_NAMES, EXPLICIT_NAMES, GPU_NAMES, parse_args, selected_names

# The benchmark suite's quick mode, in a subprocess: over a minute (CI runs it).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "run.py"
KEYS = {"name", "ours", "reference", "unit", "ratio", "goal", "meets"}


def _run(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, str(RUN), *args, "--json", str(out), "--tmpdir", str(scratch), "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert list(scratch.iterdir()) == [], "the scratch folder was not deleted"
    return proc, json.loads(out.read_text())


def _check_row(row: dict) -> None:
    assert KEYS <= set(row), f"{row.get('name')}: missing {sorted(KEYS - set(row))}"
    assert isinstance(row["goal"], str) and isinstance(row["unit"], str)
    assert row["meets"] in (True, False, None)
    if row.get("status", "ok") == "ok":
        ours, reference, ratio = row["ours"], row["reference"], row["ratio"]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (ours, reference, ratio)), row
        assert ratio == pytest.approx(ours / reference, rel=1e-9)
    else:
        assert row["status"] == "skipped", row  # a benchmark that errors fails the run (exit code 1)
        assert row["notes"].startswith("skipped: ") and row["ours"] is None and row["ratio"] is None


def test_quick_run_writes_every_benchmark(tmp_path: Path) -> None:
    proc, rows = _run(tmp_path, "--quick", timeout=900)
    expected = [n for n in ALL_NAMES if n not in GPU_NAMES and n not in EXPLICIT_NAMES]
    assert [row["name"] for row in rows] == expected
    for row in rows:
        _check_row(row)
    for name in expected:  # the printed table names every benchmark
        assert name in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, --gpu runs the full GPU benchmarks")
def test_gpu_benchmarks_are_reported_as_skipped_without_cuda(tmp_path: Path) -> None:
    proc, rows = _run(tmp_path, "--gpu", "--only", "gpu", timeout=120)
    assert [row["name"] for row in rows] == list(GPU_NAMES)
    for row in rows:
        _check_row(row)
        assert row["status"] == "skipped" and "CUDA" in row["notes"]
    assert "skipped" in proc.stderr


def test_only_selects_and_refuses_unknown_names() -> None:
    assert selected_names(parse_args(["--only", "store_bytes_vs_payload,store_preload_vs_npy"])) == [
        "store_preload_vs_npy", "store_bytes_vs_payload"]
    assert selected_names(parse_args(["--only", "gpu"])) == list(GPU_NAMES)
    assert not set(GPU_NAMES) & set(selected_names(parse_args([])))
    assert not set(EXPLICIT_NAMES) & set(selected_names(parse_args(["--quick"])))  # epic55_full_size: by name only
    assert selected_names(parse_args(["--only", "epic55_full_size"])) == ["epic55_full_size"]
    assert selected_names(parse_args(["--only", "heads_cost_growth"])) == list(ALIASES["heads_cost_growth"])
    with pytest.raises(SystemExit, match="unknown benchmark"):
        selected_names(parse_args(["--only", "no_such_benchmark"]))
