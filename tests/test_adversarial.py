"""The shared WGAN-GP loop (paper eq. 5–6) and its gradient penalty."""

import math

import pytest
import torch
from torch import nn

from acsleuth_core.errors import Cancelled
from acsleuth_core.nn.adversarial import AdversarialConfig, gradient_penalty, train_adversarial
from acsleuth_core.nn.reconstruction import ReconstructionGenerator, ReconstructionTask, critic_network
from acsleuth_core.progress import CancelToken

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

HISTORY_KEYS = {"reconstruction", "generator", "critic", "wasserstein"}


def _linear_critic(weight: torch.Tensor) -> nn.Linear:
    critic = nn.Linear(weight.numel(), 1)
    with torch.no_grad():
        critic.weight.copy_(weight[None, :])
        critic.bias.fill_(0.7)
    return critic


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic():
    torch.manual_seed(0)
    w = torch.randn(6)
    critic = _linear_critic(w / w.norm())
    gp = gradient_penalty(critic, torch.randn(32, 6), torch.randn(32, 6))
    assert float(gp) == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_of_a_norm_three_linear_critic_is_four():
    torch.manual_seed(1)
    w = torch.randn(6)
    critic = _linear_critic(3 * w / w.norm())
    gp = gradient_penalty(critic, torch.randn(32, 6), torch.randn(32, 6))
    assert float(gp) == pytest.approx((3 - 1) ** 2, rel=1e-5)


def test_gradient_penalty_is_differentiable_in_the_critic_weights():
    """d/dw (‖w‖ − 1)² = 2(‖w‖ − 1) w/‖w‖: the penalty must train the critic, not just be reported."""
    torch.manual_seed(2)
    w = torch.randn(5)
    w = 3 * w / w.norm()
    critic = _linear_critic(w)
    gradient_penalty(critic, torch.randn(16, 5), torch.randn(16, 5)).backward()
    torch.testing.assert_close(critic.weight.grad[0], 2 * (3 - 1) * w / 3, rtol=1e-4, atol=1e-6)


def _tiny_task(seed: int = 0, memory_size: int = 16, n_genes: int = 20) -> ReconstructionTask:
    torch.manual_seed(seed)
    generator = ReconstructionGenerator(
        n_genes, hidden_dims=(32,), latent_dim=8, memory_size=memory_size, dropout=0.0
    )
    return ReconstructionTask(generator, critic_network(n_genes, (32,)))


def _batches(X: torch.Tensor, batch_size: int, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)

    def epoch():
        order = torch.randperm(X.shape[0], generator=rng)
        for start in range(0, X.shape[0], batch_size):
            yield X[order[start : start + batch_size]]

    return epoch


def test_training_reports_progress_once_per_epoch_and_returns_equal_histories():
    X = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    events = []
    history = train_adversarial(
        _tiny_task(),
        _batches(X, 16),
        AdversarialConfig(epochs=3, learning_rate=1e-3),
        stage="module I",
        progress=events.append,
    )
    assert [e.epoch for e in events] == [1, 2, 3]
    assert all(e.n_epochs == 3 and e.stage == "module I" for e in events)
    assert events[-1].fraction == 1.0
    assert all(set(e.losses) == HISTORY_KEYS for e in events)
    assert all(e.cells_per_second > 0 for e in events)
    assert set(history) == HISTORY_KEYS
    assert all(len(values) == 3 for values in history.values())
    assert all(math.isfinite(v) for values in history.values() for v in values)
    # the reported losses are the history's per-epoch values
    assert [e.losses["reconstruction"] for e in events] == history["reconstruction"]
    # 4 batches per epoch with n_critic = 2 means 2 generator steps, whose loss is recorded
    assert all(v != 0.0 for v in history["generator"])


def test_training_leaves_networks_in_eval_mode():
    task = _tiny_task()
    X = torch.randn(32, 20)
    train_adversarial(task, _batches(X, 16), AdversarialConfig(epochs=1), stage="t")
    assert not task.generator.training
    assert not task.critic.training


def test_training_fills_the_memory_bank_with_latents():
    task = _tiny_task(memory_size=16)
    initial = task.generator.memory.queue.clone()
    X = torch.randn(64, 20)
    train_adversarial(task, _batches(X, 16), AdversarialConfig(epochs=2), stage="t")
    # 4 generator steps of 16 latents each have overwritten all 16 slots
    assert not torch.isclose(task.generator.memory.queue, initial).any()


def test_cancelling_from_the_progress_callback_stops_training():
    token = CancelToken()
    events = []

    def progress(event):
        events.append(event)
        if event.epoch == 1:
            token.cancel()

    X = torch.randn(64, 20)
    with pytest.raises(Cancelled):
        train_adversarial(
            _tiny_task(), _batches(X, 16), AdversarialConfig(epochs=5), stage="t", progress=progress, cancel=token
        )
    assert [e.epoch for e in events] == [1]


def test_reconstruction_loss_decreases_on_low_rank_data():
    rng = torch.Generator().manual_seed(0)
    X = torch.randn(128, 2, generator=rng) @ torch.randn(2, 20, generator=rng)
    X = X + 0.05 * torch.randn(128, 20, generator=rng)
    history = train_adversarial(
        _tiny_task(seed=0, memory_size=32),
        _batches(X, 16),
        AdversarialConfig(epochs=20, learning_rate=1e-3, critic_learning_rate=1e-3),
        stage="t",
    )
    rec = history["reconstruction"]
    assert sum(rec[-3:]) / 3 < 0.75 * sum(rec[:3]) / 3
    assert rec[-1] < rec[0]


def test_generator_trains_even_when_an_epoch_has_fewer_batches_than_n_critic():
    task = _tiny_task()
    before = [p.detach().clone() for p in task.generator.parameters()]
    X = torch.randn(32, 20)
    history = train_adversarial(task, lambda: [X], AdversarialConfig(epochs=4, n_critic=2), stage="t")
    after = list(task.generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(v != 0.0 for v in history["generator"])
