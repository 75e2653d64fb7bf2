"""Module II: kin pairs between target cells called normal and reference cells.

The paper learns a dense non-negative mapping ``M`` (targets × reference) so
that ``ReLU(M)·Z_R`` reproduces the target embeddings ``Z_T`` under an L1 loss
and a WGAN-GP critic (eq. 15–17); a target cell's kin is the arg-max of its row.
That matrix is quadratic in cells. Here each row holds only the weights of the
target cell's ``n_candidates`` nearest reference cells, kept in a sparse
embedding table that only the rows of the current mini-batch update, so memory
and time grow linearly with cells and no targets × reference tensor is built.

Candidates are searched after removing each batch's latent offset, estimated
robustly (iterative nearest-reference median, like one translation-only
iterative-closest-point fit) so a batch effect does not pick the wrong kin.
The offsets also seed module III's style vectors.

A kin is the candidate carrying most of the row's weight, under a capacity:
no reference cell is the kin of more than ``kin_capacity`` times its fair
share (targets / reference cells) of target cells. Without it a few reference
cells on the edge of the reference cloud facing the target become the kin of
dozens of targets (hubness of nearest neighbours in high dimensions; on
CellBench, 213 targets had 40 distinct kins, one of them 30 times), module
III then pulls those targets onto the same few points and batches stay
apart. A target whose candidates are all full keeps its heaviest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .neighbours import nearest
from .nn.adversarial import GanTraining, GeneratorOutput, shuffled_rows, train_adversarial
from .nn.reconstruction import critic_network
from .progress import CancelToken, ProgressCallback, check_cancel
from .runtime import holds_global_random_state, resolve_device, seed_everything


@dataclass(frozen=True)
class KinConfig(GanTraining):
    """Hyperparameters of module II (every mapping row is updated 10–200 times by default)."""

    EPOCH_BOUNDS: ClassVar[tuple[int, int]] = (10, 200)

    n_candidates: int = 15
    align_rounds: int = 3
    batch_size: int = 256
    learning_rate: float = 0.01
    critic_learning_rate: Optional[float] = 1e-3
    #: most targets one reference cell may be kin to, as a multiple of targets / reference cells; None: no limit
    kin_capacity: Optional[float] = 2.0


@dataclass
class KinPairs:
    """Module II's output for target cells (rows in the order given)."""

    kin: np.ndarray
    confidence: np.ndarray
    mapping: sp.csr_matrix
    offsets: dict[str, np.ndarray]
    history: dict[str, list[float]]


class SparseKinMapping(nn.Module):
    """``ẑ_i = Σ_c ReLU(M_ic) · z_R[candidate_ic]``: eq. 15 with each row restricted to its candidates."""

    def __init__(self, candidates: np.ndarray, reference_latent: np.ndarray, initial_weights: np.ndarray):
        super().__init__()
        self.weights = nn.Embedding(*candidates.shape, sparse=True)
        with torch.no_grad():
            self.weights.weight.copy_(torch.as_tensor(initial_weights, dtype=torch.float32))
        self.register_buffer("candidates", torch.as_tensor(candidates, dtype=torch.long))
        self.register_buffer("reference", torch.as_tensor(reference_latent, dtype=torch.float32))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        mix = torch.relu(self.weights(rows))
        return torch.einsum("bk,bkp->bp", mix, self.reference[self.candidates[rows]])

    def row_weights(self) -> np.ndarray:
        """``ReLU(M)`` on the candidate columns, targets × candidates."""
        return torch.relu(self.weights.weight.detach()).cpu().numpy()


class KinTask:
    """Module II as an adversarial task: the critic tells real target embeddings from mixes of reference ones."""

    def __init__(self, mapping: SparseKinMapping, target_latent: torch.Tensor):
        self.generator = mapping
        self.critic = critic_network(target_latent.shape[1], hidden_dims=(256, 64)).to(target_latent.device)
        self._target = target_latent

    def generate(self, rows: torch.Tensor) -> GeneratorOutput:
        real = self._target[rows]
        fake = self.generator(rows)
        return GeneratorOutput(real=real, fake=fake, reconstruction_loss=(real - fake).abs().mean())

    def after_generator_step(self, output: GeneratorOutput) -> None:
        pass


@holds_global_random_state
def find_kin_pairs(
    target_latent: np.ndarray,
    reference_latent: np.ndarray,
    batches: np.ndarray,
    config: KinConfig = KinConfig(),
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> KinPairs:
    """Pair each target cell with the reference cell that carries most of its non-negative mix
    (within ``config.kin_capacity``: :func:`capacity_limited_choice`).

    ``target_latent`` and ``reference_latent`` are module-I embeddings (cells ×
    latent); ``batches`` names each target cell's batch. Returns the kin's row
    in the reference, a confidence (the kin's share of the row's weight, 0–1),
    the sparse mapping ``ReLU(M)`` and the per-batch latent offsets.
    """
    if len(target_latent) < 2 or len(reference_latent) < 2:
        raise ValueError("kin pairing needs at least two target cells called normal and two reference cells")
    generator_rng = seed_everything(config.seed)
    device = resolve_device(config.device)
    batches = np.asarray(batches, dtype=str)
    offsets = latent_offsets(target_latent, reference_latent, batches, config.align_rounds, config.seed, cancel)
    aligned = target_latent - np.stack([offsets[b] for b in batches])
    k = min(config.n_candidates, len(reference_latent))
    candidates, distances = nearest(reference_latent, aligned, k, seed=config.seed)
    mapping = SparseKinMapping(candidates, reference_latent, _initial_weights(distances)).to(device)
    target = torch.as_tensor(aligned, dtype=torch.float32, device=device)
    adversarial = config.adversarial(len(aligned), generator_optimiser="sparse_adam")
    batch_size = min(config.batch_size, len(aligned))

    def epoch_batches() -> Iterator[torch.Tensor]:
        for rows in shuffled_rows(len(aligned), batch_size, generator_rng):
            yield rows.to(device)

    history = train_adversarial(
        KinTask(mapping, target), epoch_batches, adversarial, stage="module II", progress=progress, cancel=cancel
    )
    weights = mapping.row_weights()
    chosen = capacity_limited_choice(weights, candidates, len(reference_latent), config.kin_capacity)
    return _pairs_from_weights(weights, candidates, chosen, len(reference_latent), offsets, history)


def latent_offsets(
    target_latent: np.ndarray,
    reference_latent: np.ndarray,
    batches: np.ndarray,
    rounds: int = 3,
    seed: int = 0,
    cancel: Optional[CancelToken] = None,
) -> dict[str, np.ndarray]:
    """Each batch's latent shift from the reference: the coordinate-wise median of
    ``z − z_nearest_reference``, re-estimated ``rounds`` times after removing the last estimate."""
    offsets = {}
    for batch in np.unique(batches):
        cells = target_latent[batches == batch]
        offset = np.zeros(cells.shape[1], dtype=np.float32)
        for _ in range(rounds):
            check_cancel(cancel)
            nearest_ref, _ = nearest(reference_latent, cells - offset, 1, seed=seed)
            offset = np.median(cells - reference_latent[nearest_ref[:, 0]], axis=0).astype(np.float32)
        offsets[str(batch)] = offset
    return offsets


def _initial_weights(distances: np.ndarray) -> np.ndarray:
    """Start each row as a soft nearest-neighbour mix: ``softmax(−d² / mean(d²))`` over its candidates."""
    d2 = distances.astype(np.float64) ** 2
    scaled = -d2 / np.maximum(d2.mean(axis=1, keepdims=True), 1e-12)
    weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def capacity_limited_choice(
    weights: np.ndarray, candidates: np.ndarray, n_reference: int, capacity: Optional[float]
) -> np.ndarray:
    """Column (in ``candidates``) of each row's kin: its heaviest candidate with room left.

    Each reference cell takes at most ``⌈capacity · rows / n_reference⌉`` rows.
    Rows propose in rounds, heaviest remaining candidate first; a reference
    cell accepts the heaviest proposals that fit. Rows left without room keep
    their heaviest candidate. ``capacity=None``: every row's heaviest candidate.
    """
    ranked = np.argsort(-weights, axis=1, kind="stable")
    if capacity is None:
        return ranked[:, 0]
    n_rows, n_candidates = weights.shape
    room = np.full(n_reference, max(1, int(np.ceil(capacity * n_rows / n_reference))))
    chosen = np.full(n_rows, -1)
    for rank in range(n_candidates):
        open_rows = np.nonzero(chosen < 0)[0]
        if open_rows.size == 0:
            break
        columns = ranked[open_rows, rank]
        proposed = candidates[open_rows, columns]
        order = np.lexsort((-weights[open_rows, columns], proposed))  # by reference cell, heaviest first
        proposed = proposed[order]
        place_in_queue = np.arange(proposed.size) - np.searchsorted(proposed, proposed)  # 0 for each cell's heaviest
        accepted = place_in_queue < room[proposed]
        chosen[open_rows[order[accepted]]] = columns[order[accepted]]
        np.subtract.at(room, proposed[accepted], 1)
    unplaced = chosen < 0
    chosen[unplaced] = ranked[unplaced, 0]
    return chosen


def _pairs_from_weights(
    weights: np.ndarray, candidates: np.ndarray, chosen: np.ndarray, n_reference: int, offsets: dict, history: dict
) -> KinPairs:
    rows = np.arange(len(weights))
    totals = weights.sum(axis=1)
    confidence = np.divide(weights[rows, chosen], totals, out=np.zeros(len(weights)), where=totals > 0)
    indptr = np.arange(0, weights.size + 1, weights.shape[1])
    mapping = sp.csr_matrix((weights.ravel(), candidates.ravel(), indptr), shape=(len(weights), n_reference))
    mapping.sum_duplicates()
    mapping.eliminate_zeros()
    return KinPairs(
        kin=candidates[rows, chosen], confidence=confidence.astype(np.float32), mapping=mapping, offsets=offsets, history=history
    )
