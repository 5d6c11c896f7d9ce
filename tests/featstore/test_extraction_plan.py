"""Where a build's sampling comes from: the verb backbone's record, unless given, and what it says when
the noun backbone's record disagrees (`featstore.extraction_plan.resolve_sampling`)."""
from __future__ import annotations

import pytest

from featstore.extraction_plan import resolve_sampling, store_fields
from featstore.models import backbone_map_shape, get_backbone_record
from featstore.sampling import SamplingConfig


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
