"""A small store for the store tests: three fields, rows of one video, random tensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec

FIELDS = {
    "verb.global": FieldSpec("float16", (16,)),
    "det.global.box": FieldSpec("float32", (6, 4)),
    "det.global.score": FieldSpec("float32", (6,)),
}


def segment_row(uid: str, verb: int = 1) -> dict:
    """An index row of segment ``uid`` (video P01_01, frames 1-30)."""
    return {"uid": uid, "participant_id": "P01", "video_id": "P01_01", "start_frame": 1, "stop_frame": 30,
            "verb_class": verb, "noun_class": 2, "dataset": "epic55", "source": "EPIC_train_action_labels"}


def random_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One segment's tensors of `FIELDS` (float32; the store casts ``verb.global`` to float16)."""
    return {
        "verb.global": rng.standard_normal(16).astype(np.float32),
        "det.global.box": rng.random((6, 4)).astype(np.float32),
        "det.global.score": rng.random(6).astype(np.float32),
    }


def fill_store(path: Path, n: int, *, seed: int = 0, **writer_kwargs) -> dict[str, dict[str, np.ndarray]]:
    """Create a store of `FIELDS` at ``path`` and write segments ``"0"`` .. ``str(n - 1)`` into shard 0.

    Returns:
        uid -> the tensors written.
    """
    store = FeatureStore.create(path, fields=FIELDS, provenance={"test": True})
    rng = np.random.default_rng(seed)
    written = {}
    with store.writer(**writer_kwargs) as writer:
        for i in range(n):
            written[str(i)] = random_arrays(rng)
            writer.put(segment_row(str(i)), written[str(i)])
    return written
