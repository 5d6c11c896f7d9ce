"""The small real workloads the reliability tests crash, crowd and starve: argv of each command."""
from __future__ import annotations

from pathlib import Path

from featstore.samples.features import feature_shapes
from tests.helpers.tiny_build import tiny_build_flags
from tests.reliability import faults

# Imported features: small, with detection slots (6 global + 4 local boxes a segment).
IMPORT_SHAPES = feature_shapes(verb_dim=8, noun_dim=8, det_dim=4, n_global=6, n_local=4, map_size=None)
IMPORT_BOXES_PER_SEGMENT = 6 + 4

# Built features (the default --map none): verb.global, verb.local, noun.global, det.{global,local}.{feat,box,score}.
BUILD_FIELDS = 9
BUILD_BOXES_PER_SEGMENT = 60 + 40

TRAIN_WHERE = "participant_id <= 'P25'"
VAL_WHERE = "participant_id > 'P25'"


def import_command(store: Path, annotations: Path, npz: Path) -> list[str]:
    return faults.command("featstore", "import", store, "--annotations", annotations, "--from", npz,
                          "--no-progress")


def build_command(store: Path, annotations: Path, frames: Path, *extra: str) -> list[str]:
    """`featstore build` at the extraction tests' tiny settings (random r3d_18 and MobileNet detector,
    8-frame clips, 32-pixel short side), one segment per export; ``--workers 0`` unless given."""
    return faults.command(
        "featstore", "build", store, "--annotations", annotations, "--frames", frames, *tiny_build_flags(),
        "--no-progress", "--batch-size", "2", "--flush-every", "1", *(extra or ("--workers", "0")))


def train_command(store: Path, out: Path, *extra: str) -> list[str]:
    """Three epochs of SAOA, seeded (deterministic on CPU with one thread)."""
    return faults.command("heads", "train", store, "--model", "saoa", "--train-where", TRAIN_WHERE,
                          "--val-where", VAL_WHERE, "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
                          "--seed", "3", "--out", out, "--no-progress", *extra)
