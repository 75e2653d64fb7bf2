"""The whole ACsleuth flow over AnnData: what the CLI and the app both call.

``detect_anomalies`` prepares the inputs, trains module I on the reference,
scores the targets and returns a new annotated target AnnData; the inputs
are never modified. ``correct_detection_run`` adds batch correction
(modules II and III) to that result. ``call_anomalies`` re-draws the calls on an annotated
AnnData with another threshold rule, without retraining.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Mapping, Optional

import anndata as ad
import numpy as np
import pandas as pd

from . import keys
from . import threshold as thr
from .calls import refresh_calls
from .correction import CorrectionConfig, CorrectionResult, annotate_correction, correct_batches
from .detect import SCORE_DETAIL_KEYS, AnomalyDetector, DetectionResult, DetectorConfig
from .errors import InputError
from .model_inputs import ModelInputs
from .preprocess import PreparedData, prepare
from .progress import CancelToken, ProgressCallback
from .subtypes import SubtypeConfig
from .views import standardised
from .subtyping import SubtypeResult, annotate_subtypes, subtype_anomalies


@dataclass
class DetectionRun:
    """What one detection run produced: the annotated target, the model and the prepared data."""

    adata: ad.AnnData
    detector: AnomalyDetector
    prepared: PreparedData


def detect_anomalies(
    reference: ad.AnnData,
    targets: Mapping[str, ad.AnnData] | ad.AnnData,
    *,
    batch_key: Optional[str] = None,
    n_hvg: int | str = 3000,
    declared: str = "auto",
    config: DetectorConfig = DetectorConfig(),
    detector: Optional[AnomalyDetector] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> DetectionRun:
    """Train module I on ``reference`` (or use a trained ``detector``) and score ``targets``.

    Returns the targets stacked into one new AnnData (original values, genes
    shared by all targets) annotated with ``obs[keys.SCORE]``,
    ``obs[keys.ANOMALY]``, ``obs[keys.BATCH]``, ``obs[keys.RESIDUAL_NORM]``,
    ``obsm[keys.LATENT]`` and ``uns[keys.UNS]``.
    """
    prepared = prepare(reference, targets, batch_key=batch_key, n_hvg=n_hvg, declared=declared)
    if detector is None:
        detector = AnomalyDetector(config).fit(
            prepared.reference.X, prepared.genes, progress=progress, cancel=cancel
        )
    else:
        prepared = _restrict_to_model_genes(prepared, detector)
    result = detector.score(prepared.target.X, prepared.batches, progress=progress, cancel=cancel)
    annotated = _stack_original(targets, prepared)
    annotate(annotated, result, detector, prepared)
    return DetectionRun(annotated, detector, prepared)


def correct_detection_run(
    run: DetectionRun,
    config: CorrectionConfig = CorrectionConfig(),
    *,
    label_key: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> CorrectionResult:
    """Batch-correct a detection run in place (modules II and III): writes the correction keys into ``run.adata``."""
    inputs = ModelInputs.from_prepared(run.prepared)
    result = correct_batches(
        run.adata, inputs, run.detector, config, label_key=label_key, progress=progress, cancel=cancel
    )
    annotate_correction(run.adata, result, inputs.genes, config)
    return result


def subtype_detection_run(
    run: DetectionRun,
    config: SubtypeConfig = SubtypeConfig(),
    *,
    use_correction: bool = True,
    reference_like_normal: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> SubtypeResult:
    """Split a detection run's anomalous cells into subtypes (module IV); writes the subtype keys into
    ``run.adata`` and, with ``reference_like_normal``, calls normal the cells that resemble the reference
    (their subtype and their own neighbours alike; :mod:`resemblance`)."""
    inputs = ModelInputs.from_prepared(run.prepared)
    result = subtype_anomalies(
        run.adata, inputs, run.detector, config, use_correction=use_correction,
        reference_like_normal=reference_like_normal, progress=progress, cancel=cancel,
    )
    annotate_subtypes(run.adata, result)
    return result


def drop_stage_keys(adata: ad.AnnData, stage: str) -> None:
    """Remove whatever ``stage`` (``keys.CORRECTION`` or ``keys.SUBTYPES``) wrote into ``adata``; the call is
    derived again without it."""
    for slot, names in keys.STAGE_KEYS[stage].items():
        container = adata.uns[keys.UNS] if slot == "uns" else getattr(adata, slot)
        for name in names:
            if name in container:
                del container[name]
    refresh_calls(adata)


def annotate(adata: ad.AnnData, result: DetectionResult, detector: AnomalyDetector, prepared: PreparedData) -> None:
    """Write a detection result into ``adata`` under the documented keys."""
    adata.obs[keys.BATCH] = pd.Categorical(result.batches)
    adata.obs[keys.SCORE] = result.scores
    adata.obs[keys.ANOMALY] = result.calls  # here, in the column order; refresh_calls below derives it
    adata.obs[keys.RESIDUAL_NORM] = result.residual_norm
    adata.obs[keys.PVALUE] = thr.tail_pvalues(result.scores, result.reference_scores)
    for name, view in result.views.items():
        adata.obs[keys.VIEW_COLUMNS[name]] = standardised(view).target
    adata.obsm[keys.LATENT] = result.latent
    adata.uns[keys.UNS] = {
        "params": _h5ad_safe(detector.config.to_json()),
        "threshold": _h5ad_safe(result.threshold.as_dict()),
        "reference_scores": np.asarray(result.reference_scores, dtype=np.float64),
        "history": {k: np.asarray(v, dtype=np.float64) for k, v in detector.history.items()},
        "genes": {"n_model_genes": len(detector.genes), "matching": prepared.gene_report.summary()},
        "input_kinds": dict(prepared.input_kinds),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    refresh_calls(adata)


def call_anomalies(adata: ad.AnnData, method: str = "label_free", value: Optional[float] = None) -> thr.Threshold:
    """Re-draw ``obs[keys.ANOMALY]`` on an annotated AnnData with another rule; returns the threshold.

    The threshold's description of the score (``detail.score``, ``detail.views``, …) is kept. When the
    threshold is unchanged, cells that subtyping called normal stay normal (:func:`calls.refresh_calls`).

    ``method``: ``label_free`` (default rule), ``fraction`` (``value`` = expected
    anomaly fraction) or ``manual`` (``value`` = score cut-off).
    """
    if keys.SCORE not in adata.obs or keys.UNS not in adata.uns:
        raise InputError("This AnnData has no ACsleuth scores yet: run the detector first.")
    scores = adata.obs[keys.SCORE].to_numpy()
    if method == "label_free":
        threshold = thr.label_free_threshold(scores, adata.uns[keys.UNS]["reference_scores"])
    elif method == "fraction":
        threshold = thr.fraction_threshold(scores, _required(value, "an expected anomaly fraction"))
    elif method == "manual":
        threshold = thr.manual_threshold(_required(value, "a threshold"))
    else:
        raise ValueError(f"method must be one of {', '.join(thr.METHODS)}, not {method!r}")
    previous = adata.uns[keys.UNS].get("threshold", {}).get("detail", {})
    score_description = {k: previous[k] for k in SCORE_DETAIL_KEYS if k in previous}
    threshold = dataclasses.replace(threshold, detail=threshold.detail | score_description)
    adata.uns[keys.UNS]["threshold"] = _h5ad_safe(threshold.as_dict())
    refresh_calls(adata)
    return threshold


def versions() -> dict[str, str]:
    """Versions of ACsleuth and the libraries that shape its results."""
    out = {"python": platform.python_version()}
    for package in ("acsleuth-studio", "torch", "scanpy", "anndata", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _restrict_to_model_genes(prepared: PreparedData, detector: AnomalyDetector) -> PreparedData:
    missing = [g for g in detector.genes if g not in set(prepared.target.var_names)]
    if missing:
        raise InputError(
            f"The saved model uses {len(detector.genes):,} genes and {len(missing):,} of them are not in the "
            f"targets (e.g. {', '.join(missing[:3])}); score targets measured on the model's genes, or retrain."
        )
    prepared.target = prepared.target[:, detector.genes].copy()
    prepared.genes = list(detector.genes)
    return prepared


def _stack_original(targets: Mapping[str, ad.AnnData] | ad.AnnData, prepared: PreparedData) -> ad.AnnData:
    if isinstance(targets, ad.AnnData):
        out = targets.copy()
    else:
        out = ad.concat(list(targets.values()), join="inner", merge="same")
    out.obs_names = prepared.target.obs_names
    return out


def _required(value: Optional[float], what: str) -> float:
    if value is None:
        raise ValueError(f"this threshold rule needs {what}")
    return float(value)


def _h5ad_safe(value):
    """Nested dicts/lists with ``None`` replaced by "auto", so ``uns`` writes to .h5ad."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_h5ad_safe(v) for v in value]
    return "auto" if value is None else value
