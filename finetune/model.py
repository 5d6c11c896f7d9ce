"""The stage-1 model: a registered video backbone and a linear classifier on its pooled feature.

The backbone is exactly what `featstore build` later runs (`featstore.models.build_backbone`), so its
state dict is what the build loads; the classifier is a separate module, saved under its own key.
No dropout (report 3.1: "This strategy is not used in our models").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from featstore.models import BackboneRecord, LoadReport, VideoBackbone, build_backbone, load_backbone_checkpoint

__all__ = ["InitReport", "VideoClassifier", "build_video_classifier"]


class VideoClassifier(nn.Module):
    """A backbone and a linear layer on its pooled (time and space averaged) last-stage feature.

    Args:
        backbone: a registered backbone (normalises its own [0, 1] input with its record's mean / std).
        num_classes: classifier outputs.
    """

    def __init__(self, backbone: VideoBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.record.feature_dim, num_classes)
        # A small start, as fine-tuning recipes initialise a new head: the first steps do not swamp
        # the pretrained features with large random gradients.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, clip: Tensor) -> Tensor:
        """Class logits of a batch of clips.

        Args:
            clip: (B, Cin, T, H, W) float in [0, 1].
        Returns:
            (B, num_classes) logits.
        """
        _, pooled = self.backbone(clip)  # (B, C)
        return self.classifier(pooled)


@dataclass(frozen=True)
class InitReport:
    """Where the backbone's starting weights came from.

    Attributes:
        checkpoint: the init file, None for random weights.
        loaded: tensors copied from it.
        dropped: its classifier keys, left out (the new classifier starts fresh).
    """

    checkpoint: Path | None
    loaded: int = 0
    dropped: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the run's log."""
        if self.checkpoint is None:
            return "init: random weights (no --init checkpoint)"
        dropped = (f"; its classifier was dropped ({', '.join(self.dropped)})" if self.dropped
                   else "; it has no classifier")
        return f"init: {self.loaded} tensors loaded from {self.checkpoint}{dropped}"


def build_video_classifier(
    backbone: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    init: str | Path | None = None,
    seed: int = 0,
) -> tuple[VideoClassifier, BackboneRecord, InitReport]:
    """Build the stage-1 model on the CPU, seeded, optionally starting from a local checkpoint.

    Args:
        backbone: a registered backbone name.
        num_classes: classifier outputs.
        in_channels: 3 for RGB, 2 for flow (u, v).
        init: a local checkpoint of the backbone (Kinetics, IG-65M, a previous stage-1 run...); keys
            of its classifier (the record's ``classifier_prefixes``, e.g. ``fc.``, ``logits.``) are
            dropped, everything else must fit exactly.
        seed: the torch seed both the random initialisation and the classifier are drawn under (the
            caller's random stream is left as it was).
    Returns:
        ``(model in train mode, the backbone's record, what the init loaded)``.
    Raises:
        UnknownModelError: unknown backbone.
        CheckpointError: a missing init file, or keys / shapes that do not fit (listed).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, record = build_backbone(backbone, in_channels=in_channels)
        model = VideoClassifier(module, num_classes)
    report = InitReport(checkpoint=None)
    if init is not None:
        loaded: LoadReport = load_backbone_checkpoint(module, init)
        module.load_report = loaded
        report = InitReport(checkpoint=Path(init), loaded=loaded.loaded, dropped=loaded.ignored)
    return model.train(), record, report
