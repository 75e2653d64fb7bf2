"""Module III: style transfer that removes per-batch effects (paper eq. 18–20).

A target cell ``x`` of batch ``b`` is encoded, its batch's style vector is
subtracted, ``ẑ = E(x) − S_b``, and the result is decoded into the
reference's gene space, ``x̂ = G(ẑ)``. Training pulls ``x̂`` towards the
expression of the cell's kin reference cell (L1) while a WGAN-GP critic tells
real reference cells from generated ones, in the one adversarial loop the
detector uses. ``ẑ`` is also pulled towards the kin's own embedding, which is
what eq. 18 says ``ẑ`` estimates. Reference cells take part as their own kin
with a style of zero, which anchors the corrected space on the reference.

Encoder and decoder start from module I's, the style vectors from module II's
latent offsets. After training every target cell, anomalies included, is
corrected.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .nn.adversarial import GanTraining, GeneratorOutput, shuffled_rows, train_adversarial
from .nn.reconstruction import ReconstructionGenerator, critic_network
from .progress import CancelToken, ProgressCallback, check_cancel
from .runtime import dense_batch_rows, holds_global_random_state, resolve_device, seed_everything

#: batch code of reference cells: no style is removed from them
REFERENCE_CODE = -1


@dataclass(frozen=True)
class StyleConfig(GanTraining):
    """Hyperparameters of module III (training settings as :class:`GanTraining`, 10–300 passes)."""

    learning_rate: float = 5e-4
    latent_weight: float = 2.0


#: corrected log expression below this is stored as zero, which keeps the corrected layer sparse
EXPRESSION_FLOOR = 0.01


class Corrected(NamedTuple):
    latent: np.ndarray
    expression: sp.csr_matrix


class StyleTransferGenerator(nn.Module):
    """Encoder, per-batch style vectors ``S`` and decoder: ``x̂ = G(E(x) − S_b)``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, initial_styles: np.ndarray):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.styles = nn.Parameter(torch.as_tensor(initial_styles, dtype=torch.float32).clone())

    @classmethod
    def from_module_one(cls, module_one: ReconstructionGenerator, initial_styles: np.ndarray) -> "StyleTransferGenerator":
        """Copies of module I's encoder and decoder (module I itself is left untouched)."""
        return cls(copy.deepcopy(module_one.encoder), copy.deepcopy(module_one.decoder), initial_styles)

    def style_free_latent(self, x: torch.Tensor, batch_codes: torch.Tensor) -> torch.Tensor:
        """``E(x) − S_b``; reference cells (code −1) keep ``E(x)``."""
        style = self.styles[batch_codes.clamp(min=0)] * (batch_codes >= 0).unsqueeze(1)
        return self.encoder(x) - style

    def forward(self, x: torch.Tensor, batch_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.style_free_latent(x, batch_codes)
        return latent, self.decoder(latent)


@dataclass
class TrainingPool:
    """The cells module III learns from: target cells called normal, then reference cells as their own kin."""

    expression: sp.csr_matrix
    kin_expression: sp.csr_matrix
    batch_codes: np.ndarray

    @classmethod
    def build(
        cls, target: sp.csr_matrix, batch_codes: np.ndarray, kin_rows: np.ndarray, reference: sp.csr_matrix
    ) -> "TrainingPool":
        return cls(
            expression=sp.vstack([target, reference], format="csr"),
            kin_expression=sp.vstack([reference[kin_rows], reference], format="csr"),
            batch_codes=np.concatenate([batch_codes, np.full(reference.shape[0], REFERENCE_CODE)]).astype(np.int64),
        )

    def __len__(self) -> int:
        return self.expression.shape[0]

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            _dense(self.expression[rows], device),
            torch.as_tensor(self.batch_codes[rows], device=device),
            _dense(self.kin_expression[rows], device),
        )


class StyleTask:
    """Module III as an adversarial task (eq. 19–20 plus the latent kin term)."""

    def __init__(self, generator: StyleTransferGenerator, pool: TrainingPool, latent_weight: float, device: torch.device):
        self.generator = generator
        self.critic = critic_network(pool.expression.shape[1]).to(device)
        self._pool = pool
        self._latent_weight = latent_weight
        self._device = device

    def generate(self, rows: torch.Tensor) -> GeneratorOutput:
        x, codes, kin = self._pool.batch(rows.numpy(), self._device)
        latent, generated = self.generator(x, codes)
        loss = (generated - kin).abs().mean()
        if self._latent_weight > 0:
            with torch.no_grad():
                kin_latent = self.generator.encoder(kin)
            loss = loss + self._latent_weight * (latent - kin_latent).abs().mean()
        return GeneratorOutput(real=kin, fake=generated, reconstruction_loss=loss)

    def after_generator_step(self, output: GeneratorOutput) -> None:
        pass


class StyleTransfer:
    """Train module III and correct cells with it."""

    def __init__(self, config: StyleConfig = StyleConfig()):
        self.config = config
        self.batch_names: list[str] = []
        self.generator: Optional[StyleTransferGenerator] = None
        self.history: dict[str, list[float]] = {}

    @holds_global_random_state
    def fit(
        self,
        module_one: ReconstructionGenerator,
        target: sp.csr_matrix,
        batches: np.ndarray,
        kin_rows: np.ndarray,
        reference: sp.csr_matrix,
        offsets: dict[str, np.ndarray],
        *,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> "StyleTransfer":
        """Learn style vectors and the generator from target cells called normal and their kin reference rows."""
        cfg = self.config
        generator_rng = seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        self.batch_names = sorted(offsets)
        codes = self.batch_codes(batches)
        initial = np.stack([offsets[name] for name in self.batch_names])
        self.generator = StyleTransferGenerator.from_module_one(module_one, initial).to(device)
        pool = TrainingPool.build(sp.csr_matrix(target), codes, kin_rows, sp.csr_matrix(reference))
        task = StyleTask(self.generator, pool, cfg.latent_weight, device)
        adversarial = cfg.adversarial(len(pool))
        batch_size = min(cfg.batch_size, len(pool))

        self.history = train_adversarial(
            task,
            lambda: shuffled_rows(len(pool), batch_size, generator_rng),
            adversarial,
            stage="module III",
            progress=progress,
            cancel=cancel,
        )
        self.generator.cpu()
        return self

    def batch_codes(self, batches: np.ndarray) -> np.ndarray:
        """Integer style row of each batch name; an unknown batch is an error."""
        lookup = {name: i for i, name in enumerate(self.batch_names)}
        unknown = sorted(set(map(str, batches)) - set(lookup))
        if unknown:
            raise ValueError(f"no style was learnt for batch(es) {', '.join(unknown)}")
        return np.array([lookup[str(b)] for b in batches], dtype=np.int64)

    @torch.no_grad()
    def correct(self, X: sp.spmatrix, batches: Optional[np.ndarray], cancel: Optional[CancelToken] = None) -> Corrected:
        """Corrected latent and expression of cells; ``batches=None`` treats them as reference cells.

        Expression is on the reference's log scale, sparse: values below
        :data:`EXPRESSION_FLOOR` (including the decoder's negative ones) become zero.
        """
        latent = []
        expression = []
        for x, codes in self._batches(X, batches, cancel):
            z, x_hat = self.generator(x, codes)
            latent.append(z.numpy())
            values = x_hat.numpy()
            expression.append(sp.csr_matrix(np.where(values >= EXPRESSION_FLOOR, values, 0.0).astype(np.float32)))
        return Corrected(np.vstack(latent), sp.vstack(expression, format="csr"))

    @torch.no_grad()
    def correct_latent(
        self, X: sp.spmatrix, batches: Optional[np.ndarray], cancel: Optional[CancelToken] = None
    ) -> np.ndarray:
        """Only the corrected latent ``E(x) − S_b`` of cells (no decoding); ``batches=None``: reference cells."""
        batches_of_cells = self._batches(X, batches, cancel)
        return np.vstack([self.generator.style_free_latent(x, codes).numpy() for x, codes in batches_of_cells])

    def _batches(
        self, X: sp.spmatrix, batches: Optional[np.ndarray], cancel: Optional[CancelToken]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Dense cell batches and their style codes, in row order, sized by gene count."""
        if self.generator is None:
            raise ValueError("module III has not been trained yet")
        self.generator.eval()
        X = sp.csr_matrix(X)
        codes = np.full(X.shape[0], REFERENCE_CODE) if batches is None else self.batch_codes(batches)
        step = dense_batch_rows(X.shape[1])
        for start in range(0, X.shape[0], step):
            check_cancel(cancel)
            rows = slice(start, start + step)
            yield _dense(X[rows], torch.device("cpu")), torch.as_tensor(codes[rows])


def _dense(X: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(X.toarray().astype(np.float32)).to(device)
