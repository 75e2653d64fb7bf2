"""Corrected expression from kin pairs: measured expression minus the batch effect where each cell sits.

For a target cell called normal and its kin reference cell (module II), ``x − r`` is the batch effect
plus whatever tells the two cells apart. Averaged over a cell's nearest normal cells of its own sample
(Gaussian weights on distances in the module-I latent), the cell-to-cell part cancels and the batch
effect stays, local enough to follow an effect that differs between cell types. Every target cell,
anomalies included, gets that local estimate subtracted from its *measured* log expression, so it keeps
what makes it itself; values below :data:`EXPRESSION_FLOOR` are stored as zero (log expression is never
negative), which keeps a measured zero at zero wherever the batch raised that gene.

Work is done sample by sample and in row chunks: memory grows with cells × genes of one chunk, never
with cells².
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp

from .neighbours import nearest
from .progress import CancelToken, check_cancel
from .runtime import dense_batch_rows

#: corrected log expression below this is stored as zero, which keeps the corrected layer sparse
EXPRESSION_FLOOR = 0.01


@dataclass(frozen=True)
class ShiftConfig:
    """``neighbours``: normal cells of the same sample whose kin differences estimate a cell's batch effect."""

    neighbours: int = 50

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be at least 1, not {self.neighbours}")

    def to_json(self) -> dict:
        return asdict(self)


def shift_corrected_expression(
    target: sp.csr_matrix,
    latent: np.ndarray,
    batches: np.ndarray,
    normal: np.ndarray,
    kin_rows: np.ndarray,
    reference: sp.csr_matrix,
    config: ShiftConfig = ShiftConfig(),
    cancel: Optional[CancelToken] = None,
) -> sp.csr_matrix:
    """Batch-corrected log expression of every target cell, in the target's row order (CSR, float32).

    ``latent``: module-I latent of every target cell; ``normal``: the cells that have a kin;
    ``kin_rows``: reference row of each normal cell's kin, in the order of ``np.flatnonzero(normal)``.
    """
    target, reference = sp.csr_matrix(target, dtype=np.float32), sp.csr_matrix(reference, dtype=np.float32)
    batches = np.asarray(batches).astype(str)
    normal_rows = np.flatnonzero(normal)
    if len(kin_rows) != len(normal_rows):
        raise ValueError(f"{len(kin_rows)} kin rows were given for {len(normal_rows)} normal cells")
    blocks, order = [], []
    for batch in map(str, np.unique(batches)):
        rows = np.flatnonzero(batches == batch)
        in_batch = batches[normal_rows] == batch
        if not in_batch.any():
            raise ValueError(f"sample {batch!r} has no cell with a kin, so its batch effect cannot be estimated")
        sources, kins = normal_rows[in_batch], np.asarray(kin_rows)[in_batch]
        weights = _neighbour_weights(latent[rows], latent[sources], config.neighbours)
        differences = (target[sources] - reference[kins]).tocsr()
        step = dense_batch_rows(target.shape[1])
        for start in range(0, rows.size, step):
            check_cancel(cancel)
            chunk = slice(start, start + step)
            shift = (weights[chunk] @ differences).toarray()
            values = target[rows[chunk]].toarray() - shift
            blocks.append(sp.csr_matrix(np.where(values >= EXPRESSION_FLOOR, values, 0.0).astype(np.float32)))
        order.append(rows)
    stacked = sp.vstack(blocks, format="csr")
    return stacked[np.argsort(np.concatenate(order), kind="stable")]


def _neighbour_weights(queries: np.ndarray, sources: np.ndarray, k: int) -> sp.csr_matrix:
    """Row-normalised Gaussian weights of each query's ``k`` nearest sources (queries × sources, sparse).

    The width is the median distance to the k-th neighbour; distances are taken relative to each
    row's nearest one, so a query far from every source still gets finite weights.
    """
    k = min(k, sources.shape[0])
    indices, distances = nearest(sources, queries, k)
    squared = distances.astype(np.float64) ** 2
    width = float(np.median(squared[:, -1])) or 1.0
    weights = np.exp(-(squared - squared[:, :1]) / width)
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(queries.shape[0]), k)
    return sp.csr_matrix((weights.ravel(), (rows, indices.ravel())), shape=(queries.shape[0], sources.shape[0]))
