"""Joining the detector's views into one score."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from acsleuth_core.views import ViewScores, combine, robust_scale, standardised, tail_excess, tail_excess_weights


def _view(rng, centre=0.0, spread=1.0, n_target=300, n_reference=200, signal=0.0):
    """A view whose last 30 target cells are shifted up by ``signal`` reference spreads."""
    target = rng.normal(centre, spread, n_target)
    target[-30:] += signal * spread
    return ViewScores(target, rng.normal(centre, spread, n_reference))


def test_standardising_puts_the_reference_at_median_zero_and_mad_one():
    rng = np.random.default_rng(0)
    view = standardised(_view(rng, centre=40.0, spread=7.0))
    assert np.median(view.reference) == pytest.approx(0.0, abs=1e-12)
    centre, scale = robust_scale(view.reference)
    assert scale == pytest.approx(1.0)


def test_the_units_of_a_view_do_not_change_the_joined_score():
    rng = np.random.default_rng(1)
    a, b = _view(rng, signal=4.0), _view(rng, signal=1.0)
    rescaled = ViewScores(1000 * b.target + 5, 1000 * b.reference + 5)
    np.testing.assert_allclose(combine({"a": a, "b": b}).target, combine({"a": a, "b": rescaled}).target)


def test_a_view_with_signal_carries_the_joined_score_over_a_view_without():
    rng = np.random.default_rng(2)
    strong, noise = _view(rng, signal=8.0), _view(rng, signal=0.0)
    truth = np.r_[np.zeros(270, bool), np.ones(30, bool)]
    joined = combine({"strong": strong, "noise": noise})
    assert roc_auc_score(truth, joined.target) > 0.99
    assert joined.reference.shape == (200,)


def test_weights_pick_views_and_must_be_sensible():
    rng = np.random.default_rng(3)
    a, b = _view(rng), _view(rng)
    only_a = combine({"a": a, "b": b}, weights={"a": 1.0, "b": 0.0})
    np.testing.assert_allclose(only_a.target, standardised(a).target)
    with pytest.raises(ValueError, match="weights"):
        combine({"a": a, "b": b}, weights={"a": -1.0, "b": 1.0})


def test_tail_excess_is_the_targets_share_past_the_references_tail_beyond_what_the_reference_has():
    rng = np.random.default_rng(4)
    clean = ViewScores(rng.normal(size=2000), rng.normal(size=2000))
    assert tail_excess(clean) < 0.02
    twenty_percent_out = ViewScores(np.r_[rng.normal(size=800), rng.normal(10, 1, 200)], rng.normal(size=2000))
    assert tail_excess(twenty_percent_out) == pytest.approx(0.2 + 0.8 * 0.05 - 0.05, abs=0.02)
    below = ViewScores(rng.normal(-3, 1, 500), rng.normal(size=500))
    assert tail_excess(below) == 0.0


def test_weights_favour_the_view_in_which_the_target_stands_out():
    rng = np.random.default_rng(5)
    views = {"telling": _view(rng, signal=10.0), "silent": _view(rng, signal=0.0)}
    weights = tail_excess_weights(views)
    assert weights["telling"] > 20 * weights["silent"] and weights["silent"] > 0
    truth = np.r_[np.zeros(270, bool), np.ones(30, bool)]
    weighted = combine(views, weights)
    assert roc_auc_score(truth, weighted.target) >= roc_auc_score(truth, combine(views).target)
