"""Device choice, seeding, and the size of dense batches."""

from __future__ import annotations

import functools
import random
import threading
import warnings

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
#: held while work draws from the process-wide random generators (see :func:`holds_global_random_state`)
_GLOBAL_RANDOM_STATE = threading.RLock()
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


def holds_global_random_state(function):
    """Decorate a function that seeds or draws from the process-wide random generators (torch's default
    generator, NumPy's and Python's): it runs while holding one process-wide lock.

    Weight initialisation, dropout and the gradient penalty draw from torch's default generator, which
    every thread shares: two background jobs training at once would each reseed it and draw from the
    other's sequence, so the same seed would no longer give the same model. With the lock, their seeded
    sections take turns and each gives what it gives alone; work outside them (preparing data, scoring,
    layouts) still runs side by side.
    """

    @functools.wraps(function)
    def holding(*args, **kwargs):
        with _GLOBAL_RANDOM_STATE:
            return function(*args, **kwargs)

    return holding


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch and ask torch for deterministic kernels; return a torch generator
    for sampling mini-batches. Call it only inside a function decorated with
    :func:`holds_global_random_state`.

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


@functools.cache
def thread_invariant_products() -> bool:
    """Whether a matrix product gives the same bits on one CPU thread as on two (checked once per process).

    False when torch ran a product before ``acsleuth_core`` was imported, which leaves MKL in its default
    mode (see the package docstring).
    """
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(128, 3000, generator=generator), torch.rand(3000, 512, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = a @ b
        torch.set_num_threads(2)
        two = a @ b
    finally:
        torch.set_num_threads(threads)
    return torch.equal(one, two)


def warn_if_thread_dependent() -> None:
    """Warn when CPU training would depend on the number of threads (a GPU run is not checked)."""
    if not thread_invariant_products():
        warnings.warn(
            "torch's matrix products depend on the number of CPU threads in this process, so the same seed may "
            "train another model on another machine: import acsleuth_core before running anything with torch, "
            "or set MKL_CBWR=AUTO,STRICT before starting Python.",
            RuntimeWarning,
            stacklevel=3,
        )
