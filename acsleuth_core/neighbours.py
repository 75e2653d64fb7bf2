"""k-nearest-neighbour search with memory and time linear in the number of query cells.

Small problems get exact neighbours (scikit-learn, distances computed in
bounded row chunks); large ones an approximate index (PyNNDescent, which
umap-learn already depends on). Neither ever holds a query × index matrix.
"""

from __future__ import annotations

import numpy as np
import sklearn
from sklearn.neighbors import NearestNeighbors

#: above this many query × index pairs, exact search costs too much time and the ANN index is used
EXACT_PAIR_LIMIT = 4e8
#: scikit-learn's working memory for one chunk of distances, in MiB
CHUNK_MIB = 128


def nearest(
    index_points: np.ndarray, queries: np.ndarray, k: int, *, seed: int = 0, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and Euclidean distances (rows sorted near → far) of each query's ``k`` nearest index points.

    With ``exclude_self`` the queries are the index points themselves and each
    point's own row is left out of its neighbours.
    """
    index_points = np.ascontiguousarray(index_points, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    extra = 1 if exclude_self else 0
    k_search = min(k + extra, index_points.shape[0])
    if k_search - extra < 1:
        raise ValueError("nearest-neighbour search needs at least one candidate point")
    if float(index_points.shape[0]) * queries.shape[0] <= EXACT_PAIR_LIMIT:
        with sklearn.config_context(working_memory=CHUNK_MIB):
            distances, indices = NearestNeighbors(n_neighbors=k_search).fit(index_points).kneighbors(queries)
    else:
        indices, distances = _approximate(index_points, queries, k_search, seed)
    if exclude_self:
        indices, distances = _drop_self(indices, distances)
    return indices.astype(np.int64), distances.astype(np.float32)


def _approximate(index_points: np.ndarray, queries: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pynndescent import NNDescent

    index = NNDescent(index_points, n_neighbors=max(k, 15), random_state=seed, low_memory=True)
    return index.query(queries, k=k)


def _drop_self(indices: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index (or, where ties hid it, the last neighbour)."""
    own = np.arange(indices.shape[0])[:, None]
    is_self = indices == own
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    keep = ~is_self
    k = indices.shape[1] - 1
    return indices[keep].reshape(-1, k), distances[keep].reshape(-1, k)
