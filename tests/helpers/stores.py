"""Small stores of generated features, imported through `featstore import`'s library call."""
from __future__ import annotations

from pathlib import Path

from featstore.store.importer import import_npz
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import PlantedSignal, feature_shapes, write_feature_npzs


def make_planted_store(root: Path, n: int = 480, *, seed: int = 0, **planted_kwargs) -> Path:
    """A store of planted-signal features: participants P01, P02 (train) and P26, P27 (val).

    Args:
        root: an empty folder; the annotation file, the npz files and the store go in it.
        n: number of segments.
        seed: of the segments and their features.
        planted_kwargs: `PlantedSignal` options.
    Returns:
        ``root / "store"`` (its annotation file is ``root / "annotations" / "EPIC_train_action_labels.csv"``).
    """
    planted = PlantedSignal(**planted_kwargs)
    segments = generate_segments(n, num_verbs=planted.verb_embedding.shape[0], num_nouns=planted.num_nouns, seed=seed)
    annotations = write_epic55_annotations(root / "annotations" / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(root / "npz", segments, seed=seed, make_arrays=planted)
    import_npz(root / "store", annotations, npz, progress=False)
    return root / "store"


def make_small_store(root: Path, n: int = 48, *, seed: int = 0) -> Path:
    """A small store of random features with every canonical field but the map (8-d features, 6 / 4 slots).

    Participants P01, P02 (the LFB split's train side) and P26, P27 (its val side), as `make_planted_store`.

    Returns:
        ``root / "store"`` (its annotation file is ``root / "annotations" / "EPIC_train_action_labels.csv"``).
    """
    segments = generate_segments(n, num_verbs=4, num_nouns=5, seed=seed)
    annotations = write_epic55_annotations(root / "annotations" / "EPIC_train_action_labels.csv", segments)
    shapes = feature_shapes(verb_dim=8, noun_dim=8, det_dim=4, n_global=6, n_local=4, map_size=None)
    npz = write_feature_npzs(root / "npz", segments, shapes=shapes, seed=seed)
    import_npz(root / "store", annotations, npz, progress=False)
    return root / "store"


def make_store_without_detections(root: Path, n: int = 96, *, seed: int = 0) -> Path:
    """A planted-signal store whose detection slots are all padding (scores 0, so no slot is valid):
    what a detector that finds nothing builds. Same layout as `make_planted_store`."""
    from featstore.store.schema import BOX_SETS, det_field

    planted = PlantedSignal()
    scores = {det_field(box_set, "score") for box_set in BOX_SETS}

    def arrays(rng, seg):
        return {name: (value * 0 if name in scores else value) for name, value in planted(rng, seg).items()}

    segments = generate_segments(n, num_verbs=planted.verb_embedding.shape[0], num_nouns=planted.num_nouns, seed=seed)
    annotations = write_epic55_annotations(root / "annotations" / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(root / "npz", segments, seed=seed, make_arrays=arrays)
    import_npz(root / "store", annotations, npz, progress=False)
    return root / "store"
