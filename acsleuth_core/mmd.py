"""The MMD-trained anomaly predictor (paper eq. 9–12), estimated on mini-batches.

The predictor ``f_p`` maps a cell's reconstruction residual to ``p ∈ (0, 1)``.
Training minimises ``L_p = −Σ_{i≠j} k(δ_i, δ_j) γ_c(p_i, p_j)``: the negative
squared MMD between the soft "normal" and "anomalous" groups. The double sum
is never formed over all cells: a uniform mini-batch of B cells, rescaled by
``N(N−1) / (B(B−1))``, is an unbiased estimate of it for fixed soft counts;
during training the counts are estimated from the same mini-batch's current
predictions, so they move with ``p``.

Note on eq. 11: as printed, its two mixed terms carry the wrong sign (at
``p_i → 0, p_j → 1`` it tends to ``+1/(mn)``, not eq. 10's ``−1/(mn)``).
We use the corrected form, written with ``sinc``:
``γ_c = a_i a_j /(m(m−1)) + b_i b_j /(n(n−1)) − (a_i b_j + b_i a_j)/(mn)``
where ``a = sinc(p) = sin(πp)/(πp)`` and ``b = sinc(1−p)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .nn.blocks import mlp
from .progress import CancelToken, ProgressCallback, ProgressEvent, check_cancel


def corner_weights(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b) = (sinc(p), sinc(1 − p))``: 1/0 at ``p = 0`` and 0/1 at ``p = 1``."""
    return torch.sinc(p), torch.sinc(1 - p)


def gamma_c(p_i: torch.Tensor, p_j: torch.Tensor, m: float, n: float) -> torch.Tensor:
    """The smooth pair weight of eq. 11 (sign-corrected); broadcasts over ``p_i`` and ``p_j``."""
    a_i, b_i = corner_weights(p_i)
    a_j, b_j = corner_weights(p_j)
    return a_i * a_j / (m * (m - 1)) + b_i * b_j / (n * (n - 1)) - (a_i * b_j + b_i * a_j) / (m * n)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``exp(−‖x − y‖² / (2h²))`` for every row pair."""
    d2 = torch.cdist(x, y).pow(2)
    return torch.exp(-d2 / (2 * bandwidth**2))


def pair_sum(features: torch.Tensor, p: torch.Tensor, m: float, n: float, bandwidth: float) -> torch.Tensor:
    """``Σ_{i≠j} k(δ_i, δ_j) γ_c(p_i, p_j)`` over the rows given."""
    kernel = gaussian_kernel(features, features, bandwidth)
    kernel = kernel - torch.diag_embed(torch.diagonal(kernel))
    a, b = corner_weights(p)
    return (
        a @ kernel @ a / (m * (m - 1))
        + b @ kernel @ b / (n * (n - 1))
        - 2 * (a @ kernel @ b) / (m * n)
    )


def minibatch_loss(
    features: torch.Tensor, p: torch.Tensor, m: float, n: float, n_total: int, bandwidth: float
) -> torch.Tensor:
    """Unbiased mini-batch estimate of the full ``L_p`` over ``n_total`` cells."""
    b = features.shape[0]
    scale = n_total * (n_total - 1) / (b * (b - 1))
    return -scale * pair_sum(features, p, m, n, bandwidth)


def soft_counts(p: torch.Tensor, n_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft counts ``(m, n) = (Σ(1 − p), Σ p)`` of all ``n_total`` cells, estimated from the
    ``p`` given (all cells, or a mini-batch scaled up), clamped so both groups keep two cells.

    They stay functions of ``p`` (gradients flow through them): with counts
    frozen, raising every ``p`` at once would raise eq. 12 more than
    separating the groups does, and the predictor collapses to a constant.
    """
    n = (p.mean() * n_total).clamp(2.0, n_total - 2.0)
    return n_total - n, n


def median_bandwidth(features: torch.Tensor, generator: torch.Generator, sample: int = 1000) -> float:
    """Median heuristic: the median distance between rows of a random sample."""
    idx = torch.randperm(features.shape[0], generator=generator)[:sample]
    d = torch.pdist(features[idx])
    return float(d.median().clamp_min(1e-6))


class AnomalyPredictor(nn.Module):
    """``f_p``: residual → anomaly logit (``sigmoid`` gives ``p``)."""

    def __init__(self, n_inputs: int, hidden_dims: tuple[int, ...] = (128, 32)):
        super().__init__()
        self.net = mlp([n_inputs, *hidden_dims, 1], dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


@dataclass(frozen=True)
class PredictorConfig:
    """How the predictor is trained: a warm start on the initial score's ranking, then eq. 12."""

    warmup_epochs: int = 10
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3


def fit_predictor(
    features: np.ndarray,
    warm_start_targets: np.ndarray,
    config: PredictorConfig,
    *,
    generator: torch.Generator,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> AnomalyPredictor:
    """Train ``f_p`` on the target cells' residual features.

    ``warm_start_targets`` (in [0, 1]) orient the predictor before the MMD
    objective takes over: the MMD is symmetric in the two groups, so without
    them nothing says which group is the anomalous one.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    targets = torch.from_numpy(np.asarray(warm_start_targets, dtype=np.float32))
    n_cells = x.shape[0]
    predictor = AnomalyPredictor(x.shape[1])
    optimiser = torch.optim.Adam(predictor.parameters(), lr=config.learning_rate)
    bandwidth = median_bandwidth(x, generator)
    batch_size = min(config.batch_size, n_cells)
    n_epochs = config.warmup_epochs + config.epochs
    bce = nn.BCEWithLogitsLoss()
    for epoch in range(1, n_epochs + 1):
        warm = epoch <= config.warmup_epochs
        total, steps = 0.0, 0
        for idx in torch.randperm(n_cells, generator=generator).split(batch_size):
            check_cancel(cancel)
            if idx.numel() < 2:
                continue
            logits = predictor(x[idx])
            if warm:
                loss = bce(logits, targets[idx])
            else:
                p = torch.sigmoid(logits)
                m, n = soft_counts(p, n_cells)
                loss = minibatch_loss(x[idx], p, m, n, n_cells, bandwidth)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, steps = total + loss.item(), steps + 1
        if progress is not None:
            name = "warm_start" if warm else "mmd"
            progress(ProgressEvent("predictor", epoch, n_epochs, {name: total / max(steps, 1)}))
    predictor.eval()
    _orient(predictor, x, targets)
    return predictor


@torch.no_grad()
def _orient(predictor: AnomalyPredictor, x: torch.Tensor, warm_start_targets: torch.Tensor) -> None:
    """Make ``p → 1`` the group with larger residuals, as the warm start says.

    Eq. 12 is unchanged when the two groups swap names, so training can end
    with the partition right but the labels flipped; the last layer's sign
    is then reversed.
    """
    logits = predictor(x)
    correlation = torch.corrcoef(torch.stack([logits, warm_start_targets]))[0, 1]
    if torch.isfinite(correlation) and correlation < 0:
        last = predictor.net[-1]
        last.weight.neg_()
        last.bias.neg_()


@torch.no_grad()
def predict_logits(predictor: AnomalyPredictor, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Anomaly logits for every row of ``features``, in batches."""
    out = [
        predictor(torch.from_numpy(np.ascontiguousarray(features[i : i + batch_size], dtype=np.float32)))
        for i in range(0, features.shape[0], batch_size)
    ]
    return torch.cat(out).double().numpy()
