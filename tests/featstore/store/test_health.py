"""A store's health checks: the share of valid detection slots, and the warning when it is too small."""
from __future__ import annotations

from pathlib import Path

from featstore.store.health import MIN_VALID_SLOTS, DetectionCoverage, coverage_warning, detection_coverage
from featstore.store.reader import FeatureStore
from tests.helpers.stores import make_store_without_detections


def test_a_store_whose_detector_found_nothing_says_so(tmp_path: Path, planted_store: Path) -> None:
    empty = detection_coverage(FeatureStore.open(make_store_without_detections(tmp_path, 8)))
    assert empty == DetectionCoverage(valid=0, total=8 * 100, segments=8)  # 60 global + 40 local slots each
    warning = coverage_warning(empty, where="demo/store")
    assert warning.startswith("demo/store: only 0 of 800 detection slots (0.0 %, under 5 %) over 8 segments")
    full = detection_coverage(FeatureStore.open(planted_store))
    assert full.fraction == 1.0 and coverage_warning(full) is None


def test_the_threshold_is_a_share_of_the_slots() -> None:
    just_under = DetectionCoverage(valid=int(MIN_VALID_SLOTS * 1000) - 1, total=1000, segments=10)
    assert coverage_warning(just_under) is not None
    assert coverage_warning(DetectionCoverage(valid=50, total=1000, segments=10)) is None
    assert coverage_warning(None) is None  # a store without detection fields
