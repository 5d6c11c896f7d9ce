"""`featstore import --format rulstm-lmdb` against a bare sequential scan of the same LMDB.

The source is a synthetic RULSTM-layout LMDB (one modality, 1024-d raw float32 under
``<video>_frame_{:010d}.jpg``) of EPIC-55's training size: 28,472 segments over 272 videos, lengths
drawn like EPIC-55's (median 59, mean 113 frames at 30 fps), back to back, so the LMDB holds exactly
the frames the segments cover (~3.2 M frames: 12 GiB of values, ~25 GiB of LMDB, each 4 KiB value
taking two overflow pages). ``FEATSTORE_BENCH_IMPORT_SCALE`` (a fraction of the segments; default
0.1) scales it; ``--quick`` uses 1/100.

Ours: bytes of the frames the import read / wall seconds of `featstore.imports.import_features`
(mean pooling, writing the store; one process), in a fresh process that also samples the resident
memory of itself and its children; the same with ``--workers 2`` is reported in the notes.
Reference: ``for value in cursor.iternext(keys=False)`` over the whole LMDB summing ``len(value)``
(values copied out as ``bytes``, as a plain Python scan reads them), page cache warm for both (a
scan first warms it). The second row is one import process's peak anonymous resident memory against
a stated bound (file pages of the mapped LMDBs are page cache, reported in the notes).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np

from benchmarks.common import GiB, MiB, Context, Result, compare, load_average, spread

REPO = Path(__file__).resolve().parents[1]
EPIC55_TRAIN = 28_472
EPIC55_VIDEOS = 272
WIDTH = 1024
RSS_BOUND = 512 * MiB  # the stated bound on an import process's own (anonymous) memory, whatever the source's size
WORKERS = 2  # `featstore import --workers` of the second, reported run: the cores of the machine measured

IMPORT_CHILD = r"""
import json, os, sys, threading, time
peak = {"anon": 0, "file": 0, "process": 0}

def tree():
    # This process and its descendants (the import's workers).
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier += children
    return found

def sample():
    while True:
        anon = file = 0
        for pid in tree():
            try:
                with open(f"/proc/{pid}/status") as status:
                    for line in status:
                        if line.startswith("RssAnon:"):
                            value = int(line.split()[1]) * 1024
                            anon += value
                            peak["process"] = max(peak["process"], value)
                        elif line.startswith("RssFile:"):
                            file += int(line.split()[1]) * 1024
            except OSError:
                pass
        peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
from featstore.imports import import_features
from featstore.store.reader import FeatureStore
started = time.perf_counter()
report = import_features(sys.argv[1], sys.argv[2], sys.argv[3], format="rulstm-lmdb", flush_every=1024,
                         workers=int(sys.argv[4]), progress=False)
seconds = time.perf_counter() - started
store = FeatureStore.open(sys.argv[1])
frames = int(store.read_field(store.uids(), "rulstm.rgb.frames").sum())
time.sleep(0.1)
print(json.dumps({"seconds": seconds, "imported": report.imported, "failed": len(report.failed),
                  "frames": frames, "peak_anon": peak["anon"], "peak_process": peak["process"],
                  "peak_file": peak["file"]}))
"""

def _scale(quick: bool) -> float:
    if quick:
        return 0.01
    return float(os.environ.get("FEATSTORE_BENCH_IMPORT_SCALE", "0.1"))


def write_source(root: Path, n_segments: int, seed: int = 0) -> tuple[Path, Path, int]:
    """EPIC-55-like segments back to back over 272 videos, and the RULSTM LMDB of their frames.

    Returns:
        (annotation file, LMDB folder, frames written).
    """
    from featstore.samples.annotations import SegmentLabel, write_epic55_annotations
    from featstore.samples.published import write_rulstm_lmdb

    rng = np.random.default_rng(seed)
    # EPIC-55 train at 30 fps: median 59 frames, mean 113 -> lognormal sigma sqrt(2 ln(113 / 59)).
    lengths = np.clip(rng.lognormal(math.log(59), math.sqrt(2 * math.log(113 / 59)), n_segments), 15, 9000)
    videos = max(1, round(EPIC55_VIDEOS * n_segments / EPIC55_TRAIN))
    segments, next_frame = [], {}
    for i, length in enumerate(lengths):
        video = f"P{i % videos // 10 + 1:02d}_{i % videos % 10 + 1:02d}"
        start = next_frame.get(video, 1)  # native 60 fps frames, two per 30 fps frame
        stop = start + 2 * int(length) - 1
        next_frame[video] = stop + 1
        segments.append(SegmentLabel(str(i), video[:3], video, start, stop, int(rng.integers(125)),
                                     int(rng.integers(352))))
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    pool = rng.standard_normal((4099, WIDTH)).astype(np.float32)  # distinct values, cheap to draw
    count = 0

    def frames():
        nonlocal count
        for video, end in sorted(next_frame.items()):
            for frame in range(1, math.floor(end / 60 * 30) + 2):
                count += 1
                yield video, frame, pool[count % len(pool)]

    lmdb_dir = write_rulstm_lmdb(root / "rulstm" / "rgb", frames(), map_size=1 << 34, commit_every=20_000)
    return annotations, lmdb_dir.parent, count


def scan(lmdb_dir: Path) -> tuple[float, int]:
    """Seconds and value bytes of one sequential pass over the LMDB, values copied out as bytes."""
    with lmdb.open(str(lmdb_dir), readonly=True, lock=False, readahead=True) as env:
        started = time.perf_counter()
        total = 0
        with env.begin() as txn:
            for value in txn.cursor().iternext(keys=False, values=True):
                total += len(value)
        return time.perf_counter() - started, total


def _import(root: Path, annotations: Path, source: Path, name: str, workers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", IMPORT_CHILD, str(root / name), str(annotations), str(source),
                           str(workers)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"the import process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_rulstm(ctx: Context, wanted: set[str]) -> list[Result]:
    """`featstore import --format rulstm-lmdb` vs a sequential scan of its LMDB; the import's peak memory."""
    scale = _scale(ctx.sizes.quick)
    n = max(100, round(EPIC55_TRAIN * scale))
    root = ctx.workspace.path("import-rulstm")
    need = int(n * 113 * WIDTH * 4 * 1.3)
    if ctx.workspace.free_bytes() < 2 * need + 5 * GiB:
        raise RuntimeError(f"needs ~{2 * need / GiB:.1f} GiB of disk and 5 GiB to spare")
    try:
        started = time.perf_counter()
        annotations, source, frames = write_source(root, n)
        written_s = time.perf_counter() - started
        ctx.log(f"  wrote {frames:,} frames for {n:,} segments in {written_s:.0f} s")
        scan(source / "rgb")  # warms the page cache for both sides
        scans, imports, parallel = [], [], []
        for round_ in range(2):
            scans.append(scan(source / "rgb"))
            imports.append(_import(root, annotations, source, f"store-{round_}", 1))
            ctx.workspace.remove(f"import-rulstm/store-{round_}")
            parallel.append(_import(root, annotations, source, f"parallel-{round_}", WORKERS))
            ctx.workspace.remove(f"import-rulstm/parallel-{round_}")
            ctx.log(f"  round {round_}: scan {scans[-1][0]:.2f} s, import {imports[-1]['seconds']:.2f} s, "
                    f"with {WORKERS} workers {parallel[-1]['seconds']:.2f} s (load {load_average()})")
        scans.append(scan(source / "rgb"))
        source_bytes = sum(os.path.getsize(p) for p in (source / "rgb").iterdir())
    finally:
        ctx.workspace.remove("import-rulstm")
    scan_bytes = scans[0][1]
    scan_rates = [total / seconds for seconds, total in scans]
    import_rates = [run["frames"] * WIDTH * 4 / run["seconds"] for run in imports]
    parallel_rates = [run["frames"] * WIDTH * 4 / run["seconds"] for run in parallel]
    run = imports[0]
    assert run["imported"] == n and run["failed"] == 0, run
    notes = (f"{n:,} segments ({scale:g} of EPIC-55 train) over {frames:,} frames of 1024-d float32 "
             f"({scan_bytes / GiB:.2f} GiB of values, LMDB {source_bytes / GiB:.2f} GiB); import read "
             f"{run['frames']:,} frames; import (one process) {statistics.median(r['seconds'] for r in imports):.1f} s "
             f"(rounds {spread([r['seconds'] for r in imports])} s); with --workers {WORKERS} "
             f"{statistics.median(r['seconds'] for r in parallel):.1f} s ({spread([r['seconds'] for r in parallel])} s: "
             f"{statistics.median(parallel_rates) / statistics.median(scan_rates):.2f}x the scan); scan "
             f"{statistics.median(s for s, _ in scans):.2f} s ({spread([s for s, _ in scans])} s); page cache warm; "
             f"load {load_average()}")
    rows = [compare("import_rulstm_vs_lmdb_scan", statistics.median(import_rates), statistics.median(scan_rates),
                    unit="bytes/s", goal=">= 0.5", notes=notes)]
    peak = max(r["peak_process"] for r in imports + parallel)
    rows.append(compare("import_rulstm_peak_rss", peak, RSS_BOUND, unit="bytes", goal="<= 1",
                        notes=f"the largest anonymous RSS of one import process (interpreter and libraries "
                              f"included) against the stated bound {RSS_BOUND / MiB:.0f} MiB a process; all "
                              f"{WORKERS} workers and their parent together peaked at "
                              f"{max(r['peak_anon'] for r in parallel) / MiB:,.0f} MiB; mapped file pages (source "
                              f"LMDB and store: page cache) at {max(r['peak_file'] for r in imports) / MiB:,.0f} "
                              f"MiB; {notes}"))
    return [r for r in rows if r.name in wanted]
