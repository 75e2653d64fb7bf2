"""How well a correction did: batches mixed, biology kept, corrected cells placed among the reference.

Measured on the reference cells and the target cells called normal, before (measured expression,
module-I latent) and after (corrected layer, corrected latent), in two spaces:

* ``expression``: principal axes of the log expression of the cells measured (reference cells beside
  the measured targets before, beside the corrected layer after), as one would embed them for a UMAP;
  reference transfer instead on the reference cells' own axes, so the corrected layer is judged where a
  user would put it: among real reference cells;
* ``latent``: the model's latent space (module I's before, the corrected one after).

Each holds ``batch_entropy`` and ``ilisi``; with labels also ``label_purity``, ``label_asw`` and
``reference_transfer``. :func:`biology_lost` words what dropped.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

import scipy.sparse as sp

from .metrics import DEFAULT_K, PrincipalAxes, correction_metrics, label_asw, reference_transfer

REFERENCE_BATCH = "reference"
STAGES = ("before", "after")
SPACES = ("expression", "latent")
#: a biology metric that falls by more than this after correction is reported as lost
TOLERANCE = 0.02
MIXING = {"batch_entropy": "Batch mixing (kNN entropy)", "ilisi": "iLISI"}
BIOLOGY = {
    "label_purity": "kNN label purity",
    "label_asw": "Label silhouette (ASW)",
    "reference_transfer": "Reference transfer",
}
METRIC_NAMES = MIXING | BIOLOGY


class Labels(NamedTuple):
    """Labels (e.g. cell types) of the reference cells and of the measured target cells."""

    reference: np.ndarray
    target: np.ndarray


def correction_quality(
    reference_X,
    target_X,
    corrected_X,
    batches: np.ndarray,
    *,
    latents: dict[str, tuple[np.ndarray, np.ndarray]],
    labels: Optional[Labels] = None,
    k: int = DEFAULT_K,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics by space and stage: ``{"expression": {"before": {...}, "after": {...}}, "latent": {...}}``.

    ``target_X`` / ``corrected_X``: the measured and corrected expression of the measured target cells
    (rows of ``batches``); ``latents[stage]``: (reference, target) embeddings.
    """
    expression = {
        stage: expression_quality(reference_X, X, batches, labels, k, seed)
        for stage, X in zip(STAGES, (target_X, corrected_X))
    }
    latent = {stage: embedding_quality(*latents[stage], batches, labels, k, seed) for stage in STAGES}
    return {"expression": expression, "latent": latent}


def expression_quality(
    reference_X, target_X, batches: np.ndarray, labels: Optional[Labels] = None, k: int = DEFAULT_K, seed: int = 0
) -> dict[str, float]:
    """Metrics of reference + target log expression on principal axes fitted on both; reference transfer on
    the reference's own axes."""
    axes = PrincipalAxes(sp.vstack([sp.csr_matrix(reference_X), sp.csr_matrix(target_X)], format="csr"), seed=seed)
    out = embedding_quality(axes.transform(reference_X), axes.transform(target_X), batches, labels, k, seed)
    if labels is not None:
        reference_axes = PrincipalAxes(reference_X, seed=seed)
        out["reference_transfer"] = reference_transfer(
            reference_axes.transform(reference_X), labels.reference, reference_axes.transform(target_X), labels.target, k, seed
        )
    return out


def embedding_quality(
    reference: np.ndarray, targets: np.ndarray, batches: np.ndarray, labels: Optional[Labels] = None,
    k: int = DEFAULT_K, seed: int = 0,
) -> dict[str, float]:
    """Mixing of reference + target rows of an embedding; with labels also purity, label ASW and reference
    transfer (target cells' nearest reference cells in this embedding)."""
    embedding = np.vstack([reference, targets]).astype(np.float32)
    all_batches = np.concatenate([np.full(len(reference), REFERENCE_BATCH), np.asarray(batches, dtype=str)])
    all_labels = None if labels is None else np.concatenate([labels.reference, labels.target])
    out = correction_metrics(embedding, all_batches, all_labels, k, seed)
    if labels is not None:
        out["label_asw"] = label_asw(embedding, all_labels, seed)
        out["reference_transfer"] = reference_transfer(reference, labels.reference, targets, labels.target, k, seed)
    return out


def biology_lost(metrics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One sentence per biology metric of the expression space that fell by more than :data:`TOLERANCE`."""
    before, after = metrics["expression"]["before"], metrics["expression"]["after"]
    return [
        f"{label} fell from {before[name]:.2f} to {after[name]:.2f}"
        for name, label in BIOLOGY.items()
        if name in after and np.isfinite(after[name]) and after[name] < before[name] - TOLERANCE
    ]
