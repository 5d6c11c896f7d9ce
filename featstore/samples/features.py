"""Generated features, for tests, benchmarks and the demo (no CNN needed).

``write_feature_npzs`` writes one ``<uid>.npz`` per segment in the layout ``featstore import`` reads;
``PlantedSignal`` makes features whose labels only a head that reads them the way SAOA does can find.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from featstore.samples.annotations import SegmentLabel
from featstore.store.schema import BOX_SETS, DET_LOCAL_BOX, NOUN_GLOBAL, VERB_GLOBAL, VERB_MAP, det_field


def feature_shapes(*, verb_dim: int = 64, noun_dim: int = 64, det_dim: int = 32, n_global: int = 60,
                   n_local: int = 40, map_size: tuple[int, int, int] | None = (2, 7, 7)) -> dict[str, tuple[int, ...]]:
    """Canonical field shapes for generated stores (``map_size`` None leaves out ``verb.map``)."""
    shapes = {VERB_GLOBAL: (verb_dim,), NOUN_GLOBAL: (noun_dim,)}
    for box_set, slots in zip(BOX_SETS, (n_global, n_local)):
        shapes[det_field(box_set, "feat")] = (slots, det_dim)
        shapes[det_field(box_set, "box")] = (slots, 4)
        shapes[det_field(box_set, "score")] = (slots,)
    if map_size is not None:
        shapes[VERB_MAP] = (verb_dim, *map_size)
    return shapes


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n normalised x1, y1, x2, y2 boxes of at least a tenth of the frame per side."""
    xy = rng.uniform(0.0, 0.7, size=(n, 2))
    wh = rng.uniform(0.1, 0.3, size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, 1.0)], axis=1).astype(np.float32)


def random_segment_arrays(rng: np.random.Generator, shapes: Mapping[str, tuple[int, ...]],
                          valid_fraction: float = 0.8) -> dict[str, np.ndarray]:
    """Random features of the given shapes; boxes are well-formed and some slots are padded (score 0)."""
    arrays: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "box":
            arrays[name] = random_boxes(rng, shape[0])
        elif leaf == "score":
            scores = rng.uniform(0.3, 1.0, size=shape).astype(np.float32)
            scores[rng.random(shape) > valid_fraction] = 0.0
            arrays[name] = scores
        else:
            arrays[name] = rng.standard_normal(shape).astype(np.float32)
    for box_set in BOX_SETS:
        box, score = det_field(box_set, "box"), det_field(box_set, "score")
        if box in arrays and score in arrays:
            arrays[box][arrays[score] == 0] = 0.0
    return arrays


def write_feature_npzs(
    directory: str | os.PathLike,
    segments: Sequence[SegmentLabel],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    make_arrays: Callable[[np.random.Generator, SegmentLabel], dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write one ``<uid>.npz`` per segment.

    Args:
        directory: output folder (created).
        segments: the segments.
        shapes: field shapes for random features (default ``feature_shapes()``).
        seed: RNG seed.
        make_arrays: optional generator of one segment's arrays (e.g. with a planted signal).
    Returns:
        The folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = dict(shapes or feature_shapes())
    rng = np.random.default_rng(seed)
    for seg in segments:
        arrays = make_arrays(rng, seg) if make_arrays is not None else random_segment_arrays(rng, shapes)
        np.savez(directory / f"{seg.uid}.npz", **arrays)
    return directory


class PlantedSignal:
    """Features where labels can be read only the way SAOA reads them (for learning tests and demos).

    Construction, per segment (``C`` = verb/noun dim, ``Cd`` = detection dim):

    - Nouns live only in the detections. Every global slot carries the embedding of some noun
      class; the one *target* slot carries the segment's noun plus a fixed marker vector, the
      distractors carry other nouns and no marker. ``noun.global`` and ``verb.global`` are noise,
      so the ``global`` baseline is at chance on nouns, a mean over slots is confused by the
      distractors, and an attention that finds the marker reads the noun.
    - Verbs live only in the spatial map, at the target local box. ``verb.map`` holds the verb's
      embedding inside the target box's cells and its negation in a disjoint region of the same
      size, so the map's mean (what ``verb.global`` is) carries no verb. Detection features carry
      no verb either, so SAP's verb branch (global verb feature + detection features) is at chance,
      while SAOA's local alignment pools the map at the target box and reads the verb.
    """

    def __init__(self, *, verb_dim: int = 32, det_dim: int = 32, map_size: tuple[int, int, int] = (2, 7, 7),
                 n_global: int = 60, n_local: int = 40, num_verbs: int = 6, num_nouns: int = 6,
                 noise: float = 0.3, seed: int = 1234):
        rng = np.random.default_rng(seed)
        self.verb_dim, self.det_dim, self.map_size = verb_dim, det_dim, map_size
        self.n_global, self.n_local, self.noise = n_global, n_local, noise
        self.verb_embedding = rng.standard_normal((num_verbs, verb_dim)).astype(np.float32)
        self.noun_embedding = rng.standard_normal((num_nouns, det_dim)).astype(np.float32) * 1.5
        self.marker = np.zeros(det_dim, np.float32)
        self.marker[: det_dim // 4] = 3.0
        self.num_nouns = num_nouns

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return feature_shapes(verb_dim=self.verb_dim, noun_dim=self.verb_dim, det_dim=self.det_dim,
                              n_global=self.n_global, n_local=self.n_local, map_size=self.map_size)

    def _cell_box(self, rng: np.random.Generator, size: int, taken: np.ndarray | None = None) -> tuple[int, int]:
        _, height, width = self.map_size
        while True:
            y, x = int(rng.integers(0, height - 1)), int(rng.integers(0, width - 1))
            if taken is None or not taken[y:y + size, x:x + size].any():
                return y, x

    def __call__(self, rng: np.random.Generator, seg: SegmentLabel) -> dict[str, np.ndarray]:
        c, (t, h, w) = self.verb_dim, self.map_size
        noise = self.noise
        arrays = {
            VERB_GLOBAL: (rng.standard_normal(c) * noise).astype(np.float32),
            NOUN_GLOBAL: (rng.standard_normal(c) * noise).astype(np.float32),
        }
        # Nouns: one marked target among distractor objects.
        for box_set, n in zip(BOX_SETS, (self.n_global, self.n_local)):
            others = rng.integers(0, self.num_nouns, size=n)
            feats = self.noun_embedding[others] + rng.standard_normal((n, self.det_dim)).astype(np.float32) * noise
            target = int(rng.integers(0, n))
            feats[target] = self.noun_embedding[seg.noun_class] + self.marker
            arrays[det_field(box_set, "feat")] = feats.astype(np.float32)
            arrays[det_field(box_set, "score")] = rng.uniform(0.5, 1.0, n).astype(np.float32)
            arrays[det_field(box_set, "box")] = random_boxes(rng, n)
            arrays[f"_target.{box_set}"] = np.array(target)
        # Verbs: +embedding under the target local box (2x2 cells), -embedding in a disjoint 2x2 region.
        verb_map = (rng.standard_normal((c, t, h, w)) * noise).astype(np.float32)
        y, x = self._cell_box(rng, 2)
        taken = np.zeros((h, w), bool)
        taken[y:y + 2, x:x + 2] = True
        y2, x2 = self._cell_box(rng, 2, taken)
        embedding = self.verb_embedding[seg.verb_class][:, None, None, None]
        verb_map[:, :, y:y + 2, x:x + 2] += embedding
        verb_map[:, :, y2:y2 + 2, x2:x2 + 2] -= embedding
        arrays[VERB_MAP] = verb_map
        arrays[VERB_GLOBAL] += verb_map.mean(axis=(1, 2, 3))
        target = int(arrays.pop("_target.local"))
        arrays.pop("_target.global")
        arrays[DET_LOCAL_BOX][target] = [x / w, y / h, (x + 2) / w, (y + 2) / h]
        return arrays
