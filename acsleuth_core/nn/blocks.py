"""Small reusable torch modules: an MLP builder and the memory bank of module I."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(dims: list[int], *, dropout: float = 0.0, norm: bool = True) -> nn.Sequential:
    """A feed-forward stack ``dims[0] → … → dims[-1]``.

    Hidden layers get :class:`RowNorm` (when ``norm``), LeakyReLU and dropout; the last
    layer is a plain linear map so callers choose their own output activation.
    """
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            if norm:
                layers.append(RowNorm(d_out))
            layers.append(nn.LeakyReLU(0.2))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RowNorm(nn.Module):
    """Layer normalisation with a learnt scale and shift, like ``nn.LayerNorm`` (same parameter names).

    ``nn.LayerNorm``'s fused CPU backward adds up its scale and shift gradients in an order that depends
    on the number of threads, so the same seed trained differently on another machine; here the
    normalisation is done row by row and the scale and shift are plain tensor operations, whose
    gradients do not depend on it.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


class MemoryBank(nn.Module):
    """FIFO queue of latent vectors read by temperature attention (paper eq. 3).

    ``read(z)`` returns ``Qᵀ softmax(Q z / τ)`` for each row of ``z``;
    ``enqueue(z̃)`` appends the newest rows and drops the oldest ones.
    """

    def __init__(self, size: int, dim: int, temperature: float = 1.0):
        super().__init__()
        if size < 1:
            raise ValueError("the memory bank needs at least one slot")
        self.temperature = float(temperature)
        self.register_buffer("queue", torch.randn(size, dim) / dim**0.5)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        """Attention weights over the bank's slots, one row per input; rows sum to 1."""
        return torch.softmax(z @ self.queue.T / self.temperature, dim=1)

    def read(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct each latent vector as an attention-weighted mix of the bank."""
        return self.attention(z) @ self.queue

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """Write the newest vectors over the oldest slots (circular buffer)."""
        z = z.detach()
        if z.shape[0] >= self.size:
            z = z[-self.size :]
        n = z.shape[0]
        start = int(self.pointer)
        end = start + n
        if end <= self.size:
            self.queue[start:end] = z
        else:
            first = self.size - start
            self.queue[start:] = z[:first]
            self.queue[: n - first] = z[first:]
        self.pointer.fill_(end % self.size)

    def oldest_to_newest(self) -> torch.Tensor:
        """The bank's contents in queue order, oldest slot first."""
        start = int(self.pointer)
        return torch.cat([self.queue[start:], self.queue[:start]])
