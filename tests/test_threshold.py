"""Turning scores into calls: the label-free conformal rule, an expected fraction, a manual cut."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from acsleuth_core import threshold as thr


def _mixture(seed: int, n_anomalies: int = 100):
    """Normal scores N(0, 1) for 300 reference and 400 target cells, anomalous ones N(5, 1)."""
    rng = np.random.default_rng(seed)
    reference = rng.normal(0, 1, 300)
    target = np.r_[rng.normal(0, 1, 400), rng.normal(5, 1, n_anomalies)]
    truth = np.r_[np.zeros(400, dtype=bool), np.ones(n_anomalies, dtype=bool)]
    return target, reference, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_free_threshold_calls_a_clear_mixture_well(seed):
    target, reference, truth = _mixture(seed)
    threshold = thr.label_free_threshold(target, reference)
    calls = thr.call(target, threshold)
    assert f1_score(truth, calls) > 0.9
    assert threshold.method == "label_free"
    detail = threshold.detail
    assert detail["route"] == "conformal_bh" and detail["fdr"] == thr.FDR_LEVEL
    assert detail["n_reference_cells"] == 300 and not detail["nothing_called"]
    assert detail["reference_called"] == pytest.approx(np.mean(reference > threshold.value))
    # false discoveries stay near the level: at most ~10 % of the calls are normal cells
    assert np.sum(calls & ~truth) <= 0.15 * calls.sum()


def test_label_free_threshold_finds_rare_anomalies_when_they_clear_every_reference_cell():
    rng = np.random.default_rng(3)
    reference = rng.normal(0, 1, 300)
    target = np.r_[rng.normal(0, 1, 500), rng.normal(8, 0.5, 15)]  # 3 % anomalies beyond every reference cell
    calls = thr.call(target, thr.label_free_threshold(target, reference))
    assert calls[500:].all() and calls[:500].sum() <= 3


@pytest.mark.parametrize("seed", range(6))
def test_label_free_threshold_calls_almost_nothing_on_a_clean_target(seed):
    rng = np.random.default_rng(seed)
    reference, clean = rng.normal(0, 1, 300), rng.normal(0, 1, 500)
    threshold = thr.label_free_threshold(clean, reference)
    assert thr.call(clean, threshold).mean() < 0.02


def test_label_free_threshold_does_not_depend_on_the_scores_units():
    target, reference, _ = _mixture(4)
    calls = thr.call(target, thr.label_free_threshold(target, reference))
    rescaled = thr.call(3 * target - 7, thr.label_free_threshold(3 * target - 7, 3 * reference - 7))
    np.testing.assert_array_equal(calls, rescaled)


def test_nothing_called_puts_the_threshold_above_every_score_and_says_so():
    rng = np.random.default_rng(5)
    reference, clean = rng.normal(0, 1, 50), rng.normal(-1, 1, 200)
    threshold = thr.label_free_threshold(clean, reference)
    assert threshold.detail["nothing_called"]
    assert not thr.call(clean, threshold).any() and not thr.call(reference, threshold).any()
    sentence, check = thr.explain(threshold.as_dict())
    assert check and "expected fraction" in sentence


def test_explain_names_the_rule_its_fdr_and_the_reference_share_it_would_call():
    target, reference, _ = _mixture(0)
    threshold = thr.label_free_threshold(target, reference)
    sentence, check = thr.explain(threshold.as_dict())
    assert not check
    assert "300 reference cells" in sentence and "10% false discovery rate" in sentence
    assert f"{threshold.detail['reference_called']:.1%}" in sentence
    assert thr.explain(thr.fraction_threshold(target, 0.2).as_dict())[0].startswith("The top 20.0%")
    assert thr.explain(thr.manual_threshold(1.0).as_dict()) == ("Your score threshold.", False)


def test_minus_log10_pvalues_start_at_zero_and_grow_past_the_reference():
    reference = np.arange(99.0)
    values = thr.minus_log10_pvalues(np.array([-5.0, 49.5, 98.5, 120.0, 1e3]), reference)
    np.testing.assert_allclose(values[:2], [0.0, -np.log10(50 / 100)])
    assert np.all(np.diff(values) > 0) and values[-1] > 2.0  # beyond 1/(n + 1) = 0.01


def test_shifted_samples_names_a_sample_that_sits_above_the_reference_not_one_with_some_anomalies():
    rng = np.random.default_rng(6)
    reference = rng.normal(0, 1, 300)
    anomalous_minority = np.r_[rng.normal(0, 1, 200), rng.normal(6, 1, 60)]
    shifted = rng.normal(2.5, 1, 200)
    scores = np.r_[anomalous_minority, shifted]
    batches = np.r_[np.full(260, "A"), np.full(200, "B")]
    assert thr.shifted_samples(scores, batches, reference) == ["B"]


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


def test_benjamini_hochberg_cut_calls_exactly_the_bh_rejections():
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, 60)
    target = np.r_[rng.normal(0, 1, 300), rng.normal(4, 1, 90)]
    pvalues = thr.tail_pvalues(target, reference)
    cut = thr.benjamini_hochberg_cut(target, pvalues)
    rejected = thr.benjamini_hochberg(pvalues)
    np.testing.assert_array_equal(target > cut, rejected)
    assert 60 < rejected.sum() < 110
    # nothing clears the reference: no cut at all
    clean = rng.normal(0, 1, 300)
    assert thr.benjamini_hochberg_cut(clean, thr.tail_pvalues(clean, reference)) == np.inf


def test_tail_pvalues_are_conformal_below_the_tail_and_keep_falling_past_the_reference():
    rng = np.random.default_rng(7)
    reference = rng.normal(0, 1, 200)
    below = np.linspace(-3, np.quantile(reference, thr.TAIL_QUANTILE), 50)
    np.testing.assert_array_equal(thr.tail_pvalues(below, reference), thr.conformal_pvalues(below, reference))
    far = np.array([reference.max() + 1, reference.max() + 3, reference.max() + 6])
    p = thr.tail_pvalues(far, reference)
    assert np.all(p < 1 / 201) and np.all(np.diff(p) < 0)
    # monotone over the whole range: a higher score never gets a larger p-value
    grid = np.linspace(-4, 10, 500)
    assert np.all(np.diff(thr.tail_pvalues(grid, reference)) <= 1e-12)


@pytest.mark.parametrize("draw", ["normal", "standard_exponential", "standard_t"])
def test_tail_pvalues_are_about_uniform_for_exchangeable_scores(draw):
    """Averaged over references (marginal validity), whatever the tail: light, exponential or heavy (t, 3 df)."""
    shares = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        sample = (lambda n: rng.standard_t(3, n)) if draw == "standard_t" else (lambda n: getattr(rng, draw)(size=n))
        p = thr.tail_pvalues(sample(20000), sample(300))
        shares.append([np.mean(p <= 0.05), np.mean(p <= 0.01), np.mean(p <= 0.001)])
    mean = np.mean(shares, axis=0)
    assert mean[0] == pytest.approx(0.05, abs=0.015)
    assert mean[1] == pytest.approx(0.01, abs=0.005)
    assert mean[2] < 0.004


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
