"""Turning scores into calls: the label-free anchored mixture, an expected fraction, a manual cut."""

import inspect

import numpy as np
import pytest
from sklearn.metrics import f1_score

from acsleuth_core import threshold as thr


def _mixture(seed: int, n_anomalies: int = 100):
    """Scores as probabilities: normal logits N(−3, 1), anomalous logits N(3, 1)."""
    rng = np.random.default_rng(seed)
    reference = thr.expit(rng.normal(-3, 1, 300))
    target = thr.expit(np.r_[rng.normal(-3, 1, 400), rng.normal(3, 1, n_anomalies)])
    truth = np.r_[np.zeros(400, dtype=bool), np.ones(n_anomalies, dtype=bool)]
    return target, reference, truth


def test_label_free_threshold_takes_only_target_and_reference_scores():
    assert list(inspect.signature(thr.label_free_threshold).parameters) == ["target_scores", "reference_scores"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_free_threshold_calls_a_clear_mixture_well(seed):
    target, reference, truth = _mixture(seed)
    threshold = thr.label_free_threshold(target, reference)
    calls = thr.call(target, threshold)
    assert f1_score(truth, calls) > 0.9
    assert threshold.method == "label_free"
    assert 0.0 < threshold.value < 1.0
    # the anomalous component is found where the anomalies are, at about their share
    assert threshold.detail["anomalous_centre"] == pytest.approx(3.0, abs=0.5)
    assert threshold.detail["anomaly_fraction"] == pytest.approx(0.2, abs=0.05)
    assert threshold.detail["n_reference_cells"] == 300
    assert threshold.detail["route"] == "mixture"
    assert threshold.detail["reference_called"] <= thr.MAX_REFERENCE_CALLED


def test_label_free_threshold_calls_almost_nothing_on_a_clean_target():
    rng = np.random.default_rng(0)
    reference = thr.expit(rng.normal(-3, 1, 300))
    clean = thr.expit(rng.normal(-3, 1, 500))
    calls = thr.call(clean, thr.label_free_threshold(clean, reference))
    assert calls.mean() < 0.02


@pytest.mark.parametrize("seed", [82, 132, 194, 222])
def test_label_free_threshold_never_calls_half_of_a_clean_target(seed):
    rng = np.random.default_rng(seed)
    reference, clean = rng.normal(0, 1, 300), rng.normal(0, 1, 500)
    threshold = thr.label_free_threshold(thr.expit(clean), thr.expit(reference))
    assert thr.call(thr.expit(clean), threshold).mean() < 0.1


def test_label_free_threshold_falls_back_to_the_reference_tail_without_an_anomalous_component():
    rng = np.random.default_rng(3)
    reference = rng.normal(-3, 1, 1000)
    mixture = thr.fit_anchored_mixture(reference[:500] - 1.0, reference)
    assert mixture.anomaly_fraction == 0.0
    expected = mixture.normal_centre + 2.5758293035489 * mixture.normal_scale
    assert mixture.cut() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_label_free_threshold_does_not_call_a_normal_subpopulation_the_reference_also_has(seed):
    """A fifth of reference and target cells sit in an upper mode: the mixture takes it for anomalies,
    but its cut calls more than MAX_REFERENCE_CALLED of the (normal) reference cells, so it is not
    trusted and the conformal BH fallback calls (almost) nothing."""
    rng = np.random.default_rng(seed)

    def cells(n):
        return np.where(rng.random(n) < 0.2, rng.normal(3, 0.3, n), rng.normal(0, 1, n))

    reference, target = cells(300), cells(500)
    mixture = thr.fit_anchored_mixture(target, reference)
    assert np.mean(target > mixture.cut()) > 0.1  # what the unchecked mixture would call
    assert thr.reference_called_share(reference, mixture.cut()) > thr.MAX_REFERENCE_CALLED
    assert not thr.mixture_is_trusted(mixture, reference)
    threshold = thr.label_free_threshold(thr.expit(target), thr.expit(reference))
    assert threshold.detail["route"] == "conformal_bh"
    assert thr.call(thr.expit(target), threshold).mean() < 0.02
    assert threshold.detail["reference_called"] <= thr.FDR_LEVEL


def test_label_free_threshold_falls_back_to_conformal_bh_when_the_mixture_is_degenerate():
    """The anomalous component would swallow almost the whole target (fraction > MAX_MIXTURE_FRACTION)."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 100)
    target = np.r_[rng.normal(2.5, 1.5, 950), rng.normal(9, 0.3, 50)]
    mixture = thr.fit_anchored_mixture(target, reference)
    assert mixture.anomaly_fraction > thr.MAX_MIXTURE_FRACTION
    threshold = thr.label_free_threshold(thr.expit(target), thr.expit(reference))
    assert threshold.detail["route"] == "conformal_bh"
    calls = thr.call(thr.expit(target), threshold)
    assert calls[950:].all()  # every cell far beyond every reference cell is called
    assert np.isclose(threshold.value, thr.expit(reference), rtol=0, atol=1e-12).any()  # a reference score


def test_conformal_pvalues_count_reference_scores_at_or_above():
    reference = np.array([4.0, 1.0, 3.0, 2.0])
    p = thr.conformal_pvalues(np.array([0.0, 2.0, 2.5, 4.0, 5.0]), reference)
    np.testing.assert_allclose(p, np.array([5, 4, 3, 2, 1]) / 5)


def test_conformal_pvalues_are_uniform_for_exchangeable_scores():
    rng = np.random.default_rng(1)
    p = thr.conformal_pvalues(rng.normal(size=20000), rng.normal(size=99))
    assert set(np.unique(p * 100).round(6)) <= set(np.arange(1, 101, dtype=float))
    # marginally super-uniform: P(p ≤ k/100) ≈ k/100 (within sampling error of the 99 reference cells)
    assert np.mean(p <= 0.1) == pytest.approx(0.1, abs=0.07)


def test_benjamini_hochberg_is_step_up():
    # sorted p against k/5 · 0.05: 0.001 ≤ 0.01, 0.02 ≤ 0.02, 0.039 > 0.03 (still rejected: step-up),
    # 0.04 ≤ 0.04, 0.9 > 0.05
    p = np.array([0.04, 0.001, 0.039, 0.02, 0.9])
    np.testing.assert_array_equal(thr.benjamini_hochberg(p, 0.05), [True, True, True, True, False])
    np.testing.assert_array_equal(thr.benjamini_hochberg(p, 0.005), [False, True, False, False, False])
    assert not thr.benjamini_hochberg(np.array([0.5, 0.9]), 0.1).any()


def test_conformal_bh_cut_calls_exactly_the_bh_rejections():
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, 60)
    target = np.r_[rng.normal(0, 1, 300), rng.normal(4, 1, 90)]
    cut = thr.conformal_bh_cut(target, reference)
    rejected = thr.benjamini_hochberg(thr.conformal_pvalues(target, reference))
    np.testing.assert_array_equal(target > cut, rejected)
    assert cut in set(reference)
    assert 60 < rejected.sum() < 110
    # nothing clears the reference: no cut at all
    assert thr.conformal_bh_cut(rng.normal(0, 1, 300), reference) == np.inf


def test_anchored_mixture_pins_the_normal_component_to_the_reference():
    target, reference, _ = _mixture(4)
    mixture = thr.fit_anchored_mixture(thr.logit(target), thr.logit(reference))
    assert mixture.normal_centre == pytest.approx(float(np.median(thr.logit(reference))))
    # changing the target does not move the normal component
    other = thr.fit_anchored_mixture(thr.logit(target[:450]), thr.logit(reference))
    assert other.normal_centre == mixture.normal_centre
    assert other.normal_scale == mixture.normal_scale


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("n_cells", [1000, 777])
def test_fraction_threshold_calls_the_requested_fraction(fraction, n_cells):
    scores = np.random.default_rng(5).uniform(size=n_cells)
    threshold = thr.fraction_threshold(scores, fraction)
    n_called = int(thr.call(scores, threshold).sum())
    assert abs(n_called - fraction * n_cells) <= 1
    assert threshold.method == "fraction"
    assert threshold.detail == {"fraction": fraction}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_threshold_rejects_fractions_outside_zero_one(fraction):
    with pytest.raises(ValueError):
        thr.fraction_threshold(np.linspace(0, 1, 10), fraction)


def test_manual_threshold_calls_scores_strictly_above_it():
    scores = np.array([0.1, 0.5, 0.50001, 0.9])
    threshold = thr.manual_threshold(0.5)
    np.testing.assert_array_equal(thr.call(scores, threshold), [False, False, True, True])
    assert threshold.method == "manual"
    assert threshold.as_dict() == {"value": 0.5, "method": "manual", "detail": {}}


def test_logit_and_expit_are_inverse_and_logit_is_finite_at_zero_and_one():
    x = np.linspace(-8, 8, 17)
    np.testing.assert_allclose(thr.logit(thr.expit(x)), x, atol=1e-9)
    assert np.all(np.isfinite(thr.logit(np.array([0.0, 1.0]))))


def test_held_out_pvalues_rank_each_score_against_the_others():
    p = thr.held_out_pvalues(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(p, [4 / 4, 3 / 4, 2 / 4, 1 / 4])  # (1 + others at or above) / n


def test_fisher_combination_adds_up_evidence():
    one = np.array([0.5])
    assert thr.fisher_combined(np.array([1.0]), np.array([1.0]))[0] == pytest.approx(1.0)
    assert thr.fisher_combined(np.array([0.01]), one)[0] < 0.05  # one strong test carries the call
    assert thr.fisher_combined(np.array([0.01]), np.array([0.01]))[0] < thr.fisher_combined(np.array([0.01]), one)[0]


def test_label_free_threshold_falls_back_to_a_target_mixture_when_bh_calls_nothing():
    """Few held-out cells, four of them outliers beyond every anomaly: the anchored mixture's cut calls
    them (over MAX_REFERENCE_CALLED), no conformal p-value is small enough for BH, yet the target's
    scores fall in two clear groups, which the last route calls."""
    rng = np.random.default_rng(0)
    reference = np.r_[rng.normal(0, 1, 26), 12.0, 12.5, 13.0, 13.5]
    target = np.r_[rng.normal(0.3, 1, 400), rng.normal(8, 0.7, 600)]
    assert not thr.mixture_is_trusted(thr.fit_anchored_mixture(target, reference), reference)
    assert not thr.benjamini_hochberg(thr.conformal_pvalues(target, reference)).any()
    threshold = thr.label_free_threshold(thr.expit(target), thr.expit(reference))
    assert threshold.detail["route"] == "target_mixture"
    calls = thr.call(thr.expit(target), threshold)
    assert calls[400:].mean() > 0.98 and calls[:400].mean() < 0.02


def test_estimated_fdr_is_near_one_when_the_target_scores_like_the_reference():
    rng = np.random.default_rng(1)
    reference, target = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    assert thr.estimated_fdr(target, reference, 1.0) > 0.8
    assert thr.estimated_fdr(np.r_[target, np.full(1000, 9.0)], reference, 3.0) < 0.01
    assert thr.estimated_fdr(target, reference, 99.0) == 1.0  # nothing called


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_target_without_anomalies_is_not_split_by_the_target_mixture(seed):
    """A shifted, one-group target with outliers among few held-out cells: BH calls nothing, and the
    target mixture's split of it is rejected by its estimated false discovery rate."""
    rng = np.random.default_rng(seed)
    reference = np.r_[rng.normal(0, 1, 26), 12.0, 12.5, 13.0, 13.5]
    target = rng.normal(1.0, 1.2, 1000)
    free = thr.fit_target_mixture(target)
    assert thr.estimated_fdr(target, reference, free.crossing()) > thr.MAX_TARGET_MIXTURE_FDR
    threshold = thr.label_free_threshold(thr.expit(target), thr.expit(reference))
    assert threshold.detail["route"] != "target_mixture"
    assert thr.call(thr.expit(target), threshold).mean() < 0.05


def test_explain_says_how_each_route_called_and_flags_the_ones_to_check():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 60)
    separated = thr.label_free_threshold(thr.expit(np.r_[rng.normal(0, 1, 400), rng.normal(8, 0.5, 100)]), thr.expit(reference))
    text, check = thr.explain(separated.as_dict())
    assert separated.detail["route"] == "mixture" and "60 reference cells held out" in text and not check
    nothing = thr.label_free_threshold(thr.expit(rng.normal(0, 1, 500)), thr.expit(reference))
    text, check = thr.explain(nothing.as_dict())
    assert nothing.value == 1.0 and "none is called" in text and check
    outliers = np.r_[rng.normal(0, 1, 26), 12.0, 12.5, 13.0, 13.5]
    last = thr.label_free_threshold(thr.expit(np.r_[rng.normal(0.3, 1, 400), rng.normal(8, 0.7, 600)]), thr.expit(outliers))
    text, check = thr.explain(last.as_dict())
    assert last.detail["route"] == "target_mixture" and "last resort" in text and check
    assert thr.explain(thr.fraction_threshold(np.arange(10.0), 0.2).as_dict()) == (
        "The top 20.0% of cells (your expected anomaly fraction).", False
    )


def test_the_last_route_raises_a_too_low_cut_until_its_estimated_fdr_is_met():
    """A mixture crossing inside the normal bulk calls too many normal cells; the cut moves up to the
    lowest one whose estimated FDR is within the level: the anomalies, and a true FDR within the level."""
    rng = np.random.default_rng(0)
    reference = np.r_[rng.normal(0, 1, 59), 6.5]  # one held-out outlier among the anomalies' scores
    target = np.r_[rng.normal(0, 1, 300), rng.normal(6, 0.5, 100)]
    too_low = 1.0
    assert thr.estimated_fdr(target, reference, too_low) > thr.MAX_TARGET_MIXTURE_FDR
    cut = thr.lowest_cut_within_fdr(target, reference, start=too_low)
    assert thr.estimated_fdr(target, reference, cut) <= thr.MAX_TARGET_MIXTURE_FDR
    calls = target > cut
    assert calls[300:].mean() > 0.95 and calls[:300].sum() / calls.sum() <= thr.MAX_TARGET_MIXTURE_FDR
    assert (target > too_low)[:300].sum() / (target > too_low).sum() > thr.MAX_TARGET_MIXTURE_FDR


def test_the_last_route_finds_no_cut_in_a_target_like_the_reference():
    """Above every held-out cell a few target cells still score by chance; the conformal count (plus one)
    keeps those from looking like a call with no false discoveries."""
    rng = np.random.default_rng(3)
    reference, target = rng.normal(0, 1, 60), rng.normal(0, 1, 2000)
    assert (target > reference.max()).sum() > 0
    assert thr.lowest_cut_within_fdr(target, reference, start=0.0) == np.inf


def test_the_mixture_cut_starts_at_the_held_out_975th_percentile_when_the_gaussian_tail_reaches_further():
    """Normal scores with a short tail (uniform here, as capped conformal scores pile up) and anomalies
    around the fitted Gaussian's 97.5th percentile: the floor there would leave over a tenth of them
    uncalled, while no held-out (normal) cell scores above 2."""
    rng = np.random.default_rng(1)
    reference = rng.uniform(-2, 2, 59)
    target = np.r_[rng.uniform(-2, 2, 300), rng.normal(3.3, 0.2, 100)]
    mixture = thr.fit_anchored_mixture(target, reference)
    gaussian_floor = mixture.normal_centre + 1.959964 * mixture.normal_scale
    assert mixture.found_anomalies and np.mean(target[300:] > gaussian_floor) < 0.9
    calls = target > mixture.cut()
    assert calls[300:].mean() > 0.98 and not calls[:300].any()
