"""Action scores from verb and noun scores, and the LFB action re-weighting prior (DESIGN section 6).

Pure functions over numpy arrays (torch is used inside only as a faster top-k). `action_scores`
reproduces the official EPIC-Kitchens scoring, `compute_action_scores` in
epic-kitchens/epic-kitchens-55-lib `epic_kitchens/scoring.py` (EPIC-55) and
epic-kitchens/C1-Action-Recognition `utils/scoring.py` (EPIC-100):

1. take each segment's top-100 verbs and top-100 nouns by score;
2. softmax over those 100 scores (not over all classes);
3. outer product -> a 100 x 100 matrix of pair scores, times the prior at those pairs if given;
4. keep the 100 best pairs, ranked.

Ties. The official code ranks with `np.argsort(x)[..., ::-1]` (numpy's default, unstable sort),
so the order of exactly equal scores is unspecified there. We fix it to what that expression gives
with a *stable* sort, so results are deterministic and equal the official ones whenever the official
order is defined:
- verbs / nouns: among equal scores the higher class index ranks first;
- pairs: selection of the best 100 as `argsort(flat)[::-1][:100]` (among equal scores the later
  flat index `verb_rank * k_nouns + noun_rank` wins), then re-ranked as the official evaluation
  does when it turns the `{action: score}` dicts back into ranks (`_scores_dict_to_ranks`), which
  reverses tie order again: in the final ranking equal scores come in ascending flat index.
This matters with the prior, where all unseen pairs tie at exactly 0.

EPIC-100 quirk (not reproduced): C1-Action-Recognition calls `scipy.special.softmax` without an
axis, i.e. over the whole `(N, 100)` array at once. Within a row that is the per-row softmax times
a constant, so rankings and accuracies are the same (barring float underflow); only the absolute
scores differ. We use the per-row softmax of the EPIC-55 library.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["softmax", "lfb_action_prior", "action_scores", "rank_classes"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax.

    Args:
        logits: any shape.
        axis: the axis to normalise over.

    Returns:
        Array of the same shape (float64 unless the input is a lower-precision float).
    """
    logits = np.asarray(logits)
    if not np.issubdtype(logits.dtype, np.floating):
        logits = logits.astype(np.float64)
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def rank_classes(scores: np.ndarray) -> np.ndarray:
    """Classes of each row from best to worst, the EPIC way (`argsort(...)[..., ::-1]`, stable).

    Args:
        scores: `(N, K)`.

    Returns:
        `(N, K)` int64; `ranks[i, 0]` is row i's top class. Equal scores: higher index first.
    """
    return np.argsort(np.asarray(scores), axis=-1, kind="stable")[..., ::-1]


def lfb_action_prior(
    verb_labels: np.ndarray, noun_labels: np.ndarray, num_verbs: int, num_nouns: int
) -> np.ndarray:
    """The action re-weighting prior of the Long-Term Feature Banks code (P(noun | verb)).

    `freq = count / total` over the training `(verb, noun)` pairs;
    `prior[v, n] = freq[v, n] / (sum_n freq[v, n] + 1e-5)`. Pairs never seen in training get 0.

    Args:
        verb_labels: `(M,)` training verb classes.
        noun_labels: `(M,)` training noun classes.
        num_verbs: V.
        num_nouns: N.

    Returns:
        `(V, N)` float64.
    """
    verb_labels = np.asarray(verb_labels, dtype=np.int64).ravel()
    noun_labels = np.asarray(noun_labels, dtype=np.int64).ravel()
    if verb_labels.shape != noun_labels.shape:
        raise ValueError("verb_labels and noun_labels must have the same length")
    if verb_labels.size and (verb_labels.min() < 0 or verb_labels.max() >= num_verbs):
        raise ValueError(f"verb labels must lie in [0, {num_verbs})")
    if noun_labels.size and (noun_labels.min() < 0 or noun_labels.max() >= num_nouns):
        raise ValueError(f"noun labels must lie in [0, {num_nouns})")
    counts = np.bincount(verb_labels * num_nouns + noun_labels, minlength=num_verbs * num_nouns)
    counts = counts.reshape(num_verbs, num_nouns).astype(np.float64)
    freq = counts / max(counts.sum(), 1.0)
    return freq / (freq.sum(axis=1, keepdims=True) + 1e-5)


def _top_classes(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` classes per row (official `top_scores`) and their scores, best first."""
    top = rank_classes(scores)[:, :k]  # (B, k)
    return top, np.take_along_axis(scores, top, axis=1)


def _select_best_pairs(flat: np.ndarray, top_actions: int) -> np.ndarray:
    """Indices of the `top_actions` best entries per row, in the official final order.

    Equivalent to `o = argsort(flat, stable)[:, ::-1][:, :A]` followed by the re-ranking
    `o[argsort(flat[o], stable)[::-1]]`, without sorting all `k_v * k_n` entries: a top-k finds
    each row's A-th best value t; everything above t is in, and of the entries equal to t the ones
    with the largest indices fill the remaining places (that is what the reversed stable argsort
    keeps). The final order is score descending, equal scores by ascending index.

    Args:
        flat: `(B, L)` pair scores.
        top_actions: A <= L.

    Returns:
        `(B, A)` int64 indices into `flat`'s columns.
    """
    batch, length = flat.shape
    # The A-th best value is the same whatever tie rule picks the entries; torch.topk finds it
    # about 4x faster than np.partition (which also copies the array).
    threshold = torch.topk(torch.from_numpy(flat), top_actions, dim=1).values[:, -1].numpy()  # (B,)
    above = flat > threshold[:, None]  # (B, L)
    tied = flat == threshold[:, None]  # (B, L)
    missing = top_actions - above.sum(axis=1)  # (B,) places left for tied entries, >= 1
    keep = above | tied
    # Rows with more tied entries than places (e.g. many pairs at exactly 0 under the prior) keep
    # the last `missing` of them. Only those rows pay for the cumulative count.
    crowded = np.nonzero(tied.sum(axis=1) > missing)[0]
    if crowded.size:
        tied_rows = tied[crowded]
        tied_from_right = np.cumsum(tied_rows[:, ::-1], axis=1)[:, ::-1]  # tied entries at or after j
        keep[crowded] = above[crowded] | (tied_rows & (tied_from_right <= missing[crowded, None]))
    chosen = np.nonzero(keep)[1].reshape(batch, top_actions)  # ascending index within each row
    chosen_scores = np.take_along_axis(flat, chosen, axis=1)
    order = np.argsort(-chosen_scores, axis=1, kind="stable")  # ties keep ascending index
    return np.take_along_axis(chosen, order, axis=1)


def action_scores(
    verb_scores: np.ndarray,
    noun_scores: np.ndarray,
    *,
    top_k_verbs: int = 100,
    top_k_nouns: int = 100,
    top_actions: int = 100,
    prior: np.ndarray | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The best `top_actions` (verb, noun) pairs of every segment, ranked, with their scores.

    Score of a pair = softmax over the top-k verb scores x softmax over the top-k noun scores
    (x `prior[v, n]` when given, so pairs unseen in training score 0). See the module docstring
    for the source and the tie rule.

    Args:
        verb_scores: `(B, V)` verb logits or scores (the softmax is taken here).
        noun_scores: `(B, N)`.
        top_k_verbs: verbs kept per segment (EPIC: 100; all 97 on EPIC-100).
        top_k_nouns: nouns kept per segment (EPIC: 100).
        top_actions: pairs returned per segment (EPIC: 100); fewer if there are fewer pairs.
        prior: optional `(V, N)` action prior (e.g. `lfb_action_prior`).
        chunk: segments per vectorised step (bounds memory at `chunk * k_v * k_n` float64).

    Returns:
        `pairs (B, A, 2)` int64 `(verb, noun)`, best first, and `scores (B, A)` float64,
        non-increasing along A, with `A = min(top_actions, k_v * k_n)`.
    """
    verb_scores = np.asarray(verb_scores, dtype=np.float64)
    noun_scores = np.asarray(noun_scores, dtype=np.float64)
    if verb_scores.ndim != 2 or noun_scores.ndim != 2 or len(verb_scores) != len(noun_scores):
        raise ValueError(
            f"expected (B, V) and (B, N) scores, got {verb_scores.shape} and {noun_scores.shape}"
        )
    batch, num_verbs = verb_scores.shape
    num_nouns = noun_scores.shape[1]
    if prior is not None:
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (num_verbs, num_nouns):
            raise ValueError(f"prior must have shape {(num_verbs, num_nouns)}, got {prior.shape}")
    k_verbs = min(top_k_verbs, num_verbs)
    k_nouns = min(top_k_nouns, num_nouns)
    num_actions = min(top_actions, k_verbs * k_nouns)

    pairs = np.empty((batch, num_actions, 2), dtype=np.int64)
    scores = np.empty((batch, num_actions), dtype=np.float64)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        top_verbs, top_verb_scores = _top_classes(verb_scores[start:stop], k_verbs)  # (b, kv)
        top_nouns, top_noun_scores = _top_classes(noun_scores[start:stop], k_nouns)  # (b, kn)
        matrix = softmax(top_verb_scores)[:, :, None] * softmax(top_noun_scores)[:, None, :]  # (b, kv, kn)
        if prior is not None:
            matrix = matrix * prior[top_verbs[:, :, None], top_nouns[:, None, :]]
        flat = matrix.reshape(stop - start, -1)  # (b, kv*kn)
        best = _select_best_pairs(flat, num_actions)  # (b, A)
        verb_rank, noun_rank = np.divmod(best, k_nouns)
        pairs[start:stop, :, 0] = np.take_along_axis(top_verbs, verb_rank, axis=1)
        pairs[start:stop, :, 1] = np.take_along_axis(top_nouns, noun_rank, axis=1)
        scores[start:stop] = np.take_along_axis(flat, best, axis=1)
    return pairs, scores
