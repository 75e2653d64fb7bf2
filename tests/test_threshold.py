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
