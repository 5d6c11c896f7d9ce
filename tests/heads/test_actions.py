"""Action scores and the LFB prior, against a transcription of the official EPIC scoring code
(`official_action_ranks`, tests/helpers/official_epic.py: no code path shared with `heads.actions`).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.special

from heads.actions import action_scores, lfb_action_prior, rank_classes, softmax
from tests.helpers.official_epic import ACTION_VERB_MULTIPLIER, official_action_ranks


def _as_ids(pairs: np.ndarray) -> np.ndarray:
    return pairs[..., 0] * ACTION_VERB_MULTIPLIER + pairs[..., 1]


def _random_scores(
    rng: np.random.Generator, n: int, num_verbs: int, num_nouns: int, ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    verb, noun = rng.normal(size=(n, num_verbs)), rng.normal(size=(n, num_nouns))
    if ties:  # few distinct values: many exactly equal scores, products and prior zeros
        verb, noun = np.round(verb), np.round(noun)
        verb[: n // 4] = 0.0  # whole rows tied
    return verb, noun


# ---------------------------------------------------------------- softmax and ranks


def test_softmax() -> None:
    x = np.array([[0.0, 200.0, 10.0], [1e4, 1e4, -1e4]])
    p = softmax(x)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0)
    np.testing.assert_allclose(p, scipy.special.softmax(x, axis=-1))
    np.testing.assert_allclose(softmax(x.T, axis=0), p.T)
    assert np.isfinite(p).all()


def test_rank_classes_ties_put_the_higher_index_first() -> None:
    ranks = rank_classes(np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    np.testing.assert_array_equal(ranks, [[2, 1, 0, 3], [3, 2, 1, 0]])


# ---------------------------------------------------------------- prior


def test_lfb_prior_against_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    num_verbs, num_nouns = 6, 9
    verbs = rng.integers(0, 4, 500)  # verbs 4, 5 never occur: their rows are 0
    nouns = rng.integers(0, num_nouns, 500)
    counts = Counter(zip(verbs.tolist(), nouns.tolist()))
    total = sum(counts.values())
    expected = np.zeros((num_verbs, num_nouns))
    for v in range(num_verbs):
        row_freq = sum(counts[(v, n)] / total for n in range(num_nouns))
        for n in range(num_nouns):
            expected[v, n] = (counts[(v, n)] / total) / (row_freq + 1e-5)
    prior = lfb_action_prior(verbs, nouns, num_verbs, num_nouns)
    np.testing.assert_allclose(prior, expected, rtol=1e-12, atol=1e-15)
    assert (prior[4:] == 0).all()
    unseen = [(v, n) for v in range(4) for n in range(num_nouns) if (v, n) not in counts]
    assert all(prior[v, n] == 0 for v, n in unseen)
    assert np.all(prior.sum(axis=1)[:4] < 1) and np.all(prior.sum(axis=1)[:4] > 0.999)


def test_lfb_prior_refuses_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="verb"):
        lfb_action_prior(np.array([3]), np.array([0]), 3, 2)
    with pytest.raises(ValueError, match="noun"):
        lfb_action_prior(np.array([0]), np.array([2]), 3, 2)


# ---------------------------------------------------------------- action scores


def test_action_scores_hand_computed() -> None:
    verb = np.log(np.array([[0.7, 0.3]]))  # softmax gives back 0.7, 0.3
    noun = np.log(np.array([[0.1, 0.6, 0.3]]))
    pairs, scores = action_scores(verb, noun, top_actions=4)
    np.testing.assert_array_equal(pairs[0], [[0, 1], [0, 2], [1, 1], [1, 2]])
    np.testing.assert_allclose(scores[0], [0.42, 0.21, 0.18, 0.09])
    # With a prior: (0, 1) was never seen in training and scores 0.
    prior = np.array([[1.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    pairs, scores = action_scores(verb, noun, top_actions=6, prior=prior)
    np.testing.assert_allclose(scores[0], [0.21, 0.09, 0.07, 0.015, 0.0, 0.0])
    np.testing.assert_array_equal(pairs[0, :4], [[0, 2], [1, 1], [0, 0], [1, 0]])
    # The two zero pairs come last, in the official order: ascending flat index
    # `verb_rank * k_nouns + noun_rank` with noun ranks (1, 2, 0): (0, 1) -> 0, (1, 2) -> 4.
    np.testing.assert_array_equal(pairs[0, 4:], [[0, 1], [1, 2]])


def test_action_scores_softmax_only_over_the_top_k() -> None:
    verb = np.array([[3.0, 2.0, 1.0, -5.0]])
    noun = np.array([[0.0, 1.0]])
    pairs, scores = action_scores(verb, noun, top_k_verbs=2, top_actions=100)
    assert pairs.shape == (1, 4, 2)  # 2 verbs x 2 nouns
    p_verb = scipy.special.softmax([3.0, 2.0])
    p_noun = scipy.special.softmax([0.0, 1.0])
    np.testing.assert_allclose(scores[0], sorted(np.outer(p_verb, p_noun).ravel(), reverse=True))
    np.testing.assert_allclose(scores.sum(), 1.0)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize(("num_verbs", "num_nouns", "top_k"), [(125, 352, 100), (12, 15, 7), (4, 5, 100)])
def test_action_scores_equal_the_official_ranking(
    ties: bool, with_prior: bool, num_verbs: int, num_nouns: int, top_k: int
) -> None:
    rng = np.random.default_rng(num_verbs + 2 * ties + with_prior)
    n = 40 if num_verbs > 100 else 200
    verb, noun = _random_scores(rng, n, num_verbs, num_nouns, ties)
    prior = None
    if with_prior:
        m = 2 * num_verbs  # few training pairs: a sparse prior, many pairs tie at 0
        prior = lfb_action_prior(rng.integers(0, num_verbs, m), rng.integers(0, num_nouns, m), num_verbs, num_nouns)
    official_ranks, official_dicts = official_action_ranks(verb, noun, top_k, prior)
    pairs, scores = action_scores(verb, noun, top_k_verbs=top_k, top_k_nouns=top_k, top_actions=top_k, prior=prior,
                                  chunk=17)
    np.testing.assert_array_equal(_as_ids(pairs), official_ranks)
    expected_scores = np.array([[d[a] for a in row] for d, row in zip(official_dicts, official_ranks)])
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-12, atol=0)
    assert np.all(np.diff(scores, axis=1) <= 0)
    if ties and with_prior:
        assert (scores == 0).any()  # the boundary tie rule was exercised


def test_action_scores_epic100_global_softmax_quirk_gives_the_same_ranking() -> None:
    """C1-Action-Recognition `utils/scoring.py` softmaxes over the whole (N, 100) array at once."""
    rng = np.random.default_rng(3)
    verb, noun = rng.normal(size=(60, 97)), rng.normal(size=(60, 300))
    official_ranks, _ = official_action_ranks(verb, noun, 100, softmax_fn=lambda x: scipy.special.softmax(x))
    pairs, _ = action_scores(verb, noun)
    assert pairs.shape == (60, 100, 2)
    np.testing.assert_array_equal(_as_ids(pairs), official_ranks)


def test_action_scores_batch_is_row_independent() -> None:
    rng = np.random.default_rng(4)
    verb, noun = _random_scores(rng, 9, 20, 30, ties=True)
    pairs, scores = action_scores(verb, noun, top_actions=50)
    for i in range(9):
        row_pairs, row_scores = action_scores(verb[i : i + 1], noun[i : i + 1], top_actions=50)
        np.testing.assert_array_equal(row_pairs[0], pairs[i])
        np.testing.assert_array_equal(row_scores[0], scores[i])


def test_action_scores_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="prior"):
        action_scores(np.zeros((2, 3)), np.zeros((2, 4)), prior=np.zeros((4, 3)))
    with pytest.raises(ValueError):
        action_scores(np.zeros((2, 3)), np.zeros((3, 4)))
