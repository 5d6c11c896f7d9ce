"""`featstore info`'s summary: what a person checks, on one screen, from what the store records."""
from __future__ import annotations

from featstore.store.summary import describe_store

SHA = "9eb7d3e11bf98a2c68cc25b69207a8e79f144f77058094555bcda3d9bd5751f4"


def info(provenance: dict | None = None) -> dict:
    fields = {"verb.global": {"dtype": "float16", "shape": [512]},
              "verb.local": {"dtype": "float16", "shape": [3, 512], "complete": False}}
    return {
        "path": "/data/store",
        "segments": {"ok": 10, "failed": 2},
        "fields": fields,
        "bytes": 3 * 2**20,
        "bytes_per_segment": {"fields": {name: {"payload": 1024, "lmdb": 4096} for name in fields}, "measured": 2048},
        "map_alternatives": {"none": {"bytes_per_segment": 1024, "bytes": 10240}, "full": None},
        "derived": {},
        "manifest": {"featstore_version": "0.1.0", "created_at": "2026-12-06T22:31:21Z",
                     **({"provenance": provenance} if provenance is not None else {})},
    }


def test_a_built_store_shows_models_with_short_checksums_sampling_and_warnings() -> None:
    provenance = {
        "source": "build", "map": "full", "modality": "rgb", "input_size": [32, 43],
        "verb_backbone": {"name": "r3d_18", "checkpoint": "/runs/verbnet/checkpoint.pt", "checkpoint_sha256": SHA,
                          "finetune": {"run": "/runs/verbnet", "epoch": 3, "metrics": {"verb_top1": 68.75}}},
        "noun_backbone": {"name": "r3d_18", "checkpoint": None, "weights": "RANDOM WEIGHTS"},
        "detector": {"name": "fasterrcnn_resnet50_fpn", "checkpoint": None, "weights": "RANDOM WEIGHTS"},
        "sampling": {"clip_frames": 4, "clip_stride": 4, "size": 32, "clip_sampling": "centred", "det_fps": 1.0,
                     "det_topk": 3, "det_global_seconds": 2.0, "det_local_seconds": 1.0},
        "det_global_slots": 6, "det_local_slots": 3,
        "warnings": ["RANDOM WEIGHTS: detector 'fasterrcnn_resnet50_fpn' has no checkpoint"],
    }
    lines = describe_store(info(provenance))
    text = "\n".join(lines)
    assert len(lines) <= 40 and max(map(len, lines)) <= 120
    assert "segments    10 ok, 2 failed" in text
    assert f"(sha256 {SHA[:12]})" in text and SHA not in text
    assert "fine-tuned by featstore finetune: /runs/verbnet (epoch 3, verb_top1 68.8)" in text
    assert "noun      r3d_18  RANDOM WEIGHTS" in text
    assert "4 frames at stride 4, short side 32, input 32x43, centred" in text
    assert "6 slots over 2.0 s (global), 3 over 1.0 s (local)" in text
    assert "verb.local" in text and "(being derived: incomplete)" in text
    assert "verb map    stored with --map full; per segment with --map none 1.0 KiB" in text
    assert lines[lines.index("warnings") + 1] == "  RANDOM WEIGHTS: detector 'fasterrcnn_resnet50_fpn' has no checkpoint"


def test_a_store_that_records_little_shows_only_what_it_has() -> None:
    lines = describe_store(info())
    text = "\n".join(lines)
    assert "models" not in lines and "sampling" not in lines and "warnings" not in lines
    assert "verb map    per segment with --map none 1.0 KiB" in lines
    assert lines[0] == "store       /data/store (featstore 0.1.0, created 2026-12-06T22:31:21Z)"
    assert "verb.global" in text
