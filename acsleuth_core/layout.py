"""2-D layouts (UMAP) of reference and target cells before and after batch correction.

The Correct page plots these; the table also carries each target cell's kin so
kin pairs can be drawn as segments. Above ``max_cells`` a random sample (fixed
seed) is laid out, so the plot and the time stay bounded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import keys
from .correction import REFERENCE_BATCH, CorrectionResult

#: columns of the layout table
CELL, SOURCE, IS_REFERENCE = "cell", "source", "is_reference"
BEFORE = ("umap_before_1", "umap_before_2")
AFTER = ("umap_after_1", "umap_after_2")
DEFAULT_MAX_CELLS = 20_000


def umap_2d(embedding: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """UMAP coordinates (cells × 2) of an embedding, reproducible for a seed."""
    import umap

    n_neighbors = max(2, min(n_neighbors, embedding.shape[0] - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, min_dist=0.3, n_jobs=1)
    return reducer.fit_transform(np.asarray(embedding, dtype=np.float32)).astype(np.float32)


def correction_layout(
    adata, result: CorrectionResult, reference_names: pd.Index, *, max_cells: int = DEFAULT_MAX_CELLS, seed: int = 0
) -> pd.DataFrame:
    """One row per laid-out cell: name, source (batch or ``reference``), anomaly call, kin,
    kin confidence, and UMAP coordinates before (module-I latent) and after (corrected latent)."""
    n_target = adata.n_obs
    table = pd.DataFrame(
        {
            CELL: np.concatenate([adata.obs_names.to_numpy(), np.asarray(reference_names)]),
            SOURCE: np.concatenate([adata.obs[keys.BATCH].astype(str).to_numpy(), np.full(len(reference_names), REFERENCE_BATCH)]),
            IS_REFERENCE: np.arange(n_target + len(reference_names)) >= n_target,
            keys.ANOMALY: np.concatenate([adata.obs[keys.ANOMALY].to_numpy(bool), np.zeros(len(reference_names), bool)]),
            keys.KIN: np.concatenate([np.asarray(result.kin.astype(object)), np.full(len(reference_names), None)]),
            keys.KIN_CONFIDENCE: np.concatenate([result.kin_confidence, np.full(len(reference_names), np.nan, np.float32)]),
        }
    )
    rows = _sample_rows(len(table), max_cells, seed)
    before = np.vstack([adata.obsm[keys.LATENT], result.reference_latent])[rows]
    after = np.vstack([result.corrected_latent, result.reference_corrected_latent])[rows]
    table = table.iloc[rows].reset_index(drop=True)
    table[list(BEFORE)] = umap_2d(before, seed)
    table[list(AFTER)] = umap_2d(after, seed)
    table[keys.KIN] = table[keys.KIN].astype(str).where(table[keys.KIN].notna(), "")
    return table


def kin_segments(layout: pd.DataFrame, columns: tuple[str, str], n_pairs: int, seed: int = 0) -> pd.DataFrame:
    """Up to ``n_pairs`` kin pairs whose two cells are both laid out, as ``x0, y0, x1, y1`` rows."""
    positions = layout[layout[IS_REFERENCE]].set_index(CELL)[list(columns)]
    targets = layout[(layout[keys.KIN] != "") & layout[keys.KIN].isin(positions.index)]
    if len(targets) > n_pairs:
        targets = targets.sample(n_pairs, random_state=seed)
    start = targets[list(columns)].to_numpy()
    end = positions.loc[targets[keys.KIN]].to_numpy()
    return pd.DataFrame({"x0": start[:, 0], "y0": start[:, 1], "x1": end[:, 0], "y1": end[:, 1], CELL: targets[CELL].to_numpy()})


def _sample_rows(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
