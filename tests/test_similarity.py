"""The reference-similarity view of novelty."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

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
