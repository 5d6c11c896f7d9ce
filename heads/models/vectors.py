"""The `vectors` head: the `global` baseline over any stored fields, named by its switches.

A store imported from a published set (`featstore import`) holds fields named for what they are
(`rulstm.rgb`, `rulstm.flow`, `rulstm.obj`, `actionformer.slowfast`, `tbn.rgb`, LFB's
`det.global.feat`), not VerbNet's and NounNet's globals. This head reads the fields its switches
name: each branch concatenates its fields and classifies them linearly, like `global`, e.g. verbs
from `rulstm.flow` and nouns from `rulstm.rgb` + `rulstm.obj`. A `[D]` field is read as it is; an
`[N, D]` field (TA3N's 25 snippets, detection slots) is averaged over its rows, over the valid slots
only for a detection set (`det.<set>.feat`, whose `det.<set>.score` marks them). With its defaults
(`verb.global`, `noun.global`) it is the `global` baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from featstore.store.schema import BOX_SETS, NOUN_GLOBAL, VERB_GLOBAL, det_field
from heads.data import DERIVED, batch_key
from heads.models.registry import FeatureDims, register_head

__all__ = ["FieldInput", "VectorHead", "field_inputs", "parse_fields", "vector_fields", "vectors"]

# A detection set's features -> the score field whose positive entries mark its valid slots.
_SLOT_SCORES = {det_field(box_set, "feat"): det_field(box_set, "score") for box_set in BOX_SETS}


def parse_fields(text: str) -> tuple[str, ...]:
    """``"rulstm.rgb, rulstm.obj"`` -> ``("rulstm.rgb", "rulstm.obj")`` (a switch names its fields so)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def vector_fields(*, verb_fields: str, noun_fields: str) -> tuple[str, ...]:
    """STORE fields the head reads: the named ones, and each detection set's score for its slot mask."""
    names = list(dict.fromkeys(parse_fields(verb_fields) + parse_fields(noun_fields)))
    return tuple(names + [_SLOT_SCORES[name] for name in names if name in _SLOT_SCORES])


@dataclass(frozen=True)
class FieldInput:
    """One field a branch reads.

    Attributes:
        key: its batch key.
        width: D, its last dimension.
        rows: N for an `[N, D]` field (averaged), None for a `[D]` field.
        valid_key: the batch key of its slot mask `(B, N)`, for a detection set.
    """

    key: str
    width: int
    rows: int | None = None
    valid_key: str | None = None


def field_inputs(fields: Sequence[str], dims: FeatureDims) -> tuple[FieldInput, ...]:
    """The inputs of one branch.

    Raises:
        ValueError: a field the store lacks, or one that is neither `[D]` nor `[N, D]`.
    """
    inputs = []
    for field in fields:
        shape = dims.shape_of(field)
        if shape is None:
            raise ValueError(f"head 'vectors': the store has no field {field!r}")
        if len(shape) not in (1, 2):
            raise ValueError(f"head 'vectors' reads [D] or [N, D] fields; {field} is {list(shape)}")
        score = _SLOT_SCORES.get(field)
        inputs.append(FieldInput(batch_key(field), shape[-1], shape[0] if len(shape) == 2 else None,
                                 DERIVED[score] if score is not None else None))
    if not inputs:
        raise ValueError("head 'vectors': a branch names no field")
    return tuple(inputs)


class VectorHead(nn.Module):
    """Independent linear verb and noun classifiers, each on the concatenation of its fields.

    Args:
        verb_inputs: the verb branch's fields.
        noun_inputs: the noun branch's fields.
        num_verbs: V.
        num_nouns: N.
    """

    def __init__(self, *, verb_inputs: Sequence[FieldInput], noun_inputs: Sequence[FieldInput], num_verbs: int,
                 num_nouns: int) -> None:
        super().__init__()
        self.verb_inputs, self.noun_inputs = tuple(verb_inputs), tuple(noun_inputs)
        self.verb_classifier = nn.Linear(sum(i.width for i in self.verb_inputs), num_verbs)
        self.noun_classifier = nn.Linear(sum(i.width for i in self.noun_inputs), num_nouns)

    @staticmethod
    def _vector(batch: dict[str, Tensor], field: FieldInput) -> Tensor:
        values = batch[field.key]  # (B, D) or (B, N, D)
        if field.rows is None:
            return values
        if field.valid_key is None:
            return values.mean(dim=1)
        valid = batch[field.valid_key].unsqueeze(-1).to(values.dtype)  # (B, N, 1)
        return (values * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Args:
            batch: the batch keys of the named fields (and their slot masks); other keys are ignored.

        Returns:
            `verb_logits (B, V)`, `noun_logits (B, N)`.
        """
        verbs = torch.cat([self._vector(batch, f) for f in self.verb_inputs], dim=1)  # (B, sum D)
        nouns = torch.cat([self._vector(batch, f) for f in self.noun_inputs], dim=1)
        return {"verb_logits": self.verb_classifier(verbs), "noun_logits": self.noun_classifier(nouns)}


@register_head(
    "vectors",
    description="linear verb/noun classifiers on any stored fields named by --verb-fields / --noun-fields "
                "(imported sets: rulstm.flow, rulstm.rgb,rulstm.obj, ...); its defaults are `global`",
    fields=lambda *, verb_fields, noun_fields, **_: vector_fields(verb_fields=verb_fields, noun_fields=noun_fields),
)
def vectors(*, dims: FeatureDims, num_verbs: int, num_nouns: int, verb_fields: str = VERB_GLOBAL,
            noun_fields: str = NOUN_GLOBAL) -> VectorHead:
    """The `vectors` head.

    Args:
        dims: feature sizes, with the store's field shapes.
        num_verbs: V.
        num_nouns: N.
        verb_fields: comma-separated store fields the verb classifier reads, concatenated (e.g.
            rulstm.flow); [N, D] fields are averaged over their rows (valid slots for det.*.feat).
        noun_fields: the same for the noun classifier (e.g. rulstm.rgb,rulstm.obj).

    Returns:
        A `VectorHead` (plain CPU module).
    """
    return VectorHead(verb_inputs=field_inputs(parse_fields(verb_fields), dims),
                      noun_inputs=field_inputs(parse_fields(noun_fields), dims),
                      num_verbs=num_verbs, num_nouns=num_nouns)
