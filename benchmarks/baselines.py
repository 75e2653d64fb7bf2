"""Reference-fitted anomaly scorers the detection suite compares ACsleuth with.

Each ``fit_*(X_fit, seed, pca_input)`` fits on log-normalised reference cells and
returns ``score(X)``, higher = more anomalous:

* ``fit_isolation_forest``: IsolationForest (sklearn) in a 50-component PCA of
  the fit part; score = ``−score_samples``;
* ``fit_knn_distance``: mean distance to the 15 nearest fit-part cells in that PCA;
* ``fit_scmap_cluster``: scmap-cluster style: Leiden clusters (scanpy, igraph
  flavour, resolution 1.0, 15-NN graph on that PCA) of the fit part, centroids =
  mean log expression; score = ``1 − max`` Pearson correlation to a centroid
  (scmap itself selects 500 genes with M3Drop and combines three similarities;
  this keeps its idea, not its details);
* ``fit_pca_error``: squared reconstruction error in that PCA.

The PCA input is each gene z-scored with the fit part's mean and standard
deviation and clipped at ±10 (``pca_input="zscore"``, as in scanpy's and
Seurat's standard workflow), or the log expression as is (``"log"``).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

PCA_INPUTS = ("zscore", "log")
ZSCORE_CLIP = 10.0
N_PCS = 50
N_NEIGHBOURS = 15
LEIDEN_RESOLUTION = 1.0
CHUNK = 4096


def _dense_chunks(X) -> Iterator[np.ndarray]:
    """Dense float64 row blocks of a sparse matrix."""
    for start in range(0, X.shape[0], CHUNK):
        yield X[start : start + CHUNK].toarray().astype(np.float64)


def _fit_pca(X_fit, seed: int, pca_input: str) -> Callable[[object], np.ndarray]:
    """PCA (up to 50 components) of the fit part; returns a projector for any cells.

    ``pca_input``: "zscore" standardises each gene with the fit part's mean and
    standard deviation (constant genes get 1) and clips at ±10; "log" uses the
    log expression as is (PCA centres it).
    """
    from sklearn.decomposition import PCA

    dense = X_fit.toarray().astype(np.float64)
    if pca_input == "zscore":
        mean, sd = dense.mean(axis=0), dense.std(axis=0)
        sd[sd == 0] = 1.0
        transform = lambda block: np.clip((block - mean) / sd, -ZSCORE_CLIP, ZSCORE_CLIP)  # noqa: E731
    elif pca_input == "log":
        transform = lambda block: block  # noqa: E731
    else:
        raise ValueError(f"pca_input must be one of {', '.join(PCA_INPUTS)}, not {pca_input!r}")
    n_components = min(N_PCS, X_fit.shape[0] - 1, X_fit.shape[1])
    pca = PCA(n_components=n_components, random_state=seed).fit(transform(dense))
    return lambda X: np.vstack([pca.transform(transform(block)) for block in _dense_chunks(X)])


def fit_isolation_forest(X_fit, seed: int, pca_input: str) -> Callable:
    """Isolation forest in the fit part's PCA; score = ``−score_samples``."""
    from sklearn.ensemble import IsolationForest

    project = _fit_pca(X_fit, seed, pca_input)
    forest = IsolationForest(random_state=seed).fit(project(X_fit))
    return lambda X: -forest.score_samples(project(X))


def fit_knn_distance(X_fit, seed: int, pca_input: str) -> Callable:
    """Mean distance to the 15 nearest fit-part cells in the fit part's PCA."""
    from sklearn.neighbors import NearestNeighbors

    project = _fit_pca(X_fit, seed, pca_input)
    index = NearestNeighbors(n_neighbors=N_NEIGHBOURS).fit(project(X_fit))
    return lambda X: index.kneighbors(project(X))[0].mean(axis=1)


def fit_scmap_cluster(X_fit, seed: int, pca_input: str) -> Callable:
    """Leiden clusters of the fit part; score = 1 − max Pearson correlation to a cluster centroid."""
    labels = _leiden_labels(_fit_pca(X_fit, seed, pca_input)(X_fit), seed)
    centroids = np.vstack([np.asarray(X_fit[labels == k].mean(axis=0)).ravel() for k in np.unique(labels)])
    centroids = _row_standardise(centroids)

    def score(X) -> np.ndarray:
        best = [np.max(_row_standardise(block) @ centroids.T, axis=1) for block in _dense_chunks(X)]
        return 1.0 - np.concatenate(best)

    return score


def _leiden_labels(pcs: np.ndarray, seed: int) -> np.ndarray:
    """Leiden clusters (scanpy, igraph flavour) on the 15-NN graph of ``pcs``."""
    import anndata as ad
    import scanpy as sc

    cells = ad.AnnData(np.zeros((pcs.shape[0], 0), dtype=np.float32), obsm={"X_pca": pcs})
    sc.pp.neighbors(cells, n_neighbors=N_NEIGHBOURS, use_rep="X_pca", random_state=seed)
    sc.tl.leiden(
        cells, resolution=LEIDEN_RESOLUTION, random_state=seed, flavor="igraph", n_iterations=2, directed=False
    )
    return cells.obs["leiden"].astype(int).to_numpy()


def _warm_up_leiden() -> None:
    """Cluster random points once: compiles scanpy's numba neighbour code outside the timer."""
    _leiden_labels(np.random.default_rng(0).normal(size=(100, 10)), 0)


def _row_standardise(X: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (so a dot product is a Pearson correlation; constant rows → 0)."""
    centred = X - X.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


def fit_pca_error(X_fit, seed: int, pca_input: str) -> Callable:
    """Squared reconstruction error in the fit part's PCA (of z-scored genes)."""
    from sklearn.decomposition import PCA

    dense = X_fit.toarray().astype(np.float64)
    mean, sd = dense.mean(axis=0), dense.std(axis=0)
    sd[sd == 0] = 1.0
    z = lambda X: np.clip((X.toarray() - mean) / sd, -ZSCORE_CLIP, ZSCORE_CLIP)  # noqa: E731
    pca = PCA(min(N_PCS, X_fit.shape[0] - 1, X_fit.shape[1]), random_state=seed).fit(z(X_fit))

    def score(X) -> np.ndarray:
        values = z(X)
        return ((values - pca.inverse_transform(pca.transform(values))) ** 2).mean(axis=1)

    return score
