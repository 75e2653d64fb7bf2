"""Anomaly subtypes over an annotated result: embeddings for module IV, clustering, markers, keys.

``subtype_anomalies`` takes the cells called anomalous, builds ``z = E(x)`` and
``ζ = E(x − x̂)`` with module I (``x`` corrected when a correction is present
and ``use_correction``), clusters them (:mod:`subtypes`) and finds marker
genes (:mod:`markers`). Markers are tested on the measured log expression,
not the corrected one: the correction is a decoder's output, smoother than
real counts, so it serves the clustering, while differential expression is
read off what was measured (as scanpy and Seurat advise for integrated data). ``annotate_subtypes`` writes the result under the
documented keys. Re-running it with another k or resolution needs no GAN
training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import keys
from .detect import AnomalyDetector
from .correction import threshold_changed_since
from .errors import InputError
from .layout import CELL, umap_2d
from .markers import subtype_markers
from .model_inputs import ModelInputs
from .progress import CancelToken, ProgressCallback
from .subtypes import SubtypeConfig, Subtypes, check_enough_anomalies, find_subtypes


#: UMAP columns of :func:`subtype_layout`
UMAP = ("umap_1", "umap_2")


@dataclass
class SubtypeResult:
    """Module IV's result for the anomalous cells of a result, plus marker tables."""

    anomalous: np.ndarray
    subtypes: Subtypes
    markers: dict[str, pd.DataFrame]
    used_correction: bool
    config: SubtypeConfig


def subtype_anomalies(
    adata: ad.AnnData,
    inputs: ModelInputs,
    detector: AnomalyDetector,
    config: SubtypeConfig = SubtypeConfig(),
    *,
    use_correction: bool = True,
    n_marker_genes: int = 25,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> SubtypeResult:
    """Split the cells called anomalous in ``adata`` into subtypes (``adata`` is not modified)."""
    if keys.ANOMALY not in adata.obs:
        raise InputError("This AnnData has no ACsleuth calls yet: run the detector first.")
    anomalous = adata.obs[keys.ANOMALY].to_numpy(dtype=bool)
    check_enough_anomalies(int(anomalous.sum()), config)
    used_correction = use_correction and keys.CORRECTED in adata.layers
    expression = anomaly_expression(adata, inputs, anomalous, used_correction)
    latent = detector.encode(expression)
    residual_latent = detector.encode(detector.reconstruction_residuals(expression)) if config.use_residual else None
    subtypes = find_subtypes(latent, residual_latent, config, progress=progress, cancel=cancel)
    measured = anomaly_expression(adata, inputs, anomalous, corrected=False)
    markers = subtype_markers(measured, _names(subtypes.labels), inputs.reference.X, inputs.genes, n_marker_genes)
    return SubtypeResult(anomalous, subtypes, markers, used_correction, config)


def anomaly_expression(adata: ad.AnnData, inputs: ModelInputs, anomalous: np.ndarray, corrected: bool) -> sp.csr_matrix:
    """Log expression of the anomalous cells on the model's genes: corrected, or as the model saw it."""
    if corrected:
        columns = adata.var_names.get_indexer(inputs.genes)
        return sp.csr_matrix(adata.layers[keys.CORRECTED])[anomalous][:, columns]
    return sp.csr_matrix(inputs.target.X)[anomalous]


def annotate_subtypes(adata: ad.AnnData, result: SubtypeResult) -> None:
    """Write subtypes, confidences, the fused embedding and markers into ``adata``."""
    subtypes, anomalous = result.subtypes, result.anomalous
    names = np.full(adata.n_obs, None, dtype=object)
    names[anomalous] = _names(subtypes.labels)
    categories = [str(i + 1) for i in range(subtypes.k_chosen)]
    adata.obs[keys.SUBTYPE] = pd.Categorical(names, categories=categories)
    confidence = np.full(adata.n_obs, np.nan, dtype=np.float32)
    confidence[anomalous] = subtypes.confidence
    adata.obs[keys.SUBTYPE_CONFIDENCE] = confidence
    fused = np.full((adata.n_obs, subtypes.fused.shape[1]), np.nan, dtype=np.float32)
    fused[anomalous] = subtypes.fused
    adata.obsm[keys.FUSED] = fused
    adata.uns[keys.UNS][keys.SUBTYPES] = {
        "params": result.config.to_json() | {"n_subtypes": str(result.config.n_subtypes), "used_correction": result.used_correction},
        "k_chosen": subtypes.k_chosen,
        "k_reason": subtypes.k_reason,
        "sizes": {c: int((names == c).sum()) for c in categories},
        "n_epochs": subtypes.n_epochs,
        "label_changes": np.asarray(subtypes.label_changes, dtype=np.float64),
        "markers_vs_anomalies": result.markers["vs_anomalies"],
        "markers_vs_reference": result.markers["vs_reference"],
        "threshold": float(adata.uns[keys.UNS]["threshold"]["value"]),
    }


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


def _names(labels: np.ndarray) -> np.ndarray:
    return (np.asarray(labels) + 1).astype(str)
