"""Detector tests, parametrised over the detector registry: a detector is tested here the moment it
is registered (``detectron2`` where detectron2 is installed, as in CI).

Every detector is randomly initialised under a fixed seed at a small input size, with score
threshold 0 so random weights still yield boxes. The contract: detections are the top-k, best first,
with boxes normalised to [0, 1]; their features are the box head re-pooled on the final boxes, i.e.
equal to `features_at` on those boxes; a checkpoint round-trips exactly and a wrong one is refused
with what does not fit. Each family's detections are also checked against its library's own
forward pass (torchvision's ``FasterRCNN.forward`` here; detectron2's predictor in
test_detectron2.py), which pins the normalisation of the boxes.
"""
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
MIN_SIZE, MAX_SIZE = 64, 128
# Detectors too large to build several times per test in the fast loop.
LARGE = {"fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "detectron2"}


def small_detector(spec: str, **kwargs) -> ObjectDetector:
    """A registered detector at the tests' input size, score threshold 0."""
    detector, _ = build_detector(spec, score_thresh=0.0, min_size=MIN_SIZE, max_size=MAX_SIZE, **kwargs)
    return detector


def each_detector(*, slow_when_large: bool = False) -> list:
    return [
        pytest.param(name, marks=pytest.mark.slow if slow_when_large and name in LARGE else ())
        for name in list_detectors()
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """Two frames of different sizes (each detector resizes and pads them into one batch)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 120, 160, generator=generator), torch.rand(3, 100, 150, generator=generator)]


@pytest.fixture(scope="module", params=each_detector())
def detector(request: pytest.FixtureRequest) -> ObjectDetector:
    torch.manual_seed(0)
    return small_detector(request.param)


@pytest.fixture(scope="module")
def detections(detector: ObjectDetector, images: list[torch.Tensor]) -> list[Detections]:
    with torch_threads(1):  # as the tests that recompute from them (one_thread)
        return detector.detect(images, topk=TOPK)


def assert_well_formed(found: Detections, topk: int, feature_dim: int) -> None:
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


def test_registry_lists_the_detectors() -> None:
    names = list_detectors()
    assert {"fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", MOBILENET} <= set(names)
    assert ("detectron2" in names) == (importlib.util.find_spec("detectron2") is not None)
    assert all(get_detector_record(name).feature_dim > 0 for name in names)


def test_detect_returns_topk_normalised_boxes_with_box_head_features(
    detector: ObjectDetector, detections: list[Detections]
) -> None:
    assert len(detections) == 2
    assert detector.record.feature_dim == get_detector_record(detector.record.name).feature_dim
    assert detector.input_short_side == MIN_SIZE  # what the build's decode workers shrink frames to
    for found in detections:
        assert_well_formed(found, TOPK, detector.record.feature_dim)
    # score_thresh=0 must give boxes, else the re-pooling tests below would be vacuous.
    assert all(len(found) > 0 for found in detections)


def test_detect_features_are_repooled_on_the_final_boxes(
    detector: ObjectDetector, images: list[torch.Tensor], detections: list[Detections]
) -> None:
    pooled = detector.features_at(images, [found.boxes for found in detections])
    for found, features in zip(detections, pooled):
        torch.testing.assert_close(features, found.features, rtol=1e-5, atol=1e-5)


def test_smaller_topk_keeps_the_best_detections(
    detector: ObjectDetector, images: list[torch.Tensor], detections: list[Detections]
) -> None:
    fewer = detector.detect(images, topk=2)
    for short, full in zip(fewer, detections):
        assert len(short) == min(2, len(full))
        torch.testing.assert_close(short.boxes, full.boxes[: len(short)])
        torch.testing.assert_close(short.features, full.features[: len(short)])


def test_features_at_given_boxes(detector: ObjectDetector, images: list[torch.Tensor]) -> None:
    boxes = [
        torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]),
        torch.zeros((0, 4)),  # an image without boxes (e.g. a padded detection frame)
    ]
    first = detector.features_at(images, boxes)
    second = detector.features_at(images, boxes)
    dim = detector.record.feature_dim
    assert first[0].shape == (3, dim) and first[1].shape == (0, dim)
    assert torch.equal(first[0], second[0]) and torch.isfinite(first[0]).all()
    assert detector.features_at([], []) == [] and detector.detect([], topk=TOPK) == []
    assert [f.shape for f in detector.features_at(images, [torch.zeros((0, 4))] * 2)] == [(0, dim)] * 2
    with pytest.raises(ValueError, match="2 images but 1 box"):
        detector.features_at(images, boxes[:1])
    with pytest.raises(ValueError, match=r"boxes of image 0: expected \(k, 4\)"):
        detector.features_at(images, [torch.zeros(3), boxes[1]])
    with pytest.raises(ValueError, match=r"image 0: expected \(3, H, W\)"):
        detector.detect([images[0][:2]], topk=TOPK)


@pytest.mark.parametrize("name", each_detector(slow_when_large=True))
def test_checkpoint_round_trip_is_exact_and_keeps_the_class_count(
    name: str, images: list[torch.Tensor], tmp_path: Path
) -> None:
    torch.manual_seed(3)
    original = small_detector(name, num_classes=5)
    assert original.checkpoint is None
    spec = original.save_checkpoint(tmp_path / "detector.pth")
    assert spec.startswith(f"{name}:")

    torch.manual_seed(4)  # another random init: everything must come from the file
    loaded = small_detector(spec)
    assert loaded.checkpoint == tmp_path / "detector.pth" and loaded.load_report.loaded > 0
    box = [torch.tensor([[0.1, 0.2, 0.6, 0.9]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    for expected, actual in zip(original.features_at(images, box), loaded.features_at(images, box)):
        assert torch.equal(expected, actual)
    for expected, actual in zip(original.detect(images, topk=3), loaded.detect(images, topk=3)):
        assert torch.equal(expected.boxes, actual.boxes) and torch.equal(expected.labels, actual.labels)
        assert bool((actual.labels < 5).all()), "5 classes incl. background"

    with pytest.raises(CheckpointError, match="num_classes=91 contradicts"):
        small_detector(spec, num_classes=91)


@pytest.mark.parametrize("name", each_detector(slow_when_large=True))
def test_a_checkpoint_that_does_not_fit_says_what(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = small_detector(name).save_checkpoint(tmp_path / "detector.pth")
    state = torch.load(tmp_path / "detector.pth", weights_only=True)["model"]
    dropped, reshaped = list(state)[0], list(state)[-1]
    del state[dropped]
    state[reshaped] = torch.zeros(3, 3)
    state["backbone.nonsense.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "detector.pth")
    with pytest.raises(CheckpointError) as error:
        small_detector(spec)
    message = str(error.value)
    assert f"does not fit model {name!r}" in message and "detector.pth" in message
    assert f"1 missing key(s): {dropped}" in message
    assert "1 unexpected key(s): backbone.nonsense.weight" in message
    assert f"1 shape-mismatched key(s): {reshaped} (3, 3) vs model" in message


def test_missing_and_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="never downloads weights.*local path"):
        build_detector(f"fasterrcnn_resnet50_fpn:{tmp_path / 'missing.pth'}")
    wrong = tmp_path / "wrong.pt"
    torch.save({"backbone.body.nonsense.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*unexpected key\(s\): backbone\.body\.nonsense"):
        build_detector(f"{MOBILENET}:{wrong}")


def test_torchvision_detections_are_torchvisions_own_normalised(images: list[torch.Tensor]) -> None:
    """The step-by-step detect equals torchvision's FasterRCNN.forward, with boxes divided by each
    image's own width and height (forward maps them back to the input size)."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    ours = small_detector(MOBILENET)
    reference = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0, min_size=MIN_SIZE,
        max_size=MAX_SIZE,
    ).eval()
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        expected = reference(images)
    for image, found, want in zip(images, ours.detect(images, topk=TOPK), expected):
        height, width = image.shape[-2:]
        assert len(found) == min(TOPK, len(want["boxes"])) > 0
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        torch.testing.assert_close(found.boxes, want["boxes"][:TOPK] / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(found.scores, want["scores"][:TOPK])
        assert torch.equal(found.labels, want["labels"][:TOPK])


@pytest.mark.slow
def test_resnet50_features_depend_on_where_the_box_is() -> None:
    # Randomly initialised MobileNet features are nearly constant, so this check uses the ResNet.
    torch.manual_seed(0)
    detector = small_detector("fasterrcnn_resnet50_fpn")
    frame = torch.zeros(3, 90, 120)
    frame[:, 45:, 60:] = 1.0
    quadrants = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    top_left, bottom_right = detector.features_at([frame], [quadrants])[0]
    assert not torch.allclose(top_left, bottom_right)


@pytest.mark.parametrize("name", each_detector(slow_when_large=True))
def test_roi_feature_is_the_roialign_output_at_the_same_boxes(name: str, images: list[torch.Tensor]) -> None:
    """`--det-feature roi` (issue 23): the same model and boxes, the box pooler's RoIAlign output averaged
    over its bins as the feature (the report's "output of the RoIAlign layer"), in the record's size."""
    torch.manual_seed(0)
    box_head = small_detector(name)
    torch.manual_seed(0)
    roi, record = build_detector(name, score_thresh=0.0, min_size=MIN_SIZE, max_size=MAX_SIZE, feature="roi")
    assert roi.feature == "roi" and box_head.feature == "box-head"
    assert record.feature_dim == roi.roi_feature_dim != box_head.record.feature_dim
    with torch_threads(1):
        for by_head, by_roi in zip(box_head.detect(images, topk=TOPK), roi.detect(images, topk=TOPK)):
            torch.testing.assert_close(by_roi.boxes, by_head.boxes)
            assert_well_formed(by_roi, TOPK, record.feature_dim)
        found = roi.detect(images, topk=TOPK)
        torch.testing.assert_close(roi.features_at(images, [f.boxes for f in found])[0], found[0].features,
                                   rtol=1e-5, atol=1e-5)
    roi.use_feature("box-head")  # and back: the box head's size again
    assert roi.record.feature_dim == box_head.record.feature_dim
    with pytest.raises(ValueError, match="box-head, roi"):
        roi.use_feature("fc7")


def test_torchvision_roi_feature_is_the_box_pooler_averaged(images: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    detector, _ = build_detector(MOBILENET, score_thresh=0.0, min_size=MIN_SIZE, max_size=MAX_SIZE, feature="roi")
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    with torch.no_grad():
        image_list, _ = detector.transform(images[:1])
        maps = detector.backbone(image_list.tensors)
        (height, width), = image_list.image_sizes
        pooled = detector.roi_heads.box_roi_pool(maps, [boxes * torch.tensor([width, height, width, height])],
                                                 image_list.image_sizes)  # (2, 256, 7, 7)
    torch.testing.assert_close(detector.features_at(images[:1], [boxes])[0], pooled.mean(dim=(2, 3)))
    assert detector.record.feature_dim == 256
