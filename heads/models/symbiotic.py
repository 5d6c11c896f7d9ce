"""SAOA and SAP: one general symbiotic head with its parts injected, and thin builders.

The shape follows torchvision's video ResNet: small blocks (`layers.py`), one general model class
(`SymbioticHead`, made of two `SymbioticBranch`es) and public builders (`saoa`, `sap`) that only
choose arguments. The math is DESIGN section 5:

    noun branch: Hn = ObjectAlignment(fn_g, det.global)      (B, 60, Cn)
                 Hn' = sigmoid(Wgn fv_g + bgn) * Hn           gate from the verb branch
                 hn''_i = s hn'_i / ||hn'_i||                rows L2-normalised, rescaled by their
                                                             mean norm s (`relation_norm`)
                 zn = sum_i softmax_i((Wqn fv_g).(Wkn hn''_i)) hn''_i
                 noun_logits = Ln(zn)
    verb branch: the same with the roles swapped; SAOA aligns the RoI-pooled verb map at each of the
                 40 local boxes (`verb_local`), SAP the global verb feature with the 60 global
                 detections (`verb_objects`).

The readings of the report's ambiguous sentences, with the sentences, are in docs/method.md.

Batch keys (produced by the data layer; masks are bool, True = valid slot):
`verb_global (B, Cv)`, `noun_global (B, Cn)`, `det_global_feat (B, 60, Cd)`,
`det_global_valid (B, 60)`, `det_local_feat (B, 40, Cd)`, `det_local_valid (B, 40)`,
`verb_local (B, 40, Cv)`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from featstore.store.schema import (
    BOX_SETS,
    DET_GLOBAL_FEAT,
    DET_GLOBAL_SCORE,
    DET_LOCAL_FEAT,
    DET_LOCAL_SCORE,
    NOUN_GLOBAL,
    VERB_GLOBAL,
    VERB_LOCAL,
)
from heads.models.layers import (
    RELATION_NORMS,
    ActionAttendedRelation,
    CrossStreamGate,
    MaskedMeanPool,
    ObjectAlignment,
)
from heads.models.registry import FeatureDims, register_head

__all__ = ["SymbioticBranch", "SymbioticHead", "saoa", "sap", "symbiotic_fields"]

class SymbioticBranch(nn.Module):
    """One branch (verb or noun): align -> gate -> relate -> classify.

    Args:
        alignment: `ObjectAlignment`-like, `(backbone, objects, valid) -> (B, N, H)`.
        gate: `CrossStreamGate`-like, `(rows, query) -> rows`; None = no gating (ablation).
        relation: `(rows, valid, query) -> (z (B, H), weights (B, N))`: `ActionAttendedRelation`,
            or `MaskedMeanPool` for the no-relation ablation.
        classifier: `(B, H [+ C]) -> (B, classes)`.
        backbone_key: batch key of the backbone feature aligned with the objects: `verb_local`
            (local alignment), `verb_global` or `noun_global` (global alignment).
        objects: which detection set the branch aligns with, `global` (60) or `local` (40).
        global_key: batch key of this branch's own global feature (for `concat_global`).
        concat_global: ours: concatenate the branch's global feature to `z` before the classifier.
    """

    def __init__(
        self,
        *,
        alignment: nn.Module,
        gate: nn.Module | None,
        relation: nn.Module,
        classifier: nn.Module,
        backbone_key: str,
        objects: str,
        global_key: str,
        concat_global: bool = False,
    ) -> None:
        super().__init__()
        if objects not in BOX_SETS:
            raise ValueError(f"objects must be one of {BOX_SETS}, got {objects!r}")
        self.alignment = alignment
        self.gate = gate
        self.relation = relation
        self.classifier = classifier
        self.backbone_key = backbone_key
        self.objects = objects
        self.global_key = global_key
        self.concat_global = concat_global

    def forward(self, batch: dict[str, Tensor], cross_query: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            batch: the batch dict (see the module docstring).
            cross_query: `(B, Cq)` the *other* branch's global feature (gate and attention query).

        Returns:
            `logits (B, classes)` and `attention (B, N)` over this branch's detection slots.
        """
        objects = batch[f"det_{self.objects}_feat"]  # (B, N, Cd)
        valid = batch[f"det_{self.objects}_valid"].bool()  # (B, N)
        rows = self.alignment(batch[self.backbone_key], objects, valid)  # (B, N, H)
        if self.gate is not None:
            rows = self.gate(rows, cross_query)  # (B, N, H)
        pooled, attention = self.relation(rows, valid, cross_query)  # (B, H), (B, N)
        if self.concat_global:
            pooled = torch.cat([pooled, batch[self.global_key]], dim=-1)  # (B, H + C)
        return self.classifier(pooled), attention


class SymbioticHead(nn.Module):
    """The symbiotic-attention head: two branches, each gated and queried by the other's global feature.

    Args:
        verb_branch: the verb branch; its cross-stream query is `noun_global`.
        noun_branch: the noun branch; its cross-stream query is `verb_global`.
    """

    def __init__(self, *, verb_branch: SymbioticBranch, noun_branch: SymbioticBranch) -> None:
        super().__init__()
        self.verb_branch = verb_branch
        self.noun_branch = noun_branch

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Args:
            batch: dict of tensors (module docstring).

        Returns:
            `verb_logits (B, V)`, `noun_logits (B, N)`, `verb_attention (B, 40)` (or 60 when the
            verb branch aligns with the global set), `noun_attention (B, 60)`.
        """
        verb_logits, verb_attention = self.verb_branch(batch, batch["noun_global"])
        noun_logits, noun_attention = self.noun_branch(batch, batch["verb_global"])
        return {
            "verb_logits": verb_logits,
            "noun_logits": noun_logits,
            "verb_attention": verb_attention,
            "noun_attention": noun_attention,
        }


def _branch(
    *,
    backbone_dim: int,
    query_dim: int,
    det_dim: int,
    num_classes: int,
    backbone_key: str,
    objects: str,
    global_key: str,
    gating: bool,
    relation: bool,
    relation_norm: str,
    normalize: bool,
    concat_global: bool,
) -> SymbioticBranch:
    hidden = backbone_dim  # H = the branch's backbone dim C, as in the equations
    # Creation order is fixed (alignment, gate, relation, classifier) so that heads differing only
    # in where the backbone feature comes from draw identical weights from the same seed.
    alignment = ObjectAlignment(backbone_dim, det_dim, hidden, normalize=normalize)
    gate = CrossStreamGate(query_dim, hidden) if gating else None
    pool: nn.Module = (ActionAttendedRelation(query_dim, hidden, row_norm=relation_norm) if relation
                       else MaskedMeanPool())
    classifier = nn.Linear(hidden + (backbone_dim if concat_global else 0), num_classes)
    return SymbioticBranch(
        alignment=alignment,
        gate=gate,
        relation=pool,
        classifier=classifier,
        backbone_key=backbone_key,
        objects=objects,
        global_key=global_key,
        concat_global=concat_global,
    )


def _symbiotic(
    *,
    dims: FeatureDims,
    num_verbs: int,
    num_nouns: int,
    local_alignment: bool,
    verb_objects: str,
    gating: bool,
    relation: bool,
    relation_norm: str,
    normalize: bool,
    concat_global: bool,
) -> SymbioticHead:
    if verb_objects not in BOX_SETS:
        raise ValueError(f"verb_objects must be one of {BOX_SETS}, got {verb_objects!r}")
    if relation_norm not in RELATION_NORMS:
        raise ValueError(f"relation_norm must be one of {', '.join(RELATION_NORMS)}, got {relation_norm!r}")
    common = dict(det_dim=dims.det_dim, gating=gating, relation=relation, relation_norm=relation_norm,
                  normalize=normalize, concat_global=concat_global)
    verb_branch = _branch(
        backbone_dim=dims.verb_dim,
        query_dim=dims.noun_dim,
        num_classes=num_verbs,
        backbone_key="verb_local" if local_alignment else "verb_global",
        objects=verb_objects,
        global_key="verb_global",
        **common,
    )
    noun_branch = _branch(
        backbone_dim=dims.noun_dim,
        query_dim=dims.verb_dim,
        num_classes=num_nouns,
        backbone_key="noun_global",
        objects="global",
        global_key="noun_global",
        **common,
    )
    return SymbioticHead(verb_branch=verb_branch, noun_branch=noun_branch)


def symbiotic_fields(*, local_alignment: bool, verb_objects: str) -> tuple[str, ...]:
    """STORE fields a symbiotic head reads.

    Both globals are always needed (each branch's alignment or the other's gate and query use
    them). Detection scores are read for their validity (0 = padded slot). Local alignment needs
    `verb.local` (batch key `verb_local`): the store's own when it holds it, else `verb.map` (or
    `verb.map_tmean`) RoI-pooled at the `det.local.box` boxes at load time
    (`registry.LOAD_TIME_SOURCES`).
    """
    fields = [VERB_GLOBAL, NOUN_GLOBAL, DET_GLOBAL_FEAT, DET_GLOBAL_SCORE]
    if verb_objects == "local":
        fields += [DET_LOCAL_FEAT, DET_LOCAL_SCORE]
    if local_alignment:
        fields += [VERB_LOCAL]
    return tuple(fields)


@register_head(
    "saoa",
    description="SAOA: symbiotic attention with object-centric alignment (local alignment for verbs)",
    fields=lambda *, local_alignment, **_: symbiotic_fields(local_alignment=local_alignment, verb_objects="local"),
)
def saoa(
    *,
    dims: FeatureDims,
    num_verbs: int,
    num_nouns: int,
    gating: bool = True,
    relation: bool = True,
    relation_norm: str = "rows",
    local_alignment: bool = True,
    normalize: bool = False,
    concat_global: bool = False,
) -> SymbioticHead:
    """SAOA (Wang et al., TPAMI 2020): the verb branch aligns the verb map RoI-pooled at each of the
    40 local boxes (`verb_local`) with those boxes' detection features; the noun branch aligns the
    global noun feature with the 60 global detections.

    Args:
        dims: feature sizes.
        num_verbs: V.
        num_nouns: N.
        gating: cross-stream gating (False: ablation, rows pass ungated).
        relation: action-attended relation (False: ablation, mean over valid rows).
        relation_norm: rows the relation attends: `rows` (the gated rows L2-normalised and rescaled
            by their mean norm, attended and summed: the report's "normalized feature matrix",
            docs/method.md), `unit` (normalised, not rescaled), `keys` (attended as unit rows,
            summed as gated) or `none` (no normalisation, before issue 23).
        local_alignment: False falls back to SAP's verb branch on the local detections (global verb
            feature with the 40 local boxes), i.e. `sap(verb_objects="local")`.
        normalize: the report's I3D L2 scheme in both alignments; `heads train` turns it on for a
            store whose backbones are of the I3D family (its manifest) unless given.
        concat_global: ours: concatenate each branch's global feature before its classifier.

    Returns:
        A `SymbioticHead` (plain CPU module).
    """
    return _symbiotic(dims=dims, num_verbs=num_verbs, num_nouns=num_nouns, local_alignment=local_alignment,
                      verb_objects="local", gating=gating, relation=relation, relation_norm=relation_norm,
                      normalize=normalize, concat_global=concat_global)


@register_head(
    "sap",
    description="SAP: symbiotic attention with privileged information (global alignment in both branches)",
    fields=lambda *, verb_objects, **_: symbiotic_fields(local_alignment=False, verb_objects=verb_objects),
)
def sap(
    *,
    dims: FeatureDims,
    num_verbs: int,
    num_nouns: int,
    gating: bool = True,
    relation: bool = True,
    relation_norm: str = "rows",
    normalize: bool = False,
    concat_global: bool = False,
    verb_objects: str = "global",
) -> SymbioticHead:
    """SAP (Wang et al., AAAI 2020): global alignment in both branches,
    verb rows `ReLU(Wv fv_g + Wvo fo_i + bv)`.

    Args:
        dims: feature sizes.
        num_verbs: V.
        num_nouns: N.
        gating: cross-stream gating (False: ablation).
        relation: action-attended relation (False: mean over valid rows).
        relation_norm: as `saoa`'s: `rows` (default), `unit`, `keys` or `none`.
        normalize: the report's I3D L2 scheme; `heads train` turns it on for I3D-family stores unless given.
        concat_global: ours: concatenate each branch's global feature before its classifier.
        verb_objects: the detection set the verb branch aligns with: `global` (the 60 slots of the
            6 s window, which the report ties to global alignment) or `local` (the 40 slots of the
            4 s window, as SAOA's verb branch; `saoa(local_alignment=False)` is that model).

    Returns:
        A `SymbioticHead` (plain CPU module).
    """
    return _symbiotic(dims=dims, num_verbs=num_verbs, num_nouns=num_nouns, local_alignment=False,
                      verb_objects=verb_objects, gating=gating, relation=relation, relation_norm=relation_norm,
                      normalize=normalize, concat_global=concat_global)
