"""The run folder's checkpoint: `featstore build` loads its backbone strictly and records the run."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from featstore.epic.sampling import SamplingConfig
from featstore.extract.config import BuildConfig
from featstore.extract.service import build_store
from featstore.models import build_backbone, read_state_dict
from featstore.models.checkpoints import read_finetune_record
from featstore.store.reader import FeatureStore
from featstore.training.run_folder import CHECKPOINT_NAME, CURVES_NAME
from finetune.model import build_video_classifier
from finetune.outputs import plot_curves, write_finetuned_checkpoint


def finetuned(tmp_path: Path, name: str = "mc3_18", in_channels: int = 3) -> tuple[Path, torch.nn.Module, dict]:
    model, _, _ = build_video_classifier(name, num_classes=6, in_channels=in_channels, seed=3)
    with torch.no_grad():  # weights no random init reproduces
        for parameter in model.parameters():
            parameter.mul_(1.01)
    record = {"format": 1, "run": str(tmp_path / "run"), "epoch": 2, "metrics": {"verb_top1": 40.0},
              "config": {"settings": {"backbone": name, "target": "verb", "recipe": "r50-3d", "lr": 0.003,
                                      "scale_range": (224, 288)}}}
    path = write_finetuned_checkpoint(tmp_path / CHECKPOINT_NAME, backbone=model.backbone.state_dict(),
                                      classifier=model.classifier.state_dict(), record=record)
    return path, model, record


def test_the_backbone_loads_strictly_and_the_classifier_and_record_sit_beside_it(tmp_path: Path) -> None:
    path, model, record = finetuned(tmp_path)
    backbone, _ = build_backbone(f"mc3_18:{path}")
    assert backbone.load_report.ignored == ()  # nothing dropped: the backbone's keys, exactly
    assert set(read_state_dict(path)) == set(backbone.state_dict())
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key
    payload = torch.load(path, weights_only=True)  # plain containers: loadable without trusting code
    assert torch.equal(payload["classifier"]["weight"], model.classifier.weight)
    assert read_finetune_record(path) == json.loads(json.dumps(record))
    # A checkpoint that is not a stage-1 one has no record.
    torch.save(model.backbone.state_dict(), tmp_path / "plain.pt")
    assert read_finetune_record(tmp_path / "plain.pt") is None


def test_a_half_precision_checkpoint_is_half_the_size_and_loads_cast_back(tmp_path: Path) -> None:
    path, model, record = finetuned(tmp_path)
    half = write_finetuned_checkpoint(tmp_path / "half.pt", backbone=model.backbone.state_dict(),
                                      classifier=model.classifier.state_dict(), record=record, half=True)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    assert torch.load(half, weights_only=True)["state_dict"]["stem.0.weight"].dtype == torch.float16
    backbone, _ = build_backbone(f"mc3_18:{half}")
    weight = backbone.state_dict()["stem.0.weight"]
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, model.backbone.state_dict()["stem.0.weight"], atol=1e-3)


def test_a_flow_checkpoint_loads_into_a_flow_backbone(tmp_path: Path) -> None:
    path, _, _ = finetuned(tmp_path, in_channels=2)
    backbone, _ = build_backbone(f"mc3_18:{path}", in_channels=2)
    assert backbone.stem[0].in_channels == 2


def test_a_store_built_from_it_records_the_run_next_to_the_checkpoint_hash(small_epic, tmp_path: Path) -> None:
    path, _, record = finetuned(tmp_path)
    config = BuildConfig(store=tmp_path / "store", annotations=small_epic.annotations, frames_root=small_epic.frames,
                         verb_backbone=f"mc3_18:{path}", noun_backbone="mc3_18",
                         sampling=SamplingConfig(clip_frames=8, clip_stride=2, size=32), limit=2, workers=0,
                         progress=False)
    report = build_store(config)
    assert report.built == 2 and not report.failed, report.summary()
    provenance = FeatureStore.open(tmp_path / "store").manifest["provenance"]
    verb = provenance["verb_backbone"]
    assert verb["checkpoint_sha256"] and verb["finetune"] == json.loads(json.dumps(record))
    assert "finetune" not in provenance["noun_backbone"]  # random weights: no run behind them


def test_curves_are_written(tmp_path: Path) -> None:
    history = [{"epoch": 1, "loss": 2.0, "verb_top1": 10.0, "verb_top5": 50.0},
               {"epoch": 2, "loss": 1.5, "verb_top1": 20.0, "verb_top5": 60.0}]
    png = plot_curves(history, tmp_path / CURVES_NAME, target="verb", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
