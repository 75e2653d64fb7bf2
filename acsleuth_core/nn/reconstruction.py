"""Module I networks: encoder → memory bank → decoder, and the critic (forward maths only)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .adversarial import GeneratorOutput
from .blocks import MemoryBank, mlp


class Reconstruction(NamedTuple):
    latent: torch.Tensor
    memory_read: torch.Tensor
    expression: torch.Tensor


class ReconstructionGenerator(nn.Module):
    """Encode expression to a latent vector, re-express it through the memory bank, decode.

    With ``memory_size=0`` the bank is switched off and the decoder reads the
    latent vector directly (the paper's memory-bank ablation).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        hidden_dims: tuple[int, ...] = (512,),
        latent_dim: int = 256,
        memory_size: int = 512,
        temperature: Optional[float] = None,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder = mlp([n_genes, *hidden_dims, latent_dim], dropout=dropout)
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), n_genes], dropout=dropout)
        self.memory: Optional[MemoryBank] = None
        if memory_size > 0:
            self.memory = MemoryBank(memory_size, latent_dim, temperature or latent_dim**0.5)

    def forward(self, x: torch.Tensor) -> Reconstruction:
        z = self.encoder(x)
        z_read = self.memory.read(z) if self.memory is not None else z
        return Reconstruction(z, z_read, self.decoder(z_read))


def critic_network(n_inputs: int, hidden_dims: tuple[int, ...] = (512, 128)) -> nn.Module:
    """A WGAN critic ``inputs → 1`` (no normalisation layers, as WGAN-GP asks)."""
    return mlp([n_inputs, *hidden_dims, 1], norm=False)


class ReconstructionTask:
    """Module I as an adversarial task: reconstruct reference cells, L1 + critic."""

    def __init__(self, generator: ReconstructionGenerator, critic: nn.Module):
        self.generator = generator
        self.critic = critic
        self._latent: Optional[torch.Tensor] = None

    def generate(self, batch: torch.Tensor) -> GeneratorOutput:
        out = self.generator(batch)
        self._latent = out.latent
        loss = (batch - out.expression).abs().mean()
        return GeneratorOutput(real=batch, fake=out.expression, reconstruction_loss=loss)

    def after_generator_step(self, output: GeneratorOutput) -> None:
        if self.generator.memory is not None and self._latent is not None:
            self.generator.memory.enqueue(self._latent)
