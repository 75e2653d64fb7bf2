"""Anomaly subtypes over an annotated result: module IV's inputs, clustering, markers, keys.

``subtype_anomalies`` takes the cells past the anomaly threshold, embeds their
log expression and module I's residuals of it as tokens (:mod:`subtypes`),
clusters them, checks which subtypes look like reference cells, i.e. normal
cells past the threshold (:mod:`resemblance`), and finds marker genes
(:mod:`markers`). By default the cells that look like reference cells (their
subtype does, and so do their own neighbours) are then called normal
(:mod:`calls`): on the benchmarks the subtypes so flagged held normal cells,
or a rare new type whose own cells stay called (README, "Subtypes that
resemble the reference").

When a correction exists (and ``use_correction``), the expression is
batch-adjusted in gene space with the kin pairs of module II: each batch is
shifted by the mean gap between its normal cells and their kin reference
cells (:func:`kin_batch_shifts`). Module III's corrected layer is not used
here: its decoder was trained to produce reference cells, so it draws
anomalous cells towards normal types and blurs what sets them apart (on the
demo, k-means of that layer cannot separate the progenitors from the B cells).
Markers are tested on the measured log expression, not on any corrected one, as
scanpy and Seurat advise for integrated data. ``annotate_subtypes`` writes
the result under the documented keys. Re-running it with another k or
resolution needs no GAN training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import keys
from .calls import refresh_calls, threshold_calls, threshold_changed_since
from .detect import AnomalyDetector
from .errors import InputError
from .layout import CELL, umap_2d
from .markers import subtype_markers
from .model_inputs import ModelInputs
from .progress import CancelToken, ProgressCallback
from .resemblance import cell_resemblance, cells_like_reference, subtype_resemblance
from .subtypes import SubtypeConfig, Subtypes, check_enough_anomalies, find_subtypes, principal_tokens


#: UMAP columns of :func:`subtype_layout`
UMAP = ("umap_1", "umap_2")


@dataclass
class SubtypeResult:
    """Module IV's result for the cells past the threshold, plus marker tables and the resemblance check.

    ``anomalous`` marks the cells past the threshold (all clustered); over those cells, ``like_reference``
    marks the ones that resemble the reference (:func:`resemblance.cells_like_reference`) and ``kept``
    the ones that stay anomalous: all, or (``reference_like_normal``) the others.
    """

    anomalous: np.ndarray
    subtypes: Subtypes
    markers: dict[str, pd.DataFrame]
    resemblance: pd.DataFrame
    like_reference: np.ndarray
    used_correction: bool
    config: SubtypeConfig
    reference_like_normal: bool

    @property
    def names(self) -> np.ndarray:
        """Subtype names ("1", "2", …) of the clustered cells."""
        return _names(self.subtypes.labels)

    @property
    def kept(self) -> np.ndarray:
        """Over the clustered cells: True where the cell stays called anomalous."""
        return _kept(self.like_reference, self.reference_like_normal)

    @property
    def kept_subtypes(self) -> list[str]:
        """Names of the subtypes whose cells stay called anomalous, in order."""
        return sorted({str(name) for name in self.names[self.kept]}, key=int)


def subtype_anomalies(
    adata: ad.AnnData,
    inputs: ModelInputs,
    detector: AnomalyDetector,
    config: SubtypeConfig = SubtypeConfig(),
    *,
    use_correction: bool = True,
    reference_like_normal: bool = True,
    n_marker_genes: int = 25,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> SubtypeResult:
    """Split the cells past the anomaly threshold in ``adata`` into subtypes (``adata`` is not modified).

    With ``reference_like_normal``, the cells of subtypes that resemble the reference are to be called
    normal (:func:`annotate_subtypes` does it); markers are then found for the other subtypes only.
    """
    if keys.ANOMALY not in adata.obs:
        raise InputError("This AnnData has no ACsleuth calls yet: run the detector first.")
    anomalous = threshold_calls(adata)
    check_enough_anomalies(int(anomalous.sum()), config)
    used_correction = use_correction and keys.KIN in adata.obs and bool(adata.obs[keys.KIN].notna().any())
    measured = anomaly_expression(inputs, anomalous)
    expression = measured
    if used_correction:
        expression = batch_adjusted(measured, adata.obs[keys.BATCH].astype(str).to_numpy()[anomalous], kin_batch_shifts(adata, inputs))
    tokens, residual_tokens = _tokens(expression, detector, config)
    subtypes = find_subtypes(tokens, residual_tokens, config, progress=progress, cancel=cancel)
    names = _names(subtypes.labels)
    # the same neighbour count as the Leiden graph of the automatic k
    cells = cell_resemblance(expression, inputs.reference.X, names, n_neighbors=config.n_neighbors, seed=config.seed)
    table = subtype_resemblance(cells)
    like_reference = cells_like_reference(cells, table)
    kept = _kept(like_reference, reference_like_normal)
    markers = subtype_markers(measured[kept], names[kept], inputs.reference.X, inputs.genes, n_marker_genes)
    return SubtypeResult(
        anomalous, subtypes, markers, table, like_reference, used_correction, config, reference_like_normal
    )


def anomaly_expression(inputs: ModelInputs, rows: np.ndarray) -> sp.csr_matrix:
    """Log expression of these target cells on the model's genes, as the model saw it (measured)."""
    return sp.csr_matrix(inputs.target.X)[rows]


def kin_batch_shifts(adata: ad.AnnData, inputs: ModelInputs) -> dict[str, np.ndarray]:
    """Per batch, the mean of (kin reference cell − cell) over its cells with a kin pair (module II), per gene.

    Kin pairs match a target cell with a reference cell of the same kind, so
    this gap is the batch's effect in log-expression space, free of cell-type
    composition; batches without kin pairs get no shift.
    """
    batches = adata.obs[keys.BATCH].astype(str).to_numpy()
    kin = adata.obs[keys.KIN]
    paired = kin.notna().to_numpy()
    reference_rows = inputs.reference.obs_names.get_indexer(kin[paired].astype(str))
    if (reference_rows < 0).any():
        raise InputError("Some kin reference cells are not among the model's reference cells: run the correction again.")
    target, reference = sp.csr_matrix(inputs.target.X), sp.csr_matrix(inputs.reference.X)
    shifts = {}
    for batch in np.unique(batches[paired]):
        in_batch = batches[paired] == batch
        own = target[np.nonzero(paired)[0][in_batch]]
        partners = reference[reference_rows[in_batch]]
        shifts[batch] = np.asarray(partners.mean(axis=0) - own.mean(axis=0), dtype=np.float32).ravel()
    return shifts


def batch_adjusted(expression: sp.spmatrix | np.ndarray, batches: np.ndarray, shifts: dict[str, np.ndarray]) -> np.ndarray:
    """A dense copy of ``expression`` plus each row's batch shift, floored at zero (log expression is never negative)."""
    adjusted = expression.toarray() if sp.issparse(expression) else np.array(expression, copy=True)
    adjusted = adjusted.astype(np.float32, copy=False)
    for batch, shift in shifts.items():
        adjusted[batches == batch] += shift
    return np.maximum(adjusted, 0.0)


def _tokens(expression: sp.spmatrix | np.ndarray, detector: AnomalyDetector, config: SubtypeConfig) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Module IV's expression and residual tokens, embedded as ``config.encoder`` says."""
    if config.encoder == "module_one":
        residual = detector.encode(detector.reconstruction_residuals(expression)) if config.use_residual else None
        return detector.encode(expression), residual
    dense = expression.toarray() if sp.issparse(expression) else np.asarray(expression)
    tokens = principal_tokens(dense, config.token_dim, config.seed, standardise=True)
    if not config.use_residual:
        return tokens, None
    features = detector.residual_features(expression)
    return tokens, principal_tokens(features, config.token_dim, config.seed, standardise=False)


def annotate_subtypes(adata: ad.AnnData, result: SubtypeResult) -> None:
    """Write subtypes, confidences, which cells' subtypes resemble the reference, the fused embedding,
    markers and the resemblance table into ``adata``, then the call (:func:`calls.refresh_calls`).

    Cells called normal for resembling the reference get no subtype, confidence or fused row, like
    every normal cell; ``obs[keys.SUBTYPE_LIKE_REFERENCE]`` keeps the record of them.
    """
    subtypes, anomalous = result.subtypes, result.anomalous
    kept_rows = np.nonzero(anomalous)[0][result.kept]
    names = np.full(adata.n_obs, None, dtype=object)
    names[kept_rows] = result.names[result.kept]
    categories = result.kept_subtypes
    adata.obs[keys.SUBTYPE] = pd.Categorical(names, categories=categories)
    confidence = np.full(adata.n_obs, np.nan, dtype=np.float32)
    confidence[kept_rows] = subtypes.confidence[result.kept]
    adata.obs[keys.SUBTYPE_CONFIDENCE] = confidence
    like_reference = pd.array(np.full(adata.n_obs, None), dtype="boolean")
    like_reference[anomalous] = result.like_reference
    adata.obs[keys.SUBTYPE_LIKE_REFERENCE] = like_reference
    fused = np.full((adata.n_obs, subtypes.fused.shape[1]), np.nan, dtype=np.float32)
    fused[kept_rows] = subtypes.fused[result.kept]
    adata.obsm[keys.FUSED] = fused
    adata.uns[keys.UNS][keys.SUBTYPES] = {
        "params": result.config.to_json() | {
            "n_subtypes": str(result.config.n_subtypes),
            "used_correction": result.used_correction,
            "reference_like_normal": result.reference_like_normal,
        },
        "k_chosen": subtypes.k_chosen,
        "k_reason": subtypes.k_reason,
        "called_normal": int((~result.kept).sum()),
        "sizes": {c: int((names == c).sum()) for c in categories},
        "n_epochs": subtypes.n_epochs,
        "label_changes": np.asarray(subtypes.label_changes, dtype=np.float64),
        "markers_vs_anomalies": result.markers["vs_anomalies"],
        "markers_vs_reference": result.markers["vs_reference"],
        "reference_resemblance": result.resemblance,
        "threshold": float(adata.uns[keys.UNS]["threshold"]["value"]),
    }
    refresh_calls(adata)


def subtypes_are_stale(adata: ad.AnnData) -> bool:
    """True when the anomaly threshold changed after subtyping (the subtypes cover other cells)."""
    return threshold_changed_since(adata, keys.SUBTYPES)


def subtype_layout(adata: ad.AnnData, *, seed: int = 0) -> pd.DataFrame:
    """One row per cell with a subtype: name, batch, subtype, confidence and UMAP of the fused embedding."""
    if keys.SUBTYPE not in adata.obs:
        raise InputError("This AnnData has no subtypes yet: run module IV first.")
    rows = adata.obs[keys.SUBTYPE].notna().to_numpy()
    table = pd.DataFrame(
        {
            CELL: adata.obs_names[rows].to_numpy(),
            keys.BATCH: adata.obs[keys.BATCH][rows].astype(str).to_numpy(),
            keys.SUBTYPE: adata.obs[keys.SUBTYPE][rows].astype(str).to_numpy(),
            keys.SUBTYPE_CONFIDENCE: adata.obs[keys.SUBTYPE_CONFIDENCE][rows].to_numpy(),
        }
    )
    fused = adata.obsm[keys.FUSED][rows]
    table[list(UMAP)] = umap_2d(fused, seed) if rows.sum() > 2 else np.zeros((rows.sum(), 2), np.float32)
    return table


def _kept(like_reference: np.ndarray, reference_like_normal: bool) -> np.ndarray:
    """Which clustered cells stay called anomalous: all, or those not like the reference."""
    return ~like_reference if reference_like_normal else np.ones(like_reference.size, dtype=bool)


def _names(labels: np.ndarray) -> np.ndarray:
    return (np.asarray(labels) + 1).astype(str)
