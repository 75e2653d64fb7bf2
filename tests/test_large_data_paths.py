"""The large-data code paths of the library calls module IV and the layouts rely on.

scanpy, umap-learn and our own neighbour search switch algorithm with the
number of cells (scanpy's neighbours above 4,096 cells, umap-learn's above
4,096, ours above ``EXACT_PAIR_LIMIT`` query × index pairs). A path that only
runs on big data must still be exercised here, on data just past the switch.
"""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from acsleuth_core import neighbours
from acsleuth_core.layout import umap_2d
from acsleuth_core.subtypes import SubtypeConfig, find_subtypes, leiden_labels

#: just past the 4,096 cells where scanpy and umap-learn leave exact neighbours
PAST_SWITCH = 5000


def _two_groups(n: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % 2
    points = rng.normal(size=(n, dim)) + 8.0 * truth[:, None]
    return points.astype(np.float32), truth


@pytest.fixture
def approximate_neighbours(monkeypatch):
    """Send every neighbour search to the approximate index, as at a hundred thousand cells."""
    monkeypatch.setattr(neighbours, "EXACT_PAIR_LIMIT", 0)


def test_leiden_past_scanpys_switch_with_approximate_neighbours_finds_the_groups(approximate_neighbours):
    points, truth = _two_groups(PAST_SWITCH)
    labels = leiden_labels(points, resolution=0.1)
    assert labels.shape == (PAST_SWITCH,)
    assert adjusted_rand_score(truth, labels) > 0.99


def test_leiden_on_exact_neighbours_finds_the_groups():
    points, truth = _two_groups(600)
    assert adjusted_rand_score(truth, leiden_labels(points, resolution=0.1)) > 0.99


def test_umap_past_umap_learns_switch_keeps_the_groups_apart():
    points, truth = _two_groups(PAST_SWITCH)
    layout = umap_2d(points, seed=0)
    assert layout.shape == (PAST_SWITCH, 2) and np.isfinite(layout).all()
    centres = np.stack([layout[truth == g].mean(axis=0) for g in (0, 1)])
    spread = max(layout[truth == g].std(axis=0).max() for g in (0, 1))
    assert np.linalg.norm(centres[0] - centres[1]) > 3 * spread


def test_automatic_subtypes_on_thousands_of_cells_take_every_large_data_path(approximate_neighbours):
    """Above the silhouette's sample size and with approximate neighbours: the stage that crashed at scale."""
    z, truth = _two_groups(PAST_SWITCH + 1000, dim=16)
    zeta, _ = _two_groups(PAST_SWITCH + 1000, dim=16, seed=1)
    found = find_subtypes(z, zeta, SubtypeConfig(max_epochs=2, max_auto_k=3, seed=0))
    assert found.k_chosen == 2
    assert adjusted_rand_score(truth, found.labels) > 0.99


def test_leiden_gives_torch_back_the_thread_count_it_found(monkeypatch):
    """umap-learn's numba code can reset torch's intra-op thread count on first use; a changed count changes
    every later float sum, so a model trained after clustering would not repeat one trained before it."""
    import torch

    from acsleuth_core import subtypes

    real_graph = subtypes._fuzzy_knn_graph

    def graph_that_changes_threads(*args):
        torch.set_num_threads(2 if torch.get_num_threads() == 1 else 1)
        return real_graph(*args)

    monkeypatch.setattr(subtypes, "_fuzzy_knn_graph", graph_that_changes_threads)
    before = torch.get_num_threads()
    points, truth = _two_groups(300)
    labels = leiden_labels(points, resolution=0.1)
    assert torch.get_num_threads() == before
    assert adjusted_rand_score(truth, labels) > 0.99
