"""Generated stores at benchmark shapes, written through the product's own writer (`writer().put`).

Features are random float16 slices of one pre-drawn pool (drawing 400k normal numbers per segment
would dominate the build; the tensors' values do not change any timing measured here). Boxes and
scores are well-formed, with about a fifth of the slots padded (score 0), as in real stores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from featstore.epic.annotations import read_segments
from featstore.epic.metadata import NUM_CLASSES
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, random_boxes
from featstore.store.importer import box_rows_from_arrays
from featstore.store.local_pool import local_recipe
from featstore.store.reader import FeatureStore
from featstore.store.schema import (
    BOX_SETS,
    DET_GLOBAL_FEAT,
    DET_LOCAL_FEAT,
    VERB_GLOBAL,
    VERB_LOCAL,
    VERB_MAP,
    FieldSpec,
    default_dtype,
    det_field,
)

# EPIC-55 class counts; participants split 3 : 1 into train (P01-P03) and validation (P26).
NUM_VERBS, NUM_NOUNS = NUM_CLASSES["epic55"]
PARTICIPANTS = ("P01", "P02", "P03", "P26")
TRAIN_WHERE = "participant_id <= 'P25'"
VAL_WHERE = "participant_id > 'P25'"


@dataclass(frozen=True)
class BuiltStore:
    """A generated store and what it took to write it."""

    path: Path
    annotations: Path
    segments: int
    shapes: dict[str, tuple[int, ...]]
    payload_bytes: int  # sum of every stored tensor's bytes (what the store holds)
    seconds: float  # wall time of the writes (generation included)

    def describe(self) -> str:
        verb_map = self.shapes.get(VERB_MAP)
        shown = "x".join(str(d) for d in verb_map) if verb_map else "none"
        local = ", verb.local " + "x".join(str(d) for d in self.shapes[VERB_LOCAL]) if VERB_LOCAL in self.shapes else ""
        return (f"{self.segments} segments, C={self.shapes[VERB_GLOBAL][0]}, Cd={self.shapes[DET_GLOBAL_FEAT][1]}, "
                f"{self.shapes[DET_GLOBAL_FEAT][0]}/{self.shapes[DET_LOCAL_FEAT][0]} slots, verb.map {shown} fp16"
                f"{local}")


class FeaturePool:
    """Random float16 feature tensors cut from one pre-drawn pool."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng = rng
        self.values = rng.standard_normal(size, dtype=np.float32).astype(np.float16)

    def take(self, shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape))
        if n > self.values.size:
            raise ValueError(f"pool of {self.values.size} values cannot give {n}")
        start = int(self.rng.integers(0, self.values.size - n + 1))
        return self.values[start:start + n].reshape(shape)


def segment_arrays(pool: FeaturePool, shapes: dict[str, tuple[int, ...]],
                   valid_fraction: float = 0.8) -> dict[str, np.ndarray]:
    """One segment's tensors in their stored dtypes: features from the pool, boxes and scores drawn."""
    rng = pool.rng
    arrays = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "box":
            arrays[name] = random_boxes(rng, shape[0])
        elif leaf == "score":
            scores = rng.uniform(0.3, 1.0, size=shape).astype(np.float32)
            scores[rng.random(shape) > valid_fraction] = 0.0
            arrays[name] = scores
        else:
            arrays[name] = pool.take(shape)
    for box_set in BOX_SETS:
        box = det_field(box_set, "box")
        if box in arrays:
            arrays[box][arrays[det_field(box_set, "score")] == 0] = 0.0
    return arrays


def build_store(
    root: Path,
    n_segments: int,
    *,
    verb_dim: int,
    det_dim: int,
    map_size: tuple[int, int, int] | None,
    n_global: int = 60,
    n_local: int = 40,
    verb_local: bool = False,
    seed: int = 0,
    flush_every: int = 1024,
    log: Callable[[str], None] | None = None,
) -> BuiltStore:
    """Write a store of ``n_segments`` generated segments under ``root`` (``root/store``).

    Args:
        root: folder for the annotation file and the store (created).
        n_segments: segments, labelled with EPIC-55 class counts, spread over PARTICIPANTS.
        verb_dim: C of verb.global, noun.global and verb.map.
        det_dim: Cd of the detection features.
        map_size: (T, H, W) of verb.map, or None for a store without it.
        verb_local: also store ``verb.local`` (n_local, C), recorded as avg-pooled from a map of
            ``map_size`` (the values are random like every other feature here).
    Returns:
        The store's description.
    """
    root.mkdir(parents=True, exist_ok=True)
    segments = generate_segments(n_segments, num_verbs=NUM_VERBS, num_nouns=NUM_NOUNS, participants=PARTICIPANTS,
                                 videos_per_participant=4, seed=seed)
    annotations = write_epic55_annotations(root / "annotations" / "EPIC_train_action_labels.csv", segments)
    shapes = feature_shapes(verb_dim=verb_dim, noun_dim=verb_dim, det_dim=det_dim, n_global=n_global,
                            n_local=n_local, map_size=map_size)
    derived = None
    if verb_local:
        shapes[VERB_LOCAL] = (n_local, verb_dim)
        derived = {VERB_LOCAL: local_recipe(pool="avg", source=VERB_MAP,
                                              source_shape=(verb_dim, *map_size) if map_size else None)}
    fields = {name: FieldSpec(dtype=default_dtype(name), shape=tuple(shape)) for name, shape in shapes.items()}
    largest = max(int(np.prod(s)) for s in shapes.values())
    pool = FeaturePool(np.random.default_rng(seed), max(4 * largest, 1 << 20))
    rows = read_segments(annotations).to_pylist()
    store = FeatureStore.create(root / "store", fields=fields, derived=derived,
                                provenance={"source": "benchmark", "annotations": str(annotations)})
    started = time.perf_counter()
    with store.writer("0", flush_every=flush_every) as writer:
        for i, row in enumerate(rows):
            arrays = segment_arrays(pool, shapes)
            writer.put(row, arrays, boxes=box_rows_from_arrays(arrays))
            if log is not None and (i + 1) % 1000 == 0:
                log(f"  wrote {i + 1}/{n_segments} segments ({time.perf_counter() - started:.0f} s)")
    seconds = time.perf_counter() - started
    payload = n_segments * sum(spec.nbytes for spec in fields.values())
    return BuiltStore(root / "store", annotations, n_segments, shapes, payload, seconds)
