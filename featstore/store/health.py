"""What a store's numbers say about its health: checks that turn silent nonsense into a loud warning.

A store whose detector found nothing still builds and still trains: its box slots are all padding
(``valid`` false, score 0), the heads' object branches see zeros, and a head ends at chance without
an error. `detection_coverage` counts the valid slots of the boxes index; `coverage_warning` says
when they are too few to learn from (`featstore build`, `heads train` and the demo print it, a head
run records it in its metrics.json ``warnings``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_VALID_SLOTS", "DetectionCoverage", "detection_coverage", "coverage_warning"]

MIN_VALID_SLOTS = 0.05  # below this share of valid box slots a store's detections carry almost nothing


@dataclass(frozen=True)
class DetectionCoverage:
    """How many of a store's detection slots hold a detection.

    Attributes:
        valid: slots with a detection (``boxes.valid``).
        total: slots of every stored segment (both box sets).
        segments: segments with box slots.
    """

    valid: int
    total: int
    segments: int

    @property
    def fraction(self) -> float:
        return self.valid / self.total if self.total else 0.0


def detection_coverage(store: Any) -> DetectionCoverage | None:
    """The valid detection slots of ``store`` (a `featstore.store.reader.FeatureStore`).

    Returns:
        The counts, or None when the store has no boxes index (no detection fields).
    """
    with store.connect() as con:
        total, valid, segments = con.execute(
            "select count(*), count(*) filter (where valid), count(distinct uid) from boxes").fetchone()
    if not total:
        return None
    return DetectionCoverage(int(valid), int(total), int(segments))


def coverage_warning(coverage: DetectionCoverage | None, *, threshold: float = MIN_VALID_SLOTS,
                     where: str = "the store") -> str | None:
    """One line when fewer than ``threshold`` of the box slots are valid, else None.

    Args:
        coverage: `detection_coverage`'s counts (None: no boxes, nothing to say).
        threshold: the share below which the detections are too few to learn from.
        where: names the store in the line.
    """
    if coverage is None or coverage.fraction >= threshold:
        return None
    return (f"{where}: only {coverage.valid} of {coverage.total} detection slots ({100 * coverage.fraction:.1f} %, "
            f"under {100 * threshold:.0f} %) over {coverage.segments} segments hold a detection: the heads' object "
            "branches see padding; check the detector (its mAP), its score threshold, or the --boxes file")
