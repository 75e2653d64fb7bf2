"""Module IV: anomaly subtypes from fused embeddings, clustered DESC-style (paper eq. 21–25).

For the cells called anomalous, ``x`` is their log expression (batch-adjusted
when a correction exists, see :mod:`subtyping`) and ``r`` the residual of
module I's reconstruction, per gene scale as the anomaly predictor reads it.
Each is embedded as one token (eq. 21): by default (``encoder="pca"``) the top
principal components over the anomalous cells, of ``x`` with genes
standardised and of ``r`` as it is; with ``encoder="module_one"`` module I's
encoder, ``z = E(x)`` and ``ζ = E(r)``, as the paper does. Module I's encoder
was trained on normal cells only and folds unseen cell types onto them: on the
demo, k-means on ``[z | ζ]`` cannot tell the CD34+ progenitors from the B
cells, while the principal components can (README, benchmarks). A small
transformer block reads the tokens and fuses them into ``z*`` (eq. 22; with
``use_residual=False`` only the expression token is read).

The fusion starts as a PCA of the block-scaled tokens (the transformer layer
begins as the identity, see :class:`FusionBlock`), so the starting partition
sees the tokens' geometry, not a random projection of it.

Clustering follows DESC. Centroids start from k-means when k is given. In the
automatic mode the starting partition is the one with the best silhouette
among k-means for k = 2…``max_auto_k`` and Leiden on a kNN graph of ``z*`` at
``resolution``; the reason is reported. Soft assignments are Student-t
kernels ``q`` (eq. 23); the target ``p ∝ q² / f^balance`` sharpens them
(eq. 24; DESC's ``balance = 1`` pulls cells into rare subtypes, so it is
weakened by default), and ``KL(p‖q)`` (eq. 25) trains the fusion block and
the centroids together. The target is refreshed every pass; training stops
when fewer than ``tol`` of the hard labels change in a pass, or after
``max_epochs``. Clusters left empty are dropped, so every reported subtype
has cells.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import silhouette_score
from torch import nn

from .errors import EmptyDataError, InputError
from .progress import CancelToken, ProgressCallback, ProgressEvent, check_cancel
from .runtime import holds_global_random_state, seed_everything


#: cells the silhouette of a candidate partition is measured on (all of them below this)
SILHOUETTE_SAMPLE = 5000
#: how cells are embedded into tokens: principal components over the anomalies, or module I's encoder
ENCODERS = ("pca", "module_one")
#: standardised expression is clipped here, as ``scanpy.pp.scale(max_value=10)`` does
SCALE_CLIP = 10.0


@dataclass(frozen=True)
class SubtypeConfig:
    """Settings of module IV."""

    n_subtypes: Union[int, str] = "auto"
    resolution: float = 0.5
    use_residual: bool = True
    encoder: str = "pca"
    token_dim: int = 32
    fused_dim: int = 32
    heads: int = 4
    student_dof: float = 1.0
    balance: float = 0.5
    max_epochs: int = 100
    tol: float = 0.005
    batch_size: int = 256
    learning_rate: float = 1e-3
    n_neighbors: int = 15
    max_auto_k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise InputError(f"The subtype encoder must be one of {', '.join(ENCODERS)}, not {self.encoder!r}.")

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items()}


@dataclass
class Subtypes:
    """Module IV's output for the anomalous cells (rows in the order given)."""

    labels: np.ndarray
    confidence: np.ndarray
    fused: np.ndarray
    soft_assignments: np.ndarray
    k_chosen: int
    k_reason: str
    n_epochs: int
    label_changes: list[float]


def principal_tokens(values: np.ndarray, dim: int, seed: int, *, standardise: bool) -> np.ndarray:
    """Top ``dim`` principal components of ``values`` over these cells (genes standardised and clipped first if asked)."""
    from sklearn.decomposition import PCA

    values = np.asarray(values, dtype=np.float32)
    if standardise:
        spread = values.std(axis=0)
        values = np.clip((values - values.mean(axis=0)) / np.where(spread > 0, spread, 1.0), -SCALE_CLIP, SCALE_CLIP)
    n_components = min(dim, values.shape[0] - 1, values.shape[1])
    return PCA(n_components, random_state=seed).fit_transform(values).astype(np.float32)


class FusionBlock(nn.Module):
    """Fuse the expression token (and the residual token) as tokens of one transformer encoder layer into ``z*``.

    The layer is pre-norm with its two output projections zeroed, so it starts
    as the identity and training learns what to mix; :meth:`start_from` sets
    the final projection to the principal axes of the cells' tokens, so ``z*``
    starts as a PCA of the tokens rather than a random projection of them.
    """

    def __init__(self, latent_dim: int, fused_dim: int, heads: int, use_residual: bool):
        super().__init__()
        self.use_residual = use_residual
        n_tokens = 2 if use_residual else 1
        self.token_type = nn.Parameter(torch.zeros(n_tokens, latent_dim))
        self.block = nn.TransformerEncoderLayer(
            latent_dim,
            _divisor_at_most(latent_dim, heads),
            dim_feedforward=2 * latent_dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        for last in (self.block.self_attn.out_proj, self.block.linear2):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.project = nn.Linear(n_tokens * latent_dim, min(fused_dim, n_tokens * latent_dim))

    def tokens(self, z: torch.Tensor, zeta: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.stack([z, zeta], dim=1) if self.use_residual else z.unsqueeze(1)

    def forward(self, z: torch.Tensor, zeta: Optional[torch.Tensor]) -> torch.Tensor:
        mixed = self.block(self.tokens(z, zeta) + self.token_type)
        return self.project(mixed.flatten(1))

    @torch.no_grad()
    def start_from(self, z: torch.Tensor, zeta: Optional[torch.Tensor]) -> None:
        """Set the projection to the top principal axes of the flattened tokens of these cells."""
        flat = self.tokens(z, zeta).flatten(1)
        mean = flat.mean(dim=0)
        _, _, axes = torch.linalg.svd(flat - mean, full_matrices=False)
        n_axes = min(self.project.out_features, axes.shape[0])
        self.project.weight.zero_()
        self.project.weight[:n_axes] = axes[:n_axes]
        self.project.bias.copy_(-self.project.weight @ mean)


def soft_assignments(fused: torch.Tensor, centroids: torch.Tensor, dof: float = 1.0) -> torch.Tensor:
    """Student-t kernel ``q_ij ∝ (1 + ‖z*_i − μ_j‖² / ν)^(−(ν+1)/2)``, rows summing to 1 (eq. 23)."""
    d2 = torch.cdist(fused, centroids).pow(2)
    q = (1.0 + d2 / dof).pow(-(dof + 1.0) / 2.0)
    return q / q.sum(dim=1, keepdim=True)


def sharpened_target(q: torch.Tensor, balance: float = 1.0) -> torch.Tensor:
    """DESC's auxiliary target ``p_ij ∝ q_ij² / f_j^balance`` with ``f_j = Σ_i q_ij`` (eq. 24 at ``balance = 1``).

    Squaring sharpens ``q``; dividing by the soft cluster size ``f_j`` favours
    small clusters. At ``balance = 1`` (DEC/DESC) that pull is strong enough to
    drag cells of a large subtype into a rare one; lower values weaken it.
    """
    weight = q.pow(2) / q.sum(dim=0, keepdim=True).pow(balance)
    return weight / weight.sum(dim=1, keepdim=True)


@holds_global_random_state
def find_subtypes(
    tokens: np.ndarray,
    residual_tokens: Optional[np.ndarray],
    config: SubtypeConfig = SubtypeConfig(),
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Subtypes:
    """Cluster anomalous cells from their expression tokens (and the tokens of their residuals)."""
    n_cells = tokens.shape[0]
    fixed_k = check_enough_anomalies(n_cells, config)
    generator = seed_everything(config.seed)
    use_residual = config.use_residual and residual_tokens is not None
    z = _block_scaled(tokens)
    zeta = _block_scaled(residual_tokens) if use_residual else None
    fusion = FusionBlock(z.shape[1], config.fused_dim, config.heads, use_residual)
    fusion.start_from(z, zeta)
    with torch.no_grad():
        initial = fusion(z, zeta).numpy()
    labels, k_reason = _initial_labels(initial, fixed_k, config)
    k = int(labels.max()) + 1
    centroids = nn.Parameter(torch.as_tensor(np.stack([initial[labels == j].mean(axis=0) for j in range(k)])))
    optimiser = torch.optim.Adam([*fusion.parameters(), centroids], lr=config.learning_rate)
    changes: list[float] = []
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        check_cancel(cancel)
        with torch.no_grad():
            target = sharpened_target(soft_assignments(fusion(z, zeta), centroids, config.student_dof), config.balance)
        for rows in torch.randperm(n_cells, generator=generator).split(config.batch_size):
            q = soft_assignments(fusion(z[rows], zeta[rows] if use_residual else None), centroids, config.student_dof)
            loss = (target[rows] * (target[rows].clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(dim=1).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            new_labels = soft_assignments(fusion(z, zeta), centroids, config.student_dof).argmax(dim=1).numpy()
        changes.append(float(np.mean(new_labels != labels)))
        labels = new_labels
        if progress is not None:
            progress(ProgressEvent("module IV", epoch, config.max_epochs, {"kl": loss.item(), "changed": changes[-1]}))
        if changes[-1] < config.tol:
            break
    with torch.no_grad():
        fused = fusion(z, zeta)
        q = soft_assignments(fused, centroids, config.student_dof).numpy()
    labels, q = _drop_empty(q)
    if q.shape[1] < k:
        k_reason += f"; {k - q.shape[1]} of the {k} starting clusters lost all their cells in training and were dropped"
    return Subtypes(
        labels=labels,
        confidence=q.max(axis=1),
        fused=fused.numpy(),
        soft_assignments=q,
        k_chosen=q.shape[1],
        k_reason=k_reason,
        n_epochs=epoch,
        label_changes=changes,
    )


def check_enough_anomalies(n_cells: int, config: SubtypeConfig) -> Optional[int]:
    """The fixed k (None for automatic); an :class:`EmptyDataError` when ``n_cells`` cannot be split so."""
    fixed_k = None if config.n_subtypes == "auto" else int(config.n_subtypes)
    if fixed_k is not None and fixed_k < 1:
        raise InputError("The number of subtypes must be at least 1 (or 'auto').")
    if n_cells < (fixed_k or 3):
        raise EmptyDataError(
            f"Only {n_cells} cells are called anomalous, too few to split into "
            f"{fixed_k or 'several'} subtypes; lower the anomaly threshold or ask for fewer subtypes."
        )
    return fixed_k


def _initial_labels(fused: np.ndarray, fixed_k: Optional[int], config: SubtypeConfig) -> tuple[np.ndarray, str]:
    if fixed_k is not None:
        return _kmeans(fused, fixed_k, config.seed), f"k = {fixed_k} was given; centroids start from k-means"
    candidates = {
        f"k-means with k = {k}": _kmeans(fused, k, config.seed)
        for k in range(2, min(config.max_auto_k, fused.shape[0] - 1) + 1)
    }
    leiden = leiden_labels(fused, config.resolution, config.n_neighbors, config.seed)
    if 1 < leiden.max() + 1 < fused.shape[0]:
        candidates[f"Leiden at resolution {config.resolution} (k = {leiden.max() + 1})"] = leiden
    sample = min(fused.shape[0], SILHOUETTE_SAMPLE)  # silhouette is quadratic in cells: score a fixed sample
    scores = {
        name: silhouette_score(fused, labels, sample_size=sample, random_state=config.seed)
        for name, labels in candidates.items()
    }
    best = max(scores, key=scores.get)
    runner_up = sorted(scores.values())[-2] if len(scores) > 1 else float("nan")
    k = int(candidates[best].max()) + 1
    reason = (
        f"k = {k}: {best} split the fused embedding best (silhouette {scores[best]:.2f}; next best "
        f"{runner_up:.2f}) among k-means for k = 2–{config.max_auto_k} and Leiden at the chosen resolution"
    )
    return candidates[best], reason


def _kmeans(embedding: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=seed).fit_predict(embedding)


def leiden_labels(embedding: np.ndarray, resolution: float, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """Leiden clusters (0..k−1) of the UMAP-weighted kNN graph of ``embedding``.

    The neighbours come from :func:`neighbours.nearest` (exact for small data,
    an approximate index for large, linear in cells either way; each cell
    counts as its own first neighbour, as in ``scanpy.pp.neighbors``), their
    weights from umap-learn's fuzzy simplicial set (the graph scanpy's
    ``method="umap"`` describes), and the partition from scanpy's igraph Leiden
    on that adjacency. scanpy's own neighbour search is not used: its
    large-data path fails on scipy's sparse arrays.
    """
    import anndata as ad
    import scanpy as sc

    points = np.asarray(embedding, dtype=np.float32)
    n_neighbors = max(2, min(n_neighbors, points.shape[0] - 1))
    # numba's first use (by umap-learn) can reset torch's thread count, and with it every later float sum:
    # keep the caller's, so a model trained after clustering repeats one trained before it
    torch_threads = torch.get_num_threads()
    try:
        holder = ad.AnnData(np.zeros((points.shape[0], 1), dtype=np.float32))
        sc.tl.leiden(
            holder, resolution=resolution, adjacency=_fuzzy_knn_graph(points, n_neighbors, seed), random_state=seed,
            flavor="igraph", n_iterations=2, directed=False,
        )
    finally:
        torch.set_num_threads(torch_threads)
    return holder.obs["leiden"].astype(int).to_numpy()


def _fuzzy_knn_graph(points: np.ndarray, n_neighbors: int, seed: int) -> sp.csr_matrix:
    """umap-learn's fuzzy simplicial set (symmetric weights) of the points' kNN graph."""
    from umap.umap_ import fuzzy_simplicial_set

    from .neighbours import nearest

    indices, distances = nearest(points, points, n_neighbors, seed=seed)
    connectivities, _, _ = fuzzy_simplicial_set(
        sp.coo_matrix((points.shape[0], 1)), n_neighbors, None, None, knn_indices=indices, knn_dists=distances
    )
    return sp.csr_matrix(connectivities)


def _drop_empty(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hard labels with clusters that got no cell removed (and ``q`` renormalised over the rest)."""
    labels = q.argmax(axis=1)
    used = np.unique(labels)
    q = q[:, used]
    q = q / q.sum(axis=1, keepdims=True)
    return np.searchsorted(used, labels), q


def _block_scaled(values: np.ndarray) -> torch.Tensor:
    """Columns centred, the whole block scaled to a mean squared row norm of 1 (so both tokens weigh alike).

    Scaling the block, not each column, keeps a token's own geometry: its
    leading components stay larger than its noisy trailing ones.
    """
    values = np.asarray(values, dtype=np.float32)
    centred = values - values.mean(axis=0)
    size = float(np.sqrt((centred**2).sum(axis=1).mean()))
    return torch.as_tensor(centred / (size if size > 0 else 1.0))


def _divisor_at_most(n: int, limit: int) -> int:
    return max(h for h in range(1, max(limit, 1) + 1) if n % h == 0)
