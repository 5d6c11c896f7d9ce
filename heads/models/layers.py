"""Building blocks of the symbiotic heads (DESIGN section 5), one purpose each, plus the shared loss.

- `ObjectAlignment`: object-centric alignment, global (one backbone vector per segment) or local
  (one RoI-pooled backbone vector per detection slot): `h_i = ReLU(W f + Wo fo_i + b)`.
- `CrossStreamGate`: `H' = sigmoid(Wg f_other + bg) * H`, the gate coming from the *other* branch.
- `ActionAttendedRelation`: `a = softmax_i((Wq f_other) . (Wk h''_i))`, `z = sum_i a_i h''_i` with
  `h''_i = s h'_i / ||h'_i||`, `s` the mean norm of the segment's valid rows (the report attends "the
  normalized feature matrix"; `RELATION_NORMS`).
- `MaskedMeanPool`: the no-relation ablation, a plain mean over valid rows.
- `masked_softmax`, `masked_mean_weights`: masking helpers that never produce NaN.
- `head_loss`: cross-entropy on verb + cross-entropy on noun.

Masks are bool tensors, True = valid slot. Padded detection slots must never influence an output:
their inputs are zeroed before any arithmetic (so even NaN padding cannot leak into values or
gradients) and they get exactly zero attention weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RELATION_NORMS",
    "masked_softmax",
    "masked_mean_weights",
    "ObjectAlignment",
    "CrossStreamGate",
    "ActionAttendedRelation",
    "MaskedMeanPool",
    "head_loss",
]


# How the action-attended relation treats its rows (docs/method.md, "Normalised rows"):
# "rows": L2-normalise the gated rows and rescale them all by the mean norm of the segment's valid
#         rows (every row the same length, the matrix its own scale), attend over them, sum them
#         (our reading of the report);
# "unit": the same without the rescale (rows of length 1: learns an order of magnitude slower);
# "keys": attend over the unit rows, sum the gated rows;
# "none": no normalisation (the equations alone).
RELATION_NORMS = ("rows", "unit", "keys", "none")


def masked_softmax(logits: Tensor, valid: Tensor, dim: int = -1) -> Tensor:
    """Softmax over `dim` restricted to valid entries.

    Invalid entries get logit -inf, hence weight exactly 0. A row with no valid entry would be
    softmax of all -inf (NaN); it gets all-zero weights instead, so the pooled feature is zero.

    Args:
        logits: attention logits, e.g. `(B, N)`.
        valid: bool mask of the same shape, True = valid.
        dim: the dimension to normalise over.

    Returns:
        Weights of the same shape; sum 1 over `dim` on rows with a valid entry, 0 elsewhere.
    """
    any_valid = valid.any(dim=dim, keepdim=True)
    masked = logits.masked_fill(~valid, float("-inf"))
    # All-invalid rows: replace the all -inf row by zeros so softmax stays finite, then zero it.
    masked = torch.where(any_valid, masked, torch.zeros_like(masked))
    weights = torch.softmax(masked, dim=dim)
    return weights * valid.to(weights.dtype)


def masked_mean_weights(valid: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform weights over valid entries of the last dim (`1 / count`), 0 on invalid ones.

    Args:
        valid: bool mask `(B, N)`.
        dtype: dtype of the weights.

    Returns:
        `(B, N)` weights; an all-invalid row gets zeros (not 0/0).
    """
    weights = valid.to(dtype)
    count = weights.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return weights / count


def _zero_invalid(features: Tensor, valid: Tensor) -> Tensor:
    # torch.where (not multiplication): 0 * NaN is NaN, and padding is allowed to hold anything.
    return torch.where(valid.unsqueeze(-1), features, torch.zeros((), dtype=features.dtype, device=features.device))


class ObjectAlignment(nn.Module):
    """Object-centric alignment: fuse a backbone feature with every detection feature.

    `h_i = ReLU(W f + Wo fo_i + b)`, written as two projections rather than a Linear over the
    concatenation `[f, fo_i]` (the same function) so `W f` is computed once per segment, not once
    per slot, when `f` is the global feature.

    With `normalize=True` (the report's I3D scheme, section 3.1) both inputs are L2-normalised
    before they are combined and the combination is multiplied by the backbone feature's L2 norm:
    `h_i = ReLU(||f|| (W f/||f|| + Wo fo_i/||fo_i||) + b)`. I3D features and Faster R-CNN features
    live on different scales; this puts the detection feature on the backbone's scale.

    Args:
        backbone_dim: C, size of the backbone feature.
        det_dim: Cd, size of a detection feature.
        hidden_dim: size of `h_i`; the equations use the branch's backbone dim C.
        normalize: the L2 scheme above.
    """

    def __init__(self, backbone_dim: int, det_dim: int, hidden_dim: int, *, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone_proj = nn.Linear(backbone_dim, hidden_dim, bias=False)  # W
        self.object_proj = nn.Linear(det_dim, hidden_dim, bias=False)  # Wo
        # The bias sits outside the scaled sum so the L2 scheme rescales only the features.
        self.bias = nn.Parameter(torch.zeros(hidden_dim))  # b

    def forward(self, backbone: Tensor, objects: Tensor, valid: Tensor) -> Tensor:
        """Align.

        Args:
            backbone: `(B, C)` global alignment (one vector per segment), or `(B, N, C)` local
                alignment (the backbone map RoI-pooled at each detection box).
            objects: detection features `(B, N, Cd)`.
            valid: bool `(B, N)`, True = a real detection.

        Returns:
            `(B, N, H)`; rows of invalid slots are computed from zeroed inputs (callers mask them).
        """
        objects = _zero_invalid(objects, valid)  # (B, N, Cd)
        if backbone.dim() == 3:
            backbone = _zero_invalid(backbone, valid)  # (B, N, C)
        if self.normalize:
            scale = backbone.norm(dim=-1, keepdim=True)  # (B, 1) or (B, N, 1)
            backbone = F.normalize(backbone, dim=-1)
            objects = F.normalize(objects, dim=-1)
        backbone_term = self.backbone_proj(backbone)  # (B, H) or (B, N, H)
        if backbone_term.dim() == 2:
            backbone_term = backbone_term.unsqueeze(1)  # (B, 1, H): broadcast over slots
        combined = backbone_term + self.object_proj(objects)  # (B, N, H)
        if self.normalize:
            if scale.dim() == 2:
                scale = scale.unsqueeze(1)  # (B, 1, 1)
            combined = combined * scale
        return F.relu(combined + self.bias)


class CrossStreamGate(nn.Module):
    """Cross-stream gating: the other branch's global feature re-scales this branch's rows.

    `g = sigmoid(Wg f_other + bg)` (`[H]`), `H' = g * H` broadcast over rows.

    Args:
        query_dim: size of the other branch's global feature.
        hidden_dim: H, size of the rows being gated.
    """

    def __init__(self, query_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(query_dim, hidden_dim)

    def forward(self, rows: Tensor, query: Tensor) -> Tensor:
        """Args:
            rows: `(B, N, H)` aligned features.
            query: `(B, Cq)` the other branch's global feature.

        Returns:
            `(B, N, H)` gated rows.
        """
        gate = torch.sigmoid(self.gate(query))  # (B, H)
        return rows * gate.unsqueeze(1)


class ActionAttendedRelation(nn.Module):
    """Action-attended relation: attention pooling over rows with the other branch as the query.

    `a_i = softmax_i((Wq f_other) . (Wk h''_i))` over valid rows, `z = sum_i a_i h''_i`, where
    `h''_i = s h'_i / ||h'_i||` are the L2-normalised gated rows rescaled by `s`, the mean norm of
    the segment's valid rows: the report attends "the normalized feature matrix" ("we perform
    attention mechanism on the normalized object-centric noun features and the global verb
    feature"). Normalising makes every row the same length, so that no object wins attention by its
    magnitude alone; the rescale keeps the matrix at its own scale, as the report's I3D scheme
    rescales the features it normalises (unit rows make near-uniform attention and a small `z`,
    which take an order of magnitude more steps to learn: docs/method.md). As in the equations
    there is no bias and no 1/sqrt(d) temperature; the query/key size is H.

    Args:
        query_dim: size of the other branch's global feature.
        hidden_dim: H, size of the rows.
        row_norm: one of `RELATION_NORMS`: ``rows`` (attend and sum the normalised, rescaled rows),
            ``unit`` (the same without the rescale), ``keys`` (attend the unit rows, sum the gated
            rows) or ``none`` (no normalisation).
    """

    def __init__(self, query_dim: int, hidden_dim: int, *, row_norm: str = "rows") -> None:
        super().__init__()
        if row_norm not in RELATION_NORMS:
            raise ValueError(f"row_norm must be one of {', '.join(RELATION_NORMS)}, got {row_norm!r}")
        self.row_norm = row_norm
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False)  # Wq
        self.key_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)  # Wk

    def forward(self, rows: Tensor, valid: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            rows: `(B, N, H)`.
            valid: bool `(B, N)`.
            query: `(B, Cq)`.

        Returns:
            `z (B, H)` and the attention weights `(B, N)` (exactly 0 on invalid slots; an
            all-invalid row gets all-zero weights and `z = 0`).
        """
        # An all-zero row (ReLU can give one) stays zero: F.normalize divides by max(norm, eps).
        normalised = rows if self.row_norm == "none" else F.normalize(rows, dim=-1)  # (B, N, H)
        if self.row_norm == "rows":
            lengths = rows.norm(dim=-1) * valid  # (B, N), padded slots count nothing
            scale = lengths.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
            normalised = normalised * scale.unsqueeze(-1)
        query_vec = self.query_proj(query)  # (B, H)
        keys = self.key_proj(normalised)  # (B, N, H)
        logits = torch.einsum("bh,bnh->bn", query_vec, keys)  # (B, N)
        weights = masked_softmax(logits, valid)  # (B, N)
        summed = rows if self.row_norm == "keys" else normalised
        return torch.einsum("bn,bnh->bh", weights, summed), weights


class MaskedMeanPool(nn.Module):
    """The no-relation ablation: the mean over valid rows (same call signature as the relation)."""

    def forward(self, rows: Tensor, valid: Tensor, query: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args:
            rows: `(B, N, H)`.
            valid: bool `(B, N)`.
            query: ignored; accepted so the relation module and this one are interchangeable.

        Returns:
            `z (B, H)` and the uniform weights `(B, N)` (0 on invalid slots).
        """
        weights = masked_mean_weights(valid, rows.dtype)  # (B, N)
        return torch.einsum("bn,bnh->bh", weights, rows), weights


def head_loss(outputs: dict[str, Tensor], verb_labels: Tensor, noun_labels: Tensor) -> dict[str, Tensor]:
    """Cross-entropy on verb plus cross-entropy on noun (the paper's loss, no weighting).

    Args:
        outputs: a head's output with `verb_logits (B, V)` and `noun_logits (B, N)`.
        verb_labels: `(B,)` int64.
        noun_labels: `(B,)` int64.

    Returns:
        `{"verb": ..., "noun": ..., "total": verb + noun}`, scalar tensors (batch means).
    """
    verb = F.cross_entropy(outputs["verb_logits"], verb_labels)
    noun = F.cross_entropy(outputs["noun_logits"], noun_labels)
    return {"verb": verb, "noun": noun, "total": verb + noun}
