"""Turning anomaly scores into calls without labels: one rule.

Every reference cell has an honest score (cross-fitting, :mod:`detect`), and
reference cells are normal by definition, so they say how normal cells score.
A target cell's conformal p-value is the share of reference cells scoring at
least as high, ``p = (1 + #{reference ≥ score}) / (n + 1)``; above the
reference's 90th percentile the p-values follow a generalised Pareto tail fitted
to the reference's top scores (:func:`tail_pvalues`, peaks over threshold), so
they keep falling past the last reference cell. Cells are called by
Benjamini–Hochberg at ``FDR_LEVEL`` on these p-values. When target normal cells
are exchangeable with the reference cells the conformal part controls the false
discovery rate (Bates et al. 2023, "Testing for outliers with conformal
p-values"); the tail is a model, checked on the task suite. The rule depends only
on the order of the scores and the reference's tail shape.

A target
sample whose normal cells sit above the reference (a technology shift, not
anomalies) breaks exchangeability: :func:`shifted_samples` names such samples,
so the user can correct batches first or set a threshold by hand.

Users may instead give an expected anomaly fraction or a fixed threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from scipy import stats

METHODS = ("label_free", "fraction", "manual")
#: false discovery rate of the label-free call
FDR_LEVEL = 0.1
#: the p-values' tail is modelled above this quantile of the reference scores
TAIL_QUANTILE = 0.9
#: fewer reference scores than this above the tail quantile: plain conformal p-values
MIN_TAIL_POINTS = 10
#: the largest generalised Pareto shape the tail may take
MAX_TAIL_SHAPE = 0.5
#: a sample whose median score is above this quantile of the reference scores is flagged as shifted
SHIFT_QUANTILE = 0.9


@dataclass(frozen=True)
class Threshold:
    """A score cut-off and how it was chosen; cells with ``score > value`` are called anomalous."""

    value: float
    method: str
    detail: dict

    def as_dict(self) -> dict:
        return asdict(self)


def conformal_pvalues(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Conformal p-values ``(1 + #{reference ≥ t}) / (n + 1)`` of target scores (high = anomalous)."""
    r = np.sort(np.asarray(reference, dtype=np.float64))
    t = np.asarray(target, dtype=np.float64)
    n_at_or_above = r.size - np.searchsorted(r, t, side="left")
    return (1.0 + n_at_or_above) / (r.size + 1.0)


def benjamini_hochberg(pvalues: np.ndarray, q: float = FDR_LEVEL) -> np.ndarray:
    """Boolean rejections of the Benjamini–Hochberg step-up procedure at level ``q``."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    passed = np.nonzero(p[order] <= q * np.arange(1, p.size + 1) / p.size)[0]
    rejected = np.zeros(p.size, dtype=bool)
    if passed.size:
        rejected[order[: passed[-1] + 1]] = True
    return rejected


def tail_pvalues(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Conformal p-values whose upper tail is smoothed and extended beyond the reference (peaks over threshold).

    At or below the reference's ``TAIL_QUANTILE`` quantile ``u`` they are the conformal p-values; above it,
    ``(1 + #{reference > u}) / (n + 1) · S(score − u)`` with ``S`` the survival function of a generalised
    Pareto distribution fitted to the reference's exceedances over ``u``, its shape kept in
    ``[0, MAX_TAIL_SHAPE]`` (no finite end point, at most a moderately heavy tail). A cell far beyond every
    reference cell then gets a p-value below ``1/(n + 1)``, so rare anomalies can be called with a small reference.
    """
    t = np.asarray(target, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    p = conformal_pvalues(t, r)
    u = float(np.quantile(r, TAIL_QUANTILE))
    exceedances = r[r > u] - u
    if exceedances.size < MIN_TAIL_POINTS or np.ptp(exceedances) == 0:
        return p
    shape, scale = _fit_tail(exceedances)
    above = t > u
    tail = (1.0 + exceedances.size) / (r.size + 1.0) * stats.genpareto.sf(t[above] - u, shape, scale=scale)
    p[above] = np.maximum(tail, np.finfo(np.float64).tiny)
    return p


def _fit_tail(exceedances: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto shape (clipped to ``[0, MAX_TAIL_SHAPE]``) and scale of exceedances over 0."""
    shape, _, scale = stats.genpareto.fit(exceedances, floc=0.0)
    if 0.0 <= shape <= MAX_TAIL_SHAPE:
        return float(shape), float(scale)
    shape = float(np.clip(shape, 0.0, MAX_TAIL_SHAPE))
    scale = stats.genpareto.fit(exceedances, f0=shape, floc=0.0)[2]
    return shape, float(scale)


def benjamini_hochberg_cut(target: np.ndarray, pvalues: np.ndarray, q: float = FDR_LEVEL) -> float:
    """The score cut ``c`` for which ``target > c`` are exactly the Benjamini–Hochberg rejections of
    ``pvalues`` (which fall as the score rises); ``inf`` when nothing is rejected."""
    t = np.asarray(target, dtype=np.float64)
    rejected = benjamini_hochberg(pvalues, q)
    if not rejected.any():
        return float("inf")
    if rejected.all():
        return float(np.nextafter(t.min(), -np.inf))
    return float(t[~rejected].max())


def label_free_threshold(target_scores: np.ndarray, reference_scores: np.ndarray, q: float = FDR_LEVEL) -> Threshold:
    """The default call: Benjamini–Hochberg at level ``q`` on the target's p-values against the reference
    cells' scores (:func:`tail_pvalues`). Nothing called: the threshold is the highest score of all."""
    t = np.asarray(target_scores, dtype=np.float64)
    r = np.asarray(reference_scores, dtype=np.float64)
    cut = benjamini_hochberg_cut(t, tail_pvalues(t, r), q)
    value = cut if np.isfinite(cut) else float(max(t.max(initial=-np.inf), r.max(initial=-np.inf)))
    detail = {
        "route": "conformal_bh",
        "fdr": q,
        "n_reference_cells": int(r.size),
        "reference_called": reference_called_share(r, value),
        "nothing_called": not np.isfinite(cut),
    }
    return Threshold(value=float(value), method="label_free", detail=detail)


def reference_called_share(reference: np.ndarray, cut: float) -> float:
    """Share of reference scores above ``cut``: what the call would say of normal cells."""
    return float(np.mean(np.asarray(reference, dtype=np.float64) > cut))


def minus_log10_pvalues(target_scores: np.ndarray, reference_scores: np.ndarray) -> np.ndarray:
    """``−log10`` of the target scores' p-values against the reference (:func:`tail_pvalues`): 0 for a cell
    below every reference cell, growing without bound past them."""
    return -np.log10(tail_pvalues(target_scores, reference_scores))


def shift_warning(scores: np.ndarray, batches: np.ndarray, reference_scores: np.ndarray) -> str | None:
    """A sentence for users when whole samples score above the reference (:func:`shifted_samples`), else None."""
    shifted = shifted_samples(scores, batches, reference_scores)
    if not shifted:
        return None
    names = ", ".join(shifted)
    return (
        f"Most cells of {names} score above {SHIFT_QUANTILE:.0%} of the reference cells: that looks like a "
        "technology or batch shift of the whole sample rather than anomalous cells, and the label-free call "
        "may take in normal cells. Check the histogram; correct batches (Correct step) and judge the calls by "
        "their subtypes, or set an expected fraction or a threshold by hand."
    )


def shifted_samples(scores: np.ndarray, batches: np.ndarray, reference_scores: np.ndarray) -> list[str]:
    """Samples whose median score lies above the reference's ``SHIFT_QUANTILE`` quantile: most of their
    cells score unlike the reference, which points to a technology or batch shift rather than anomalies."""
    bar = float(np.quantile(np.asarray(reference_scores, dtype=np.float64), SHIFT_QUANTILE))
    scores, batches = np.asarray(scores, dtype=np.float64), np.asarray(batches, dtype=str)
    return [str(b) for b in dict.fromkeys(batches) if np.median(scores[batches == b]) > bar]



def fraction_threshold(scores: np.ndarray, fraction: float) -> Threshold:
    """Call the top ``fraction`` of cells anomalous."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("the expected anomaly fraction must lie strictly between 0 and 1")
    value = float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - fraction))
    return Threshold(value=value, method="fraction", detail={"fraction": fraction})


def manual_threshold(value: float) -> Threshold:
    """A user-given cut-off on the score scale."""
    return Threshold(value=float(value), method="manual", detail={})

def explain(threshold: Mapping) -> tuple[str, bool]:
    """How a saved threshold (``Threshold.as_dict()``) was chosen, in a sentence for users, and whether
    the call deserves their eye (nothing called)."""
    detail = threshold.get("detail", {})
    if threshold["method"] == "fraction":
        return f"The top {float(detail['fraction']):.1%} of cells (your expected anomaly fraction).", False
    if threshold["method"] == "manual":
        return "Your score threshold.", False
    n = int(detail.get("n_reference_cells", 0))
    fdr = float(detail.get("fdr", FDR_LEVEL))
    sentence = (
        f"Label-free: cells scoring beyond the {n} reference cells (each scored by a model that did not train "
        f"on it) at a {fdr:.0%} false discovery rate (conformal p-values, Benjamini–Hochberg); this cut "
        f"would call {float(detail.get('reference_called', 0.0)):.1%} of the reference cells."
    )
    if detail.get("nothing_called"):
        return sentence + " No cell passed it: if you expect anomalies, set an expected fraction or a threshold.", True
    return sentence, False



def call(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean anomaly calls: ``score > threshold``."""
    return np.asarray(scores, dtype=np.float64) > threshold.value
