"""Head training: a grid of runs trained K at a time (`heads ablate --parallel K`), and 15 epochs of
SAOA at EPIC-55 size on a GPU."""
from __future__ import annotations

import gc
import statistics
import time

import pyarrow as pa
import torch

from benchmarks.common import Context, Result, compare, spread, synchronize
from benchmarks.stores import NUM_NOUNS, NUM_VERBS, TRAIN_WHERE, VAL_WHERE, build_store


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# parallel_heads_vs_sequential


class _LoadCounter:
    """Counts ``heads.data.load_features`` calls (how often a grid preloads features) while entered."""

    def __init__(self) -> None:
        self.calls: dict[int, list[int]] = {}
        self.label = 0

    def __call__(self, label: int) -> "_LoadCounter":
        self.label = label
        return self

    def __enter__(self) -> "_LoadCounter":
        from heads import data as head_data

        self._module, self._original = head_data, head_data.load_features
        counts = self.calls.setdefault(self.label, [])
        counts.append(0)

        def counting(*args, **kwargs):
            counts[-1] += 1
            return self._original(*args, **kwargs)

        head_data.load_features = counting
        return self

    def __exit__(self, *exc) -> None:
        self._module.load_features = self._original

    def of(self, label: int) -> str:
        return ",".join(str(c) for c in self.calls.get(label, [])) or "?"


def _grid(runs: int, epochs: int, device: str, batch_size: int):
    from heads.grid import parse_grid

    return parse_grid({
        "base": {"train_where": TRAIN_WHERE, "val_where": VAL_WHERE, "epochs": epochs, "batch_size": batch_size,
                 "lr": 1e-3, "seeds": list(range(runs))},
        "run": [{"name": "saoa", "model": "saoa"}],
    }, device=device)


def parallel_heads(ctx: Context, wanted: set[str], *, name: str = "parallel_heads_vs_sequential",
                   segments: int | None = None, dim: int | None = None, det_dim: int | None = None,
                   map_size: tuple[int, int, int] | None = None, epochs: int | None = None,
                   repeats: int | None = None, goal: str = "report (GPU: <= 0.35)") -> list[Result]:
    """Seconds for ``runs`` seeds of ``saoa`` through ``run_grid(parallel=runs)`` and ``parallel=1``.

    Both go through the product's grid runner, which is meant to load the features once per call and
    share them between runs either way (the notes say how often it actually loaded them), so the
    ratio isolates grouped stepping; each run validates and checkpoints after every epoch, as
    ``heads ablate`` does.
    """
    try:
        from heads.ablation import run_grid
    except ImportError as err:  # heads/ablation.py is being written by others
        from benchmarks.common import skipped

        return [skipped(name, f"heads.ablation is not importable yet ({err})", unit="s", goal=goal)]
    sizes = ctx.sizes
    segments = segments or sizes.heads_segments
    dim, det_dim = dim or sizes.heads_dim, det_dim or sizes.heads_det_dim
    map_size = map_size or sizes.heads_map
    epochs = epochs or sizes.heads_epochs
    runs = sizes.heads_runs
    repeats = repeats or sizes.heads_repeats
    root = ctx.workspace.path(name)
    loads = _LoadCounter()
    try:
        built = build_store(root / "data", segments, verb_dim=dim, det_dim=det_dim, map_size=map_size)
        if not sizes.quick:
            # Warm-up: one small grouped call (imports, allocator, kernels) that is not timed.
            run_grid(built.path, _grid(2, 1, ctx.device, 32), root / "warmup", parallel=2, log=_quiet)
            ctx.workspace.remove(f"{name}/warmup")
        timings: dict[int, list[float]] = {1: [], runs: []}
        sync = synchronize(ctx.device)
        for repeat in range(repeats):
            for parallel in (1, runs) if repeat % 2 == 0 else (runs, 1):
                out = root / f"grid-p{parallel}-r{repeat}"
                started = time.perf_counter()
                with loads(parallel):
                    result = run_grid(built.path, _grid(runs, epochs, ctx.device, sizes.batch_size), out,
                                      parallel=parallel, log=_quiet)
                if sync is not None:
                    sync()
                timings[parallel].append(time.perf_counter() - started)
                if result.failed:
                    raise RuntimeError(f"grid runs failed: {result.failed}")
                ctx.workspace.remove(out.relative_to(ctx.workspace.root))
                gc.collect()
    finally:
        ctx.workspace.remove(name)
    ours, reference = statistics.median(timings[runs]), statistics.median(timings[1])
    train_rows = segments * 3 // 4
    notes = (f"{runs} seeds of saoa, {epochs} epoch(s) each, {train_rows} training / {segments - train_rows} validation "
             f"segments of C={dim}, Cd={det_dim}, verb.map {dim}x{'x'.join(map(str, map_size))}, batch "
             f"{sizes.batch_size}, device {ctx.device}; ours = run_grid(parallel={runs}), reference = "
             f"run_grid(parallel=1) (the grid runner shares preloaded features between runs in both modes: "
             f"load_features ran {loads.of(runs)} times per grid in ours, {loads.of(1)} in the reference; "
             f"validation and a checkpoint after every epoch in both); {'no warm-up, ' if sizes.quick else ''}"
             f"median of {repeats}, samples ours {spread(timings[runs])} s, reference {spread(timings[1])} s; "
             f"torch threads {torch.get_num_threads()}")
    return [compare(name, ours, reference, unit="s", goal=goal, notes=notes)]


# --------------------------------------------------------------------------------------------------
# gpu_saoa_15_epochs_epic55


def device_features(n: int, *, verb_dim: int, det_dim: int, map_size: tuple[int, int, int], n_global: int,
                    n_local: int, device: torch.device, chunk: int, seed: int = 0):
    """``PreloadedFeatures`` generated directly on the device, as a store of that size would preload.

    ``verb_local`` is RoI-pooled (``pool_local_verb_features``, as the preload does) from a verb map
    drawn chunk by chunk on the device, so the whole map (37 GB at 23,191 x 2048x8x7x7 fp16) is never
    resident; only its pooled (N, 40, C) result is kept, as in the real preload.

    Returns:
        (features, seconds spent on the local-alignment pooling).
    """
    from heads.data import PreloadedFeatures, SegmentLabels
    from heads.local_alignment import pool_local_verb_features

    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float16)

    def boxes(count: int, slots: int) -> torch.Tensor:
        xy = torch.rand(count, slots, 2, generator=generator, device=device) * 0.7
        wh = torch.rand(count, slots, 2, generator=generator, device=device) * 0.2 + 0.1
        return torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)

    local = torch.empty(n, n_local, verb_dim, dtype=torch.float16, device=device)
    sync = synchronize(device)
    pooling = 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        verb_map = randn(stop - start, verb_dim, *map_size)
        local_boxes = boxes(stop - start, n_local)
        if sync is not None:
            sync()
        started = time.perf_counter()
        local[start:stop] = pool_local_verb_features(verb_map, local_boxes).half()
        if sync is not None:
            sync()
        pooling += time.perf_counter() - started
        del verb_map
    tensors = {
        "verb_global": randn(n, verb_dim),
        "noun_global": randn(n, verb_dim),
        "det_global_feat": randn(n, n_global, det_dim),
        "det_local_feat": randn(n, n_local, det_dim),
        "det_global_valid": torch.rand(n, n_global, generator=generator, device=device) < 0.8,
        "det_local_valid": torch.rand(n, n_local, generator=generator, device=device) < 0.8,
        "verb_local": local,
    }
    cpu = torch.Generator().manual_seed(seed)
    verb = torch.randint(0, NUM_VERBS, (n,), generator=cpu)
    noun = torch.randint(0, NUM_NOUNS, (n,), generator=cpu)
    uids = tuple(str(i) for i in range(n))
    labels = SegmentLabels(uids, verb, noun, pa.table({"uid": list(uids)}))
    # The product's class, filled without a store: batches() and batch() are its own code.
    features = PreloadedFeatures.__new__(PreloadedFeatures)
    features.labels = labels
    features.device = device
    features.tensors = tensors
    features.verb = verb.to(device)
    features.noun = noun.to(device)
    return features, pooling


def gpu_saoa(ctx: Context, wanted: set[str]) -> list[Result]:
    """15 epochs of saoa at EPIC-55 train size through the trainer's own loop (the engine + run hooks)."""
    from featstore.training.engine import Engine
    from featstore.training.hooks import Checkpointer, LearningRate, LossCheck
    from heads.evaluation import ScoringContext
    from heads.models import FeatureDims
    from heads.models.symbiotic import symbiotic_fields
    from heads.trainer import HeadTrainable, PreparedRun, TrainConfig

    quick = ctx.sizes.quick
    n = 256 if quick else 23_191
    verb_dim = det_dim = 64 if quick else 2048
    map_size = (2, 7, 7) if quick else (8, 7, 7)
    epochs = 1 if quick else 15
    device = torch.device(ctx.device)
    sync = synchronize(device)
    features, pooling = device_features(n, verb_dim=verb_dim, det_dim=det_dim, map_size=map_size, n_global=60,
                                        n_local=40, device=device, chunk=128 if quick else 512)
    config = TrainConfig(model="saoa", epochs=epochs, batch_size=32, lr=1e-4, device=str(device))
    dims = FeatureDims(verb_dim=verb_dim, noun_dim=verb_dim, det_dim=det_dim, n_global=60, n_local=40)
    fields = symbiotic_fields(local_alignment=True, verb_objects="local")  # saoa's
    scoring = ScoringContext(dataset="epic55", num_verbs=NUM_VERBS, num_nouns=NUM_NOUNS, class_sets=None)
    run = PreparedRun(config=config, store=None, dims=dims, fields=fields, train=features, val=None, scoring=scoring)
    root = ctx.workspace.path("gpu_saoa")
    try:
        # Warm-up: 50 steps of a throwaway run (cuBLAS handles, kernel selection, allocator).
        warm = HeadTrainable(run)
        losses = [warm.train_step(batch, None) for _, batch in zip(range(50), warm.epoch_batches(0, None))]
        torch.stack(losses).cpu()
        del warm
        if sync is not None:
            sync()
        head = HeadTrainable(run)
        engine = Engine()
        # The hooks of `heads train` without validation and files other than the checkpoint.
        state = engine.add(head, name="gpu_saoa", epochs=epochs, hooks=[
            LossCheck(), LearningRate(head.optimizer), Checkpointer(root / "run" / "last.pt", resume=False)])
        started = time.perf_counter()
        engine.train()
        if sync is not None:
            sync()
        total = time.perf_counter() - started
        steps_only = sum(entry["seconds"] for entry in state.history)
    finally:
        ctx.workspace.remove("gpu_saoa")
    budget = 20.0
    steps = epochs * -(-n // 32)
    notes = (f"{epochs} epochs x {n} segments (batch 32, {steps} steps), C=Cd={verb_dim}, 60/40 slots, verb.map "
             f"{verb_dim}x{'x'.join(map(str, map_size))} generated on the device chunk by chunk and RoI-pooled "
             f"({pooling:.1f} s, not in the time); features as device tensors (not read from a store); ours = "
             f"the engine with HeadTrainable (loss check and a checkpoint per epoch, no validation) = {total:.1f} s, of which "
             f"steps {steps_only:.1f} s ({steps / max(steps_only, 1e-9):.0f} steps/s); reference = the goal's "
             f"{budget:.0f} s budget; device {device}")
    return [compare("gpu_saoa_15_epochs_epic55", total, budget, unit="s", goal="<= 1", notes=notes)]


def gpu_parallel_heads(ctx: Context, wanted: set[str]) -> list[Result]:
    quick = ctx.sizes.quick
    return parallel_heads(
        ctx, wanted, name="gpu_parallel_heads_vs_sequential",
        segments=128 if quick else 3000, dim=32 if quick else 2048, det_dim=16 if quick else 2048,
        map_size=(1, 4, 4) if quick else (1, 7, 7), epochs=1 if quick else 2, repeats=1, goal="<= 0.35")
