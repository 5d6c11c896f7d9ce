"""The store and the trainer's data path: bytes on disk, preload time, batches per second.

All four share one generated store (``shared_store``), built once per run at the largest size
the machine's free disk and memory allow (see ``choose_store_size``).
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    Context,
    GiB,
    MiB,
    Result,
    available_memory,
    compare,
    interleaved,
    load_average,
    spread,
    synchronize,
)
from benchmarks.stores import BuiltStore, build_store
from featstore.store.reader import FeatureStore
from heads.data import DERIVED, PreloadedFeatures, load_features, selection_labels
from heads.models import get_head

NPY_WORKERS = 2  # the reference DataLoader's worker processes (the setting)


# --------------------------------------------------------------------------------------------------
# the shared store


@dataclass(frozen=True)
class StorePlan:
    segments: int
    map_size: tuple[int, int, int]
    why: str


def choose_store_size(ctx: Context) -> StorePlan:
    """The largest (segments, verb.map) that fits the disk and memory now free.

    Disk: the store (~payload), one contiguous copy for ``store_preload_vs_npy`` and the per-file
    ``.npy`` copy of the data-path rows, with 10 GiB (or 10 % of the disk) left for everyone else.
    Memory: one side's file in the page cache plus its loaded arrays, with headroom.
    """
    sizes = ctx.sizes
    free = ctx.workspace.free_bytes()
    total_disk = os.statvfs(ctx.workspace.root).f_blocks * os.statvfs(ctx.workspace.root).f_frsize
    keep_free = max(10 * GiB, total_disk // 10) if not sizes.quick else 256 * MiB
    memory = available_memory()
    candidates = [(sizes.segments, sizes.map_size)]
    if not sizes.quick:
        candidates += [(sizes.segments, (2, 7, 7)), (2000, sizes.map_size), (2000, (2, 7, 7)), (1000, (2, 7, 7))]
    rejected = []
    for segments, map_size in candidates:
        payload = segments * sizes.payload_per_segment(map_size)
        rows = min(sizes.data_path_segments, segments)
        per_file = rows * 2 * (sizes.n_local * sizes.verb_dim + (sizes.n_global + sizes.n_local) * sizes.det_dim)
        disk = int(1.1 * payload) + payload + per_file
        t, h, w = map_size
        label = f"{segments} segments with verb.map {sizes.verb_dim}x{t}x{h}x{w}"
        if free - disk < keep_free:
            rejected.append(f"{label} needs {disk / GiB:.1f} GiB of disk, {free / GiB:.1f} GiB free")
            continue
        if 2.5 * payload > memory:
            rejected.append(f"{label} needs ~{2.5 * payload / GiB:.1f} GiB of memory, {memory / GiB:.1f} GiB available")
            continue
        why = f"payload {payload / GiB:.2f} GiB; disk free {free / GiB:.0f} GiB, memory available {memory / GiB:.0f} GiB"
        if rejected:
            why += "; smaller than asked because " + "; ".join(rejected)
        return StorePlan(segments, map_size, why)
    raise RuntimeError("no store size fits this machine now: " + "; ".join(rejected))


def shared_store(ctx: Context) -> tuple[BuiltStore, str]:
    def make() -> tuple[BuiltStore, str]:
        plan = choose_store_size(ctx)
        t, h, w = plan.map_size
        ctx.log(f"building the shared store: {plan.segments} segments, C={ctx.sizes.verb_dim}, "
                f"verb.map {ctx.sizes.verb_dim}x{t}x{h}x{w} ({plan.why})")
        built = build_store(ctx.workspace.path("shared"), plan.segments, verb_dim=ctx.sizes.verb_dim,
                            det_dim=ctx.sizes.det_dim, map_size=plan.map_size, n_global=ctx.sizes.n_global,
                            n_local=ctx.sizes.n_local, log=ctx.log)
        ctx.log(f"  written in {built.seconds:.1f} s ({built.payload_bytes / MiB / built.seconds:.0f} MiB/s of payload)")
        return built, plan.why

    return ctx.workspace.cached("shared_store", make)


# --------------------------------------------------------------------------------------------------
# store_bytes_vs_payload


def store_bytes(ctx: Context, wanted: set[str]) -> list[Result]:
    built, why = shared_store(ctx)
    store = FeatureStore.open(built.path)
    on_disk = store.disk_bytes()
    parts = {}
    for sub in ("lmdb", "segments", "boxes"):
        files = [p.stat() for p in (built.path / sub).rglob("*") if p.is_file()]
        parts[sub] = sum(min(st.st_size, st.st_blocks * 512) for st in files)
    notes = (f"{built.describe()}; payload = every stored tensor's bytes (float16 features, float32 boxes and "
             f"scores); on disk = allocated blocks of every file: LMDB {parts['lmdb'] / MiB:.0f} MiB, "
             f"segments parquet {parts['segments'] / MiB:.2f} MiB, boxes parquet {parts['boxes'] / MiB:.2f} MiB")
    return [compare("store_bytes_vs_payload", on_disk, built.payload_bytes, unit="bytes", goal="<= 1.15", notes=notes)]


# --------------------------------------------------------------------------------------------------
# store_preload_vs_npy


def _write_contiguous(store: FeatureStore, uids: list[str], path: Path, chunk: int = 512) -> int:
    """Every field of every segment, field after field, as one uint8 ``.npy`` (the same bytes as the store's).

    Flushed to disk before returning, so no writeback of it runs while anything is timed.
    """
    total = len(uids) * sum(spec.nbytes for spec in store.fields.values())
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": (total,)})
        for field in sorted(store.fields):
            for start in range(0, len(uids), chunk):
                handle.write(store.read_field(uids[start:start + chunk], field).tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    return total


def store_preload(ctx: Context, wanted: set[str]) -> list[Result]:
    built, why = shared_store(ctx)
    sizes = ctx.sizes
    store = FeatureStore.open(built.path)
    uids = store.uids()
    contiguous = ctx.workspace.path("contiguous.npy")
    _write_contiguous(store, uids, contiguous)
    store.close()
    holder: list[Any] = []

    def release() -> None:
        # Each call starts like a new training process: no arrays from the last call, and the store's
        # LMDB environments closed (unmapped) so they are opened and mapped again.
        holder.clear()
        gc.collect()
        FeatureStore.open(built.path).close()

    def ours(_: int) -> None:
        opened = FeatureStore.open(built.path)
        selected = opened.uids()
        holder.append({field: opened.read_field(selected, field) for field in opened.fields})

    def reference(_: int) -> None:
        holder.append(np.load(contiguous))

    # Warm page cache for both: the warm-up round reads each side's file once before the timed rounds.
    # Taking turns needs both files cached at once next to one side's arrays; where memory is short,
    # each side is timed in its own block instead (its own file warm, the other's maybe evicted).
    together = available_memory() > 3.3 * built.payload_bytes
    try:
        if together:
            samples = interleaved({"ours": ours, "reference": reference}, warmup=sizes.warmup,
                                  repeats=sizes.repeats, before=release)
        else:
            samples = {name: interleaved({name: fn}, warmup=sizes.warmup, repeats=sizes.repeats,
                                         before=release)[name]
                       for name, fn in (("ours", ours), ("reference", reference))}
        release()
    finally:
        holder.clear()
        ctx.workspace.remove("contiguous.npy")
    ours_s, ref_s = statistics.median(samples["ours"]), statistics.median(samples["reference"])
    gib = built.payload_bytes / GiB
    notes = (f"{built.describe()}, every field; {gib:.2f} GiB; page cache warm for both (a warm-up round reads "
             f"each side's files once, then {sizes.repeats} timed rounds, "
             f"{'taking turns' if together else 'one side after the other (memory too short to take turns)'}); "
             f"ours = open + index query + read_field of every field, store closed between calls; ours "
             f"{gib / ours_s:.2f} GiB/s (samples {spread(samples['ours'])} s), numpy.load {gib / ref_s:.2f} GiB/s "
             f"(samples {spread(samples['reference'])} s); load average {load_average()}")
    return [compare("store_preload_vs_npy", ours_s, ref_s, unit="s", goal="<= 2", notes=notes)]


# --------------------------------------------------------------------------------------------------
# train_data_path_vs_npy / train_data_path_vs_memory


class _Order(torch.utils.data.Sampler):
    """A sampler whose order can be replaced between epochs (the workers stay alive: persistent)."""

    def __init__(self, order: list[int]):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class NpySegments(torch.utils.data.Dataset):
    """The per-file layout: ``<folder>/<key>/<uid>.npy``, one file per segment and tensor.

    The reference gets the tensors already in their batch form (the pooled local-alignment features
    ``verb_local``, not the verb map), so it does none of the RoIAlign work ours did at preload.
    """

    def __init__(self, folder: Path, uids: list[str], features: list[str], scores: dict[str, str],
                 verb: torch.Tensor, noun: torch.Tensor):
        self.folder, self.uids, self.features, self.scores = folder, uids, features, scores
        self.verb, self.noun = verb, noun

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int):
        uid = self.uids[index]
        out = {key: torch.from_numpy(np.load(self.folder / key / f"{uid}.npy")) for key in self.features}
        for score_key, valid_key in self.scores.items():
            out[valid_key] = torch.from_numpy(np.load(self.folder / score_key / f"{uid}.npy") > 0)
        return out, self.verb[index], self.noun[index]


def _write_per_file(folder: Path, features: PreloadedFeatures, store: FeatureStore) -> tuple[list[str], dict[str, str]]:
    """The data-path rows as one ``.npy`` per segment and tensor (float16 features, float32 scores)."""
    uids = list(features.labels.uids)
    keys = [k for k, v in features.tensors.items() if v.is_floating_point()]
    for key in keys:
        (folder / key).mkdir(parents=True, exist_ok=True)
        values = features.tensors[key].cpu().half().numpy()  # the store's float16, whatever is resident
        for row, uid in enumerate(uids):
            np.save(folder / key / f"{uid}.npy", values[row])
    scores = {}
    for field, valid_key in DERIVED.items():
        if valid_key in features.tensors:
            (folder / field).mkdir(parents=True, exist_ok=True)
            values = store.read_field(uids, field)
            for row, uid in enumerate(uids):
                np.save(folder / field / f"{uid}.npy", values[row])
            scores[field] = valid_key
    return keys, scores


def train_data_path(ctx: Context, wanted: set[str]) -> list[Result]:
    built, why = shared_store(ctx)
    sizes = ctx.sizes
    store = FeatureStore.open(built.path)
    rows = min(sizes.data_path_segments, built.segments)
    labels = selection_labels(store, f"cast(uid as integer) < {rows}")
    fields = get_head("saoa").required_fields()
    device = torch.device(ctx.device)
    sync = synchronize(device)
    started = time.perf_counter()
    features = load_features(store, labels, fields, device=device)
    if sync is not None:
        sync()
    preload_s = time.perf_counter() - started
    n = len(features)
    batches_per_epoch = -(-n // sizes.batch_size)
    orders = [torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(sizes.warmup + sizes.repeats)]
    batch_bytes = sum(v[0].numel() * (4 if v.is_floating_point() else v.element_size())
                      for v in features.tensors.values()) * sizes.batch_size
    shape_note = (f"saoa's batch: {', '.join(f'{k} {tuple(v.shape[1:])}' for k, v in features.tensors.items())}; "
                  f"{n} segments of {built.describe().split(', ', 1)[1]}, batch {sizes.batch_size} "
                  f"({batch_bytes / MiB:.1f} MiB float32), {batches_per_epoch} batches per epoch, device {device}; "
                  f"median of {sizes.repeats} epochs after {sizes.warmup} warm-up, each round one epoch of every "
                  f"side on the same order")

    def ours_epoch(order: torch.Tensor) -> None:
        for _ in features.batches(order, sizes.batch_size):
            pass

    runners = {"ours": ours_epoch}
    in_memory: dict[str, torch.Tensor] = {}
    if "train_data_path_vs_memory" in wanted:
        in_memory = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in features.tensors.items()}
        verb, noun = features.verb, features.noun

        def memory_epoch(order: torch.Tensor) -> None:
            for index in torch.split(order.to(device), sizes.batch_size):
                _ = ({k: v.index_select(0, index) for k, v in in_memory.items()}, verb[index], noun[index])

        runners["memory"] = memory_epoch
    loader = None
    if "train_data_path_vs_npy" in wanted:
        folder = ctx.workspace.path("per_file_npy")
        keys, scores = _write_per_file(folder, features, store)
        os.sync()  # no writeback of these files while anything is timed
        dataset = NpySegments(folder, list(labels.uids), keys, scores, labels.verb, labels.noun)
        sampler = _Order(orders[0].tolist())
        loader = torch.utils.data.DataLoader(dataset, batch_size=sizes.batch_size, sampler=sampler,
                                             num_workers=NPY_WORKERS, persistent_workers=True, prefetch_factor=2,
                                             pin_memory=device.type == "cuda")

        def npy_epoch(order: torch.Tensor) -> None:
            sampler.order = order.tolist()
            for tensors, verbs, nouns in loader:
                _ = ({k: (v.to(device).float() if v.dtype == torch.float16 else v.to(device))
                      for k, v in tensors.items()}, verbs.to(device), nouns.to(device))

        runners["npy"] = npy_epoch
    try:
        # Epochs in turns (ours, memory, npy, ours, ...), each round on the same batch order.
        seconds = interleaved({name: (lambda r, run=run: run(orders[r])) for name, run in runners.items()},
                              warmup=sizes.warmup, repeats=sizes.repeats, sync=sync)
    finally:
        loader = None  # stops the persistent workers
        in_memory.clear()
        ctx.workspace.remove("per_file_npy")
    rates = {name: [batches_per_epoch / s for s in samples] for name, samples in seconds.items()}
    ours_rate = statistics.median(rates["ours"])
    results = []
    if "train_data_path_vs_npy" in wanted:
        results.append(compare(
            "train_data_path_vs_npy", ours_rate, statistics.median(rates["npy"]), unit="batches/s", goal=">= 10",
            notes=(f"reference: torch DataLoader, {NPY_WORKERS} persistent workers, one float16 .npy per segment "
                   f"and tensor ({len(keys) + len(scores)} files per segment; verb_local already RoI-pooled, "
                   f"masks from the score files), page cache warm; ours {spread(rates['ours'])}, reference "
                   f"{spread(rates['npy'])} batches/s; {shape_note}; load average {load_average()}")))
    if "train_data_path_vs_memory" in wanted:
        results.append(compare(
            "train_data_path_vs_memory", ours_rate, statistics.median(rates["memory"]), unit="batches/s",
            goal=">= 0.9",
            notes=(f"reference: the same tensors held as float32 on the device, one index_select per tensor per "
                   f"batch; ours: PreloadedFeatures.batches as `heads train` preloads (float32 resident when "
                   f"twice the store's bytes fit the memory budget, as here; else float16 gathered then cast); "
                   f"ours {spread(rates['ours'])}, reference {spread(rates['memory'])} batches/s; {shape_note}; "
                   f"preload (read + RoIAlign) took {preload_s:.1f} s; load average {load_average()}")))
    return results
