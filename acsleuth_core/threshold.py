"""Turning anomaly scores into calls without labels.

The default rule fits a two-component Gaussian mixture to the target scores
(on the logit scale) whose *normal* component is pinned to the scores of
reference cells held out of every fit: those cells are normal by definition,
so they say what a normal score looks like. Only the anomalous component and
the mixing weight are estimated. Users may instead give an expected anomaly
fraction or a fixed threshold.

The held-out reference cells also *check* the call. A cut that calls more than
``MAX_REFERENCE_CALLED`` of them (normal cells!) is not trusted; neither is a
mixture whose anomalous component is degenerate (none found, or one that takes
most of the target: a broad component that merely absorbs the normal cells'
spread when the pinned normal scale from a few dozen held-out cells is off).
The call then falls back to an empirical null: conformal p-values of target
scores against the held-out scores, ``p = (1 + #{reference ≥ score}) / (n + 1)``,
and Benjamini–Hochberg at ``FDR_LEVEL``. Those p-values are valid when target
normal cells are exchangeable with held-out reference cells and BH on them
controls the false discovery rate (Bates et al. 2023, "Testing for outliers
with conformal p-values"). The BH cut is always one of the reference scores,
so it calls about ``p*`` of the held-out cells at most. With ``n`` held-out
cells the smallest p-value is ``1/(n + 1)``: rare anomalies can go uncalled by
this route, it errs on the side of calling too little. Only when BH calls
nothing is a two-component mixture fitted on the target scores alone
(:func:`fit_target_mixture`); when its upper group is not most of the target,
the cut is the lowest one, from where that group's posterior reaches 1/2
upwards, whose call has a false discovery rate, estimated with the held-out
cells as the null (:func:`estimated_fdr`), of at most
``MAX_TARGET_MIXTURE_FDR``. The estimate counts held-out cells as a conformal
p-value does (plus one), so a cut above every held-out cell still has to call
several times more target cells than the null would put there. That check
rejects a normal subpopulation that scores high in reference and target alike,
and the split of a target without anomalies (README: targets with their
anomalies removed); its value, looser than BH's level because this route
serves small or outlier-carrying held-out sets whose estimate is coarse, was
set after seeing the CellBench benchmark (README).
``Threshold.detail`` records the ``route`` taken (``"mixture"``,
``"conformal_bh"`` or ``"target_mixture"``), the fitted mixture and the share
of held-out cells the cut calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import numpy as np
from scipy import stats

METHODS = ("label_free", "fraction", "manual")
#: an anomalous component must sit this many normal SDs above the normal centre to count
MIN_SEPARATION = 2.0
#: a label-free cut may call at most this share of held-out reference cells (which are normal)
MAX_REFERENCE_CALLED = 0.1
#: a mixture whose anomalous component takes more than this share of the target is not trusted
MAX_MIXTURE_FRACTION = 0.9
#: the last-resort mixture fitted on the target alone is used when its call's estimated FDR is at most this
MAX_TARGET_MIXTURE_FDR = 0.2
#: false discovery rate of the conformal Benjamini–Hochberg fallback
FDR_LEVEL = 0.1


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
class ScoreMixture:
    """Two Gaussians on a real-valued score, a normal and an anomalous one."""

    normal_centre: float
    normal_scale: float
    anomalous_centre: float
    anomalous_scale: float
    anomaly_fraction: float
    normal_975: float = float("inf")

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
        97.5th percentile or, when lower, the observed normal scores' own (``normal_975``); the
        Gaussian's 99.5th percentile when no anomalous component was found.

        The Gaussian is a model of the normal scores; where their observed tail ends earlier
        (normal scores built from conformal p-values pile up below a cap), its 97.5th percentile
        can lie beyond most anomalies, and the observed percentile is the better floor.
        """
        if not self.found_anomalies:
            return self.normal_centre + stats.norm.ppf(0.995) * self.normal_scale
        floor = self.normal_centre + stats.norm.ppf(0.975) * self.normal_scale
        return self.crossing(start=min(floor, self.normal_975))

    def crossing(self, start: Optional[float] = None) -> float:
        """Where the anomalous posterior first reaches 1/2 on the way from ``start`` (default: the
        normal centre) to the anomalous centre; the anomalous centre when it does not."""
        start = self.normal_centre if start is None else start
        grid = np.linspace(start, self.anomalous_centre, 2001)
        above = np.nonzero(self.posterior(grid) >= 0.5)[0]
        return float(grid[above[0]]) if above.size else float(self.anomalous_centre)


def fit_anchored_mixture(target: np.ndarray, reference: np.ndarray, *, max_iter: int = 200) -> ScoreMixture:
    """Fit the anomalous component and fraction by EM, the normal one fixed from ``reference``.

    The normal location and scale are the reference's median and MAD (robust
    to the odd outlier among reference cells); its 97.5th percentile bounds the cut's floor.
    """
    t = np.asarray(target, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    mu0 = float(np.median(r))
    sd0 = max(float(stats.median_abs_deviation(r, scale="normal")), 0.25 * float(np.std(r)), 1e-3)
    pi1, mu1, sd1 = _fit_anomalous_component(t, mu0, sd0, max_iter)
    return ScoreMixture(mu0, sd0, mu1, sd1, pi1, normal_975=float(np.quantile(r, 0.975)))


def label_free_threshold(target_scores: np.ndarray, reference_scores: np.ndarray) -> Threshold:
    """The default call for probability-like scores in [0, 1], on their logits: an anchored mixture
    checked on the held-out reference cells, else conformal p-values with Benjamini–Hochberg, else
    (BH calls nothing) a mixture fitted on the target alone, if it passes its own check."""
    t, r = logit(target_scores), logit(reference_scores)
    mixture = fit_anchored_mixture(t, r)
    cut, route = mixture.cut(), "mixture"
    if not mixture_is_trusted(mixture, r):
        cut, route = conformal_bh_cut(t, r), "conformal_bh"
    if cut == np.inf:
        free = fit_target_mixture(t)
        if free.anomaly_fraction <= MAX_MIXTURE_FRACTION:
            free_cut = lowest_cut_within_fdr(t, r, start=free.crossing())
            if free_cut < np.inf:
                mixture, cut, route = free, free_cut, "target_mixture"
    value = float(expit(cut))  # 1.0 (nothing called) when no route calls anything
    detail = asdict(mixture) | {
        "n_reference_cells": int(np.size(reference_scores)),
        "scale": "logit",
        "route": route,
        "reference_called": reference_called_share(reference_scores, value),
    }
    return Threshold(value=value, method="label_free", detail=detail)


def fit_target_mixture(target: np.ndarray, seed: int = 0) -> ScoreMixture:
    """Two Gaussians fitted to the target scores alone (EM, scikit-learn); the lower one is the normal one.

    The last resort of :func:`label_free_threshold`: with few held-out cells, or
    an outlier among them, the conformal p-values cannot get small enough for
    BH to call anything even when the target's scores clearly fall in two groups.
    """
    from sklearn.mixture import GaussianMixture

    t = np.asarray(target, dtype=np.float64).reshape(-1, 1)
    if t.shape[0] < 4 or np.ptp(t) == 0:
        centre = float(t.mean()) if t.size else 0.0
        return ScoreMixture(centre, 1.0, centre, 1.0, 0.0)
    fitted = GaussianMixture(2, n_init=3, random_state=seed).fit(t)
    low, high = np.argsort(fitted.means_.ravel())
    centre, scale = fitted.means_.ravel(), np.sqrt(fitted.covariances_.ravel())
    return ScoreMixture(
        float(centre[low]), float(scale[low]), float(centre[high]), float(scale[high]), float(fitted.weights_[high])
    )


def mixture_is_trusted(mixture: ScoreMixture, reference: np.ndarray) -> bool:
    """Whether an anchored mixture's call passes the checks: an anomalous component was found,
    it takes at most ``MAX_MIXTURE_FRACTION`` of the target, and its cut calls at most
    ``MAX_REFERENCE_CALLED`` of the held-out reference ``scores`` (same scale as the mixture)."""
    return (
        mixture.found_anomalies
        and mixture.anomaly_fraction <= MAX_MIXTURE_FRACTION
        and reference_called_share(reference, mixture.cut()) <= MAX_REFERENCE_CALLED
    )


def estimated_fdr(target: np.ndarray, reference: np.ndarray, cut: float) -> float:
    """Storey's estimate of the false discovery rate of calling ``target > cut``, with the held-out
    ``reference`` scores as the null: ``π̂₀ · (conformal share of reference called) / (share of target
    called)``. The reference share is ``(1 + #{reference > cut}) / (n + 1)``, as a conformal p-value
    counts, so a cut above every held-out score is not taken for a perfect one; ``π̂₀`` is the target's
    uncalled share over the reference's (at most 1). 1 when nothing is called."""
    return float(_estimated_fdrs(target, reference, np.array([cut], dtype=np.float64))[0])


def lowest_cut_within_fdr(target: np.ndarray, reference: np.ndarray, start: float, level: float = MAX_TARGET_MIXTURE_FDR) -> float:
    """The lowest cut at or above ``start`` (``start`` itself or a target score) whose call's
    :func:`estimated_fdr` is at most ``level``; ``inf`` when none is."""
    t = np.asarray(target, dtype=np.float64)
    cuts = np.unique(np.r_[start, t[t > start]])
    within = np.nonzero(_estimated_fdrs(t, reference, cuts) <= level)[0]
    return float(cuts[within[0]]) if within.size else float("inf")


def _estimated_fdrs(target: np.ndarray, reference: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """:func:`estimated_fdr` at each of ``cuts`` at once (sorted counts, no loop over cuts)."""
    t = np.sort(np.asarray(target, dtype=np.float64))
    r = np.sort(np.asarray(reference, dtype=np.float64))
    target_called = (t.size - np.searchsorted(t, cuts, side="right")) / t.size
    reference_above = r.size - np.searchsorted(r, cuts, side="right")
    reference_share = (1.0 + reference_above) / (r.size + 1.0)
    pi0 = np.minimum(1.0, (1.0 - target_called) / np.maximum(1.0 - reference_above / r.size, 1e-12))
    with np.errstate(divide="ignore", invalid="ignore"):
        fdr = np.minimum(1.0, pi0 * reference_share / target_called)
    return np.where(target_called > 0, fdr, 1.0)


def reference_called_share(reference: np.ndarray, cut: float) -> float:
    """Share of held-out reference scores above ``cut``: an estimate of the call's false-positive rate."""
    return float(np.mean(np.asarray(reference, dtype=np.float64) > cut))


def conformal_pvalues(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Conformal p-values ``(1 + #{reference ≥ t}) / (n + 1)`` of target scores (high = anomalous)."""
    r = np.sort(np.asarray(reference, dtype=np.float64))
    t = np.asarray(target, dtype=np.float64)
    n_at_or_above = r.size - np.searchsorted(r, t, side="left")
    return (1.0 + n_at_or_above) / (r.size + 1.0)


def held_out_pvalues(reference: np.ndarray) -> np.ndarray:
    """Each reference score's conformal p-value against the *other* reference scores (leave one out)."""
    r = np.asarray(reference, dtype=np.float64)
    ordered = np.sort(r)
    n_others_at_or_above = ordered.size - np.searchsorted(ordered, r, side="left") - 1
    return (1.0 + n_others_at_or_above) / ordered.size


def fisher_combined(*pvalues: np.ndarray) -> np.ndarray:
    """Fisher's combination of independent tests: the χ²(2m) tail of ``−2 Σ log p`` over the m p-values."""
    statistic = -2.0 * np.sum([np.log(np.asarray(p, dtype=np.float64)) for p in pvalues], axis=0)
    return stats.chi2.sf(statistic, 2 * len(pvalues))


def benjamini_hochberg(pvalues: np.ndarray, q: float = FDR_LEVEL) -> np.ndarray:
    """Boolean rejections of the Benjamini–Hochberg step-up procedure at level ``q``."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    passed = np.nonzero(p[order] <= q * np.arange(1, p.size + 1) / p.size)[0]
    rejected = np.zeros(p.size, dtype=bool)
    if passed.size:
        rejected[order[: passed[-1] + 1]] = True
    return rejected


def conformal_bh_cut(target: np.ndarray, reference: np.ndarray, q: float = FDR_LEVEL) -> float:
    """The cut ``c`` for which ``target > c`` are exactly the BH rejections of the conformal
    p-values at level ``q``: a reference score (``inf`` when nothing is rejected)."""
    t = np.asarray(target, dtype=np.float64)
    rejected = benjamini_hochberg(conformal_pvalues(t, reference), q)
    if not rejected.any():
        return float("inf")
    r = np.sort(np.asarray(reference, dtype=np.float64))
    # the largest rejected p-value allows j reference scores at or above a called cell
    j = int(round(conformal_pvalues(t[rejected], r).max() * (r.size + 1))) - 1
    return float(r[r.size - 1 - j]) if j < r.size else float("-inf")


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
    the call deserves their eye (nothing called, or the last-resort route)."""
    detail = threshold.get("detail", {})
    if threshold["method"] == "fraction":
        return f"The top {float(detail['fraction']):.1%} of cells (your expected anomaly fraction).", False
    if threshold["method"] == "manual":
        return "Your score threshold.", False
    n = int(detail.get("n_reference_cells", 0))
    route = detail.get("route")
    if route == "mixture":
        return (
            f"Label-free: the scores split into a normal group, pinned to {n} reference cells held out of "
            f"training, and an anomalous group; the cut calls {float(detail['reference_called']):.0%} of the "
            "held-out cells.", False,
        )
    if route == "target_mixture":
        return (
            f"Label-free, last resort: the {n} held-out reference cells could not anchor the call (too few, or "
            "outliers among them), so the target's scores were split into two groups on their own and cut, "
            f"at or above that split, where the estimated false discovery rate is at most "
            f"{MAX_TARGET_MIXTURE_FDR:.0%}. Check the histogram; set an expected fraction or a threshold if the "
            "cut looks wrong.", True,
        )
    if float(threshold["value"]) >= 1.0:
        return (
            f"Label-free: no cell scored clearly beyond the {n} held-out reference cells, so none is called. "
            "If you expect anomalies, set an expected fraction or a threshold.", True,
        )
    return (
        f"Label-free: cells scoring beyond the {n} held-out reference cells at a {FDR_LEVEL:.0%} false "
        "discovery rate (conformal p-values, Benjamini–Hochberg).", False,
    )


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
