"""``npz``, the default format: `featstore.imports.import_features` hands a <uid>.npz folder to
`featstore.store.importer.import_npz` (tested there), and refuses the published formats' clock options."""
from __future__ import annotations

from pathlib import Path

import pytest

from featstore.imports import get_format, import_features
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.importer import ImportFailure, import_npz
from featstore.store.reader import FeatureStore


def test_npz_is_the_default_format_and_takes_no_clock(tmp_path: Path) -> None:
    segments = generate_segments(4, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(tmp_path / "npz", segments, shapes=feature_shapes(verb_dim=8, noun_dim=8, map_size=None))
    report = import_features(tmp_path / "a", annotations, npz, progress=False)
    reference = import_npz(tmp_path / "b", annotations, npz, progress=False)
    assert (report.imported, reference.imported) == (4, 4)
    assert FeatureStore.open(tmp_path / "a").fields == FeatureStore.open(tmp_path / "b").fields
    with pytest.raises(ImportFailure, match="--format npz reads one file per segment: --time-map"):
        import_features(tmp_path / "c", annotations, npz, time_map="frames", progress=False)
    assert get_format("npz").opener is None and get_format("npz").options() == {}
