"""Quality metrics of batch correction, computed on a kNN graph of an embedding.

* **kNN batch entropy**: for each cell, the Shannon entropy of the batches
  among its ``k`` neighbours, divided by ``log(number of batches)`` so 0 means
  every neighbour is from the cell's own batch and 1 means all batches are
  equally represented; averaged over cells.
* **iLISI** (normalised): the inverse Simpson index of neighbour batches,
  rescaled from ``[1, n_batches]`` to ``[0, 1]``.
* **kNN label purity**: the share of each cell's neighbours that carry its own
  label (cell type), averaged over cells: how much biology a correction keeps.
* **label ASW**: the average silhouette width of the labels, rescaled from
  ``[-1, 1]`` to ``[0, 1]`` (on a seeded sample of at most
  :data:`ASW_SAMPLE` cells, so its cost does not grow with cells²).
* **reference transfer**: the share of target cells whose ``k`` nearest
  *reference* cells vote (majority) for the target cell's own label: whether
  corrected cells land on reference cells of their own kind.

:class:`PrincipalAxes` gives the spaces the expression metrics are measured in:
principal axes of log expression, fitted on a bounded sample of cells.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .neighbours import nearest
from .runtime import dense_batch_rows

DEFAULT_K = 15
#: most cells the label silhouette is computed on (a seeded sample above that)
ASW_SAMPLE = 5000
#: most cells :class:`PrincipalAxes` are fitted on (a seeded sample above that)
PCA_FIT_CELLS = 20000
PCA_COMPONENTS = 50


def batch_entropy(embedding: np.ndarray, batches: np.ndarray, k: int = DEFAULT_K, seed: int = 0) -> float:
    """Mean normalised kNN batch entropy in ``[0, 1]`` (1 = batches fully mixed)."""
    return _batch_entropy(_neighbours(embedding, k, seed), batches)


def ilisi(embedding: np.ndarray, batches: np.ndarray, k: int = DEFAULT_K, seed: int = 0) -> float:
    """Mean inverse Simpson index of neighbour batches, rescaled to ``[0, 1]`` (1 = fully mixed)."""
    return _ilisi(_neighbours(embedding, k, seed), batches)


def label_purity(embedding: np.ndarray, labels: np.ndarray, k: int = DEFAULT_K, seed: int = 0) -> float:
    """Mean share of each cell's ``k`` neighbours that carry its own label."""
    return _label_purity(_neighbours(embedding, k, seed), labels)


def correction_metrics(
    embedding: np.ndarray, batches: np.ndarray, labels: Optional[np.ndarray] = None, k: int = DEFAULT_K, seed: int = 0
) -> dict[str, float]:
    """``batch_entropy``, ``ilisi`` and, when ``labels`` are given, ``label_purity``, from one kNN graph."""
    indices = _neighbours(embedding, k, seed)
    out = {"batch_entropy": _batch_entropy(indices, batches), "ilisi": _ilisi(indices, batches)}
    if labels is not None:
        out["label_purity"] = _label_purity(indices, labels)
    return out


def label_asw(embedding: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Silhouette width of ``labels`` in ``embedding``, rescaled to ``[0, 1]`` (1 = labels tight and apart)."""
    from sklearn.metrics import silhouette_score

    codes, n_labels = _codes(labels)
    if n_labels < 2 or n_labels >= len(codes):
        return float("nan")
    sample = ASW_SAMPLE if len(codes) > ASW_SAMPLE else None
    return float((silhouette_score(embedding, codes, sample_size=sample, random_state=seed) + 1) / 2)


def reference_transfer(
    reference: np.ndarray, reference_labels: np.ndarray, targets: np.ndarray, target_labels: np.ndarray,
    k: int = DEFAULT_K, seed: int = 0,
) -> float:
    """Share of target cells whose ``k`` nearest reference cells' majority label is their own label."""
    indices, _ = nearest(reference, targets, k, seed=seed)
    codes, uniques = pd.factorize(pd.Series(np.concatenate([reference_labels, target_labels])).astype(str))
    reference_codes, target_codes = codes[: len(reference_labels)], codes[len(reference_labels) :]
    votes = _neighbour_shares(reference_codes[indices], len(uniques))
    return float(np.mean(votes.argmax(axis=1) == target_codes))


class PrincipalAxes:
    """Principal axes of cells' log expression; projects any cells on the same genes onto them."""

    def __init__(self, X, n_components: int = PCA_COMPONENTS, seed: int = 0):
        from sklearn.decomposition import PCA

        rows = np.arange(X.shape[0])
        if rows.size > PCA_FIT_CELLS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, PCA_FIT_CELLS, replace=False))
        sample = _dense(X[rows])
        n_components = max(1, min(n_components, sample.shape[0] - 1, sample.shape[1]))
        self._pca = PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit(sample)

    def transform(self, X) -> np.ndarray:
        """Coordinates of the rows of ``X`` (sparse or dense), projected chunk by chunk."""
        step = dense_batch_rows(X.shape[1])
        return np.vstack(
            [self._pca.transform(_dense(X[start : start + step])) for start in range(0, X.shape[0], step)]
        ).astype(np.float32)


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def _neighbours(embedding: np.ndarray, k: int, seed: int) -> np.ndarray:
    indices, _ = nearest(embedding, embedding, k, seed=seed, exclude_self=True)
    return indices


def _codes(labels: np.ndarray) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(pd.Series(np.asarray(labels)).astype(str))
    return codes, len(uniques)


def _batch_entropy(indices: np.ndarray, batches: np.ndarray) -> float:
    codes, n_batches = _codes(batches)
    if n_batches < 2:
        return float("nan")
    shares = _neighbour_shares(codes[indices], n_batches)
    logs = np.log(np.where(shares > 0, shares, 1.0))
    entropy = -(shares * logs).sum(axis=1)
    return float(np.mean(entropy / np.log(n_batches)))


def _ilisi(indices: np.ndarray, batches: np.ndarray) -> float:
    codes, n_batches = _codes(batches)
    if n_batches < 2:
        return float("nan")
    simpson = 1.0 / (_neighbour_shares(codes[indices], n_batches) ** 2).sum(axis=1)
    return float(np.mean((simpson - 1) / (n_batches - 1)))


def _label_purity(indices: np.ndarray, labels: np.ndarray) -> float:
    codes, _ = _codes(labels)
    return float(np.mean(codes[indices] == codes[:, None]))


def _neighbour_shares(neighbour_codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Row-wise share of each code among a cell's neighbours (cells × codes)."""
    rows = np.repeat(np.arange(neighbour_codes.shape[0]), neighbour_codes.shape[1])
    counts = np.zeros((neighbour_codes.shape[0], n_codes), dtype=np.float64)
    np.add.at(counts, (rows, neighbour_codes.ravel()), 1.0)
    return counts / neighbour_codes.shape[1]
