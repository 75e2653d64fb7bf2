"""The views of novelty the detector reads off each cell, and how they become one score.

Each view is a statistic per cell, higher = more anomalous, computed for the
target cells and, honestly, for every reference cell (by a model that did not
train on it: cross-fitting, :mod:`detect`):

* ``residual``: log mean square of module I's normalised reconstruction residuals;
* ``similarity``: log of how unlike its most similar reference cells a cell is
  (:mod:`similarity`);
* ``predictor``: the logit of module I's MMD predictor on the residuals (the paper's score).

A view is put on a common scale by standardising it with the reference cells'
median and MAD (:func:`standardised`); the score is a weighted mean of the
standardised views (:func:`combine`), each weighted by how far the target's
upper tail in that view reaches past the reference's (:func:`tail_excess_weights`):
a view in which no target cell stands out from the reference adds noise, not
evidence. Because the reference cells get the same score, the score is
calibrated by comparison with them (conformal p-values, :mod:`threshold`),
whatever the weights. The weighting was chosen on the detection task suite
(``benchmarks/suite.py``, docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
from scipy import stats

VIEWS = ("residual", "similarity", "predictor")
#: the paper's score: module I's MMD predictor alone
PAPER_VIEWS = ("predictor",)
#: a view's tail excess is the share of target cells above this quantile of its reference scores, less 1 − it
EXCESS_QUANTILE = 0.95
#: added to every squared excess, so a view no target cell stands out in keeps a trace of weight
WEIGHT_FLOOR = 1e-4


@dataclass
class ViewScores:
    """One statistic for the target cells and for every reference cell (out of fold), higher = more anomalous."""

    target: np.ndarray
    reference: np.ndarray

    def map(self, fn) -> "ViewScores":
        return ViewScores(fn(self.target), fn(self.reference))


def robust_scale(reference: np.ndarray) -> tuple[float, float]:
    """Median and normal-consistent MAD of ``reference`` (the MAD floored at a quarter of the SD, then at 1e-6)."""
    r = np.asarray(reference, dtype=np.float64)
    mad = float(stats.median_abs_deviation(r, scale="normal"))
    return float(np.median(r)), max(mad, 0.25 * float(np.std(r)), 1e-6)


def standardised(view: ViewScores) -> ViewScores:
    """``(x − median) / MAD`` with the reference cells' median and MAD: 0 is a typical reference cell."""
    centre, scale = robust_scale(view.reference)
    return view.map(lambda x: (np.asarray(x, dtype=np.float64) - centre) / scale)


def combine(views: Mapping[str, ViewScores], weights: Optional[Mapping[str, float]] = None) -> ViewScores:
    """The weighted mean of the standardised views (equal weights by default)."""
    names = list(views)
    w = np.array([1.0 if weights is None else float(weights[n]) for n in names])
    if not np.all(w >= 0) or w.sum() <= 0:
        raise ValueError("view weights must be non-negative and not all zero")
    w = w / w.sum()
    parts = [standardised(views[n]) for n in names]
    return ViewScores(
        sum(wi * p.target for wi, p in zip(w, parts)),
        sum(wi * p.reference for wi, p in zip(w, parts)),
    )


def tail_excess(view: ViewScores, quantile: float = EXCESS_QUANTILE) -> float:
    """Share of target cells above the reference's ``quantile`` quantile in excess of the ``1 − quantile``
    the reference itself has there (0 when the target has no more): how much of the target stands out."""
    bar = float(np.quantile(np.asarray(view.reference, dtype=np.float64), quantile))
    return max(float(np.mean(np.asarray(view.target) > bar)) - (1.0 - quantile), 0.0)


def tail_excess_weights(views: Mapping[str, ViewScores]) -> dict[str, float]:
    """Each view's weight: its squared :func:`tail_excess` plus ``WEIGHT_FLOOR`` (label-free: reference and
    target scores only)."""
    return {name: tail_excess(view) ** 2 + WEIGHT_FLOOR for name, view in views.items()}
