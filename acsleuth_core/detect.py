"""Module I: the reconstruction GAN trained on the reference, and anomaly scoring of targets.

:class:`AnomalyDetector` is the user-facing estimator. ``fit`` trains the
generator (encoder → memory bank → decoder) and critic on reference cells only,
keeping a share of them out of every fit for calibration. ``score`` turns a
target's reconstruction residuals into anomaly scores and makes the label-free
call (:func:`threshold.label_free_threshold`), checked on the held-out
reference cells, which are normal by definition.

In every score, residuals ``δ = x − x̂`` are first divided by each gene's
residual spread on the reference, so no gene dominates because it is highly
expressed; the *base score* is the log mean square of these normalised
residuals.

Default score (two views): the base score and the reference-similarity view
(:mod:`similarity`) each become conformal p-values against the held-out cells,
joined by Fisher's combination (:func:`_two_view_scores`). The MMD predictor is
not used here: on real cell-line data (README, "Real data") it split the
targets along plate and technology; without it the joined score's AUROC rose
from 0.916 to 0.967 (CEL-seq2 reference) and from 0.879 to 0.948 (Drop-seq).

The paper's score (``reference_similarity=False``), in order:
1. the base score's label-free call gives the warm-start labels of the
   predictor; only when it calls nothing are the base score's ranks used;
2. the predictor ``f_p`` is warm-started on those labels and trained with the
   MMD objective (eq. 12) on the target;
3. the predictor's call passes the self-check when its anchored mixture is
   trusted (it calls at most ``threshold.MAX_REFERENCE_CALLED`` of the
   held-out cells) or, failing that, the conformal BH fallback on its scores
   still calls something. A predictor that fails has split the target along
   some other structure (held-out reference cells land in its anomalous mode),
   and the base score is called instead, as ``expit`` of the base score
   standardised by the held-out cells' median and MAD.

``Threshold.detail`` records the route: ``score`` (``"residual mean square"``
with two views, else ``"predictor"`` or ``"base"``), for the paper's score
``warm_start`` (``"mixture"``, ``"conformal_bh"`` or ``"rank"``) and, as a
diagnostic, ``reference_in_anomalous_group`` (share of held-out cells with
predictor ``p > 1/2``), the threshold's own ``route`` and ``reference_called``
(share of held-out cells the final cut calls).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Optional

import numpy as np
import scipy.sparse as sp
from scipy import stats
import torch

from . import threshold as thr
from .errors import ModelError
from .mmd import PredictorConfig, fit_predictor, predict_logits
from .nn.adversarial import GanTraining, shuffled_rows, train_adversarial
from .nn.reconstruction import ReconstructionGenerator, ReconstructionTask, critic_network
from .progress import CancelToken, ProgressCallback, check_cancel
from .runtime import dense_batch_rows, resolve_device, seed_everything
from .similarity import ReferenceSimilarity

WEIGHTS_FILE = "module1.pt"
CONFIG_FILE = "detector.json"
CALIBRATION_FILE = "calibration.npz"
#: keys of a threshold's ``detail`` that describe the score rather than the cut (kept when a cut is re-drawn)
SCORE_DETAIL_KEYS = ("score", "views", "warm_start", "reference_in_anomalous_group")


@dataclass(frozen=True)
class DetectorConfig(GanTraining):
    """Hyperparameters of module I and of the scoring that follows it."""

    EPOCH_BOUNDS: ClassVar[tuple[int, int]] = (20, 400)

    latent_dim: int = 256
    hidden_dims: tuple[int, ...] = (512,)
    memory_size: int = 512
    temperature: Optional[float] = None
    dropout: float = 0.1
    target_steps: int = 2000
    holdout_fraction: float = 0.2
    residual_clip: float = 10.0
    reference_similarity: bool = True
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    @property
    def use_memory_bank(self) -> bool:
        return self.memory_size > 0

    @classmethod
    def from_json(cls, data: dict) -> "DetectorConfig":
        data = dict(data)
        data["hidden_dims"] = tuple(data["hidden_dims"])
        data["predictor"] = PredictorConfig(**data["predictor"])
        return cls(**data)


@dataclass
class DetectionResult:
    """Per-cell outputs of scoring one target (rows in the target's order)."""

    scores: np.ndarray
    calls: np.ndarray
    residual_norm: np.ndarray
    latent: np.ndarray
    batches: np.ndarray
    threshold: thr.Threshold
    reference_scores: np.ndarray
    reference_dissimilarity: Optional[np.ndarray] = None


@dataclass
class _ResidualStatistics:
    """What scoring reads off module I's residuals for a set of cells (rows in their order)."""

    base_score: np.ndarray
    residual_norm: np.ndarray
    latent: np.ndarray
    features: Optional[np.ndarray] = None


class AnomalyDetector:
    """Module I of ACsleuth: fit on normal reference cells, score target cells."""

    def __init__(self, config: DetectorConfig = DetectorConfig()):
        self.config = config
        self.genes: list[str] = []
        self.generator: Optional[ReconstructionGenerator] = None
        self.history: dict[str, list[float]] = {}
        self._holdout: Optional[sp.csr_matrix] = None
        self._gene_scale: Optional[np.ndarray] = None
        self._similarity: Optional[ReferenceSimilarity] = None

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        reference: sp.spmatrix | np.ndarray,
        genes: list[str],
        *,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> "AnomalyDetector":
        """Train module I on log-normalised reference cells (cells × ``genes``)."""
        cfg = self.config
        X = _as_csr(reference)
        if X.shape[1] != len(genes):
            raise ValueError("the reference matrix and the gene list disagree in length")
        generator_rng = seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        train_idx, holdout_idx = _split_holdout(X.shape[0], cfg.holdout_fraction, cfg.seed)
        X_train = X[train_idx]
        self.genes = list(genes)
        self.generator = _new_generator(cfg, len(genes)).to(device)
        critic = critic_network(len(genes)).to(device)
        adversarial = cfg.adversarial(X_train.shape[0])
        batch_size = min(cfg.batch_size, X_train.shape[0])

        def epoch_batches() -> Iterator[torch.Tensor]:
            for rows in shuffled_rows(X_train.shape[0], batch_size, generator_rng):
                yield _dense(X_train[rows.numpy()], device)

        self.history = train_adversarial(
            ReconstructionTask(self.generator, critic),
            epoch_batches,
            adversarial,
            stage="module I",
            progress=progress,
            cancel=cancel,
        )
        self.generator.cpu()
        self._gene_scale = self._residual_gene_scale(X_train, cancel)
        self._holdout = X[holdout_idx]
        self._similarity = ReferenceSimilarity.fit(X_train, seed=cfg.seed) if cfg.reference_similarity else None
        return self

    # ----------------------------------------------------------------- scoring
    def score(
        self,
        target: sp.spmatrix | np.ndarray,
        batches: Optional[np.ndarray] = None,
        *,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> DetectionResult:
        """Anomaly scores, calls, residual norms and latents for target cells.

        By default the score joins two views of each cell, each turned into a
        conformal p-value against the held-out reference cells: module I's
        (the mean square of the normalised reconstruction residuals) and how
        unlike its most similar reference cells the cell is
        (:mod:`similarity`); ``score = 1 − p`` with ``p`` Fisher's combination
        of the two. With ``reference_similarity`` off it is the paper's score,
        ``σ(logit)`` of the MMD predictor on the residuals (steps 2–4 of the
        module docstring).
        """
        self._require_fitted()
        cfg = self.config
        X = _as_csr(target)
        if X.shape[1] != len(self.genes):
            raise ModelError(
                f"The target has {X.shape[1]} genes but the model was trained on {len(self.genes)}; "
                "prepare the target with the model's gene list."
            )
        batches = np.asarray(batches if batches is not None else np.full(X.shape[0], "target"), dtype=str)
        keep_features = self._similarity is None  # only the predictor reads every residual feature
        cells = self._residual_statistics(X, cancel, keep_features=keep_features)
        holdout = self._residual_statistics(self._holdout, cancel, keep_features=keep_features)
        dissimilarity = None
        if self._similarity is None:
            logits, holdout_logits, route = self._residual_view(
                cells, holdout, seed_everything(cfg.seed + 1), progress, cancel
            )
            scores, reference_scores = thr.expit(logits), thr.expit(holdout_logits)
        else:
            check_cancel(cancel)
            dissimilarity = self._similarity.dissimilarity(X)
            holdout_dissimilarity = self._similarity.dissimilarity(self._holdout)
            scores, reference_scores = _two_view_scores(
                (cells.base_score, holdout.base_score),
                (_log_positive(dissimilarity), _log_positive(holdout_dissimilarity)),
            )
            route = {"score": "residual mean square", "views": "residual + reference similarity (Fisher)"}
        threshold = thr.label_free_threshold(scores, reference_scores)
        threshold = dataclasses.replace(threshold, detail=threshold.detail | route)
        return DetectionResult(
            scores=scores,
            calls=thr.call(scores, threshold),
            residual_norm=cells.residual_norm,
            latent=cells.latent,
            batches=batches,
            threshold=threshold,
            reference_scores=reference_scores,
            reference_dissimilarity=dissimilarity,
        )

    def _residual_view(
        self,
        cells: _ResidualStatistics,
        holdout: _ResidualStatistics,
        generator_rng: torch.Generator,
        progress: Optional[ProgressCallback],
        cancel: Optional[CancelToken],
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Module I's evidence on a logit scale, for targets and held-out cells: the MMD predictor's
        logits, or the standardised residual mean square when the predictor's call fails its check."""
        features, holdout_features = cells.features, holdout.features
        base, base_holdout = cells.base_score, holdout.base_score
        warm, warm_route = _warm_start_targets(base, base_holdout)
        predictor = fit_predictor(
            features, warm, self.config.predictor, generator=generator_rng, progress=progress, cancel=cancel
        )
        logits = predict_logits(predictor, features)
        reference_logits = predict_logits(predictor, holdout_features)
        route = {
            "score": "predictor",
            "warm_start": warm_route,
            "reference_in_anomalous_group": float(np.mean(reference_logits > 0)),
        }
        predictor_call = thr.label_free_threshold(thr.expit(logits), thr.expit(reference_logits))
        if _passes_self_check(predictor_call, thr.expit(logits)):
            return logits, reference_logits, route
        route["score"] = "base"
        return _standardise(base, base_holdout), _standardise(base_holdout, base_holdout), route

    def _residual_statistics(
        self, X: sp.csr_matrix, cancel: Optional[CancelToken], *, keep_features: bool
    ) -> _ResidualStatistics:
        """Per-cell base scores, raw residual norms and latents, batch by batch; the normalised,
        clipped residual features of every cell too when ``keep_features`` (a cells × genes array)."""
        clip = self.config.residual_clip
        mean_square = np.empty(X.shape[0], dtype=np.float64)
        norms = np.empty(X.shape[0], dtype=np.float64)
        latent = np.empty((X.shape[0], self.config.latent_dim), dtype=np.float32)
        features = np.empty(X.shape, dtype=np.float32) if keep_features else None
        for rows, residual, z in self._residual_batches(X, cancel):
            norms[rows] = np.linalg.norm(residual, axis=1)
            normalised = np.clip(residual / self._gene_scale, -clip, clip)
            mean_square[rows] = _mean_square(normalised)
            latent[rows] = z
            if features is not None:
                features[rows] = normalised
        return _ResidualStatistics(np.log(mean_square), norms, latent, features)

    @torch.no_grad()
    def _residual_batches(
        self, X: sp.csr_matrix, cancel: Optional[CancelToken] = None
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Yield ``(rows, x − x̂, latent)`` in row order, in batches whose dense arrays stay small however many genes."""
        self.generator.eval()
        batch_size = dense_batch_rows(X.shape[1])
        for start in range(0, X.shape[0], batch_size):
            check_cancel(cancel)
            rows = slice(start, min(start + batch_size, X.shape[0]))
            x = X[rows].toarray().astype(np.float32, copy=False)
            out = self.generator(torch.from_numpy(x))
            yield rows, x - out.expression.numpy(), out.latent.numpy()

    def _residual_gene_scale(self, X: sp.csr_matrix, cancel: Optional[CancelToken] = None) -> np.ndarray:
        """Each gene's residual spread (RMS) over these cells, floored at the 10th percentile across
        genes; accumulated batch by batch, so no cells × genes array is held."""
        sum_of_squares = np.zeros(X.shape[1], dtype=np.float64)
        for _, residual, _ in self._residual_batches(X, cancel):
            sum_of_squares += np.einsum("ij,ij->j", residual, residual, dtype=np.float64)
        scale = np.sqrt(sum_of_squares / X.shape[0])
        floor = max(float(np.quantile(scale, 0.1)), 1e-3)
        return np.maximum(scale, floor).astype(np.float32)

    @torch.no_grad()
    def encode(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Module-I latent vectors of cells on the model's genes."""
        self._require_fitted()
        return np.vstack([z for _, _, z in self._residual_batches(_as_csr(X))])

    def reconstruction_residuals(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """``x − x̂`` of cells on the model's genes (module I's reconstruction residuals)."""
        self._require_fitted()
        return np.vstack([residual for _, residual, _ in self._residual_batches(_as_csr(X))])

    def residual_features(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """The residuals as the anomaly predictor reads them: ``x − x̂`` per gene scale, clipped."""
        self._require_fitted()
        return self._residual_statistics(_as_csr(X), None, keep_features=True).features

    # ------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write weights, hyperparameters + genes (JSON) and calibration arrays into ``folder``."""
        self._require_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.generator.state_dict(), folder / WEIGHTS_FILE)
        meta = {"config": self.config.to_json(), "genes": self.genes, "history": self.history}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        h = self._holdout
        np.savez_compressed(
            folder / CALIBRATION_FILE,
            holdout_data=h.data,
            holdout_indices=h.indices,
            holdout_indptr=h.indptr,
            holdout_shape=np.array(h.shape),
            gene_scale=self._gene_scale,
            **(self._similarity.to_arrays() if self._similarity is not None else {}),
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AnomalyDetector":
        """Load a detector written by :meth:`save` (weights with ``weights_only=True``)."""
        folder = Path(folder)
        missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, CALIBRATION_FILE) if not (folder / f).is_file()]
        if missing:
            raise ModelError(f"{folder} is not a saved ACsleuth model: missing {', '.join(missing)}.")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        detector = cls(DetectorConfig.from_json(meta["config"]))
        detector.genes = list(meta["genes"])
        detector.history = meta.get("history", {})
        detector.generator = _new_generator(detector.config, len(detector.genes))
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        detector.generator.load_state_dict(state)
        detector.generator.eval()
        with np.load(folder / CALIBRATION_FILE, allow_pickle=False) as cal:
            detector._holdout = sp.csr_matrix(
                (cal["holdout_data"], cal["holdout_indices"], cal["holdout_indptr"]), shape=tuple(cal["holdout_shape"])
            )
            detector._gene_scale = cal["gene_scale"]
            if detector.config.reference_similarity and "similarity_axes" in cal.files:
                detector._similarity = ReferenceSimilarity.from_arrays(cal)
        return detector

    def _require_fitted(self) -> None:
        if self.generator is None:
            raise ModelError("The detector has not been trained yet: call fit() or load a saved model.")


def _new_generator(config: DetectorConfig, n_genes: int) -> ReconstructionGenerator:
    return ReconstructionGenerator(
        n_genes,
        hidden_dims=config.hidden_dims,
        latent_dim=config.latent_dim,
        memory_size=config.memory_size,
        temperature=config.temperature,
        dropout=config.dropout,
    )


def _as_csr(X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix(X, dtype=np.float32)


def _dense(X: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(X.toarray().astype(np.float32)).to(device)


def _split_holdout(n_cells: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train / held-out split of reference cells; at least 10 held out and 10 to train on."""
    if n_cells < 20:
        raise ModelError(f"The reference has {n_cells} cells; ACsleuth needs at least 20 normal reference cells.")
    n_holdout = int(np.clip(round(n_cells * fraction), 10, n_cells - 10))
    order = np.random.default_rng(seed).permutation(n_cells)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def _warm_start_targets(base: np.ndarray, base_holdout: np.ndarray) -> tuple[np.ndarray, str]:
    """Soft labels that orient the predictor, and how they were made.

    ``"mixture"``: the anchored mixture's posterior on the base score, when the
    mixture passes :func:`threshold.mixture_is_trusted`; ``"conformal_bh"``:
    1 for the cells Benjamini–Hochberg calls on conformal p-values against the
    held-out cells, 0 for the rest; ``"rank"``: the base score's rank in [0, 1]
    when neither calls any cell.
    """
    mixture = thr.fit_anchored_mixture(base, base_holdout)
    if thr.mixture_is_trusted(mixture, base_holdout):
        return mixture.posterior(base), "mixture"
    called = base > thr.conformal_bh_cut(base, base_holdout)
    if called.any():
        return called.astype(np.float64), "conformal_bh"
    return stats.rankdata(base) / base.size, "rank"


def _two_view_scores(*views: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Scores of target and held-out cells from ``(target, held-out)`` statistics of each view (high = anomalous).

    Each view becomes a conformal p-value against the held-out cells (leave
    one out for the held-out cells themselves), which caps the evidence any
    one view can give; ``score = 1 − `` Fisher's combination. Capped p-values
    tie (cells beyond every held-out cell in both views): ties are broken by
    the views' standardised sum, within the gap to the next score, so no other
    order changes and a fraction or manual cut can still split them.
    """
    n_targets = views[0][0].size
    combined = np.concatenate([
        1.0 - thr.fisher_combined(*(thr.conformal_pvalues(t, h) for t, h in views)),
        1.0 - thr.fisher_combined(*(thr.held_out_pvalues(h) for _, h in views)),
    ]).round(12)  # equal p-values in another order differ by rounding only: make them tie
    evidence = sum(_standardise(np.concatenate([t, h]), h) for t, h in views) / len(views)
    squashed = 0.5 + 0.5 * evidence / (1.0 + np.abs(evidence))  # into (0, 1); unlike σ, no plateau far out
    levels = np.unique(combined)
    room = np.append(levels[1:], 1.0)[np.searchsorted(levels, combined)] - combined
    scores = combined + 0.5 * room * squashed
    return scores[:n_targets], scores[n_targets:]


def _passes_self_check(threshold: thr.Threshold, scores: np.ndarray) -> bool:
    """Whether the predictor's label-free call is validated by the held-out reference cells:
    its anchored mixture was trusted (it calls at most ``MAX_REFERENCE_CALLED`` of them, see
    :func:`threshold.mixture_is_trusted`), or the conformal BH fallback still calls some cells."""
    return threshold.detail["route"] == "mixture" or bool(thr.call(scores, threshold).any())


def _standardise(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(x − median) / MAD`` of ``reference`` (normal-consistent MAD, floored)."""
    scale = max(float(stats.median_abs_deviation(reference, scale="normal")), 1e-6)
    return (np.asarray(x, dtype=np.float64) - float(np.median(reference))) / scale


def _mean_square(features: np.ndarray) -> np.ndarray:
    """Each row's mean square (float64 accumulation), floored so its log is finite."""
    return np.maximum(np.einsum("ij,ij->i", features, features, dtype=np.float64) / features.shape[1], 1e-12)


def _log_positive(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(x, 1e-12))
