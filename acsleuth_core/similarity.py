"""A second view of novelty, free of reconstruction: how closely a cell matches its most similar reference cells.

Module I's reconstruction residual misses anomalies that its decoder can
rebuild from normal parts: cell lines absent from the reference, which differ
from it by the mix of genes they share, reconstruct almost as well as the
reference's own lines (README, "Real data"). What still sets them apart is
that no reference cell looks like them. This view measures it directly: cells
are projected onto the reference's principal axes (centred on the reference
mean, so a cell is described by how it departs from the average reference
cell), and a cell's dissimilarity is ``1 − mean cosine similarity`` to its
``k`` most similar reference cells. The neighbour search is the project's
linear-memory one (:func:`neighbours.nearest`); no cells × reference matrix is
formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .neighbours import nearest

#: principal axes of the reference the cells are compared on
N_COMPONENTS = 50
#: reference cells a cell is compared with
N_NEIGHBOURS = 15


@dataclass
class ReferenceSimilarity:
    """The reference's mean and principal axes, and its cells' unit directions on them."""

    mean: np.ndarray
    axes: np.ndarray
    reference_directions: np.ndarray
    n_neighbours: int = N_NEIGHBOURS

    @classmethod
    def fit(cls, reference: sp.spmatrix | np.ndarray, *, seed: int = 0) -> "ReferenceSimilarity":
        """Principal axes of these (log-normalised) reference cells, and the cells' directions on them."""
        from sklearn.decomposition import PCA

        X = sp.csr_matrix(reference, dtype=np.float32)
        n_components = max(1, min(N_COMPONENTS, X.shape[0] - 1, X.shape[1] - 1))
        # arpack centres a sparse matrix implicitly: no dense copy of the reference is made
        pca = PCA(n_components, svd_solver="arpack", random_state=seed).fit(X)
        mean, axes = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
        return cls(mean, axes, _directions(X, mean, axes), n_neighbours=min(N_NEIGHBOURS, X.shape[0]))

    def directions(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Unit vectors of ``(x − mean)`` projected on the axes, one row per cell."""
        return _directions(X, self.mean, self.axes)

    def dissimilarity(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """``1 − mean cosine similarity`` to the most similar reference cells, in [0, 2] (0 = a reference twin)."""
        _, distances = nearest(self.reference_directions, self.directions(X), self.n_neighbours)
        # for unit vectors ‖a − b‖² = 2 (1 − cos)
        return (distances.astype(np.float64) ** 2 / 2.0).mean(axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to save beside the model (see :meth:`from_arrays`)."""
        return {
            "similarity_mean": self.mean,
            "similarity_axes": self.axes,
            "similarity_directions": self.reference_directions,
            "similarity_neighbours": np.array(self.n_neighbours),
        }

    @classmethod
    def from_arrays(cls, arrays) -> "ReferenceSimilarity":
        return cls(
            mean=arrays["similarity_mean"],
            axes=arrays["similarity_axes"],
            reference_directions=arrays["similarity_directions"],
            n_neighbours=int(arrays["similarity_neighbours"]),
        )


def _directions(X: sp.spmatrix | np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    X = sp.csr_matrix(X, dtype=np.float32)
    projected = np.asarray(X @ axes.T) - mean @ axes.T
    norms = np.linalg.norm(projected, axis=1, keepdims=True)
    return (projected / np.maximum(norms, 1e-12)).astype(np.float32)
