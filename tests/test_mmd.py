"""The MMD predictor objective (paper eq. 9–12) and its mini-batch estimate."""

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from acsleuth_core.errors import Cancelled
from acsleuth_core.mmd import (
    PredictorConfig,
    fit_predictor,
    gamma_c,
    gaussian_kernel,
    minibatch_loss,
    pair_sum,
    predict_logits,
    soft_counts,
)
from acsleuth_core.progress import CancelToken

LOW, HIGH = 1e-6, 1 - 1e-6
M, N = 7.0, 3.0


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _gamma_c_reference(p_i: float, p_j: float, m: float, n: float) -> float:
    """Eq. 11 written out term by term, with the mixed terms' sign corrected (see mmd's docstring)."""
    s = math.sin(math.pi * p_i) * math.sin(math.pi * p_j) / math.pi**2
    return s * (
        1 / (m * (m - 1)) / (p_i * p_j)
        + 1 / (m * n) / ((p_i - 1) * p_j)
        + 1 / (m * n) / (p_i * (p_j - 1))
        + 1 / (n * (n - 1)) / ((p_i - 1) * (p_j - 1))
    )


def _kernel_np(x: np.ndarray, h: float) -> np.ndarray:
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * h**2))


# ------------------------------------------------------------------ γ_c (eq. 10–11)
@pytest.mark.parametrize(
    "p_i, p_j, expected",
    [
        (LOW, LOW, 1 / (M * (M - 1))),  # both normal
        (HIGH, HIGH, 1 / (N * (N - 1))),  # both anomalous
        (LOW, HIGH, -1 / (M * N)),  # mixed pair: negative, as eq. 10 (the printed eq. 11 gives +1/(mn))
        (HIGH, LOW, -1 / (M * N)),
    ],
)
def test_gamma_c_equals_eq10_at_the_corners(p_i, p_j, expected):
    value = float(gamma_c(_t(p_i), _t(p_j), M, N))
    assert value == pytest.approx(expected, rel=1e-4)


def test_gamma_c_matches_sign_corrected_eq11_inside_the_square():
    rng = np.random.default_rng(0)
    for p_i, p_j in rng.uniform(0.02, 0.98, size=(20, 2)):
        assert float(gamma_c(_t(p_i), _t(p_j), M, N)) == pytest.approx(_gamma_c_reference(p_i, p_j, M, N), rel=1e-9)


def test_gamma_c_is_symmetric_and_broadcasts():
    p = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    table = gamma_c(p[:, None], p[None, :], M, N)
    assert table.shape == (9, 9)
    torch.testing.assert_close(table, table.T)


# ------------------------------------------------------------------ pair sum (eq. 12)
def test_pair_sum_equals_an_explicit_double_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 4))
    p = rng.uniform(0.05, 0.95, size=12)
    m, n, h = 7.4, 4.6, 1.3
    k = _kernel_np(x, h)
    loop = sum(k[i, j] * _gamma_c_reference(p[i], p[j], m, n) for i in range(12) for j in range(12) if i != j)
    value = float(pair_sum(torch.from_numpy(x), torch.from_numpy(p), m, n, h))
    assert value == pytest.approx(loop, rel=1e-9)


def test_gaussian_kernel_is_one_on_the_diagonal_and_matches_the_formula():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3))
    k = gaussian_kernel(torch.from_numpy(x), torch.from_numpy(x), 0.8).numpy()
    np.testing.assert_allclose(k, _kernel_np(x, 0.8), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.diag(k), 1.0)


def _grouped_cells(n_cells: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells with a shifted third, and soft scores that mostly follow the shift."""
    rng = np.random.default_rng(seed)
    shifted = np.arange(n_cells) % 3 == 0
    x = rng.normal(size=(n_cells, 3)) + 2.0 * shifted[:, None]
    p = np.clip(np.where(shifted, 0.8, 0.2) + rng.normal(0, 0.1, n_cells), 0.02, 0.98)
    return torch.from_numpy(x), torch.from_numpy(p)


def test_minibatch_loss_matches_full_loss_exactly_in_expectation_over_all_subsets():
    x, p = _grouped_cells(7, seed=3)
    m, n = (float(v) for v in soft_counts(p, 7))
    h = 1.5
    full = -float(pair_sum(x, p, m, n, h))
    subsets = list(itertools.combinations(range(7), 3))
    assert len(subsets) == 35
    mean = np.mean([float(minibatch_loss(x[list(s)], p[list(s)], m, n, 7, h)) for s in subsets])
    assert mean == pytest.approx(full, rel=1e-5)


def test_minibatch_loss_is_an_unbiased_estimate_of_the_full_loss():
    n_cells, batch, draws = 15, 6, 3000
    x, p = _grouped_cells(n_cells, seed=4)
    m, n = (float(v) for v in soft_counts(p, n_cells))
    h = 1.5
    full = -float(pair_sum(x, p, m, n, h))
    rng = np.random.default_rng(5)
    estimates = np.array(
        [
            float(minibatch_loss(x[idx], p[idx], m, n, n_cells, h))
            for idx in (torch.from_numpy(rng.choice(n_cells, batch, replace=False)) for _ in range(draws))
        ]
    )
    standard_error = estimates.std(ddof=1) / math.sqrt(draws)
    assert abs(full) > 0.05  # the groups really differ, so the check is not about a loss near zero
    assert 4 * standard_error < 0.05 * abs(full)  # enough draws to tell a few-percent bias
    assert abs(estimates.mean() - full) < 4 * standard_error


def test_minibatch_loss_over_all_cells_is_minus_the_full_pair_sum():
    x, p = _grouped_cells(10, seed=6)
    m, n = (float(v) for v in soft_counts(p, 10))
    assert float(minibatch_loss(x, p, m, n, 10, 1.0)) == pytest.approx(-float(pair_sum(x, p, m, n, 1.0)), rel=1e-12)


def test_hard_labels_give_minus_the_unbiased_mmd2_between_the_groups():
    rng = np.random.default_rng(7)
    normal, anomalous = rng.normal(size=(9, 4)), rng.normal(size=(5, 4)) + 1.0
    h = 1.7
    kxx, kyy = _kernel_np(normal, h), _kernel_np(anomalous, h)
    kxy = np.exp(-((normal[:, None, :] - anomalous[None, :, :]) ** 2).sum(-1) / (2 * h**2))
    m, n = 9, 5
    mmd2 = (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )
    x = torch.from_numpy(np.vstack([normal, anomalous]))
    p = torch.from_numpy(np.r_[np.zeros(m), np.ones(n)])
    loss = float(minibatch_loss(x, p, float(m), float(n), m + n, h))
    assert mmd2 > 0.1
    assert loss == pytest.approx(-mmd2, rel=1e-9)


# ------------------------------------------------------------------ soft counts
def test_soft_counts_are_the_sums_of_p_and_one_minus_p():
    p = torch.tensor([0.1, 0.9, 0.5, 0.25, 0.75, 0.5, 0.0, 1.0])
    m, n = (float(v) for v in soft_counts(p, 8))
    assert n == pytest.approx(4.0)
    assert m == pytest.approx(4.0)


@pytest.mark.parametrize("value, expected_n", [(0.0, 2.0), (1.0, 8.0), (0.01, 2.0), (0.99, 8.0)])
def test_soft_counts_clamp_so_both_groups_keep_two_cells(value, expected_n):
    m, n = (float(v) for v in soft_counts(torch.full((10,), value), 10))
    assert n == pytest.approx(expected_n)
    assert m == pytest.approx(10 - expected_n)
    assert min(m, n) >= 2


# ------------------------------------------------------------------ fitting the predictor
def _residual_like(seed: int = 0, n_cells: int = 400, n_features: int = 20):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_cells, n_features)).astype(np.float32)
    is_anomaly = np.zeros(n_cells, dtype=bool)
    is_anomaly[rng.permutation(n_cells)[: int(0.15 * n_cells)]] = True
    x[np.ix_(is_anomaly, np.arange(5))] += 3.0
    return x, is_anomaly


def _warm_start_from_mean_square(x: np.ndarray) -> np.ndarray:
    """Label-free warm start: the rank of each cell's mean squared feature, scaled to [0, 1]."""
    ms = (x.astype(np.float64) ** 2).mean(axis=1)
    return ms.argsort().argsort() / (ms.size - 1)


@pytest.fixture(scope="module")
def fitted_predictor():
    torch.manual_seed(0)  # the predictor's initial weights
    x, is_anomaly = _residual_like()
    events = []
    predictor = fit_predictor(
        x,
        _warm_start_from_mean_square(x),
        PredictorConfig(warmup_epochs=3, epochs=10, batch_size=128),
        generator=torch.Generator().manual_seed(0),
        progress=events.append,
    )
    return predictor, x, is_anomaly, events


def test_fit_predictor_separates_shifted_residuals(fitted_predictor):
    predictor, x, is_anomaly, _ = fitted_predictor
    logits = predict_logits(predictor, x)
    assert np.all(np.isfinite(logits))
    assert roc_auc_score(is_anomaly, logits) > 0.95


def test_fit_predictor_gives_anomalies_the_higher_p(fitted_predictor):
    predictor, x, is_anomaly, _ = fitted_predictor
    p = 1 / (1 + np.exp(-predict_logits(predictor, x)))
    assert p[is_anomaly].mean() > p[~is_anomaly].mean() + 0.2
    assert np.median(p[is_anomaly]) > 0.5 > np.median(p[~is_anomaly])


def test_fit_predictor_reports_warm_start_then_mmd_epochs(fitted_predictor):
    *_, events = fitted_predictor
    assert [e.epoch for e in events] == list(range(1, 14))
    assert all(e.stage == "predictor" and e.n_epochs == 13 for e in events)
    assert [next(iter(e.losses)) for e in events] == ["warm_start"] * 3 + ["mmd"] * 10
    assert all(math.isfinite(v) for e in events for v in e.losses.values())


def test_predict_logits_is_batch_size_independent(fitted_predictor):
    predictor, x, *_ = fitted_predictor
    np.testing.assert_allclose(predict_logits(predictor, x, batch_size=37), predict_logits(predictor, x), rtol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_fit_predictor_follows_the_warm_start_orientation_even_without_warmup_epochs(flip):
    """Eq. 12 is symmetric in the two groups; whatever it converges to, p must rise with the warm start."""
    torch.manual_seed(1)
    x, _ = _residual_like(seed=1)
    warm = _warm_start_from_mean_square(x)
    targets = 1 - warm if flip else warm
    predictor = fit_predictor(
        x,
        targets,
        PredictorConfig(warmup_epochs=0, epochs=10, batch_size=128),
        generator=torch.Generator().manual_seed(1),
    )
    assert np.corrcoef(predict_logits(predictor, x), targets)[0, 1] > 0


def test_fit_predictor_stops_when_cancelled():
    x, _ = _residual_like(n_cells=100)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        fit_predictor(x, np.zeros(100), PredictorConfig(), generator=torch.Generator().manual_seed(0), cancel=token)
