"""What a build computes before any model runs: shards, input size, the field schema, detection
slots and their ``boxes`` rows (files of precomputed boxes: tests/featstore/epic/test_boxes.py)."""
from __future__ import annotations

import numpy as np
import pytest

from featstore.extract.plan import (
    BOX_COLUMNS,
    MIN_VALID_SCORE,
    FrameDetections,
    detection_slots,
    input_size_for,
    merge_box_rows,
    resolve_sampling,
    shard_uids,
    store_fields,
)
from featstore.epic.frames import resize_short_side
from featstore.models import backbone_map_shape, get_backbone_record
from featstore.epic.sampling import SamplingConfig


def _detections(scores: list[float], *, dim: int = 4, labels: bool = True) -> FrameDetections:
    k = len(scores)
    boxes = np.array([[0.1 * i, 0.1, 0.1 * i + 0.2, 0.5] for i in range(k)], np.float32).reshape(k, 4)
    return FrameDetections(boxes=boxes, scores=np.array(scores, np.float32),
                           labels=np.arange(k) + 10 if labels else None,
                           features=np.arange(k * dim, dtype=np.float32).reshape(k, dim) + 1)


# ------------------------------------------------------------------------------------------------
# shards


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 15])
def test_shard_uids_are_disjoint_and_cover_the_selection(world_size: int) -> None:
    uids = [f"P{i % 4:02d}_{i}" for i in range(11)]
    shards = [shard_uids(reversed(uids), rank=r, world_size=world_size) for r in range(world_size)]
    taken = [u for shard in shards for u in shard]
    assert sorted(taken) == sorted(uids) and len(set(taken)) == len(uids)  # complete, disjoint
    assert shards[0] == sorted(uids)[0::world_size]
    assert all(shard == sorted(shard) for shard in shards)
    # The split depends on the selection only, not on the order the uids come in.
    assert [shard_uids(uids, rank=r, world_size=world_size) for r in range(world_size)] == shards


@pytest.mark.parametrize("rank, world_size", [(3, 3), (-1, 2), (0, 0)])
def test_shard_uids_refuse_a_rank_outside_the_world(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match=rf"rank {rank} is not in \[0, {world_size}\)"):
        shard_uids(["a", "b"], rank=rank, world_size=world_size)


# ------------------------------------------------------------------------------------------------
# input size and schema


@pytest.mark.parametrize("height, width, size", [(90, 160, 112), (90, 160, 32), (160, 90, 64), (256, 456, 256),
                                                 (101, 101, 7), (3, 1000, 2)])
def test_input_size_matches_resize_short_side(height: int, width: int, size: int) -> None:
    frame = np.zeros((1, height, width, 3), np.uint8)
    assert input_size_for(height, width, size) == resize_short_side(frame, size).shape[1:3]


def test_input_size_short_side_is_the_size_and_rounds_half_up() -> None:
    assert input_size_for(90, 160, 32) == (32, 57)  # 160 * 32 / 90 = 56.9
    assert input_size_for(160, 90, 32) == (57, 32)
    assert input_size_for(4, 6, 3) == (3, 5)  # 4.5 rounds up
    for bad in ((0, 10, 5), (10, 10, 0)):
        with pytest.raises(ValueError, match="bad sizes"):
            input_size_for(*bad)


def test_store_fields_follow_the_records() -> None:
    record = get_backbone_record("r3d_18")
    fields = store_fields(verb_record=record, noun_record=record, sampling=SamplingConfig(clip_frames=8, size=112),
                          input_size=(112, 199), detector_dim=1024)
    assert fields["verb.map"].shape == (512, 1, 7, 13) and fields["verb.map"].dtype == "float16"
    assert fields["verb.global"].shape == (512,) and fields["noun.global"].shape == (512,)
    assert fields["det.global.feat"].shape == (60, 1024) and fields["det.local.box"].shape == (40, 4)
    assert fields["det.global.score"].shape == (60,) and fields["det.local.score"].shape == (40,)
    assert fields["det.local.score"].dtype == "float32" and fields["det.global.box"].dtype == "float32"
    assert fields["det.global.feat"].dtype == "float16"
    assert "noun.map" not in fields


def test_store_fields_without_detector_with_noun_map_and_other_slot_counts() -> None:
    verb, noun = get_backbone_record("r3d_18"), get_backbone_record("i3d")
    sampling = SamplingConfig(clip_frames=16, size=64, det_topk=3)
    fields = store_fields(verb_record=verb, noun_record=noun, sampling=sampling, input_size=(64, 114),
                          detector_dim=None, noun_map=True)
    assert set(fields) == {"verb.global", "verb.map", "noun.global", "noun.map"}  # no detector: no det.*
    assert fields["noun.global"].shape == (noun.feature_dim,) and fields["noun.map"].shape[0] == noun.feature_dim
    with_det = store_fields(verb_record=verb, noun_record=noun, sampling=sampling, input_size=(64, 114),
                            detector_dim=8)
    assert with_det["det.global.feat"].shape == (sampling.n_global_frames * 3, 8)
    assert with_det["det.local.box"].shape == (sampling.n_local_frames * 3, 4)


# ------------------------------------------------------------------------------------------------
# detection slots


def test_detection_slots_pad_missing_frames_and_short_detections() -> None:
    found = FrameDetections(
        boxes=np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.9, 0.9]], np.float32),
        scores=np.array([0.9, 0.0], np.float32),  # a real box with score 0 must stay distinguishable
        labels=np.array([3, 4]),
        features=np.ones((2, 4), np.float32),
    )
    tensors, rows = detection_slots("local", [None, 10, 20], {10: found}, topk=3, feature_dim=4)
    assert tensors["det.local.feat"].shape == (9, 4) and tensors["det.local.box"].shape == (9, 4)
    valid = np.array(rows["valid"])
    assert valid.tolist() == [False] * 3 + [True, True, False] + [False] * 3
    assert (tensors["det.local.score"] > 0).tolist() == valid.tolist()  # readers mask on score > 0
    assert tensors["det.local.score"][4] == MIN_VALID_SCORE
    assert np.all(tensors["det.local.feat"][~valid] == 0) and np.all(tensors["det.local.box"][~valid] == 0)
    assert rows["frame"] == [None] * 3 + [10, 10, None] + [None] * 3
    assert rows["label"] == [None] * 3 + [3, 4, None] + [None] * 3
    assert rows["slot"] == list(range(9)) and rows["set"] == ["local"] * 9
    assert rows["x2"][4] == pytest.approx(0.9)
    assert set(rows) == set(BOX_COLUMNS) and all(len(column) == 9 for column in rows.values())


def test_detection_slots_keep_the_best_topk_in_order_and_tolerate_no_labels() -> None:
    many = _detections([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], labels=False)
    tensors, rows = detection_slots("global", [5, 6], {5: many, 6: _detections([0.2], labels=False)}, topk=5,
                                    feature_dim=4)
    np.testing.assert_allclose(tensors["det.global.score"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.2, 0, 0, 0, 0])
    np.testing.assert_array_equal(tensors["det.global.feat"][:5], many.features[:5])
    np.testing.assert_array_equal(tensors["det.global.box"][:5], many.boxes[:5])
    np.testing.assert_array_equal(tensors["det.global.feat"][5], _detections([0.2]).features[0])
    assert rows["frame"] == [5] * 5 + [6] + [None] * 4
    assert rows["label"] == [None] * 10 and rows["valid"] == [True] * 6 + [False] * 4
    assert rows["y2"][:6] == pytest.approx([0.5] * 6)


def test_merge_box_rows_concatenates_the_windows_in_order() -> None:
    _, global_rows = detection_slots("global", [1], {1: _detections([0.5])}, topk=2, feature_dim=4)
    _, local_rows = detection_slots("local", [2, None], {}, topk=2, feature_dim=4)
    merged = merge_box_rows([global_rows, local_rows])
    assert merged["set"] == ["global"] * 2 + ["local"] * 4
    assert merged["slot"] == [0, 1, 0, 1, 2, 3]
    assert merged["valid"] == [True, False, False, False, False, False]
    assert list(merged) == list(BOX_COLUMNS)


# Added with the published backbones (r3d_50, SlowFast, TSN/TSM, convert-checkpoint).

def test_r2plus1d_34_samples_its_own_32x4_clips_at_128() -> None:
    record = get_backbone_record("r2plus1d_34")
    resolved = resolve_sampling(record, record, modality="rgb")
    config = resolved.config
    assert (config.clip_frames, config.clip_stride, config.size) == (32, 4, 128)
    assert (config.clip_sampling, config.snippet_frames) == ("centred", 1)
    for name in ("clip_frames", "clip_stride", "size", "clip_sampling", "snippet_frames"):
        assert resolved.sources[name] == "backbone:r2plus1d_34"
    # Detection windows are the paper's, not a backbone's.
    assert resolved.sources["det_fps"] == resolved.sources["det_topk"] == "default"
    assert (config.det_fps, config.det_global_seconds, config.det_topk) == (2.0, 6.0, 5)
    assert resolved.notes == ()


def test_flags_override_the_record_and_say_so() -> None:
    record = get_backbone_record("r3d_50")
    resolved = resolve_sampling(record, record, modality="rgb", given={"size": 128, "det_topk": 3, "clip_stride": None})
    assert (resolved.config.clip_frames, resolved.config.clip_stride, resolved.config.size) == (64, 2, 128)
    assert resolved.sources["size"] == resolved.sources["det_topk"] == "flag"
    assert resolved.sources["clip_stride"] == "backbone:r3d_50", "None means not given"
    with pytest.raises(ValueError, match="unknown sampling setting"):
        resolve_sampling(record, record, modality="rgb", given={"crop": 224})
    with pytest.raises(ValueError, match="clip_frames"):
        resolve_sampling(record, record, modality="rgb", given={"clip_frames": 0})


def test_tsn_flow_takes_8_segments_of_5_stacked_flow_frames() -> None:
    record = get_backbone_record("tsn_r50")
    rgb = resolve_sampling(record, record, modality="rgb").config
    flow = resolve_sampling(record, record, modality="flow").config
    assert (rgb.clip_sampling, rgb.clip_frames, rgb.snippet_frames) == ("segments", 8, 1)
    assert (flow.clip_sampling, flow.clip_frames, flow.snippet_frames, flow.clip_stride) == ("segments", 8, 5, 2)
    assert record.in_channels("flow") == 10 and record.in_channels("rgb") == 3
    # The map has one time step per segment.
    fields = store_fields(verb_record=record, noun_record=record, sampling=flow, input_size=(256, 455),
                          detector_dim=None)
    assert fields["verb.map"].shape == (2048, 8, 8, 15)


def test_noun_backbone_runs_on_the_verb_clip_with_a_note() -> None:
    verb, noun = get_backbone_record("r3d_50"), get_backbone_record("r2plus1d_34")
    resolved = resolve_sampling(verb, noun, modality="rgb", given={"size": 112})
    assert resolved.config.clip_frames == 64 and resolved.config.size == 112
    (note,) = resolved.notes
    assert "noun backbone r2plus1d_34 runs on the verb backbone r3d_50's clip" in note
    assert "clip_frames 32" in note and "clip_stride 4" in note
    assert "size" not in note.split("asks for")[1], "a setting the user gave is not a disagreement"
    same = resolve_sampling(verb, verb, modality="rgb")
    assert same.notes == ()


def test_map_shape_follows_the_resolved_clip() -> None:
    record = get_backbone_record("slowfast_r50")
    config = resolve_sampling(record, record, modality="rgb").config
    assert (config.clip_frames, config.clip_stride, config.size) == (32, 2, 256)
    assert backbone_map_shape(record, clip_frames=config.clip_frames, height=256, width=455) == (2304, 8, 8, 15)
    # The store's (verb) map follows the paper's ResNet50-3D clip: 64 frames, 256 short side: T/16, H/32.
    r3d = get_backbone_record("r3d_50")
    assert backbone_map_shape(r3d, clip_frames=64, height=256, width=455) == (2048, 4, 8, 15)
    assert SamplingConfig().clip_frames == r3d.default_clip_frames
