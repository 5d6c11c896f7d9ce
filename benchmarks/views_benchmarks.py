"""Temporal views (docs/views.md): what a store of K views per segment costs to build, to keep and to train on.

- ``build_views_vs_single``: seconds of `featstore build --views 4` over the same segments' one-view
  build (``--views-where true``: every segment gets four views), on the demo sample with the demo's
  own build (r3d_18 with random weights, 4-frame clips at a 32-pixel short side, the ResNet-50 FPN
  pooling features at the sample's boxes, detections at 1 fps over 2 s / 1 s windows).
- ``build_views_bytes_per_view``: bytes on disk per view of that four-view store over bytes per
  segment of the one-view store.
- ``heads_epoch_views_vs_single``: one saoa epoch, preloaded, on a store holding 8 views of each
  training segment (``views="random"``: one drawn per segment, gathered by index) over the same
  epoch on its view 0 alone (``featstore copy --where "view = 0"``).

Time measurements on a shared machine: each side is timed several times in turns and the minimum
is kept (the least disturbed run), as the notes say.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Context, Result, compare, spread
from benchmarks.stores import (
    FeaturePool,
    NUM_NOUNS,
    NUM_VERBS,
    PARTICIPANTS,
    TRAIN_WHERE,
    VAL_WHERE,
    segment_arrays,
)


def _quiet(_: str) -> None:
    pass


def _build_argv(sample, store: Path, views: int) -> list[str]:
    from cli.demo_recipe import build_command, build_params

    params = build_params(sample, store, workers=0, progress=False)
    if views > 1:
        params.update(views=views, views_where="true")
    return shlex.split(build_command(params))[2:]


def build_views(ctx: Context, wanted: set[str]) -> list[Result]:
    """Build time of 4 views over 1 on the demo sample, and bytes per view over bytes per segment."""
    from click.testing import CliRunner

    from cli.featstore_cli import main as featstore_main
    from featstore.samples.kitchens import FULL_SAMPLE, SampleSpec, generate_sample
    from featstore.store.reader import FeatureStore

    # --quick: a few segments, one untimed-warm-up-free round (a smoke test, its numbers mean nothing).
    spec = SampleSpec(("P01",), ("P26",), videos_per_participant=1, segments_per_video=4) if ctx.sizes.quick \
        else FULL_SAMPLE
    repeats, warmup = (1, 0) if ctx.sizes.quick else (3, 1)
    root = ctx.workspace.path("build_views")
    sample = generate_sample(root / "sample", spec, seed=0)
    runner = CliRunner()
    seconds: dict[int, list[float]] = {1: [], 4: []}
    stores: dict[int, Path] = {}
    try:
        for round_ in range(warmup + repeats):  # the warm-up round: imports, allocator, page cache
            for views in (1, 4) if round_ % 2 == 0 else (4, 1):
                store = root / f"store-{views}-{round_}"
                started = time.perf_counter()
                result = runner.invoke(featstore_main, ["build", *_build_argv(sample, store, views)],
                                       catch_exceptions=False)
                elapsed = time.perf_counter() - started
                if result.exit_code != 0:
                    raise RuntimeError(result.output[-2000:])
                if round_ >= warmup:
                    seconds[views].append(elapsed)
                stores[views] = store
        one, four = FeatureStore.open(stores[1]), FeatureStore.open(stores[4])
        per_segment = one.disk_bytes() / len(one.uids())
        four_info = four.info()
        per_view = four.disk_bytes() / four_info["views"]["total"]
        views_made = four_info["views"]["total"]
    finally:
        ctx.workspace.remove("build_views")
    notes = (f"demo sample ({spec.n_segments} segments, {views_made} views), the demo's build with random "
             f"weights; min of {repeats} interleaved builds each (1 view {spread(seconds[1])} s, 4 views "
             f"{spread(seconds[4])} s)")
    rows = []
    if "build_views_vs_single" in wanted:
        rows.append(compare("build_views_vs_single", min(seconds[4]), min(seconds[1]), unit="s", goal="<= 2.5",
                            notes=notes))
    if "build_views_bytes_per_view" in wanted:
        rows.append(compare("build_views_bytes_per_view", per_view, per_segment, unit="bytes", goal="<= 1.05",
                            notes=f"bytes on disk (LMDB, index, manifest) per view of the 4-view store over per "
                                  f"segment of the 1-view store; {notes}"))
    return rows


def _views_store(root: Path, n_segments: int, views: int, *, dim: int, det_dim: int) -> Path:
    """A store of generated saoa fields where each training segment (P01-P03) has ``views`` views."""
    from featstore.epic.annotations import read_segments
    from featstore.samples.annotations import generate_segments, write_epic55_annotations
    from featstore.samples.features import feature_shapes
    from featstore.store.importer import box_rows_from_arrays
    from featstore.store.local_pool import local_recipe
    from featstore.store.reader import FeatureStore
    from featstore.store.schema import VERB_LOCAL, VERB_MAP, FieldSpec, default_dtype

    segments = generate_segments(n_segments, num_verbs=NUM_VERBS, num_nouns=NUM_NOUNS, participants=PARTICIPANTS,
                                 videos_per_participant=4, seed=0)
    annotations = write_epic55_annotations(root / "annotations" / "EPIC_train_action_labels.csv", segments)
    shapes = feature_shapes(verb_dim=dim, noun_dim=dim, det_dim=det_dim, n_global=60, n_local=40, map_size=None)
    shapes[VERB_LOCAL] = (40, dim)
    fields = {name: FieldSpec(default_dtype(name), tuple(shape)) for name, shape in shapes.items()}
    pool = FeaturePool(np.random.default_rng(0), max(4 * max(int(np.prod(s)) for s in shapes.values()), 1 << 20))
    store = FeatureStore.create(root / "store", fields=fields,
                                derived={VERB_LOCAL: local_recipe(pool="avg", source=VERB_MAP,
                                                                  source_shape=(dim, 1, 7, 7))},
                                provenance={"source": "benchmark", "views": {"count": views}})
    with store.writer("0", flush_every=1024) as writer:
        for row in read_segments(annotations).to_pylist():
            count = views if row["participant_id"] <= "P25" else 1
            items = []
            for view in range(count):
                arrays = segment_arrays(pool, shapes)
                items.append(({**row, "view": view}, arrays, box_rows_from_arrays(arrays)))
            writer.put_views(items)
    return root / "store"


def heads_epoch_views(ctx: Context, wanted: set[str]) -> list[Result]:
    """One preloaded saoa epoch drawing among 8 views per training segment, over the same on view 0 only."""
    from featstore.store.transform import copy_store
    from heads.trainer import HeadTrainable, TrainConfig, prepare

    sizes = ctx.sizes
    n_segments = 128 if sizes.quick else 2000
    dim, det_dim = sizes.heads_dim, sizes.heads_det_dim
    repeats = 1 if sizes.quick else 5
    root = ctx.workspace.path("heads_epoch_views")
    try:
        many = _views_store(root / "eight", n_segments, 8, dim=dim, det_dim=det_dim)
        copy_store(many, root / "one" / "store", where="view = 0", progress=False)
        config = TrainConfig(model="saoa", train_where=TRAIN_WHERE, val_where=VAL_WHERE, epochs=1,
                             batch_size=sizes.batch_size, lr=1e-3, device=ctx.device, memory_budget_gb=1000.0)
        heads = {}
        for name, store in (("one", root / "one" / "store"), ("eight", many)):
            run = prepare(store, config, log=_quiet)
            assert run.train.mode == "preload"
            heads[name] = (run, HeadTrainable(run))
        n_train = len(heads["one"][0].train)
        held = {name: run.train.views.rows for name, (run, _) in heads.items()}
        seconds: dict[str, list[float]] = {"one": [], "eight": []}
        for round_ in range(repeats + 1):
            for name in ("one", "eight") if round_ % 2 == 0 else ("eight", "one"):
                _, head = heads[name]
                started = time.perf_counter()
                losses = [head.train_step(batch, None) for batch in head.epoch_batches(round_, None)]
                torch.stack(losses).sum().item()
                if round_ > 0:
                    seconds[name].append(time.perf_counter() - started)
    finally:
        ctx.workspace.remove("heads_epoch_views")
    notes = (f"{n_train} training segments, C={dim}, Cd={det_dim}, 60/40 slots, verb.local stored, batch "
             f"{sizes.batch_size}; preloaded rows: {held['eight']} (8 views) vs {held['one']}; min of {repeats} "
             f"interleaved epochs each (8 views {spread(seconds['eight'])} s, 1 view {spread(seconds['one'])} s)")
    return [compare("heads_epoch_views_vs_single", min(seconds["eight"]), min(seconds["one"]), unit="s",
                    goal="<= 1.1", notes=notes)] if "heads_epoch_views_vs_single" in wanted else []
