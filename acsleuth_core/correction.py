"""Batch correction around the anomalies: module II (kin pairs), then the corrected expression.

``correct_batches`` takes an annotated detection result, the model and the
cells as the model saw them; it pairs the target cells below the anomaly
threshold (the threshold's call, whatever the subtype stage later called
normal, so the result does not depend on which stage ran last) with
reference cells and corrects every target cell, anomalies too, by one of two
methods:

* ``kin_shift`` (default): measured expression minus the batch effect the kin
  pairs show around the cell (:mod:`kin_shift`); the corrected latent is
  module I's encoding of that corrected expression.
* ``style_transfer``: the paper's module III (:mod:`style`): expression decoded
  from ``E(x) − S_b``, latent ``E(x) − S_b``.

It then measures the correction (:mod:`correction_quality`).
``annotate_correction`` writes the result into the AnnData under the
documented keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import keys
from .calls import threshold_calls, threshold_changed_since
from .detect import AnomalyDetector
from .errors import InputError
from .correction_quality import REFERENCE_BATCH, Labels, correction_quality
from .kin import KinConfig, KinPairs, find_kin_pairs
from .kin_shift import ShiftConfig, shift_corrected_expression
from .metrics import DEFAULT_K
from .model_inputs import ModelInputs
from .progress import CancelToken, ProgressCallback
from .style import StyleConfig, StyleTransfer

KIN_SHIFT = "kin_shift"
STYLE_TRANSFER = "style_transfer"
METHODS = (KIN_SHIFT, STYLE_TRANSFER)
#: fewest target cells called normal that correction can learn from
MIN_NORMAL_CELLS = 10


@dataclass(frozen=True)
class CorrectionConfig:
    """Settings of module II, of the corrected expression (``method``: one of :data:`METHODS`) and of the metrics."""

    kin: KinConfig = field(default_factory=KinConfig)
    method: str = KIN_SHIFT
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    metrics_k: int = DEFAULT_K

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")

    @classmethod
    def seeded(cls, seed: int, device: str = "auto", **overrides) -> "CorrectionConfig":
        """Defaults with one seed and device for both modules."""
        base = cls(**overrides)
        return replace(
            base,
            kin=replace(base.kin, seed=seed, device=device),
            style=replace(base.style, seed=seed, device=device),
        )

    def to_json(self) -> dict:
        settings = {"kin": self.kin.to_json(), "method": self.method, "metrics_k": self.metrics_k}
        if self.method == KIN_SHIFT:
            return settings | {"shift": self.shift.to_json()}
        return settings | {"style": self.style.to_json()}


@dataclass
class CorrectionResult:
    """Per-target-cell outputs (result row order) plus reference embeddings and metrics."""

    kin: pd.Categorical
    kin_confidence: np.ndarray
    corrected_latent: np.ndarray
    corrected_expression: sp.csr_matrix
    reference_latent: np.ndarray
    reference_corrected_latent: np.ndarray
    metrics: dict[str, dict[str, dict[str, float]]]
    pairs: KinPairs
    style: Optional[StyleTransfer] = None
    label_key: Optional[str] = None


def correct_batches(
    adata: ad.AnnData,
    inputs: ModelInputs,
    detector: AnomalyDetector,
    config: CorrectionConfig = CorrectionConfig(),
    *,
    label_key: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> CorrectionResult:
    """Correct the batch effects of an annotated detection result (``adata`` is not modified).

    ``label_key`` names an ``obs`` column present in both the targets and the
    reference (e.g. a cell type); when given, label purity, label ASW and
    reference transfer are measured too.
    """
    _check_aligned(adata, inputs)
    normal = ~threshold_calls(adata)
    if normal.sum() < MIN_NORMAL_CELLS:
        raise InputError(
            f"Only {int(normal.sum())} target cells are called normal; batch correction learns from normal cells "
            f"and needs at least {MIN_NORMAL_CELLS}. Lower the anomaly threshold on the Detect step, or skip correction."
        )
    batches = adata.obs[keys.BATCH].astype(str).to_numpy()
    without_normal = sorted(set(batches) - set(batches[normal]))
    if without_normal:
        raise InputError(
            f"Every cell of {', '.join(without_normal)} is called anomalous, so no batch style can be learnt for it; "
            "lower the anomaly threshold on the Detect step, or leave that sample out of the correction."
        )
    target_X = sp.csr_matrix(inputs.target.X)
    reference_X = sp.csr_matrix(inputs.reference.X)
    target_latent = np.asarray(adata.obsm[keys.LATENT], dtype=np.float32)
    reference_latent = detector.encode(reference_X)
    pairs = find_kin_pairs(
        target_latent[normal], reference_latent, batches[normal], config.kin, progress=progress, cancel=cancel
    )
    corrected = _correct_cells(
        config, detector, pairs, target_X, target_latent, batches, normal, reference_X, reference_latent, progress, cancel
    )
    metrics = correction_quality(
        reference_X, target_X[normal], corrected.expression[normal], batches[normal],
        latents={
            "before": (reference_latent, target_latent[normal]),
            "after": (corrected.reference_latent, corrected.latent[normal]),
        },
        labels=_labels(adata, inputs, label_key, normal), k=config.metrics_k,
    )
    return CorrectionResult(
        kin=_kin_names(inputs.reference.obs_names, pairs.kin, normal),
        kin_confidence=_on_normal(pairs.confidence, normal),
        corrected_latent=corrected.latent,
        corrected_expression=corrected.expression,
        reference_latent=reference_latent,
        reference_corrected_latent=corrected.reference_latent,
        metrics=metrics,
        pairs=pairs,
        style=corrected.style,
        label_key=label_key,
    )


class _Corrected(NamedTuple):
    expression: sp.csr_matrix
    latent: np.ndarray
    reference_latent: np.ndarray
    style: Optional[StyleTransfer]


def _correct_cells(
    config: CorrectionConfig, detector: AnomalyDetector, pairs: KinPairs, target_X: sp.csr_matrix,
    target_latent: np.ndarray, batches: np.ndarray, normal: np.ndarray, reference_X: sp.csr_matrix,
    reference_latent: np.ndarray, progress: Optional[ProgressCallback], cancel: Optional[CancelToken],
) -> _Corrected:
    """Every target cell's corrected expression and latent by the configured method, and the reference's latent."""
    if config.method == KIN_SHIFT:
        expression = shift_corrected_expression(
            target_X, target_latent, batches, normal, pairs.kin, reference_X, config.shift, cancel
        )
        return _Corrected(expression, detector.encode(expression), reference_latent, None)
    style = StyleTransfer(config.style).fit(
        detector.generator, target_X[normal], batches[normal], pairs.kin, reference_X, pairs.offsets,
        progress=progress, cancel=cancel,
    )
    corrected = style.correct(target_X, batches, cancel)
    return _Corrected(corrected.expression, corrected.latent, style.correct_latent(reference_X, None, cancel), style)


def annotate_correction(
    adata: ad.AnnData, result: CorrectionResult, genes: list[str], config: CorrectionConfig
) -> None:
    """Write a correction result into ``adata`` (the annotated targets) under the documented keys."""
    adata.obs[keys.KIN] = result.kin
    adata.obs[keys.KIN_CONFIDENCE] = result.kin_confidence
    adata.obsm[keys.CORRECTED_LATENT] = result.corrected_latent
    adata.var[keys.MODEL_GENE] = adata.var_names.isin(genes)
    adata.layers[keys.CORRECTED] = _in_var_space(result.corrected_expression, genes, adata.var_names)
    histories = {"kin": result.pairs.history} | ({"style": result.style.history} if result.style else {})
    history = {
        f"{stage}_{name}": np.asarray(values, dtype=np.float64)
        for stage, source in histories.items()
        for name, values in source.items()
    }
    adata.uns[keys.UNS][keys.CORRECTION] = {
        "params": config.to_json() | {"label_key": result.label_key or ""},
        "metrics": result.metrics,
        "history": history,
        "n_kin_pairs": int(pd.notna(result.kin).sum()),
        "threshold": float(adata.uns[keys.UNS]["threshold"]["value"]),
    }


def correction_is_stale(adata: ad.AnnData) -> bool:
    """True when the anomaly threshold changed after correction (kin pairs were learnt from other calls)."""
    return threshold_changed_since(adata, keys.CORRECTION)


def shared_label_columns(adata: ad.AnnData, inputs: ModelInputs) -> list[str]:
    """``obs`` columns present in both the targets and the reference, usable as labels for label purity."""
    return [c for c in adata.obs.columns if c in inputs.reference.obs.columns and not c.startswith("acsleuth_")]


def _check_aligned(adata: ad.AnnData, inputs: ModelInputs) -> None:
    for needed in (keys.ANOMALY, keys.BATCH):
        if needed not in adata.obs:
            raise InputError("This AnnData has no ACsleuth detection results yet: run the detector first.")
    if keys.LATENT not in adata.obsm:
        raise InputError(f"This AnnData lacks obsm['{keys.LATENT}']: run the detector first.")
    if not adata.obs_names.equals(inputs.target.obs_names):
        raise InputError("The model inputs do not belong to this result (cell names differ); reopen the run.")


def _labels(adata: ad.AnnData, inputs: ModelInputs, label_key: Optional[str], normal: np.ndarray) -> Optional[Labels]:
    if not label_key:
        return None
    if label_key not in shared_label_columns(adata, inputs):
        raise InputError(
            f"'{label_key}' is not an obs column of both the targets and the reference; "
            f"choose one of: {', '.join(shared_label_columns(adata, inputs)) or '(none)'}."
        )
    return Labels(
        reference=inputs.reference.obs[label_key].astype(str).to_numpy(),
        target=adata.obs[label_key].astype(str).to_numpy()[normal],
    )


def _kin_names(reference_names: pd.Index, kin_rows: np.ndarray, normal: np.ndarray) -> pd.Categorical:
    names = np.full(normal.size, None, dtype=object)
    names[normal] = np.asarray(reference_names)[kin_rows]
    return pd.Categorical(names)


def _on_normal(values: np.ndarray, normal: np.ndarray) -> np.ndarray:
    out = np.full(normal.size, np.nan, dtype=np.float32)
    out[normal] = values
    return out


def _in_var_space(expression: sp.csr_matrix, genes: list[str], var_names: pd.Index) -> sp.csr_matrix:
    """Place model-gene columns at their positions among ``var_names``; other columns stay zero.

    Only the column indices are remapped (no COO copy); a model on every gene, in order, gets
    ``expression`` itself back (the layer then shares it with the correction result)."""
    positions = var_names.get_indexer(genes)
    if (positions < 0).any():
        raise InputError("The result lacks some of the model's genes; it does not belong to this model.")
    if len(genes) == len(var_names) and np.array_equal(positions, np.arange(len(var_names))):
        return expression
    columns = positions.astype(expression.indices.dtype)[expression.indices]
    placed = sp.csr_matrix(
        (expression.data.copy(), columns, expression.indptr.copy()), shape=(expression.shape[0], len(var_names))
    )
    placed.has_sorted_indices = False
    placed.sort_indices()
    return placed

