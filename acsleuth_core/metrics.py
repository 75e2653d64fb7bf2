"""Quality metrics of batch correction, computed on a kNN graph of an embedding.

* **kNN batch entropy**: for each cell, the Shannon entropy of the batches
  among its ``k`` neighbours, divided by ``log(number of batches)`` so 0 means
  every neighbour is from the cell's own batch and 1 means all batches are
  equally represented; averaged over cells.
* **iLISI** (normalised): the inverse Simpson index of neighbour batches,
  rescaled from ``[1, n_batches]`` to ``[0, 1]``.
* **kNN label purity**: the share of each cell's neighbours that carry its own
  label (cell type), averaged over cells: how much biology a correction keeps.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from .neighbours import nearest

DEFAULT_K = 15


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
