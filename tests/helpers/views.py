"""Stores with temporal views (docs/views.md) on a small demo sample, for the build, store, heads and
crash tests.

`views_sample` generates the demo's synthetic kitchens (featstore.samples.kitchens) at a small size:
two training participants (P01, P02) of four segments each and one held-out participant (P26) of
four; `views_build_argv` is the demo's own `featstore build` (cli.demo_recipe.build_params: r3d_18
with random weights, the ResNet-50 FPN pooling features at the sample's boxes, 4-frame clips at a
32-pixel short side, detections at 1 fps) with ``--views K``. With the default ``--views-where``
the eight training segments get K views and the four of P26 one.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from featstore.samples.kitchens import Sample, SampleSpec, generate_sample

SPEC = SampleSpec(("P01", "P02"), ("P26",), videos_per_participant=1, segments_per_video=4, motion=0.3)
TRAIN_SEGMENTS = 8
VAL_SEGMENTS = 4
TRAIN_WHERE = "participant_id <= 'P25'"
VAL_WHERE = "participant_id >= 'P26'"


def views_sample(root: Path) -> Sample:
    """The small demo sample under ``root`` (same bytes for the same root name)."""
    return generate_sample(root, SPEC, seed=0)


def views_build_argv(sample: Sample, store: Path, *extra: str, views: int = 4) -> list[str]:
    """`featstore build` arguments (after ``build``) of the demo's build with ``--views``."""
    from cli.demo_recipe import build_command, build_params

    params = build_params(sample, store, workers=0, progress=False)
    params["views"] = views
    return [*shlex.split(build_command(params))[2:], *extra]


def make_planted_views_store(root: Path, n: int = 96, *, views: int = 4, seed: int = 0) -> Path:
    """A planted-signal store (`featstore.samples.features.PlantedSignal`, as `make_planted_store`) with
    temporal views: each training segment (P01, P02) has ``views`` views, each a fresh draw of its
    planted features (same labels, other noise and object positions), the held-out ones (P26, P27) one.

    Written through `StoreWriter.put_views`, as a build writes them.

    Returns:
        ``root / "store"``.
    """
    import numpy as np

    from featstore.epic.annotations import read_segments
    from featstore.samples.annotations import generate_segments, write_epic55_annotations
    from featstore.samples.features import PlantedSignal
    from featstore.store.importer import field_specs_from_arrays
    from featstore.store.reader import FeatureStore

    planted = PlantedSignal()
    segments = generate_segments(n, num_verbs=planted.verb_embedding.shape[0], num_nouns=planted.num_nouns, seed=seed)
    annotations = write_epic55_annotations(root / "annotations" / "EPIC_train_action_labels.csv", segments)
    rows = {row["uid"]: row for row in read_segments(annotations).to_pylist()}
    fields = field_specs_from_arrays(planted(np.random.default_rng(seed), segments[0]))
    store = FeatureStore.create(root / "store", fields=fields, provenance={"source": "test", "views": {"count": views}})
    with store.writer() as writer:
        for index, segment in enumerate(segments):
            count = views if segment.participant_id <= "P25" else 1
            writer.put_views([({**rows[segment.uid], "view": view},
                               planted(np.random.default_rng([seed, index, view]), segment), None)
                              for view in range(count)])
    return root / "store"
