"""EPIC-scale stores: bytes of a SAOA-ready store, how head costs grow with the store, streaming a store
larger than the memory budget, a group-by over 5.4 M box rows, and EPIC-55 at full size.

Every store is generated (random features of the paper's shapes) through the product's writer; the
query benchmark writes only the index (the query reads nothing else).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Context, GiB, MiB, Result, available_memory, compare, interleaved, load_average, spread
from benchmarks.stores import NUM_NOUNS, NUM_VERBS, PARTICIPANTS, FeaturePool, build_store, segment_arrays
from featstore.store.reader import FeatureStore
from featstore.store.schema import DET_GLOBAL_BOX, VERB_LOCAL, VERB_MAP

REPO = Path(__file__).resolve().parents[1]


def _quiet(_: str) -> None:
    pass


def _drop_page_cache(store: Path) -> None:
    """Evict a store's LMDB files from the page cache (no privileges needed: clean, unmapped pages)."""
    FeatureStore.open(store).close()
    for data in Path(store, "lmdb").rglob("data.mdb"):
        handle = os.open(data, os.O_RDONLY)
        try:
            os.fsync(handle)
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


def _fit_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) on log(size): 1 is linear growth."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float))
    return float(np.polyfit(x, y, 1)[0])


# --------------------------------------------------------------------------------------------------
# store_bytes_saoa_ready_vs_full_map


def store_bytes_saoa_ready(ctx: Context, wanted: set[str]) -> list[Result]:
    """Bytes per segment of the store `featstore derive` + `copy --drop verb.map` leave, vs the full map's."""
    from featstore.store.transform import copy_store, derive_field

    quick = ctx.sizes.quick
    n = 24 if quick else 100
    dim, det_dim, map_size = (64, 32, (2, 4, 5)) if quick else (2048, 1024, (8, 8, 15))
    root = ctx.workspace.path("saoa_ready")
    try:
        full = build_store(root / "full", n, verb_dim=dim, det_dim=det_dim, map_size=map_size, log=_quiet)
        both = root / "both"
        started = time.perf_counter()
        copy_store(full.path, both, progress=False)
        copy_seconds = time.perf_counter() - started
        started = time.perf_counter()
        derive_field(both, progress=False)
        derive_seconds = time.perf_counter() - started
        ready = root / "ready"
        fields = [f for f in FeatureStore.open(both).fields if f != VERB_MAP]
        copy_store(both, ready, fields=fields, progress=False)
        full_store, ready_store = FeatureStore.open(full.path), FeatureStore.open(ready)
        full_bytes = full_store.disk_bytes() / n
        ready_bytes = ready_store.disk_bytes() / n
        estimates = ready_store.info()["map_alternatives"]
    finally:
        ctx.workspace.remove("saoa_ready")
    t, h, w = map_size
    notes = (f"{n} generated segments, C={dim}, Cd={det_dim}, 60/40 slots, verb.map {dim}x{t}x{h}x{w} fp16; "
             f"bytes on disk per segment (every file: LMDB, index, manifest): SAOA-ready (verb.global, noun.global, "
             f"det.*, verb.local {40}x{dim}, no map) {ready_bytes / 1024:,.0f} KiB vs full map (the same fields with "
             f"verb.map instead of verb.local) {full_bytes / 1024:,.0f} KiB; made with the product: copy "
             f"{copy_seconds:.1f} s, `derive --field verb.local` {derive_seconds:.1f} s ({n / derive_seconds:.1f} "
             f"segments/s), `copy --drop verb.map`; `info` estimates per segment: none "
             f"{estimates['none']['bytes_per_segment'] / 1024:,.0f} KiB, time-mean "
             f"{estimates['time-mean']['bytes_per_segment'] / 1024:,.0f} KiB, full (with verb.local) "
             f"{estimates['full']['bytes_per_segment'] / 1024:,.0f} KiB; load average {load_average()}")
    return [compare("store_bytes_saoa_ready_vs_full_map", ready_bytes, full_bytes, unit="bytes", goal="<= 0.2",
                    notes=notes)]


# --------------------------------------------------------------------------------------------------
# heads_cost_growth_epoch / heads_cost_growth_preload


def heads_cost_growth(ctx: Context, wanted: set[str]) -> list[Result]:
    """Preload seconds and one saoa epoch's seconds at 5k, 10k, 20k, 40k segments of one store."""
    from featstore.training.engine import Engine
    from featstore.training.hooks import LearningRate, LossCheck
    from heads.trainer import HeadTrainable, TrainConfig, prepare

    quick = ctx.sizes.quick
    sizes = [250, 500, 1000, 2000] if quick else [5000, 10000, 20000, 40000]
    dim, det_dim = (32, 16) if quick else (512, 256)
    root = ctx.workspace.path("growth")
    preload: list[float] = []
    first: list[float] = []
    epoch: list[float] = []
    try:
        built = build_store(root, sizes[-1], verb_dim=dim, det_dim=det_dim, map_size=None, verb_local=True,
                            log=ctx.log)
        ctx.log(f"  growth store: {built.payload_bytes / GiB:.2f} GiB written in {built.seconds:.0f} s")
        for n in sizes:
            config = TrainConfig(model="saoa", train_where=f"cast(uid as integer) < {n}", epochs=1, batch_size=32,
                                 lr=1e-3, memory_budget_gb=1e6)
            # A first, untimed start reads the selection into the page cache (other processes' memory
            # may have pushed the freshly written store out of it), so every size is timed warm.
            gc.collect()
            started = time.perf_counter()
            del_me = prepare(built.path, config, log=_quiet)
            first.append(time.perf_counter() - started)
            del del_me
            gc.collect()
            started = time.perf_counter()
            run = prepare(built.path, config, log=_quiet)
            preload.append(time.perf_counter() - started)
            assert run.train.mode == "preload" and len(run.train) == n
            head = HeadTrainable(run)
            engine = Engine()  # the step loop of `heads train`, without validation and files
            engine.add(head, name=f"growth{n}", epochs=1, hooks=[LossCheck(), LearningRate(head.optimizer)])
            started = time.perf_counter()
            engine.train()
            epoch.append(time.perf_counter() - started)
            ctx.log(f"  {n} segments: preload {preload[-1]:.1f} s, epoch {epoch[-1]:.1f} s (load {load_average()})")
            del run, head, engine
    finally:
        ctx.workspace.remove("growth")
    common = (f"saoa, C={dim}, Cd={det_dim}, 60/40 slots, verb.local stored (no map), batch 32, CPU; one "
              f"{sizes[-1]}-segment store, selections of {', '.join(map(str, sizes))}; reference = exponent 1 "
              f"(linear); load average {load_average()}")
    rows = []
    if "heads_cost_growth_epoch" in wanted:
        exponent = _fit_exponent(sizes, epoch)
        rows.append(compare("heads_cost_growth_epoch", exponent, 1.0, unit="exponent", goal="<= 1.1", notes=(
            f"one epoch through the engine (heads train's step loop): {', '.join(f'{s:.1f}' for s in epoch)} s "
            f"({', '.join(f'{n / 32 / s:.1f}' for n, s in zip(sizes, epoch))} steps/s); {common}")))
    if "heads_cost_growth_preload" in wanted:
        exponent = _fit_exponent(sizes, preload)
        rows.append(compare("heads_cost_growth_preload", exponent, 1.0, unit="exponent", goal="<= 1.1", notes=(
            f"run start (heads.trainer.prepare: selection, field checks, preload into memory), page cache warm "
            f"(the second of two starts): {', '.join(f'{s:.2f}' for s in preload)} s; the first starts "
            f"{', '.join(f'{s:.2f}' for s in first)} s; {common}")))
    return rows


# --------------------------------------------------------------------------------------------------
# train_streaming_vs_preload / train_streaming_vs_preload_cold


def train_streaming(ctx: Context, wanted: set[str]) -> list[Result]:
    """batches/s of saoa training streaming from a store 4x the memory budget vs the same store preloaded."""
    from heads import data as head_data
    from heads.models import build_head, get_head, head_loss
    from heads.trainer import feature_dims

    quick = ctx.sizes.quick
    n = 512 if quick else 4000
    dim, det_dim = (32, 16) if quick else (512, 256)
    steps = 12 if quick else 60
    repeats = 1 if quick else 3
    root = ctx.workspace.path("streaming")
    try:
        built = build_store(root, n, verb_dim=dim, det_dim=det_dim, map_size=None, verb_local=True, log=_quiet)
        store = FeatureStore.open(built.path)
        labels = head_data.selection_labels(store, None)
        fields = get_head("saoa").required_fields()
        need = head_data.estimate_bytes(store, fields, n)
        budget = need // 4
        preloaded = head_data.load_features(store, labels, fields, memory_budget=None)
        streaming = head_data.load_features(store, labels, fields, memory_budget=budget)
        assert preloaded.mode == "preload" and streaming.mode == "stream"
        model = build_head("saoa", dims=feature_dims(store), num_verbs=NUM_VERBS, num_nouns=NUM_NOUNS)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        orders = [torch.randperm(n, generator=torch.Generator().manual_seed(r)) for r in range(2 * repeats + 2)]

        def epoch(features, order: torch.Tensor, train: bool = True) -> float:
            chunks = head_data.chunk_order(order, 32)[:steps]
            started = time.perf_counter()
            for batch, verbs, nouns in features.batches_of(chunks):
                if train:
                    optimizer.zero_grad()
                    head_loss(model(batch), verbs, nouns)["total"].backward()
                    optimizer.step()
            return len(chunks) / (time.perf_counter() - started)

        warm = {"stream": [], "preload": []}
        data_only = {"stream": [], "preload": []}
        epoch(streaming, orders[-1])  # warm-up: the page cache holds the store, the model's first steps done
        epoch(preloaded, orders[-1])
        for r in range(repeats):  # in turns, each round on the same order
            warm["stream"].append(epoch(streaming, orders[r]))
            warm["preload"].append(epoch(preloaded, orders[r]))
            data_only["stream"].append(epoch(streaming, orders[r], train=False))
            data_only["preload"].append(epoch(preloaded, orders[r], train=False))
        cold, cold_data = [], []
        for r in range(repeats):
            _drop_page_cache(built.path)
            cold.append(epoch(streaming, orders[repeats + r]))
            _drop_page_cache(built.path)
            cold_data.append(epoch(streaming, orders[repeats + r], train=False))
        del preloaded, streaming
    finally:
        ctx.workspace.remove("streaming")
    preload_rate = statistics.median(warm["preload"])
    common = (f"saoa training steps (forward, backward, SGD) on batches of 32 from {n} segments, C={dim}, Cd={det_dim}, "
              f"60/40 slots, verb.local stored; features {need / MiB:.0f} MiB, memory budget {budget / MiB:.0f} MiB "
              f"(a quarter): StreamingFeatures with {head_data.StreamingFeatures.READ_AHEAD} batches read ahead by "
              f"each of 4 reader threads; {steps} steps per round, {repeats} rounds; data path alone (no model): "
              f"stream warm {statistics.median(data_only['stream']):.0f}, cold {statistics.median(cold_data):.0f}, "
              f"preload {statistics.median(data_only['preload']):.0f} batches/s; torch threads "
              f"{torch.get_num_threads()}; load average {load_average()}")
    rows = []
    if "train_streaming_vs_preload" in wanted:
        rows.append(compare("train_streaming_vs_preload", statistics.median(warm["stream"]), preload_rate,
                            unit="batches/s", goal=">= 0.5", notes=(
                                f"page cache warm; stream {spread(warm['stream'])}, preload {spread(warm['preload'])} "
                                f"batches/s; {common}")))
    if "train_streaming_vs_preload_cold" in wanted:
        rows.append(compare("train_streaming_vs_preload_cold", statistics.median(cold), preload_rate,
                            unit="batches/s", goal="report", notes=(
                                f"page cache cold (the store's LMDB files evicted with posix_fadvise before each "
                                f"round); stream {spread(cold)} batches/s; reference = preloaded, warm; {common}")))
    return rows


# --------------------------------------------------------------------------------------------------
# query_boxes_vs_pandas


def _index_only_store(root: Path, n: int, boxes_per_segment: int, seed: int = 0) -> Path:
    """A store whose index holds ``n`` segments and ``n * boxes_per_segment`` box rows, in the writers' layout
    (parts of 1,024 segments, boxes then segments), written directly: the query reads nothing else."""
    import pyarrow as pa

    from featstore.store.schema import BOX_SCHEMA, SEGMENT_SCHEMA, STATUS_OK, FieldSpec
    from featstore.store.writer import write_parquet

    store = FeatureStore.create(root, fields={DET_GLOBAL_BOX: FieldSpec("float32", (boxes_per_segment, 4))},
                                provenance={"source": "benchmark"})
    rng = np.random.default_rng(seed)
    per_part = 1024
    written = time.time_ns()
    for part, start in enumerate(range(0, n, per_part)):
        count = min(per_part, n - start)
        uids = np.arange(start, start + count)
        segments = {
            "uid": [f"P{(u % 37) + 1:02d}_{u // 37:05d}_{u}" for u in uids],
            "dataset": ["epic100"] * count,
            "source": ["EPIC_100_train"] * count,
            "participant_id": [f"P{(u % 37) + 1:02d}" for u in uids],
            "video_id": [f"P{(u % 37) + 1:02d}_{(u // 37) % 700:03d}" for u in uids],
            "start_frame": (uids * 100).tolist(),
            "stop_frame": (uids * 100 + 90).tolist(),
            "start_timestamp": [None] * count, "stop_timestamp": [None] * count, "narration": [None] * count,
            "verb_class": rng.integers(0, 97, count).tolist(),
            "noun_class": rng.integers(0, 300, count).tolist(),
            "status": [STATUS_OK] * count, "error": [None] * count, "checksum": ["0" * 32] * count,
            "shard": ["0"] * count, "written_at": (written + uids).tolist(),  # one per journal entry
        }
        rows = count * boxes_per_segment
        x1 = rng.uniform(0, 0.7, rows).astype(np.float32)
        y1 = rng.uniform(0, 0.7, rows).astype(np.float32)
        score = rng.uniform(0, 1, rows).astype(np.float32)
        valid = score > 0.2
        boxes = {
            "uid": np.repeat(np.asarray(segments["uid"], dtype=object), boxes_per_segment).tolist(),
            "set": (["global"] * 36 + ["local"] * (boxes_per_segment - 36)) * count,
            "slot": np.tile(np.arange(boxes_per_segment, dtype=np.int32), count),
            "frame": np.repeat(uids * 100, boxes_per_segment),
            "x1": x1, "y1": y1, "x2": x1 + 0.2, "y2": y1 + 0.2,
            "score": np.where(valid, score, 0).astype(np.float32),
            "label": rng.integers(0, 300, rows),
            "valid": valid,
            "written_at": np.repeat(written + uids, boxes_per_segment).astype(np.int64),
        }
        name = f"part-0-{start + count:012d}.parquet"
        write_parquet(root / "boxes" / name, pa.Table.from_pydict(boxes, schema=BOX_SCHEMA))
        write_parquet(root / "segments" / name, pa.Table.from_pydict(segments, schema=SEGMENT_SCHEMA))
    return store.path


QUERY = ('select b.label, count(*) as n, avg(b.score) as mean_score from boxes b '
         'where b.valid group by b.label order by b.label')


def query_boxes(ctx: Context, wanted: set[str]) -> list[Result]:
    """A group-by over the boxes view (featstore query) vs pandas over the same Parquet parts."""
    import pandas as pd

    from featstore.store.query import run_query

    quick = ctx.sizes.quick
    n = 3000 if quick else 90_000
    per_segment = 60
    root = ctx.workspace.path("query_boxes")
    try:
        started = time.perf_counter()
        path = _index_only_store(root, n, per_segment)
        write_s = time.perf_counter() - started
        parts = sorted((path / "boxes").glob("*.parquet"))
        results: dict[str, Any] = {}

        def ours(_: int) -> None:
            results["ours"] = run_query(FeatureStore.open(path), QUERY)

        def reference(_: int) -> None:
            frame = pd.concat([pd.read_parquet(p, columns=["label", "score", "valid"]) for p in parts],
                              ignore_index=True)
            results["reference"] = (frame[frame["valid"]].groupby("label")["score"].agg(["count", "mean"])
                                    .reset_index())

        samples = interleaved({"ours": ours, "reference": reference}, warmup=1, repeats=3 if quick else 7)
        got, want = results["ours"].to_pandas(), results["reference"]
        assert got["n"].tolist() == want["count"].tolist()
        assert np.allclose(got["mean_score"], want["mean"], rtol=1e-5)
    finally:
        ctx.workspace.remove("query_boxes")
    notes = (f"{n:,} segments, {n * per_segment:,} box rows in {len(parts)} Parquet parts (the index only, written "
             f"in {write_s:.0f} s in the writers' layout); query: {QUERY!r}; ours = run_query (the library call "
             f"behind `featstore query`: a sandboxed DuckDB connection and its views, which keep only the boxes "
             f"of complete index parts and of each segment's kept attempt; every segment here has one attempt, "
             f"so no join on uids is needed); reference = pandas.read_parquet of "
             f"each part (only the three columns needed), concat, filter, groupby; same results checked; "
             f"ours {spread(samples['ours'])} s, pandas {spread(samples['reference'])} s; DuckDB threads "
             f"default, {os.cpu_count()} cores; load average {load_average()}")
    return [compare("query_boxes_vs_pandas", statistics.median(samples["ours"]),
                    statistics.median(samples["reference"]), unit="s", goal="<= 0.5", notes=notes)]


# --------------------------------------------------------------------------------------------------
# epic55_full_size


EPIC55_TRAIN = 28_472
CHILD = r"""
import json, resource, sys, threading, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from heads.trainer import RunState, TrainConfig, prepare

peak = {"anon": 0, "file": 0}
def sample():
    while True:
        fields = {}
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0]) * 1024
        peak["anon"] = max(peak["anon"], fields.get("RssAnon", 0))
        peak["file"] = max(peak["file"], fields.get("RssFile", 0))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
config = TrainConfig(model="saoa", epochs=1, batch_size=32, lr=1e-4, memory_budget_gb=1e6)
started = time.perf_counter()
run = prepare(sys.argv[1], config, log=lambda m: print(m, file=sys.stderr))
preload = time.perf_counter() - started
steps = int(sys.argv[2])
state = RunState(run, None)
chunks = state.begin_epoch()
losses = []
started = time.perf_counter()
for (batch, verbs, nouns), _ in zip(run.train.batches_of(chunks[:steps]), range(steps)):
    losses.append(state.step(batch, verbs, nouns, batch_rows=len(verbs)))
state.epoch_loss(losses)
train = time.perf_counter() - started
print(json.dumps({"preload_s": preload, "train_s": train, "steps": len(losses), "epoch_steps": len(chunks),
                  "mode": run.train.mode, "n": len(run.train),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_anon": peak["anon"], "peak_file": peak["file"]}))
"""


def epic55_full_size(ctx: Context, wanted: set[str]) -> list[Result]:
    """28,472 SAOA-ready segments at C=2048, Cd=1024: import, bytes, preload, peak memory, 200 saoa steps."""
    from featstore.samples.annotations import generate_segments, write_epic55_annotations
    from featstore.samples.features import feature_shapes
    from featstore.store.importer import import_npz

    quick = ctx.sizes.quick
    n = 600 if quick else EPIC55_TRAIN
    dim, det_dim = (64, 32) if quick else (2048, 1024)
    steps = 10 if quick else 200
    chunk = 200 if quick else 2000
    shapes = feature_shapes(verb_dim=dim, noun_dim=dim, det_dim=det_dim, map_size=None)
    shapes[VERB_LOCAL] = (40, dim)
    per_segment = sum(int(np.prod(s)) * (4 if k.rsplit(".", 1)[-1] in ("box", "score") else 2)
                      for k, s in shapes.items())
    need = n * per_segment
    free = ctx.workspace.free_bytes()
    if free < 1.3 * need + 2 * chunk * per_segment + 5 * GiB:
        raise RuntimeError(f"needs ~{(1.3 * need + 2 * chunk * per_segment) / GiB:.1f} GiB of disk and 5 GiB "
                           f"to spare, {free / GiB:.1f} GiB free")
    if available_memory() < 1.2 * need:
        raise RuntimeError(f"the preload needs ~{need / GiB:.1f} GiB of memory, "
                           f"{available_memory() / GiB:.1f} GiB available")
    root = ctx.workspace.path("epic55")
    try:
        segments = generate_segments(n, num_verbs=NUM_VERBS, num_nouns=NUM_NOUNS, participants=PARTICIPANTS,
                                     videos_per_participant=40, seed=0)
        annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
        pool = FeaturePool(np.random.default_rng(0), 4 * max(int(np.prod(s)) for s in shapes.values()))
        import_s = generate_s = 0.0
        for start in range(0, n, chunk):
            folder = root / "npz"
            started = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            for seg in segments[start:start + chunk]:
                np.savez(folder / f"{seg.uid}.npz", **segment_arrays(pool, shapes))
            os.sync()
            generate_s += time.perf_counter() - started
            started = time.perf_counter()
            report = import_npz(root / "store", annotations, folder, progress=False, flush_every=1024)
            import_s += time.perf_counter() - started
            assert not report.failed, report.summary()
            shutil.rmtree(folder)
            ctx.log(f"  imported {min(start + chunk, n)}/{n} ({import_s:.0f} s importing, {generate_s:.0f} s "
                    f"generating npz; load {load_average()})")
        store = FeatureStore.open(root / "store")
        assert len(store.uids()) == n
        on_disk = store.disk_bytes()
        store.close()
        runs = {}
        for cache in ("cold", "warm"):
            if cache == "cold":
                _drop_page_cache(root / "store")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
            # The warm run checks the preload from a warm page cache; its steps only confirm the step time.
            done = subprocess.run([sys.executable, "-c", CHILD, str(root / "store"),
                                   str(steps if cache == "cold" else max(1, steps // 10)),
                                   str(torch.get_num_threads())], capture_output=True, text=True, env=env,
                                  cwd=REPO, timeout=7200)
            if done.returncode != 0:
                raise RuntimeError(f"the training process failed: {done.stderr[-2000:]}")
            runs[cache] = json.loads(done.stdout.strip().splitlines()[-1])
            ctx.log(f"  {cache}: {runs[cache]} (load {load_average()})")
            if quick:
                break
    finally:
        ctx.workspace.remove("epic55")
    first = runs["cold"]
    step_s = first["train_s"] / first["steps"]
    epoch_s = step_s * first["epoch_steps"]
    warm = runs.get("warm")
    notes = (f"ours = bytes on disk, reference = the tensors' bytes; {n:,} SAOA-ready segments (verb.global, noun.global, det.global/local feat/box/score, verb.local 40x{dim}; "
             f"no map), C={dim}, Cd={det_dim}; `featstore import` from npz written in chunks of {chunk} (npz "
             f"writing {generate_s:.0f} s, not counted): {import_s:.0f} s = {n / import_s:.1f} segments/s; on disk "
             f"{on_disk / GiB:.2f} GiB ({on_disk / n / 1024:.0f} KiB per segment; payload {per_segment / 1024:.0f} "
             f"KiB); preload (heads.trainer.prepare, in a fresh process) page cache cold {first['preload_s']:.0f} s"
             + (f", warm {warm['preload_s']:.0f} s" if warm else "")
             + f"; peak RSS {first['peak_rss'] / GiB:.1f} GiB (anonymous {first['peak_anon'] / GiB:.1f} GiB, "
               f"mapped store pages {first['peak_file'] / GiB:.1f} GiB); {first['steps']} saoa steps (batch 32, "
               f"CPU, {torch.get_num_threads()} torch threads) {first['train_s']:.0f} s = {step_s:.2f} s/step"
             + (f" (warm run: {warm['train_s'] / warm['steps']:.2f} s/step)" if warm else "")
             + f"; an epoch = {first['epoch_steps']} steps = {epoch_s / 60:.1f} min extrapolated; "
               f"load average {load_average()}")
    return [compare("epic55_full_size", on_disk, n * per_segment, unit="bytes", goal="report", notes=notes)]
