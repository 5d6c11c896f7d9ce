"""The extraction service on tiny generated videos: fields, slots and masks, precomputed boxes, flow,
video files, crash and resume, and a two-rank torchrun build equal to a one-process build.

Models are randomly initialised under a fixed seed (nothing is downloaded): r3d_18 for both
backbones, the MobileNet Faster R-CNN with score threshold 0 (so random weights still detect) at a
small input size, 8-frame clips, a 32-pixel short side (tests/helpers/tiny_build.py). The pure parts
of a build (shards, schema, slots) are tested in test_plan.py, boxes files in tests/featstore/epic/test_boxes.py.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from featstore.epic.annotations import read_segments
from featstore.extract import compute
from featstore.extract.config import BuildError
from featstore.extract.decode import resize_frames
from featstore.extract.plan import input_size_for, store_fields
from featstore.extract.service import build_store
from featstore.epic.frames import EpicJpegFrames
from featstore.models import backbone_map_shape, build_detector, get_backbone_record
from featstore.samples.annotations import (
    SegmentLabel,
    write_epic55_annotations,
)
from featstore.samples.damage import truncate_file
from featstore.samples.frames import write_jpeg_video, write_mp4
from featstore.epic.sampling import SamplingConfig, plan_segment
from featstore.store.reader import FeatureStore
from tests.helpers.threads import torch_threads
from tests.helpers.tiny_build import (
    DETECTOR,
    FPS,
    HEIGHT,
    N_FRAMES,
    SMALL,
    WIDTH,
    make_epic_dataset,
    small_config,
    tiny_build_flags,
)

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tests" / "featstore" / "extract" / "torchrun_build.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def plan_of(row_start: int, row_stop: int, sampling: SamplingConfig = SMALL):
    return plan_segment(row_start, row_stop, fps=FPS, n_frames=N_FRAMES, config=sampling)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_epic_dataset(tmp_path_factory.mktemp("epic"), flow=True)


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory: pytest.TempPathFactory):
    """A store built once with the detector, counting the images each detector call gets."""
    frames, annotations = dataset
    calls: list[int] = []
    real_build_detector = compute.build_detector

    def counting_build_detector(*args, **kwargs):
        detector, record = real_build_detector(*args, **kwargs)
        real_detect = detector.detect

        def detect(images, topk):
            calls.append(len(images))
            return real_detect(images, topk)

        detector.detect = detect
        return detector, record

    store_path = tmp_path_factory.mktemp("built") / "store"
    # batch_size 1: one detector call per segment, so its image count is that segment's.
    config = small_config(store_path, annotations, frames, batch_size=1, det_batch_size=64)
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(compute, "build_detector", counting_build_detector)
        report = build_store(config)
    return config, report, calls


# ------------------------------------------------------------------------------------------------
# builds


def test_built_store_has_every_field_with_its_shape(built) -> None:
    config, report, _ = built
    assert (report.built, report.skipped, report.failed) == (6, 0, [])
    store = FeatureStore.open(config.store)
    provenance = store.manifest["provenance"]
    assert provenance["input_size"] == [32, 57]  # 90x160 frames, short side 32
    expected = store_fields(verb_record=get_backbone_record("r3d_18"), noun_record=get_backbone_record("r3d_18"),
                            sampling=SMALL, input_size=(32, 57), detector_dim=1024, verb_map="none", verb_local=True)
    assert store.fields == expected  # the default --map none: verb.local, no map
    uids = store.uids()
    assert uids == [f"s{i}" for i in range(6)]
    for name, spec in store.fields.items():
        values = store.read_field(uids, name)
        assert values.shape == (6, *spec.shape) and np.isfinite(values).all(), name
    assert provenance["verb_backbone"]["weights"] == "RANDOM WEIGHTS"
    assert provenance["verb_backbone"]["checkpoint_sha256"] is None
    assert provenance["det_global_slots"] == 60 and provenance["det_local_slots"] == 40
    assert provenance["fps_source"]["video_info"].endswith("EPIC_video_info.csv")
    assert provenance["featstore_version"] and provenance["dtype"]["features"] == "float16"
    assert store.verify() == []


def test_box_rows_match_the_slot_tensors_and_the_plan(built) -> None:
    config, _, _ = built
    store = FeatureStore.open(config.store)
    boxes = store.boxes().to_pylist()
    for uid in store.uids():
        row = store.segments(f"uid = '{uid}'").to_pylist()[0]
        plan = plan_of(row["start_frame"], row["stop_frame"])
        for box_set, frames in (("global", plan.global_frames), ("local", plan.local_frames)):
            mine = [b for b in boxes if b["uid"] == uid and b["set"] == box_set]
            assert [b["slot"] for b in mine] == list(range(len(frames) * 5))
            score = store.read_field([uid], f"det.{box_set}.score")[0]
            box = store.read_field([uid], f"det.{box_set}.box")[0]
            feat = store.read_field([uid], f"det.{box_set}.feat")[0]
            valid = np.array([b["valid"] for b in mine])
            assert ((score > 0) == valid).all()
            assert np.all(feat[~valid] == 0) and np.all(box[~valid] == 0)
            np.testing.assert_allclose(box[:, 0], [b["x1"] for b in mine])
            for slot, b in enumerate(mine):
                frame = frames[slot // 5]
                if frame is None:  # outside the video: padded
                    assert not b["valid"] and b["frame"] is None and b["score"] == 0
                elif b["valid"]:
                    assert b["frame"] == frame and 0 <= b["x1"] < b["x2"] <= 1 and b["label"] is not None
    # The per-box checks above ran on real detections, not only on padding.
    assert sum(b["valid"] for b in boxes) >= len(store.uids()) * 5
    # s0 is centred on frame 50: the global window's first frames are before frame 1.
    s0 = plan_of(20, 80)
    assert s0.global_frames[0] is None
    assert not any(b["valid"] for b in boxes if b["uid"] == "s0" and b["set"] == "global" and b["slot"] < 5)


def test_detector_runs_once_per_distinct_frame(built) -> None:
    config, _, calls = built
    # One call per segment (batch_size 1); in to-do order: by video, then start frame.
    rows = sorted(FeatureStore.open(config.store).segments().to_pylist(),
                  key=lambda r: (r["video_id"], r["start_frame"]))
    expected = [len(plan_of(r["start_frame"], r["stop_frame"]).detection_frames) for r in rows]
    assert calls == expected
    plan = plan_of(20, 80)
    in_video = [f for f in plan.global_frames + plan.local_frames if f is not None]
    assert len(set(in_video)) < len(in_video)  # the windows do share frames, each detected once


def test_rerun_skips_stored_segments_and_refuses_other_settings(built) -> None:
    config, _, _ = built
    report = build_store(config)
    assert (report.built, report.skipped, report.failed) == (0, 6, [])
    with pytest.raises(BuildError, match="seed"):
        build_store(dataclasses.replace(config, seed=1))
    with pytest.raises(BuildError, match="sampling"):
        build_store(dataclasses.replace(config, sampling=dataclasses.replace(SMALL, det_topk=4)))


def test_precomputed_boxes_fill_slots_with_masks(dataset, tmp_path: Path) -> None:
    frames, annotations = dataset
    plan = plan_of(140, 200)  # segment s4: P01_01, centred on frame 170
    rich, sparse = plan.local_frames[3], plan.global_frames[0]  # 7 boxes / 2 boxes; all others none
    path = tmp_path / "boxes.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "frame", "x1", "y1", "x2", "y2", "score", "label"])
        for k in range(7):
            writer.writerow(["P01_01", rich, 10 * k, 5, 10 * k + 40, 60, 0.1 * (k + 1), k])
        for k in range(2):
            writer.writerow(["P01_01", sparse, 0, 0, 80 + k, 45, 0.5 - 0.1 * k, 9])
    store_path = tmp_path / "store"
    config = small_config(store_path, annotations, frames, boxes=path, where="uid = 's4'", workers=1)
    report = build_store(config)
    assert (report.built, report.failed) == (1, [])
    store = FeatureStore.open(store_path)
    assert store.manifest["provenance"]["boxes_file"]["coords"] == "pixel"
    boxes = store.boxes(["s4"]).to_pylist()
    assert len([b for b in boxes if b["set"] == "global"]) == 60 and len(boxes) == 100

    local = [b for b in boxes if b["set"] == "local"]
    rich_slot = plan.local_frames.index(rich) * 5
    top = local[rich_slot:rich_slot + 5]
    assert [b["valid"] for b in top] == [True] * 5 and [b["frame"] for b in top] == [rich] * 5
    assert [b["score"] for b in top] == pytest.approx([0.7, 0.6, 0.5, 0.4, 0.3])
    assert [b["label"] for b in top] == [6, 5, 4, 3, 2]
    assert top[0]["x1"] == pytest.approx(60 / 160) and top[0]["y2"] == pytest.approx(60 / 90)
    assert sum(b["valid"] for b in local) == 5

    glob = [b for b in boxes if b["set"] == "global"]
    sparse_slot = plan.global_frames.index(sparse) * 5
    assert [b["valid"] for b in glob[sparse_slot:sparse_slot + 5]] == [True, True, False, False, False]
    assert sum(b["valid"] for b in glob) == 2 + 5  # the rich frame is in the global window too
    padded = [b for b in glob if not b["valid"]]
    assert all(b["score"] == 0 and b["frame"] is None and b["x2"] == 0 for b in padded)

    # The stored features are the detector's box-head features at exactly those boxes.
    feat = store.read_field(["s4"], "det.local.feat")[0].astype(np.float32)
    assert np.all(feat[rich_slot + 5:] == 0) and np.abs(feat[rich_slot:rich_slot + 5]).sum() > 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        detector, _ = build_detector(DETECTOR, score_thresh=0.0, min_size=64, max_size=128)
    image = EpicJpegFrames(frames).read("P01", "P01_01", [rich])
    image = resize_frames(image, *input_size_for(HEIGHT, WIDTH, 64))[0]
    given = torch.tensor([[10 * k, 5, 10 * k + 40, 60] for k in (6, 5, 4, 3, 2)], dtype=torch.float32)
    given /= torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT])
    with torch.inference_mode():
        expected = detector.features_at([torch.from_numpy(image).permute(2, 0, 1).float() / 255], [given])[0]
    np.testing.assert_allclose(feat[rich_slot:rich_slot + 5], expected.numpy(), rtol=2e-3, atol=2e-3)


def test_flow_store_feeds_two_channels(dataset, tmp_path: Path) -> None:
    frames, annotations = dataset
    report = build_store(small_config(tmp_path / "flow", annotations, frames, modality="flow", limit=2, workers=1))
    assert (report.built, report.failed) == (2, [])
    store = FeatureStore.open(tmp_path / "flow")
    provenance = store.manifest["provenance"]
    assert provenance["modality"] == "flow" and provenance["verb_backbone"]["in_channels"] == 2
    assert store.fields["verb.local"].shape == (40, 512)  # the default --map none: no map
    assert store.manifest["provenance"]["verb_map_shape"] == [512, 1, 2, 4]
    assert len(store.boxes(store.uids())) == 200  # detections come from the RGB frames beside the flow


# The publishers' backbones in a build: random weights, tiny frames (size 32, a few samples); sampling
# otherwise from each record, so TSN / TSM take 8 segments and, for flow, 5 stacked (u, v) pairs.
PUBLISHED_BUILDS = [
    pytest.param("r3d_50", "rgb", {"clip_frames": 16}, id="r3d_50-rgb"),
    pytest.param("slowfast_r50", "rgb", {"clip_frames": 8}, id="slowfast_r50-rgb"),
    pytest.param("tsn_r50", "rgb", {}, id="tsn_r50-rgb"),
    pytest.param("tsn_r50", "flow", {}, id="tsn_r50-flow"),
    pytest.param("tsm_r50", "rgb", {}, id="tsm_r50-rgb"),
    pytest.param("tsm_r50", "flow", {}, id="tsm_r50-flow"),
]


@pytest.mark.parametrize(("backbone", "modality", "overrides"), PUBLISHED_BUILDS)
def test_build_with_a_published_backbone_stores_its_map_shape(
    dataset, tmp_path: Path, backbone: str, modality: str, overrides: dict
) -> None:
    frames, annotations = dataset
    config = small_config(tmp_path / "store", annotations, frames, verb_backbone=backbone, noun_backbone=backbone,
                          modality=modality, detector=None, sampling=None,
                          sampling_overrides={"size": 32, **overrides}, limit=2, batch_size=2)
    report = build_store(config)
    assert (report.built, report.failed) == (2, [])
    store = FeatureStore.open(config.store)
    record = get_backbone_record(backbone)
    provenance = store.manifest["provenance"]
    sampling = SamplingConfig.from_dict(provenance["sampling"])
    height, width = provenance["input_size"]
    expected = backbone_map_shape(record, clip_frames=sampling.clip_frames, height=height, width=width)
    assert store.fields["verb.map"].shape == expected
    assert store.read_field(store.uids(), "verb.map").shape == (2, *expected)
    assert provenance["in_channels"] == record.in_channels(modality) == provenance["verb_backbone"]["in_channels"]
    mean, std = record.normalisation(record.in_channels(modality))
    assert provenance["verb_backbone"]["normalisation"] == {"mean": list(mean), "std": list(std), "input": "[0, 1]"}
    assert (sampling.clip_sampling, sampling.snippet_frames) == (record.clip_sampling, record.snippet_frames(modality))
    sources = provenance["sampling_sources"]
    assert sources["size"] == "flag" and sources["clip_sampling"] == f"backbone:{backbone}"
    assert sources["det_fps"] == "default"


def test_stacked_flow_clip_is_the_planned_flow_frames_u_v_interleaved(dataset, tmp_path: Path) -> None:
    """What the flow TSN receives: per segment 5 consecutive flow files, channels u1, v1, ..., u5, v5."""
    frames, annotations = dataset
    received: list[torch.Tensor] = []
    real_build_backbone = compute.build_backbone

    def recording_build_backbone(spec, *, in_channels):
        backbone, record = real_build_backbone(spec, in_channels=in_channels)
        real_forward_map = backbone.forward_map

        def forward_map(clip):
            received.append(clip * backbone.pixel_std + backbone.pixel_mean)  # undo the normalisation
            return real_forward_map(clip)

        backbone.forward_map = forward_map
        return backbone, record

    config = small_config(tmp_path / "store", annotations, frames, verb_backbone="tsn_r50", noun_backbone="tsn_r50",
                          modality="flow", detector=None, sampling=None, sampling_overrides={"size": 32},
                          limit=1, batch_size=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compute, "build_backbone", recording_build_backbone)
        assert build_store(config).built == 1
    (clip,) = received  # (1, 10, 8, H, W)
    sampling = SamplingConfig.from_dict(FeatureStore.open(config.store).manifest["provenance"]["sampling"])
    row = read_segments(annotations).to_pylist()[0]
    flow = EpicJpegFrames(frames, modality="flow")
    plan = plan_segment(row["start_frame"], row["stop_frame"], fps=FPS, n_frames=flow.n_frames("P01", "P01_01"),
                        config=sampling)
    assert len(plan.clip_frames) == 40
    decoded = resize_frames(flow.read("P01", "P01_01", list(plan.clip_frames)), *clip.shape[3:])  # (40, H, W, 2)
    expected = torch.from_numpy(decoded).float().div(255).view(8, 5, *decoded.shape[1:])  # (S, L, H, W, 2)
    expected = expected.permute(1, 4, 0, 2, 3).reshape(10, 8, *decoded.shape[1:3])  # (L * 2, S, H, W)
    torch.testing.assert_close(clip[0], expected, atol=1e-5, rtol=0)
    # Snippet 0 is 5 consecutive flow files.
    assert [f // 2 for f in plan.clip_frames[:5]] == list(range(plan.clip_frames[0] // 2, plan.clip_frames[0] // 2 + 5))


def test_sampling_comes_from_the_verb_record_unless_given(dataset, tmp_path: Path) -> None:
    frames, annotations = dataset
    with pytest.raises(BuildError, match="not both"):
        small_config(tmp_path / "x", annotations, frames, sampling_overrides={"size": 32})
    with pytest.raises(BuildError, match="clip_frames"):
        build_store(small_config(tmp_path / "y", annotations, frames, sampling=None,
                                 sampling_overrides={"clip_frames": 0}))


def test_video_files_build_and_a_truncated_one_fails_alone(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    write_mp4(videos / "P03_01.mp4", 120, height=HEIGHT, width=WIDTH, fps=30)
    write_mp4(videos / "P04_01.mp4", 120, height=HEIGHT, width=WIDTH, fps=30, seed=4)
    truncate_file(videos / "P04_01.mp4", 0.3)  # an interrupted download: the index says 120 frames
    segments = [SegmentLabel(f"v{i}", "P03", "P03_01", 10 + 40 * i, 50 + 40 * i, i, i) for i in range(2)]
    segments.append(SegmentLabel("cut", "P04", "P04_01", 70, 110, 0, 0))
    annotations = write_epic55_annotations(tmp_path / "ann" / "EPIC_train_action_labels.csv", segments, fps=30)
    config = small_config(tmp_path / "store", annotations, None, videos_dir=videos, workers=1)
    report = build_store(config)
    assert report.built == 2 and [uid for uid, _ in report.failed] == ["cut"]
    assert "P04_01.mp4" in report.failed[0][1]
    store = FeatureStore.open(tmp_path / "store")
    assert store.manifest["provenance"]["input_size"] == [32, 57]
    assert store.manifest["provenance"]["fps_source"]["container"] is True
    assert len(store.boxes(["v0", "v1"])) == 200


def test_other_aspect_ratios_are_resized_to_the_store_size(dataset, tmp_path: Path) -> None:
    frames, _ = dataset
    root = tmp_path / "frames"
    shutil.copytree(frames / "P01", root / "P01")
    write_jpeg_video(root, "P07", "P07_01", 120, height=120, width=160)  # 4:3 beside 16:9
    segments = [SegmentLabel("a", "P01", "P01_01", 100, 160, 0, 0), SegmentLabel("b", "P07", "P07_01", 30, 90, 0, 0)]
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    report = build_store(small_config(tmp_path / "store", annotations, root, detector=None, fps=FPS, batch_size=2))
    assert (report.built, report.failed) == (2, [])
    store = FeatureStore.open(tmp_path / "store")
    assert store.manifest["provenance"]["input_size"] == [32, 57]  # from the first video, P01_01
    assert store.manifest["provenance"]["input_size_from"] == "P01_01"
    assert store.read_field(["a", "b"], "verb.map").shape == (2, 512, 1, 2, 4)


def test_segment_that_cannot_be_sampled_fails_alone(dataset, tmp_path: Path) -> None:
    frames, _ = dataset
    segments = [SegmentLabel("ok", "P01", "P01_01", 100, 160, 0, 0),
                SegmentLabel("late", "P01", "P01_01", 400, 460, 0, 0),
                SegmentLabel("nofolder", "P05", "P05_01", 1, 60, 0, 0)]
    annotations = write_epic55_annotations(tmp_path / "EPIC_train_action_labels.csv", segments)
    report = build_store(small_config(tmp_path / "store", annotations, frames, detector=None, fps=FPS))
    assert report.built == 1
    reasons = dict(report.failed)
    assert "past the video's last frame" in reasons["late"]
    assert "P05_01" in reasons["nofolder"]
    store = FeatureStore.open(tmp_path / "store")
    assert "det.global.feat" not in store.fields  # no detector: a store of backbone features
    assert store.uids(status="failed") == ["late", "nofolder"]


# ------------------------------------------------------------------------------------------------
# crash + resume, torchrun


def _build_args(store: Path, annotations: Path, frames: Path, *extra: str) -> list[str]:
    return [str(store), "--annotations", str(annotations), "--frames", str(frames), *tiny_build_flags(),
            "--no-progress", *extra]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
def test_killed_build_resumes_with_every_segment_once(dataset, tmp_path: Path) -> None:
    frames, annotations = dataset
    store_path = tmp_path / "store"
    args = _build_args(store_path, annotations, frames, "--workers", "1", "--batch-size", "2")
    killed = subprocess.run([sys.executable, str(SCRIPT), "--kill-after", "3", "--", *args], cwd=REPO,
                            env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    config = small_config(store_path, annotations, frames, workers=1, batch_size=2)
    report = build_store(config)
    # The three committed before the kill count as stored (re-indexed by the rerun's writer).
    assert (report.skipped, report.built, report.failed) == (3, 3, [])
    store = FeatureStore.open(store_path)
    assert store.uids() == [f"s{i}" for i in range(6)]
    raw = pq.read_table(sorted((store_path / "segments").glob("*.parquet"))).column("uid").to_pylist()
    assert sorted(raw) == [f"s{i}" for i in range(6)]  # every segment indexed exactly once
    raw_boxes = pq.read_table(sorted((store_path / "boxes").glob("*.parquet"))).column("uid").to_pylist()
    assert {uid: raw_boxes.count(uid) for uid in set(raw_boxes)} == {f"s{i}": 100 for i in range(6)}
    assert store.verify() == []


def _torchrun_can_start() -> str | None:
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this build of torch"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
    except OSError as err:
        return f"cannot open a local socket for torchrun's rendezvous: {err}"
    return None


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(built, dataset, tmp_path: Path) -> None:
    reason = _torchrun_can_start()
    if reason:
        pytest.skip(reason)
    frames, annotations = dataset
    store_path = tmp_path / "ranks"
    args = _build_args(store_path, annotations, frames, "--workers", "0", "--batch-size", "2")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--",
         *args],
        cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    output = run.stdout + run.stderr
    if run.returncode != 0 and any(s in output for s in ("RendezvousConnectionError", "RendezvousTimeoutError",
                                                          "DistNetworkError")):
        pytest.skip(f"torchrun could not start here: {output[-500:]}")
    assert run.returncode == 0, output

    ranks = FeatureStore.open(store_path)
    shards = {row["uid"]: row["shard"] for row in ranks.segments().to_pylist()}
    assert sorted(set(shards.values())) == ["rank0", "rank1"]
    assert shards == {uid: f"rank{i % 2}" for i, uid in enumerate(sorted(shards))}
    assert sorted(p.name for p in (store_path / "lmdb").iterdir()) == ["rank0", "rank1"]

    one_config, _, _ = built  # the same models, sampling and seed, in one process
    one = FeatureStore.open(one_config.store)
    assert ranks.uids() == one.uids() and ranks.fields == one.fields
    for name, spec in ranks.fields.items():
        a, b = ranks.read_field(ranks.uids(), name), one.read_field(one.uids(), name)
        if spec.dtype == "float16":
            # Batches differ between the two builds (2 vs 1 segments), so the float32 sums may differ
            # by their rounding (relative to the field's scale, which matters near zero) and land on
            # the neighbouring fp16 value: allow one fp16 step plus that (observed: a few values).
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            step = np.spacing(np.maximum(np.abs(a), np.abs(b))).astype(np.float32)
            float32_rounding = 16 * np.finfo(np.float32).eps * float(np.abs(b32).max())
            assert np.all(np.abs(a32 - b32) <= step + float32_rounding), name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    columns = ["uid", "set", "slot", "frame", "label", "valid"]
    assert ranks.boxes().select(columns).to_pylist() == one.boxes().select(columns).to_pylist()
