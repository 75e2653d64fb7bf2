"""Which anomalous cells look like reference cells: a check on the call, per subtype and per cell.

A label-free threshold lets some normal cells through. They are few and of
several types, so module IV tends to gather them into small subtypes of their
own. Such a subtype is told apart by where its cells sit among the reference
cells: in a PCA of reference and anomalous cells together, a cell of a type
missing from the reference has few reference cells among its nearest
neighbours, while a normal cell past the threshold has about as many as the
reference's share of all cells would give by chance.

The PCA is fitted on a uniform sample of reference and anomalous cells: a
fit on every reference cell but only some anomalies would spread the fitted
cells more than the others on the noise axes and bias the neighbours by kind.

Per subtype, ``mixing`` is the mean share of reference cells among its cells'
nearest neighbours divided by that chance share; a subtype with ``mixing ≥
RESEMBLANCE_LEVEL`` is flagged as resembling the reference. A subtype's cells
are judged on at most (its size − 1) neighbours, so that a small subtype of
a new type, whose cells are nearest to each other, is not pushed among
reference cells by a neighbour count larger than itself; subtypes of fewer
than ``MIN_CELLS`` cells are not judged (``mixing`` missing, not flagged).
Each cell also has its own ``mixing`` (its share over chance). A cell
*resembles the reference* when its subtype is flagged and its own mixing
reaches the same level (:func:`cells_like_reference`): a subtype can gather
a few cells of a rare new type together with normal cells past the threshold
(on the demo, 13 progenitors with 17 normal cells: subtype mixing 0.70, the
progenitors' own 0.00–0.86, 11 of 13 below 0.5; the normal cells 0.5–1.6), and
the cells of the new type keep their few reference neighbours. By default the
subtype stage calls the cells that resemble the reference normal
(:mod:`subtyping`, :mod:`calls`); users can keep them instead, since an anomaly
that is a changed state of a normal type, not a new type, can mix with its
type's reference cells too.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .neighbours import nearest
from .runtime import dense_batch_rows

#: a subtype whose cells have at least this share of the chance rate of reference neighbours resembles the reference
RESEMBLANCE_LEVEL = 0.5
#: reference cells drawn (at random, seeded) as neighbour candidates: bounds the cost on large references
MAX_REFERENCE_CELLS = 5000
#: cells the shared PCA is fitted on (a uniform sample of reference candidates and anomalies) ...
MAX_FIT_CELLS = 10000
#: ... and at most this many values (cells × genes) in that dense sample, so many genes mean fewer cells
MAX_FIT_VALUES = 50_000_000
#: subtypes with fewer cells are not judged
MIN_CELLS = 3
#: principal components of the shared PCA
N_COMPONENTS = 30
#: columns of the per-subtype table
COLUMNS = (
    "subtype", "cells", "neighbours", "reference_neighbours", "chance", "mixing", "resembles_reference", "cells_like_reference",
)


def cell_resemblance(
    anomalies: sp.spmatrix | np.ndarray,
    reference: sp.spmatrix | np.ndarray,
    subtypes: np.ndarray,
    *,
    n_neighbors: int = 15,
    seed: int = 0,
) -> pd.DataFrame:
    """Per anomalous cell, in order: its subtype, the neighbours it is judged on, the share of reference
    cells among them, the chance share and their ratio (``mixing``; missing in subtypes too small to judge).

    ``anomalies`` and ``reference`` are log expression on the same genes (rows:
    cells); ``subtypes`` names each anomalous cell's subtype.
    """
    subtypes = np.asarray(subtypes).astype(str)
    rng = np.random.default_rng(seed)
    reference = _sample_rows(reference, MAX_REFERENCE_CELLS, rng)
    n_reference, n_cells = reference.shape[0], reference.shape[0] + anomalies.shape[0]
    embedded = _shared_pca(reference, anomalies, rng, seed)
    is_reference = np.arange(n_cells) < n_reference
    neighbours, _ = nearest(embedded, embedded, n_neighbors, seed=seed, exclude_self=True)
    reference_counts = np.cumsum(is_reference[neighbours[~is_reference]], axis=1)  # among the first j + 1
    _, subtype_of_cell, sizes = np.unique(subtypes, return_inverse=True, return_counts=True)
    k = np.minimum(reference_counts.shape[1], sizes - 1)[subtype_of_cell]
    share = np.full(subtypes.size, np.nan)
    ok = k >= max(MIN_CELLS - 1, 1)
    share[ok] = reference_counts[ok, k[ok] - 1] / k[ok]
    chance = n_reference / (n_cells - 1)
    return pd.DataFrame(
        {"subtype": subtypes, "neighbours": np.where(ok, k, 0), "share": share, "chance": chance, "mixing": share / chance}
    )


def subtype_resemblance(cells: pd.DataFrame) -> pd.DataFrame:
    """Per subtype, from :func:`cell_resemblance`'s rows: cells, neighbours judged per cell, mean share of
    reference cells among them, the chance share, their ratio (``mixing``), whether it reaches
    :data:`RESEMBLANCE_LEVEL`, and how many of its cells resemble the reference (:func:`cells_like_reference`)."""
    table = (
        cells.groupby("subtype", sort=False)
        .agg(
            cells=("share", "size"), neighbours=("neighbours", "first"), reference_neighbours=("share", "mean"),
            chance=("chance", "first"),
        )
        .reset_index()
    )
    table["mixing"] = table["reference_neighbours"] / table["chance"]
    table["resembles_reference"] = (table["mixing"] >= RESEMBLANCE_LEVEL).to_numpy(dtype=bool)
    like = pd.Series(cells_like_reference(cells, table)).groupby(cells["subtype"].to_numpy()).sum()
    table["cells_like_reference"] = table["subtype"].map(like).astype(int)
    table = table.sort_values("subtype", key=lambda names: pd.to_numeric(names, errors="coerce"), kind="stable")
    return table.reset_index(drop=True)[list(COLUMNS)]


def cells_like_reference(cells: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """Per row of :func:`cell_resemblance`: True where the cell's subtype resembles the reference and the
    cell's own ``mixing`` reaches :data:`RESEMBLANCE_LEVEL` too."""
    flagged = cells["subtype"].isin(resembling_subtypes(table)).to_numpy()
    return flagged & (cells["mixing"].to_numpy(dtype=np.float64) >= RESEMBLANCE_LEVEL)


def resembling_subtypes(table: pd.DataFrame) -> list[str]:
    """Names of the subtypes flagged as resembling the reference."""
    return table.loc[table["resembles_reference"].astype(bool), "subtype"].astype(str).tolist()


def describe_resemblance(table: pd.DataFrame, called_normal: Optional[int] = None) -> str | None:
    """A sentence naming the subtypes that resemble the reference and, when ``called_normal`` is given,
    how many of their cells were called normal (None when no subtype resembles the reference)."""
    flagged = table[table["resembles_reference"].astype(bool)]
    if flagged.empty:
        return None
    names = ", ".join(flagged["subtype"].astype(str))
    mixing = ", ".join(f"{m:.2f}" for m in flagged["mixing"])
    plural = len(flagged) > 1
    they, them, their = ("They are", "them", "their") if plural else ("It is", "it", "its")
    n_cells = int(flagged["cells"].sum())
    if called_normal is None:
        advice = f"; check the markers vs the reference before reading {them} as anomalies."
    else:
        called = (
            f", so all {their} cells are called normal" if called_normal == n_cells
            else f"; the {called_normal:,} of {their} cells that also mix with the reference on their own are called "
            f"normal, the other {n_cells - called_normal:,} {'stays' if n_cells - called_normal == 1 else 'stay'} anomalous"
        )
        advice = f"{called}. To keep them anomalous, find subtypes again without calling cells like the reference normal."
    return (
        f"Subtype{'s' if plural else ''} {names} ({n_cells:,} cells) "
        f"{'resemble' if plural else 'resembles'} the reference: {'their' if plural else 'its'} cells have "
        f"{mixing} times the chance share of reference cells among their nearest neighbours, where a cell type "
        f"missing from the reference has few (threshold {RESEMBLANCE_LEVEL}). "
        f"{they} probably normal cells past the anomaly threshold{advice}"
    )


def _shared_pca(
    reference: sp.spmatrix | np.ndarray, anomalies: sp.spmatrix | np.ndarray, rng: np.random.Generator, seed: int
) -> np.ndarray:
    """Reference then anomalous cells on the principal axes of a uniform sample of both."""
    from sklearn.decomposition import PCA

    n_reference, n_cells = reference.shape[0], reference.shape[0] + anomalies.shape[0]
    n_fit = max(2, min(n_cells, MAX_FIT_CELLS, MAX_FIT_VALUES // max(reference.shape[1], 1)))
    fitted = np.sort(rng.choice(n_cells, n_fit, replace=False))
    in_reference = fitted < n_reference
    fit_rows = np.vstack([_dense(reference[fitted[in_reference]]), _dense(anomalies[fitted[~in_reference] - n_reference])])
    n_components = min(N_COMPONENTS, fit_rows.shape[0] - 1, fit_rows.shape[1])
    pca = PCA(n_components, random_state=seed).fit(fit_rows)
    return np.vstack([_embedded(pca, reference), _embedded(pca, anomalies)])


def _sample_rows(values: sp.spmatrix | np.ndarray, limit: int, rng: np.random.Generator) -> sp.spmatrix | np.ndarray:
    """At most ``limit`` rows, drawn without replacement and kept in order."""
    if values.shape[0] <= limit:
        return values
    return values[np.sort(rng.choice(values.shape[0], limit, replace=False))]


def _embedded(pca, values: sp.spmatrix | np.ndarray) -> np.ndarray:
    """``values`` on the principal axes, a bounded block of rows at a time (fewer rows when genes are many)."""
    step = dense_batch_rows(values.shape[1])
    blocks = [pca.transform(_dense(values[start : start + step])) for start in range(0, values.shape[0], step)]
    return np.vstack(blocks).astype(np.float32)


def _dense(values: sp.spmatrix | np.ndarray) -> np.ndarray:
    return np.asarray(values.toarray() if sp.issparse(values) else values, dtype=np.float32)
