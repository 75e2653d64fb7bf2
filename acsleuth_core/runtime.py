"""Device choice, seeding, and the size of dense batches."""

from __future__ import annotations

import random

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
#: values per dense array when a sparse matrix is densified batch by batch: 8 M float32 = 32 MiB
DENSE_BATCH_VALUES = 2**23


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch and ask torch for deterministic kernels; return a torch generator
    for sampling mini-batches.

    Without deterministic kernels, two CPU threads summing the sparse kin-mapping gradients in varying
    order gave differences of 1e-7 that a long GAN training grew into another correction (demo batch
    mixing 0.874 vs 0.849 for the same seed). ``warn_only``: an op with no deterministic kernel (some
    CUDA ones) warns instead of failing.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def dense_batch_rows(n_columns: int) -> int:
    """Cells per batch when a sparse matrix is densified batch by batch (scoring, correcting, projecting
    on principal axes): about :data:`DENSE_BATCH_VALUES` values per array, 64 to 2,048 cells."""
    return int(np.clip(DENSE_BATCH_VALUES // max(n_columns, 1), 64, 2048))
