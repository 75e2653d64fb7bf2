"""The reference-similarity view of novelty, and how the detector joins it with module I's view."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from acsleuth_core import threshold as thr
from acsleuth_core.detect import _standardise, _two_view_scores
from acsleuth_core.similarity import ReferenceSimilarity


def _cells(profile: np.ndarray, n: int, rng) -> np.ndarray:
    return np.log1p(rng.poisson(profile, size=(n, profile.size))).astype(np.float32)


def test_a_type_mixed_from_reference_genes_is_unlike_every_reference_cell():
    rng = np.random.default_rng(0)
    low = np.full(50, 0.5)
    type_a, type_b, mixed = low.copy(), low.copy(), low.copy()
    type_a[:10] = 8.0
    type_b[10:20] = 8.0
    mixed[:5] = mixed[10:15] = 8.0  # half of A's genes and half of B's: no new gene, a new combination
    reference = np.vstack([_cells(type_a, 80, rng), _cells(type_b, 80, rng)])
    held_out = np.vstack([_cells(type_a, 20, rng), _cells(type_b, 20, rng)])
    novel = _cells(mixed, 20, rng)
    similarity = ReferenceSimilarity.fit(reference, seed=0)
    dissimilarity = similarity.dissimilarity(np.vstack([held_out, novel]))
    assert np.all((dissimilarity >= 0) & (dissimilarity <= 2))
    assert roc_auc_score(np.r_[np.zeros(40), np.ones(20)], dissimilarity) > 0.95


def test_similarity_survives_a_round_trip_through_arrays():
    rng = np.random.default_rng(1)
    reference = _cells(np.full(30, 2.0), 40, rng)
    similarity = ReferenceSimilarity.fit(reference, seed=0)
    copy = ReferenceSimilarity.from_arrays(similarity.to_arrays())
    np.testing.assert_array_equal(copy.dissimilarity(reference[:5]), similarity.dissimilarity(reference[:5]))


def test_a_tiny_reference_uses_as_many_axes_and_neighbours_as_it_has():
    reference = _cells(np.full(30, 2.0), 6, np.random.default_rng(2))
    similarity = ReferenceSimilarity.fit(reference, seed=0)
    assert similarity.axes.shape == (5, 30) and similarity.n_neighbours == 6
    assert similarity.dissimilarity(reference).shape == (6,)


# ------------------------------------------------------------ joining views
def _views(rng, n_targets=200, n_held_out=50, n_far=40):
    """Two views whose last ``n_far`` target cells lie beyond every held-out cell in both."""
    views = []
    for _ in range(2):
        held_out = rng.normal(size=n_held_out)
        target = rng.normal(size=n_targets)
        target[-n_far:] = 10.0 + rng.exponential(size=n_far)
        views.append((target, held_out))
    return views


def test_joined_scores_keep_fishers_order_and_break_its_ties_by_the_evidence():
    views = _views(np.random.default_rng(0))
    scores, reference_scores = _two_view_scores(*views)
    fisher = (1.0 - thr.fisher_combined(*(thr.conformal_pvalues(t, h) for t, h in views))).round(12)
    assert np.unique(fisher[-40:]).size == 1  # capped p-values: the far cells tie
    assert np.unique(scores).size == scores.size  # joined: no ties left
    strictly_above = fisher[:, None] > fisher[None, :]
    assert np.all(scores[:, None] > scores[None, :], where=strictly_above)  # Fisher's order is kept
    evidence = sum(_standardise(t, h) for t, h in views)[-40:]  # each view in its held-out cells' units
    assert np.array_equal(np.argsort(scores[-40:]), np.argsort(evidence))  # ties ordered by the views
    assert np.all((scores > 0) & (scores < 1)) and np.all((reference_scores > 0) & (reference_scores < 1))


@pytest.mark.parametrize("fraction", [0.05, 0.1])
def test_a_fraction_cut_can_split_cells_that_tied_in_fishers_combination(fraction):
    scores, _ = _two_view_scores(*_views(np.random.default_rng(1)))
    calls = thr.call(scores, thr.fraction_threshold(scores, fraction))
    assert abs(calls.sum() - fraction * scores.size) <= 1
