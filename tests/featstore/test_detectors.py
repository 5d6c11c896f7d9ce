"""Detector tests on randomly initialised torchvision Faster R-CNNs (score_thresh=0 so random weights
still yield boxes): shapes and normalisation of detections, and that detection features are the box
head re-pooled on the final boxes, i.e. equal to `features_at` on those boxes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from featstore.models import (
    CheckpointError,
    Detections,
    ObjectDetector,
    build_detector,
    get_detector_record,
    list_detectors,
)
from tests.helpers.threads import torch_threads

MOBILENET = "fasterrcnn_mobilenet_v3_large_320_fpn"
TOPK = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """Two frames of different sizes (the transform resizes and pads them into one batch)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 120, 160, generator=generator), torch.rand(3, 100, 150, generator=generator)]


@pytest.fixture(scope="module")
def mobilenet() -> ObjectDetector:
    torch.manual_seed(0)
    detector, _ = build_detector(MOBILENET, score_thresh=0.0)
    return detector


@pytest.fixture(scope="module")
def detections(mobilenet: ObjectDetector, images: list[torch.Tensor]) -> list[Detections]:
    with torch_threads(1):  # as the tests that recompute from them (one_thread)
        return mobilenet.detect(images, topk=TOPK)


def _assert_well_formed(found: Detections, topk: int, feature_dim: int) -> None:
    count = len(found)
    assert count <= topk
    assert found.boxes.shape == (count, 4) and found.boxes.dtype == torch.float32
    assert found.scores.shape == (count,)
    assert found.labels.shape == (count,) and found.labels.dtype == torch.int64
    assert found.features.shape == (count, feature_dim)
    assert ((found.boxes >= 0) & (found.boxes <= 1)).all(), "boxes are normalised to [0, 1]"
    assert (found.boxes[:, 2] >= found.boxes[:, 0]).all() and (found.boxes[:, 3] >= found.boxes[:, 1]).all()
    assert (found.scores[:-1] >= found.scores[1:]).all(), "scores descend"
    assert torch.isfinite(found.features).all()


def test_registry_lists_the_torchvision_detectors() -> None:
    names = list_detectors()
    assert {"fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", MOBILENET} <= set(names)
    assert ("detectron2" in names) == (importlib.util.find_spec("detectron2") is not None)
    assert all(get_detector_record(name).feature_dim > 0 for name in names)


def test_detect_returns_topk_normalised_boxes_with_box_head_features(
    mobilenet: ObjectDetector, detections: list[Detections]
) -> None:
    assert len(detections) == 2
    assert mobilenet.record.feature_dim == 1024
    for found in detections:
        _assert_well_formed(found, TOPK, mobilenet.record.feature_dim)
    # score_thresh=0 must give boxes, else the re-pooling test below would be vacuous.
    assert sum(len(found) for found in detections) > 0


def test_detect_features_are_repooled_on_the_final_boxes(
    mobilenet: ObjectDetector, images: list[torch.Tensor], detections: list[Detections]
) -> None:
    pooled = mobilenet.features_at(images, [found.boxes for found in detections])
    for found, features in zip(detections, pooled):
        torch.testing.assert_close(features, found.features, rtol=1e-5, atol=1e-6)


def test_smaller_topk_keeps_the_best_detections(
    mobilenet: ObjectDetector, images: list[torch.Tensor], detections: list[Detections]
) -> None:
    fewer = mobilenet.detect(images, topk=2)
    for short, full in zip(fewer, detections):
        assert len(short) == min(2, len(full))
        torch.testing.assert_close(short.boxes, full.boxes[: len(short)])
        torch.testing.assert_close(short.features, full.features[: len(short)])


def test_features_at_given_boxes_are_deterministic(mobilenet: ObjectDetector, images: list[torch.Tensor]) -> None:
    boxes = [
        torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]),
        torch.zeros((0, 4)),  # an image without boxes (e.g. a padded detection frame)
    ]
    first = mobilenet.features_at(images, boxes)
    second = mobilenet.features_at(images, boxes)
    assert first[0].shape == (3, 1024) and first[1].shape == (0, 1024)
    assert torch.equal(first[0], second[0])
    with pytest.raises(ValueError, match="2 images but 1 box"):
        mobilenet.features_at(images, boxes[:1])


def test_resnet50_fpn_at_a_small_input_size() -> None:
    torch.manual_seed(0)
    detector, record = build_detector("fasterrcnn_resnet50_fpn", score_thresh=0.0, min_size=128, max_size=160)
    assert record.feature_dim == 1024
    image = [torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(1))]
    (found,) = detector.detect(image, topk=3)
    _assert_well_formed(found, 3, record.feature_dim)
    torch.testing.assert_close(
        detector.features_at(image, [found.boxes])[0], found.features, rtol=1e-5, atol=1e-6
    )
    # Pooling happens where the box is: opposite quadrants of a half-dark frame differ. (Randomly
    # initialised MobileNet features are nearly constant, so this check uses the ResNet.)
    frame = torch.zeros(3, 90, 120)
    frame[:, 45:, 60:] = 1.0
    quadrants = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    top_left, bottom_right = detector.features_at([frame], [quadrants])[0]
    assert not torch.allclose(top_left, bottom_right)


def test_checkpoint_round_trip_takes_num_classes_from_the_checkpoint(
    images: list[torch.Tensor], tmp_path: Path
) -> None:
    torch.manual_seed(3)
    original, _ = build_detector(MOBILENET, score_thresh=0.0, num_classes=5)
    checkpoint = tmp_path / "detector.pt"
    torch.save({"model": original.state_dict()}, checkpoint)

    torch.manual_seed(4)
    loaded, _ = build_detector(f"{MOBILENET}:{checkpoint}", score_thresh=0.0)
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 5
    box = [torch.tensor([[0.1, 0.2, 0.6, 0.9]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    for expected, actual in zip(original.features_at(images, box), loaded.features_at(images, box)):
        assert torch.equal(expected, actual)
    for expected, actual in zip(original.detect(images, topk=3), loaded.detect(images, topk=3)):
        assert torch.equal(expected.boxes, actual.boxes) and torch.equal(expected.labels, actual.labels)

    with pytest.raises(CheckpointError, match="num_classes=91 contradicts"):
        build_detector(f"{MOBILENET}:{checkpoint}", num_classes=91)


def test_detector_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="never downloads weights.*local path"):
        build_detector(f"fasterrcnn_resnet50_fpn:{tmp_path / 'missing.pth'}")
    wrong = tmp_path / "wrong.pt"
    torch.save({"backbone.body.nonsense.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*unexpected key\(s\): backbone\.body\.nonsense"):
        build_detector(f"{MOBILENET}:{wrong}")


def test_detectron2_adapter_is_registered_when_importable() -> None:
    pytest.importorskip("detectron2")
    assert "detectron2" in list_detectors()
    with pytest.raises(CheckpointError, match="needs a local model"):
        build_detector("detectron2")
