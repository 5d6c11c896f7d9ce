"""The `vectors` head: the `global` baseline over fields named by its switches. Its pooling worked
by hand; on the real EPIC-55 annotations with values planted per class in RULSTM's layout, a head
trained on the imported store (no extraction) recovers the planted signal, and the store's query
answers from the annotation rows (compared with a built store in tests/cli/test_featstore_import.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from featstore.epic.annotations import read_segments
from featstore.imports import import_features
from featstore.imports.timing import timestamp_seconds
from featstore.samples.published import write_rulstm_lmdb
from featstore.store.query import run_query
from featstore.store.reader import FeatureStore
from heads.models import FeatureDims, build_head, get_head
from heads.models.vectors import field_inputs, parse_fields, vector_fields
from heads.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = FeatureDims(verb_dim=6, noun_dim=5, det_dim=4, n_global=3, n_local=2,
                   field_shapes=(("rulstm.flow", (8,)), ("rulstm.rgb", (7,)), ("rulstm.obj", (3,)),
                                 ("tbn.rgb", (25, 4)), ("cube", (2, 2, 2))))


def test_fields_are_named_by_the_switches_and_detection_sets_bring_their_mask() -> None:
    assert parse_fields(" rulstm.rgb, rulstm.obj ,") == ("rulstm.rgb", "rulstm.obj")
    assert vector_fields(verb_fields="rulstm.flow", noun_fields="rulstm.rgb,rulstm.obj") == (
        "rulstm.flow", "rulstm.rgb", "rulstm.obj")
    assert vector_fields(verb_fields="det.global.feat", noun_fields="det.global.feat") == (
        "det.global.feat", "det.global.score")
    assert get_head("vectors").required_fields() == ("verb.global", "noun.global")  # the defaults are `global`'s


def test_each_branch_concatenates_its_fields_pooling_rows_over_valid_slots() -> None:
    head = build_head("vectors", dims=DIMS, num_verbs=3, num_nouns=4, verb_fields="rulstm.flow,det.global.feat",
                      noun_fields="rulstm.rgb,rulstm.obj,tbn.rgb")
    assert head.verb_classifier.in_features == 8 + 4 and head.noun_classifier.in_features == 7 + 3 + 4
    g = torch.Generator().manual_seed(0)
    batch = {"rulstm.flow": torch.randn(2, 8, generator=g), "rulstm.rgb": torch.randn(2, 7, generator=g),
             "rulstm.obj": torch.randn(2, 3, generator=g), "tbn.rgb": torch.randn(2, 25, 4, generator=g),
             "det_global_feat": torch.randn(2, 3, 4, generator=g),
             "det_global_valid": torch.tensor([[True, False, False], [True, True, False]])}
    out = head(batch)
    slots = torch.stack([batch["det_global_feat"][0, 0], batch["det_global_feat"][1, :2].mean(0)])
    verbs = torch.cat([batch["rulstm.flow"], slots], dim=1)
    nouns = torch.cat([batch["rulstm.rgb"], batch["rulstm.obj"], batch["tbn.rgb"].mean(1)], dim=1)
    torch.testing.assert_close(out["verb_logits"], head.verb_classifier(verbs))
    torch.testing.assert_close(out["noun_logits"], head.noun_classifier(nouns))


def test_a_field_the_store_lacks_or_of_another_rank_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="the store has no field 'rulstm.depth'"):
        field_inputs(["rulstm.depth"], DIMS)
    with pytest.raises(ValueError, match=r"reads \[D\] or \[N, D\] fields; cube is \[2, 2, 2\]"):
        field_inputs(["cube"], DIMS)
    with pytest.raises(ValueError, match="a branch names no field"):
        build_head("vectors", dims=DIMS, num_verbs=3, num_nouns=4, verb_fields=" ,")


def _planted_epic55(root: Path, epic55_dir: Path, n_verbs: int = 4, n_nouns: int = 5, max_seconds: float = 2.5,
                    keep: int = 160) -> Path:
    """Real EPIC-55 training rows of the most frequent classes, short and not overlapping in time."""
    rows = pd.read_csv(epic55_dir / "EPIC_train_action_labels.csv", dtype=str, keep_default_na=False)
    verbs = rows["verb_class"].value_counts().index[:n_verbs]
    nouns = rows["noun_class"].value_counts().index[:n_nouns]
    start = rows["start_timestamp"].map(timestamp_seconds)
    stop = rows["stop_timestamp"].map(timestamp_seconds)
    chosen = rows[rows["verb_class"].isin(verbs) & rows["noun_class"].isin(nouns) & (stop - start <= max_seconds)]
    kept, last_stop = [], {}
    for index in chosen.assign(start=start, stop=stop).sort_values(["video_id", "start"]).index:
        video = rows.at[index, "video_id"]
        if start[index] > last_stop.get(video, -1.0) + 0.1:  # one segment's frames are its own
            kept.append(index)
            last_stop[video] = stop[index]
    out = root / "EPIC_train_action_labels.csv"
    rows.loc[sorted(kept[:keep], key=int)].to_csv(out, index=False)
    return out


def test_a_head_on_an_imported_store_recovers_the_planted_signal(tmp_path: Path, epic55_dir: Path) -> None:
    annotations = _planted_epic55(tmp_path, epic55_dir)
    rows = read_segments(annotations).to_pylist()
    assert len(rows) >= 120
    rng = np.random.default_rng(0)
    widths = {"rgb": 1024, "flow": 1024, "obj": 352}
    prototypes = {m: rng.standard_normal((400, w)).astype(np.float32) for m, w in widths.items()}
    spans = {}
    for row in rows:
        first = max(1, math.floor(timestamp_seconds(row["start_timestamp"]) * 30))
        spans.setdefault(row["video_id"], []).append(
            (first, math.floor(timestamp_seconds(row["stop_timestamp"]) * 30), row["verb_class"], row["noun_class"]))

    for modality, width in widths.items():
        # Only the segments' frames (EPIC videos are long): noise, plus the segment's verb prototype
        # in flow, its noun's in rgb and obj.
        write_rulstm_lmdb(tmp_path / "rulstm" / modality, (
            (video, frame, 2.0 * rng.standard_normal(width).astype(np.float32)
             + prototypes[modality][verb if modality == "flow" else noun])
            for video, segments in spans.items() for first, last, verb, noun in segments
            for frame in range(first, last + 1)))
    report = import_features(tmp_path / "store", annotations, tmp_path / "rulstm", format="rulstm-lmdb",
                             progress=False)
    assert (report.imported, report.failed) == (len(rows), [])
    # `featstore query` answers from the annotation rows, as over a built store.
    columns = ("uid", "video_id", "start_frame", "stop_frame", "start_timestamp", "verb_class", "noun_class")
    answer = run_query(FeatureStore.open(tmp_path / "store"),
                       f"select {', '.join(columns)} from segments order by cast(uid as int)").to_pylist()
    written = pd.read_csv(annotations, dtype=str, keep_default_na=False)
    assert answer == [{c: (int(r[c]) if c.endswith(("_frame", "_class")) else r[c]) for c in columns}
                      for r in written.to_dict("records")]
    config = TrainConfig(model="vectors", switches={"verb_fields": "rulstm.flow", "noun_fields": "rulstm.rgb,rulstm.obj"},
                         train_where="cast(uid as int) % 4 <> 0", val_where="cast(uid as int) % 4 = 0",
                         epochs=6, batch_size=16, lr=0.05, seed=0, action_prior="none")
    metrics = train(tmp_path / "store", tmp_path / "run", config, progress=False)
    assert metrics["verb_top1"] >= 90.0 and metrics["noun_top1"] >= 90.0, metrics
    # Swapped fields carry no verb signal: the planted signal is what was learned.
    swapped = TrainConfig(**{**config.to_json(), "switches": {"verb_fields": "rulstm.obj", "noun_fields": "rulstm.flow"},
                             "lr_steps": ()})
    chance = train(tmp_path / "store", tmp_path / "swapped", swapped, progress=False)
    assert chance["verb_top1"] < metrics["verb_top1"] - 30 and chance["noun_top1"] < metrics["noun_top1"] - 30
