"""The one WGAN-GP training loop shared by the ACsleuth GANs (modules I, II and III).

A module describes itself as an :class:`AdversarialTask`; :func:`train_adversarial`
alternates ``n_critic`` critic steps with one generator step, reports progress
once per epoch and stops cooperatively when cancelled.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Optional, Protocol

import numpy as np

import torch
from torch import nn

from ..progress import CancelToken, ProgressCallback, ProgressEvent, check_cancel


@dataclass(frozen=True)
class AdversarialConfig:
    """Loss weights and optimiser settings: ``α·L_rec − β·E[D(fake)]`` for the generator,
    ``E[D(fake)] − E[D(real)] + λ·GP`` for the critic."""

    epochs: int = 100
    learning_rate: float = 2e-4
    critic_learning_rate: float = 2e-4
    n_critic: int = 2
    alpha: float = 1.0
    beta: float = 0.05
    gp_weight: float = 10.0
    weight_decay: float = 0.0
    #: "adam", or "sparse_adam" for a generator whose parameters get sparse gradients
    #: (module II's per-cell mapping rows: only the rows in a mini-batch are updated)
    generator_optimiser: str = "adam"


@dataclass(frozen=True)
class GanTraining:
    """Training settings every ACsleuth GAN has; each module's config extends it (and may change defaults).

    ``epochs=None`` derives the number of passes from ``target_steps``
    mini-batches, clipped to the module's ``EPOCH_BOUNDS``;
    ``critic_learning_rate=None`` uses ``learning_rate`` for the critic too.
    """

    EPOCH_BOUNDS: ClassVar[tuple[int, int]] = (10, 300)

    epochs: Optional[int] = None
    target_steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-3
    critic_learning_rate: Optional[float] = None
    n_critic: int = 2
    alpha: float = 1.0
    beta: float = 0.05
    gp_weight: float = 10.0
    seed: int = 0
    device: str = "auto"

    def n_epochs(self, n_cells: int) -> int:
        """``epochs`` when given, else about ``target_steps`` mini-batches of ``n_cells`` cells."""
        return epochs_for_steps(self.epochs, self.target_steps, n_cells, self.batch_size, self.EPOCH_BOUNDS)

    def adversarial(self, n_cells: int, **extra) -> AdversarialConfig:
        """The shared loop's settings for training on ``n_cells`` cells (``extra``: other loop fields)."""
        return AdversarialConfig(
            epochs=self.n_epochs(n_cells),
            learning_rate=self.learning_rate,
            critic_learning_rate=self.critic_learning_rate or self.learning_rate,
            n_critic=self.n_critic,
            alpha=self.alpha,
            beta=self.beta,
            gp_weight=self.gp_weight,
            **extra,
        )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GeneratorOutput:
    """What one generator forward pass produced for a mini-batch."""

    real: torch.Tensor
    fake: torch.Tensor
    reconstruction_loss: torch.Tensor


class AdversarialTask(Protocol):
    """The parts of a GAN the shared loop needs."""

    generator: nn.Module
    critic: nn.Module

    def generate(self, batch: torch.Tensor) -> GeneratorOutput: ...

    def after_generator_step(self, output: GeneratorOutput) -> None: ...


def epochs_for_steps(epochs: Optional[int], target_steps: int, n_cells: int, batch_size: int, bounds: tuple[int, int]) -> int:
    """``epochs`` when given, else enough passes for about ``target_steps`` mini-batches, clipped to ``bounds``."""
    if epochs is not None:
        return epochs
    per_epoch = max(1, -(-n_cells // batch_size))
    return int(np.clip(round(target_steps / per_epoch), *bounds))


def shuffled_rows(n_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices in a fresh random order, in mini-batches; a last batch of one row is skipped
    (a critic's gradient penalty and LayerNorm need at least two)."""
    order = torch.randperm(n_rows, generator=generator)
    for start in range(0, n_rows, batch_size):
        rows = order[start : start + batch_size]
        if len(rows) > 1:
            yield rows


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty ``E[(‖∇D(x̃)‖₂ − 1)²]`` on random interpolates of real and fake rows."""
    eps = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    scores = critic(mixed)
    (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((grads.norm(2, dim=1) - 1) ** 2).mean()


def train_adversarial(
    task: AdversarialTask,
    epoch_batches: Callable[[], Iterable[torch.Tensor]],
    config: AdversarialConfig,
    *,
    stage: str,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> dict[str, list[float]]:
    """Train ``task`` for ``config.epochs`` passes over ``epoch_batches()``.

    Returns per-epoch mean losses: ``reconstruction``, ``generator``, ``critic``
    and ``wasserstein`` (the critic's estimate ``E[D(real)] − E[D(fake)]``); NaN
    for ``generator`` in an epoch too short to hold a generator step. Steps are
    counted across epochs, so every ``n_critic``-th mini-batch trains the generator.
    """
    opt_g = _generator_optimiser(task.generator, config)
    opt_d = torch.optim.Adam(task.critic.parameters(), lr=config.critic_learning_rate, betas=(0.5, 0.9), foreach=True)
    history: dict[str, list[float]] = {"reconstruction": [], "generator": [], "critic": [], "wasserstein": []}
    task.generator.train()
    task.critic.train()
    step = 0
    for epoch in range(1, config.epochs + 1):
        sums = dict.fromkeys(history, 0.0)
        counts = dict.fromkeys(history, 0)
        n_cells, started = 0, time.perf_counter()
        for batch in epoch_batches():
            step += 1
            check_cancel(cancel)
            n_cells += batch.shape[0]
            output = task.generate(batch)
            critic_loss, distance = _critic_step(task.critic, opt_d, output, config.gp_weight)
            _add(sums, counts, critic=critic_loss, wasserstein=distance, reconstruction=output.reconstruction_loss.item())
            if step % config.n_critic == 0:
                generator_loss = config.alpha * output.reconstruction_loss - config.beta * task.critic(output.fake).mean()
                opt_g.zero_grad(set_to_none=True)
                generator_loss.backward()
                opt_g.step()
                task.after_generator_step(output)
                _add(sums, counts, generator=generator_loss.item())
        for key in history:
            history[key].append(sums[key] / counts[key] if counts[key] else float("nan"))
        if progress is not None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress(
                ProgressEvent(
                    stage=stage,
                    epoch=epoch,
                    n_epochs=config.epochs,
                    losses={key: values[-1] for key, values in history.items()},
                    cells_per_second=n_cells / elapsed,
                )
            )
    task.generator.eval()
    task.critic.eval()
    return history


def _generator_optimiser(generator: nn.Module, config: AdversarialConfig) -> torch.optim.Optimizer:
    if config.generator_optimiser == "sparse_adam":
        return torch.optim.SparseAdam(list(generator.parameters()), lr=config.learning_rate, betas=(0.5, 0.9))
    if config.generator_optimiser == "adam":
        return torch.optim.Adam(
            generator.parameters(), lr=config.learning_rate, betas=(0.5, 0.9), weight_decay=config.weight_decay, foreach=True
        )
    raise ValueError(f"generator_optimiser must be 'adam' or 'sparse_adam', not {config.generator_optimiser!r}")


def _critic_step(critic: nn.Module, optimiser: torch.optim.Optimizer, output: GeneratorOutput, gp_weight: float):
    fake = output.fake.detach()
    real_score = critic(output.real).mean()
    fake_score = critic(fake).mean()
    loss = fake_score - real_score + gp_weight * gradient_penalty(critic, output.real, fake)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return loss.item(), (real_score - fake_score).item()


def _add(sums: dict, counts: dict, **values: float) -> None:
    for key, value in values.items():
        sums[key] += value
        counts[key] += 1
