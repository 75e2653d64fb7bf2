"""Turning anomaly scores into calls without labels.

The default rule fits a two-component Gaussian mixture to the target scores
(on the logit scale) whose *normal* component is pinned to the scores of
reference cells held out of every fit: those cells are normal by definition,
so they say what a normal score looks like. Only the anomalous component and
the mixing weight are estimated. Users may instead give an expected anomaly
fraction or a fixed threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

METHODS = ("label_free", "fraction", "manual")
#: an anomalous component must sit this many normal SDs above the normal centre to count
MIN_SEPARATION = 2.0


@dataclass(frozen=True)
class Threshold:
    """A score cut-off and how it was chosen; cells with ``score > value`` are called anomalous."""

    value: float
    method: str
    detail: dict

    def as_dict(self) -> dict:
        return asdict(self)


def logit(p: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@dataclass(frozen=True)
class AnchoredMixture:
    """Two Gaussians on a real-valued score: the normal one pinned by reference cells."""

    normal_centre: float
    normal_scale: float
    anomalous_centre: float
    anomalous_scale: float
    anomaly_fraction: float

    def posterior(self, x: np.ndarray) -> np.ndarray:
        """Probability that a score belongs to the anomalous component (0 at or below the normal centre)."""
        x = np.asarray(x, dtype=np.float64)
        dens1 = self.anomaly_fraction * stats.norm.pdf(x, self.anomalous_centre, self.anomalous_scale)
        dens0 = (1 - self.anomaly_fraction) * stats.norm.pdf(x, self.normal_centre, self.normal_scale)
        post = dens1 / np.maximum(dens0 + dens1, 1e-300)
        return np.where(x > self.normal_centre, post, 0.0)

    @property
    def found_anomalies(self) -> bool:
        """Whether EM found an anomalous component clearly beyond the normal one (> 2 normal SDs)."""
        return (
            self.anomaly_fraction > 1e-3
            and self.anomalous_centre > self.normal_centre + MIN_SEPARATION * self.normal_scale
        )

    def cut(self) -> float:
        """Where the anomalous posterior first reaches 1/2, never below the normal component's
        97.5th percentile; its 99.5th percentile when no anomalous component was found."""
        if not self.found_anomalies:
            return self.normal_centre + stats.norm.ppf(0.995) * self.normal_scale
        floor = self.normal_centre + stats.norm.ppf(0.975) * self.normal_scale
        grid = np.linspace(floor, self.anomalous_centre, 2001)
        above = np.nonzero(self.posterior(grid) >= 0.5)[0]
        return float(grid[above[0]]) if above.size else float(self.anomalous_centre)


def fit_anchored_mixture(target: np.ndarray, reference: np.ndarray, *, max_iter: int = 200) -> AnchoredMixture:
    """Fit the anomalous component and fraction by EM, the normal one fixed from ``reference``.

    The normal location and scale are the reference's median and MAD (robust
    to the odd outlier among reference cells).
    """
    t = np.asarray(target, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    mu0 = float(np.median(r))
    sd0 = max(float(stats.median_abs_deviation(r, scale="normal")), 0.25 * float(np.std(r)), 1e-3)
    pi1, mu1, sd1 = _fit_anomalous_component(t, mu0, sd0, max_iter)
    return AnchoredMixture(mu0, sd0, mu1, sd1, pi1)


def label_free_threshold(target_scores: np.ndarray, reference_scores: np.ndarray) -> Threshold:
    """The default call for probability-like scores in [0, 1]: an anchored mixture on their logits."""
    mixture = fit_anchored_mixture(logit(target_scores), logit(reference_scores))
    detail = asdict(mixture) | {"n_reference_cells": int(np.size(reference_scores)), "scale": "logit"}
    return Threshold(value=float(expit(mixture.cut())), method="label_free", detail=detail)


def fraction_threshold(scores: np.ndarray, fraction: float) -> Threshold:
    """Call the top ``fraction`` of cells anomalous."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("the expected anomaly fraction must lie strictly between 0 and 1")
    value = float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - fraction))
    return Threshold(value=value, method="fraction", detail={"fraction": fraction})


def manual_threshold(value: float) -> Threshold:
    """A user-given cut-off on the score scale."""
    return Threshold(value=float(value), method="manual", detail={})


def call(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean anomaly calls: ``score > threshold``."""
    return np.asarray(scores, dtype=np.float64) > threshold.value


def _fit_anomalous_component(t: np.ndarray, mu0: float, sd0: float, max_iter: int) -> tuple[float, float, float]:
    upper = t[t > mu0 + 2 * sd0]
    if upper.size < 2:
        return 0.0, mu0, sd0
    pi1, mu1, sd1 = upper.size / t.size, float(upper.mean()), max(float(upper.std()), sd0)
    for _ in range(max_iter):
        dens0 = (1 - pi1) * stats.norm.pdf(t, mu0, sd0)
        dens1 = pi1 * stats.norm.pdf(t, mu1, sd1)
        resp = dens1 / np.maximum(dens0 + dens1, 1e-300)
        new_pi = float(resp.mean())
        if new_pi < 1e-4:
            return 0.0, mu0, sd0
        new_mu = float((resp * t).sum() / resp.sum())
        new_sd = max(float(np.sqrt((resp * (t - new_mu) ** 2).sum() / resp.sum())), 0.5 * sd0)
        converged = abs(new_pi - pi1) < 1e-6 and abs(new_mu - mu1) < 1e-6
        pi1, mu1, sd1 = new_pi, new_mu, new_sd
        if converged:
            break
    return pi1, mu1, sd1
