"""The `global` baseline: what the report calls previous practice.

Two linear classifiers, verb on the pooled VerbNet feature and noun on the pooled NounNet feature,
with no interaction between the branches and no detections.
"""
from __future__ import annotations

from torch import Tensor, nn

from featstore.store.schema import NOUN_GLOBAL, VERB_GLOBAL
from heads.models.registry import FeatureDims, register_head

__all__ = ["GlobalHead", "global_head"]


class GlobalHead(nn.Module):
    """Independent linear verb and noun classifiers on the global features.

    Args:
        verb_dim: Cv.
        noun_dim: Cn.
        num_verbs: V.
        num_nouns: N.
    """

    def __init__(self, *, verb_dim: int, noun_dim: int, num_verbs: int, num_nouns: int) -> None:
        super().__init__()
        self.verb_classifier = nn.Linear(verb_dim, num_verbs)
        self.noun_classifier = nn.Linear(noun_dim, num_nouns)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Args:
            batch: needs `verb_global (B, Cv)` and `noun_global (B, Cn)`; other keys are ignored.

        Returns:
            `verb_logits (B, V)`, `noun_logits (B, N)`.
        """
        return {
            "verb_logits": self.verb_classifier(batch["verb_global"]),
            "noun_logits": self.noun_classifier(batch["noun_global"]),
        }


@register_head(
    "global",
    description="baseline: linear verb/noun classifiers on the global backbone features, no objects",
    fields=lambda **_: (VERB_GLOBAL, NOUN_GLOBAL),
)
def global_head(*, dims: FeatureDims, num_verbs: int, num_nouns: int) -> GlobalHead:
    """The `global` baseline (no switches).

    Args:
        dims: feature sizes (only `verb_dim`, `noun_dim` are used).
        num_verbs: V.
        num_nouns: N.

    Returns:
        A `GlobalHead` (plain CPU module).
    """
    return GlobalHead(verb_dim=dims.verb_dim, noun_dim=dims.noun_dim, num_verbs=num_verbs, num_nouns=num_nouns)
