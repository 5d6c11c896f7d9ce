"""The detectron2 backend (CI installs detectron2 from ../shared/wheels; skipped where it is absent).

What the registry-parametrised tests in test_detectors.py cannot see: that the adapter's boxes,
scores, classes and box features are detectron2's own (its predictor on the same input), the spec
forms and model-zoo configs, detectron2's checkpoint formats (model-zoo ``.pkl``, the checkpointer's
``.pth``) and what a file that does not fit says, the C4 (Res5) box head, and that nothing touches
the network.
"""
from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.models import CheckpointError, build_detector, list_detectors
from featstore.models.detectron2_rcnn import (
    DEFAULT_CONFIG,
    Detectron2Detector,
    parse_detectron2_spec,
    read_detectron2_checkpoint,
    resolve_detectron2_config,
)

pytest.importorskip("detectron2")

ZOO_SPEC = f"detectron2:{DEFAULT_CONFIG}"
MIN_SIZE, MAX_SIZE = 96, 160
# The ImageNet mean plus faint noise: a randomly initialised detectron2 R50 (frozen BatchNorm at
# identity, input std 1) saturates on full-range noise into tied scores of 1.0; near its mean input
# its scores are distinct, so the orders of two implementations can be compared.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]


pytestmark = pytest.mark.usefixtures("one_thread")


def small(spec: str = ZOO_SPEC, **kwargs) -> Detectron2Detector:
    detector, _ = build_detector(spec, score_thresh=0.0, min_size=MIN_SIZE, max_size=MAX_SIZE, **kwargs)
    assert isinstance(detector, Detectron2Detector)
    return detector


@pytest.fixture(scope="module")
def detector() -> Detectron2Detector:
    torch.manual_seed(0)
    return small()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """96 x 128: its short side is MIN_SIZE already, so neither side resizes and inputs are identical."""
    return (IMAGENET_MEAN + 1e-3 * torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


def zoo_pickle(path: Path, state: dict[str, torch.Tensor], **extra) -> Path:
    """A file in the layout of detectron2's model-zoo .pkl files."""
    payload = {"model": {key: value.numpy() for key, value in state.items()}, "__author__": "Detectron2 Model Zoo"}
    payload.update(extra)
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)
    return path


def test_registered_and_built_from_the_zoo_config_without_the_network(
    monkeypatch: pytest.MonkeyPatch, image: torch.Tensor, tmp_path: Path
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert "detectron2" in list_detectors()
    torch.manual_seed(0)
    bare = small("detectron2")  # the bare name is DEFAULT_CONFIG, randomly initialised
    assert bare.record.feature_dim == 1024 and bare.checkpoint is None and bare.load_report is None
    assert (bare.min_size, bare.max_size, bare.input_format) == (MIN_SIZE, MAX_SIZE, "BGR")
    assert len(bare.detect([image], topk=5)[0]) == 5
    bare.save_checkpoint(tmp_path / "model.pth")
    saved_config = (tmp_path / "config.yaml").read_text()
    assert "WEIGHTS: ''" in saved_config and "MIN_SIZE_TEST: 96" in saved_config


def test_detections_and_box_features_are_detectron2s_own(
    detector: Detectron2Detector, image: torch.Tensor, tmp_path: Path
) -> None:
    """Against detectron2's DefaultPredictor on the same pixels, loading the same weights through
    detectron2's own checkpointer from the file `save_checkpoint` wrote."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    from detectron2.structures import Boxes

    detector.save_checkpoint(tmp_path / "model_final.pth")
    cfg = get_cfg()
    cfg.merge_from_file(str(tmp_path / "config.yaml"))
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    predictor = DefaultPredictor(cfg)
    bgr = np.ascontiguousarray(image.permute(1, 2, 0).numpy()[:, :, ::-1] * 255.0, dtype=np.float32)
    with torch.no_grad():
        expected = predictor(bgr)["instances"]
    n = len(expected)
    assert n >= 20 and bool((expected.scores[:-1] > expected.scores[1:]).all()), "distinct scores, one order"

    (found,) = detector.detect([image], topk=n)
    assert len(found) == n
    torch.testing.assert_close(found.boxes, expected.pred_boxes.tensor / torch.tensor([128.0, 96, 128, 96]))
    torch.testing.assert_close(found.scores, expected.scores)
    assert torch.equal(found.labels, expected.pred_classes)

    with torch.no_grad():
        model = predictor.model
        features = model.backbone(model.preprocess_image([{"image": torch.from_numpy(bgr).permute(2, 0, 1)}]).tensor)
        pooled = model.roi_heads.box_pooler([features[f] for f in model.roi_heads.box_in_features],
                                            [Boxes(expected.pred_boxes.tensor)])
        expected_features = model.roi_heads.box_head(pooled)
    torch.testing.assert_close(found.features, expected_features, rtol=1e-4, atol=1e-4)


def test_a_model_zoo_pkl_loads_and_obsolete_keys_are_dropped(
    detector: Detectron2Detector, image: torch.Tensor, tmp_path: Path
) -> None:
    state = detector.model.state_dict()
    obsolete = {
        "pixel_mean": torch.zeros(3, 1, 1),
        "proposal_generator.anchor_generator.cell_anchors.0": torch.zeros(3, 4),
    }
    path = zoo_pickle(tmp_path / "model_final_280758.pkl", {**state, **obsolete})
    loaded = small(f"{ZOO_SPEC}:{path}")
    assert loaded.checkpoint == path
    assert loaded.load_report.loaded == len(state) and set(loaded.load_report.ignored) == set(obsolete)
    box = [torch.tensor([[0.1, 0.2, 0.7, 0.9]])]
    assert torch.equal(loaded.features_at([image], box)[0], detector.features_at([image], box)[0])


def test_matching_heuristics_rename_converted_keys(detector: Detectron2Detector, image: torch.Tensor,
                                                   tmp_path: Path) -> None:
    # Files converted from other codebases name the backbone without detectron2's nesting
    # ('res2.0.conv1.weight' for 'backbone.bottom_up.res2.0.conv1.weight') and ask for heuristics.
    state = {key.removeprefix("backbone.bottom_up."): value for key, value in detector.model.state_dict().items()}
    assert "stem.conv1.weight" in state
    plain = zoo_pickle(tmp_path / "plain.pkl", state)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): backbone\.bottom_up\..*unexpected key\(s\): stem"):
        small(f"{ZOO_SPEC}:{plain}")
    converted = zoo_pickle(tmp_path / "converted.pkl", state, matching_heuristics=True)
    loaded = small(f"{ZOO_SPEC}:{converted}")
    box = [torch.tensor([[0.0, 0.0, 0.5, 1.0]])]
    assert torch.equal(loaded.features_at([image], box)[0], detector.features_at([image], box)[0])


def test_a_pth_written_by_detectron2s_checkpointer_loads(detector: Detectron2Detector, image: torch.Tensor,
                                                         tmp_path: Path) -> None:
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(detector.model, save_dir=str(tmp_path)).save("model_final", iteration=7)
    (tmp_path / "config.yaml").write_text(detector.config_yaml)  # detectron2 training writes it there
    loaded = small(f"detectron2:{tmp_path / 'model_final.pth'}")
    assert loaded.checkpoint == tmp_path / "model_final.pth"
    for expected, actual in zip(detector.detect([image], topk=5), loaded.detect([image], topk=5)):
        assert torch.equal(expected.boxes, actual.boxes) and torch.equal(expected.features, actual.features)


def test_unreadable_or_unsafe_pkl_files_are_refused(detector: Detectron2Detector, tmp_path: Path) -> None:
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    unsafe = tmp_path / "unsafe.pkl"
    unsafe.write_bytes(pickle.dumps({"model": {"x": RunsCode()}, "__author__": "someone"}))
    with pytest.raises(CheckpointError, match=r"references (posix|os|nt)\.system; .*numpy arrays only"):
        read_detectron2_checkpoint(unsafe)

    caffe2 = tmp_path / "R-50.pkl"
    caffe2.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}))
    with pytest.raises(CheckpointError, match="not a detectron2 model-zoo file.*Caffe2"):
        read_detectron2_checkpoint(caffe2)

    not_arrays = tmp_path / "lists.pkl"
    not_arrays.write_bytes(pickle.dumps({"model": {"conv.weight": [1.0, 2.0]}}))
    with pytest.raises(CheckpointError, match="'conv.weight' is a list, not a numpy array"):
        read_detectron2_checkpoint(not_arrays)

    empty = zoo_pickle(tmp_path / "empty.pkl", {})
    with pytest.raises(CheckpointError, match="contains no tensors"):
        read_detectron2_checkpoint(empty)

    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="cannot read .*garbage.pkl.* as a pickle"):
        read_detectron2_checkpoint(garbage)

    with pytest.raises(CheckpointError, match="not found.*never downloads weights"):
        read_detectron2_checkpoint(tmp_path / "missing.pkl")

    state = {key: value for key, value in detector.model.state_dict().items() if "box_predictor" not in key}
    partial = zoo_pickle(tmp_path / "partial.pkl", state)
    with pytest.raises(CheckpointError, match=r"does not fit model 'detectron2': 4 missing key\(s\): roi_heads\.box_pr"):
        small(f"{ZOO_SPEC}:{partial}")


def test_num_classes_come_from_the_weights(detector: Detectron2Detector, tmp_path: Path) -> None:
    torch.manual_seed(1)
    five = small(num_classes=5)  # 4 objects + background, as torchvision counts
    assert five.model.roi_heads.box_predictor.cls_score.out_features == 5
    assert "NUM_CLASSES: 4" in five.config_yaml
    path = zoo_pickle(tmp_path / "five.pkl", five.model.state_dict())
    # The zoo config says 80 classes; the weights say 4 + background, and win.
    assert small(f"{ZOO_SPEC}:{path}").model.roi_heads.box_predictor.cls_score.out_features == 5
    with pytest.raises(CheckpointError, match="num_classes=81 contradicts .*5 classes"):
        small(f"{ZOO_SPEC}:{path}", num_classes=81)


@pytest.mark.slow  # the res5 head runs on all 1000 proposals
def test_the_c4_box_head_pools_res5_features(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    c4 = small("detectron2:COCO-Detection/faster_rcnn_R_50_C4_1x.yaml")
    assert c4.record.feature_dim == 2048
    images = [image]
    (found,) = c4.detect(images, topk=4)
    assert len(found) == 4 and found.features.shape == (4, 2048)
    torch.testing.assert_close(c4.features_at(images, [found.boxes])[0], found.features, rtol=1e-5, atol=1e-5)


def test_spec_forms_and_their_errors(tmp_path: Path) -> None:
    assert parse_detectron2_spec(None) == (DEFAULT_CONFIG, None)
    assert parse_detectron2_spec("my.yaml") == ("my.yaml", None)
    assert parse_detectron2_spec("A/b.yaml:/w/model.pkl") == ("A/b.yaml", Path("/w/model.pkl"))
    (tmp_path / "config.yaml").write_text("")
    assert parse_detectron2_spec(str(tmp_path / "model_final.pth")) == (
        str(tmp_path / "config.yaml"), tmp_path / "model_final.pth")
    assert resolve_detectron2_config(DEFAULT_CONFIG).name == "faster_rcnn_R_50_FPN_3x.yaml"

    lone = tmp_path / "lone" / "model.pth"
    with pytest.raises(CheckpointError, match="without a config: no config.yaml beside it.*detectron2:CONFIG:"):
        build_detector(f"detectron2:{lone}")
    with pytest.raises(CheckpointError, match="neither a local file nor a config of detectron2's model zoo"):
        build_detector("detectron2:COCO-Detection/no_such_config.yaml")
    with pytest.raises(CheckpointError, match="only yacs configs"):
        build_detector("detectron2:new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
    with pytest.raises(CheckpointError, match="bad detectron2 spec"):
        build_detector("detectron2:a.yaml:b.pkl:c")
    with pytest.raises(CheckpointError, match="never downloads weights"):
        build_detector(f"detectron2:{DEFAULT_CONFIG}:https://dl.fbaipublicfiles.com/model_final.pkl")

    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("MODEL:\n  NO_SUCH_OPTION: 1\n")
    with pytest.raises(CheckpointError, match="bad.yaml' cannot be used: .*NO_SUCH_OPTION"):
        build_detector(f"detectron2:{bad_key}")

    # A local config on top of a zoo one, as users write them.
    local = tmp_path / "epic.yaml"
    local.write_text(f"_BASE_: {resolve_detectron2_config(DEFAULT_CONFIG)}\nMODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 352\n")
    torch.manual_seed(0)
    epic = small(f"detectron2:{local}")
    assert epic.model.roi_heads.box_predictor.cls_score.out_features == 353


def test_class_names_come_from_a_stage_1_checkpoint(detector: Detectron2Detector, tmp_path: Path) -> None:
    from featstore.models.checkpoints import FINETUNE_RECORD_KEY

    state = detector.model.state_dict()  # the zoo config: 80 classes + background
    names = [f"noun{i}" for i in range(80)]
    (tmp_path / "config.yaml").write_text(detector.config_yaml)
    torch.save({"model": state, FINETUNE_RECORD_KEY: {"class_names": names}}, tmp_path / "checkpoint.pth")
    loaded = small(f"detectron2:{tmp_path / 'checkpoint.pth'}")
    assert loaded.class_names == tuple(names)
    assert detector.class_names is None and small(f"detectron2:{tmp_path / 'config.yaml'}").class_names is None

    torch.save({"model": state, FINETUNE_RECORD_KEY: {"class_names": names[:5]}}, tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="names 5 classes, but its classifier has 81"):
        small(f"detectron2:{tmp_path / 'checkpoint.pth'}")
    torch.save({"model": state, FINETUNE_RECORD_KEY: {"iteration": 3}}, tmp_path / "checkpoint.pth")
    assert small(f"detectron2:{tmp_path / 'checkpoint.pth'}").class_names is None


def test_resizing_and_empty_inputs(detector: Detectron2Detector) -> None:
    assert detector.input_short_side == MIN_SIZE
    assert detector.detect([], topk=3) == [] and detector.features_at([], []) == []
    large = torch.rand(3, 192, 256)  # short side 192: resized to MIN_SIZE
    (found,) = detector.detect([large], topk=2)
    assert len(found) == 2 and float(found.boxes.max()) <= 1.0
    (none,) = detector.features_at([large], [torch.zeros(0, 4)])
    assert none.shape == (0, 1024)


@pytest.mark.slow  # the C4 model
def test_the_roi_feature_of_a_c4_model_is_the_roialign_before_res5(image: torch.Tensor) -> None:
    """`--det-feature roi` on a C4 model: the res4 RoIAlign output (1024), not res5 averaged (2048)."""
    from detectron2.structures import Boxes

    torch.manual_seed(0)
    c4 = small("detectron2:COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", feature="roi")
    assert c4.record.feature_dim == 1024
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]])
    with torch.no_grad():
        image_list = c4.model.preprocess_image([{"image": image * 255.0 if c4.input_format == "RGB"
                                                 else (image * 255.0).flip(0)}])
        maps = c4.model.backbone(image_list.tensor)
        height, width = image_list.image_sizes[0]
        roi_heads = c4.model.roi_heads
        pooled = roi_heads.pooler([maps[name] for name in roi_heads.in_features],
                                  [Boxes(boxes * torch.tensor([width, height, width, height]))])
    torch.testing.assert_close(c4.features_at([image], [boxes])[0], pooled.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_the_roi_feature_of_an_fpn_model_is_the_box_pooler_averaged(detector: Detectron2Detector,
                                                                     image: torch.Tensor) -> None:
    torch.manual_seed(0)
    fpn = small(feature="roi")
    fpn.load_state_dict(detector.state_dict())
    assert fpn.record.feature_dim == 256 and detector.record.feature_dim == 1024
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]])
    (found,) = detector.detect([image], topk=3)
    (found_roi,) = fpn.detect([image], topk=3)
    torch.testing.assert_close(found_roi.boxes, found.boxes)
    assert found_roi.features.shape == (len(found), 256)
    with torch.no_grad():
        from detectron2.structures import Boxes

        image_list = fpn.model.preprocess_image([{"image": (image * 255.0).flip(0)}])
        maps = fpn.model.backbone(image_list.tensor)
        height, width = image_list.image_sizes[0]
        roi_heads = fpn.model.roi_heads
        pooled = roi_heads.box_pooler([maps[name] for name in roi_heads.box_in_features],
                                      [Boxes(boxes * torch.tensor([width, height, width, height]))])
    torch.testing.assert_close(fpn.features_at([image], [boxes])[0], pooled.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
