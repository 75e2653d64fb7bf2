"""Module I: the reconstruction GAN trained on the reference, and anomaly scoring of targets.

:class:`AnomalyDetector` is the user-facing estimator. ``fit`` cross-fits
module I: the reference is split into ``folds`` parts and one model is
trained on all parts but each one, so every reference cell can be scored by a
model that never saw it. ``score`` reads three views off every cell
(:mod:`views`: the residual mean square, the dissimilarity to the most similar
reference cells, and the paper's MMD predictor on the residuals); a target
cell's view is the mean over the fold models, a reference cell's comes from
its own out-of-fold model. The score is a weighted mean of the standardised
views, each weighted by how far the target's upper tail reaches past the
reference's in it (:func:`views.tail_excess_weights`); the label-free call compares target scores with
those of every reference cell (:func:`threshold.label_free_threshold`).

Residuals ``δ = x − x̂`` are divided by each gene's residual spread on the
model's training cells, so no gene dominates because it is highly expressed.

Reproducibility: the reference is put in a canonical, content-defined row
order before anything is trained (:func:`canonical_row_order`), so the same
cells in another order give the same models; the folds are drawn from the seed.
On the CPU the models do not depend on the number of threads either: MKL's
reproducible mode (set when the package is imported) and
:class:`nn.blocks.RowNorm` make every sum's order independent of it.

What downstream modules read (``encode``, ``generator``, residuals) comes from
the first fold model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch

from . import threshold as thr
from .errors import ModelError
from .mmd import PredictorConfig, fit_predictor, predict_logits
from .nn.adversarial import GanTraining, shuffled_rows, train_adversarial
from .nn.reconstruction import ReconstructionGenerator, ReconstructionTask, critic_network
from .progress import CancelToken, ProgressCallback, check_cancel
from .runtime import dense_batch_rows, holds_global_random_state, resolve_device, seed_everything, warn_if_thread_dependent
from .similarity import ReferenceSimilarity
from .views import VIEWS, ViewScores, combine, tail_excess_weights

WEIGHTS_FILE = "module1.pt"
CONFIG_FILE = "detector.json"
CALIBRATION_FILE = "calibration.npz"
#: keys of a threshold's ``detail`` that describe the score rather than the cut (kept when a cut is re-drawn)
SCORE_DETAIL_KEYS = ("score", "views", "weights", "warm_start")
#: the predictor trains on at most this many target cells (a seeded sample), then scores every cell
MAX_PREDICTOR_CELLS = 20000


@dataclass(frozen=True)
class DetectorConfig(GanTraining):
    """Hyperparameters of module I and of the scoring that follows it.

    ``views``: the views the score joins (:data:`views.VIEWS`); ``("predictor",)`` is the paper's score.
    """

    EPOCH_BOUNDS: ClassVar[tuple[int, int]] = (20, 400)

    latent_dim: int = 256
    hidden_dims: tuple[int, ...] = (512,)
    memory_size: int = 512
    temperature: Optional[float] = None
    dropout: float = 0.1
    target_steps: int = 2000
    folds: int = 2
    residual_clip: float = 10.0
    views: tuple[str, ...] = VIEWS
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.views) - set(VIEWS))
        if unknown or not self.views:
            raise ValueError(f"views must be a non-empty subset of {', '.join(VIEWS)}, not {self.views!r}")
        if self.folds < 2:
            raise ValueError("folds must be at least 2: every reference cell needs a model that did not see it")

    @property
    def use_memory_bank(self) -> bool:
        return self.memory_size > 0

    @classmethod
    def from_json(cls, data: dict) -> "DetectorConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise ModelError(
                "This model was saved by an older version of ACsleuth (settings "
                f"{', '.join(sorted(set(data) - known))} no longer exist): train it again."
            )
        data["hidden_dims"] = tuple(data["hidden_dims"])
        data["views"] = tuple(data["views"])
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
    views: dict[str, ViewScores]


@dataclass
class _FoldModel:
    """One cross-fitting model: module I trained without one fold of the reference, and what it scores with."""

    generator: ReconstructionGenerator
    gene_scale: np.ndarray
    similarity: ReferenceSimilarity

    def residual_batches(
        self, X: sp.csr_matrix, cancel: Optional[CancelToken] = None
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Yield ``(rows, x − x̂, latent)`` in row order, in batches whose dense arrays stay small."""
        self.generator.eval()
        batch_size = dense_batch_rows(X.shape[1])
        with torch.no_grad():
            for start in range(0, X.shape[0], batch_size):
                check_cancel(cancel)
                rows = slice(start, min(start + batch_size, X.shape[0]))
                x = X[rows].toarray().astype(np.float32, copy=False)
                out = self.generator(torch.from_numpy(x))
                yield rows, x - out.expression.numpy(), out.latent.numpy()

    def normalised(self, residual: np.ndarray, clip: float) -> np.ndarray:
        """Residuals per gene scale, clipped at ``±clip``: what the views read."""
        return np.clip(residual / self.gene_scale, -clip, clip)


class AnomalyDetector:
    """Module I of ACsleuth: fit on normal reference cells, score target cells."""

    def __init__(self, config: DetectorConfig = DetectorConfig()):
        self.config = config
        self.genes: list[str] = []
        self.history: dict[str, list[float]] = {}
        self._models: list[_FoldModel] = []
        self._reference: Optional[sp.csr_matrix] = None
        self._folds: Optional[np.ndarray] = None

    @property
    def generator(self) -> ReconstructionGenerator:
        """The first fold model's generator (what module III starts from)."""
        self._require_fitted()
        return self._models[0].generator

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        reference: sp.spmatrix | np.ndarray,
        genes: list[str],
        *,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> "AnomalyDetector":
        """Train the fold models on log-normalised reference cells (cells × ``genes``)."""
        cfg = self.config
        X = _as_csr(reference)
        if X.shape[1] != len(genes):
            raise ValueError("the reference matrix and the gene list disagree in length")
        if X.shape[0] < 10 * cfg.folds:
            raise ModelError(f"The reference has {X.shape[0]} cells; ACsleuth needs at least {10 * cfg.folds} normal reference cells.")
        if resolve_device(cfg.device).type == "cpu":
            warn_if_thread_dependent()
        X = X[canonical_row_order(X)]
        folds = fold_assignment(X.shape[0], cfg.folds, cfg.seed)
        self.genes = list(genes)
        n_epochs = [cfg.n_epochs(int(np.sum(folds != k))) for k in range(cfg.folds)]
        self._models = []
        for k in range(cfg.folds):
            model, history = self._train_fold_model(
                X[folds != k], seed=cfg.seed + k, progress=_offset_progress(progress, sum(n_epochs[:k]), sum(n_epochs)),
                cancel=cancel,
            )
            self._models.append(model)
            if k == 0:
                self.history = history
        self._reference, self._folds = X, folds
        return self

    @holds_global_random_state
    def _train_fold_model(
        self, X: sp.csr_matrix, *, seed: int, progress: Optional[ProgressCallback], cancel: Optional[CancelToken]
    ) -> tuple[_FoldModel, dict[str, list[float]]]:
        cfg = self.config
        generator_rng = seed_everything(seed)
        device = resolve_device(cfg.device)
        generator = _new_generator(cfg, X.shape[1]).to(device)
        critic = critic_network(X.shape[1]).to(device)
        batch_size = min(cfg.batch_size, X.shape[0])

        def epoch_batches() -> Iterator[torch.Tensor]:
            for rows in shuffled_rows(X.shape[0], batch_size, generator_rng):
                yield torch.from_numpy(X[rows.numpy()].toarray().astype(np.float32)).to(device)

        history = train_adversarial(
            ReconstructionTask(generator, critic), epoch_batches, cfg.adversarial(X.shape[0]),
            stage="module I", progress=progress, cancel=cancel,
        )
        model = _FoldModel(generator.cpu(), np.ones(X.shape[1], dtype=np.float32), ReferenceSimilarity.fit(X, seed=seed))
        model.gene_scale = _residual_gene_scale(model, X, cancel)
        return model, history

    # ----------------------------------------------------------------- scoring
    def score(
        self,
        target: sp.spmatrix | np.ndarray,
        batches: Optional[np.ndarray] = None,
        *,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> DetectionResult:
        """Anomaly scores, calls, residual norms, latents and every view for target cells.

        The score is the weighted mean of the configured views, each
        standardised by the reference cells' median and MAD and weighted by its
        tail excess (:mod:`views`); the reference cells' own scores, out of
        fold, calibrate the call.
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
        target_stats = self._ensemble_statistics(X, cancel)
        reference_stats = self._out_of_fold_statistics(cancel)
        views = {
            "residual": ViewScores(target_stats.base_score, reference_stats.base_score),
            "similarity": ViewScores(_log_positive(target_stats.dissimilarity), _log_positive(reference_stats.dissimilarity)),
        }
        description = {"score": "weighted mean of standardised views", "views": ", ".join(cfg.views)}
        if "predictor" in cfg.views:
            warm_views = {n: views[n] for n in ("residual", "similarity")}
            views["predictor"], description["warm_start"] = self._predictor_view(X, warm_views, progress, cancel)
        chosen = {name: views[name] for name in cfg.views}
        weights = tail_excess_weights(chosen)
        description["weights"] = {name: round(w / sum(weights.values()), 4) for name, w in weights.items()}
        joined = combine(chosen, weights)
        threshold = thr.label_free_threshold(joined.target, joined.reference)
        threshold = dataclasses.replace(threshold, detail=threshold.detail | description)
        return DetectionResult(
            scores=joined.target,
            calls=thr.call(joined.target, threshold),
            residual_norm=target_stats.residual_norm,
            latent=target_stats.latent,
            batches=batches,
            threshold=threshold,
            reference_scores=joined.reference,
            views=views,
        )

    @holds_global_random_state
    def _predictor_view(
        self,
        X: sp.csr_matrix,
        warm_views: dict[str, ViewScores],
        progress: Optional[ProgressCallback],
        cancel: Optional[CancelToken],
    ) -> tuple[ViewScores, str]:
        """The paper's score: the MMD predictor trained on the target's residual features, warm-started on the
        other views' call, applied to target and out-of-fold reference cells.

        Reference cells' features come from one model (the one that did not see them), so the predictor
        reads every cell through one model at a time: it trains on each fold model's features of (a sample
        of) the target, and a target cell's logit is the mean over the fold models. Eq. 12 does not say
        which of its two groups is the anomalous one: it is the group that holds a larger share of the
        target than of the reference (:func:`_orient_by_reference`).
        """
        cfg = self.config
        generator_rng = seed_everything(cfg.seed + cfg.folds)
        warm = combine(warm_views)
        called = thr.call(warm.target, thr.label_free_threshold(warm.target, warm.reference))
        if called.any() and not called.all():
            targets, route = called.astype(np.float64), "call of the other views"
        else:
            targets, route = _ranks(warm.target), "rank of the other views"
        rows = np.arange(X.shape[0])
        per_model = max(1, MAX_PREDICTOR_CELLS // cfg.folds)
        if rows.size > per_model:
            rows = np.sort(np.random.default_rng(cfg.seed).choice(rows, per_model, replace=False))
        features = np.vstack([self._features(model, X[rows], cancel) for model in self._models])
        predictor = fit_predictor(
            features, np.tile(targets[rows], cfg.folds), cfg.predictor, generator=generator_rng,
            progress=progress, cancel=cancel,
        )
        del features
        target_logits = np.zeros(X.shape[0])
        for start in range(0, X.shape[0], per_model):
            chunk = X[start : start + per_model]
            for model in self._models:
                target_logits[start : start + chunk.shape[0]] += predict_logits(predictor, self._features(model, chunk, cancel))
        target_logits /= cfg.folds
        reference_logits = np.empty(self._reference.shape[0])
        for k, model in enumerate(self._models):
            in_fold = np.nonzero(self._folds == k)[0]
            reference_logits[in_fold] = predict_logits(predictor, self._features(model, self._reference[in_fold], cancel))
        return _orient_by_reference(ViewScores(target_logits, reference_logits)), route

    def _ensemble_statistics(self, X: sp.csr_matrix, cancel: Optional[CancelToken]) -> "_Statistics":
        """Every fold model's statistics of these cells, averaged; latent and residual norm of the first model."""
        per_model = [_statistics(model, X, self.config, cancel) for model in self._models]
        first = per_model[0]
        return _Statistics(
            base_score=np.mean([s.base_score for s in per_model], axis=0),
            dissimilarity=np.mean([s.dissimilarity for s in per_model], axis=0),
            residual_norm=first.residual_norm,
            latent=first.latent,
        )

    def _out_of_fold_statistics(self, cancel: Optional[CancelToken]) -> "_Statistics":
        """Statistics of every reference cell from the fold model that did not train on it."""
        n = self._reference.shape[0]
        base, dissimilarity = np.empty(n), np.empty(n)
        for k, model in enumerate(self._models):
            in_fold = np.nonzero(self._folds == k)[0]
            stats_k = _statistics(model, self._reference[in_fold], self.config, cancel)
            base[in_fold], dissimilarity[in_fold] = stats_k.base_score, stats_k.dissimilarity
        return _Statistics(base, dissimilarity, np.empty(0), np.empty((0, 0)))

    def _features(self, model: _FoldModel, X: sp.csr_matrix, cancel: Optional[CancelToken]) -> np.ndarray:
        features = np.empty(X.shape, dtype=np.float32)
        for rows, residual, _ in model.residual_batches(X, cancel):
            features[rows] = model.normalised(residual, self.config.residual_clip)
        return features

    def _ensemble_features(self, X: sp.csr_matrix, cancel: Optional[CancelToken]) -> np.ndarray:
        """The fold models' normalised residual features of these cells, averaged (cells × genes)."""
        total = self._features(self._models[0], X, cancel)
        for model in self._models[1:]:
            total += self._features(model, X, cancel)
        return total / len(self._models)

    @torch.no_grad()
    def encode(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Module-I latent vectors of cells on the model's genes (first fold model)."""
        self._require_fitted()
        return np.vstack([z for _, _, z in self._models[0].residual_batches(_as_csr(X))])

    def reconstruction_residuals(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """``x − x̂`` of cells on the model's genes (first fold model)."""
        self._require_fitted()
        return np.vstack([residual for _, residual, _ in self._models[0].residual_batches(_as_csr(X))])

    def residual_features(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """The residuals as the predictor reads them: ``x − x̂`` per gene scale, clipped, averaged over the fold models."""
        self._require_fitted()
        return self._ensemble_features(_as_csr(X), None)

    # ------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write every fold model's weights, hyperparameters + genes (JSON) and the calibration arrays into ``folder``."""
        self._require_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({f"fold_{k}": m.generator.state_dict() for k, m in enumerate(self._models)}, folder / WEIGHTS_FILE)
        meta = {"config": self.config.to_json(), "genes": self.genes, "history": self.history}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        arrays = {
            "reference_data": self._reference.data,
            "reference_indices": self._reference.indices,
            "reference_indptr": self._reference.indptr,
            "reference_shape": np.array(self._reference.shape),
            "folds": self._folds,
        }
        for k, model in enumerate(self._models):
            arrays[f"fold_{k}_gene_scale"] = model.gene_scale
            arrays |= {f"fold_{k}_{name}": value for name, value in model.similarity.to_arrays().items()}
        np.savez_compressed(folder / CALIBRATION_FILE, **arrays)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AnomalyDetector":
        """Load a detector written by :meth:`save` (weights with ``weights_only=True``)."""
        folder = Path(folder)
        missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, CALIBRATION_FILE) if not (folder / f).is_file()]
        if missing:
            raise ModelError(f"{folder} is not a saved ACsleuth model: missing {', '.join(missing)}.")
        try:
            return cls._read_saved(folder)
        except ModelError:
            raise
        except Exception as err:  # any failure means the folder's files are not a model we saved
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise ModelError(
                f"{folder} holds a model ACsleuth cannot load ({type(err).__name__}: {first_line}): it is "
                "damaged, or was not saved by ACsleuth's --save-model or Export. Train a new model, or "
                "give the folder of another saved model."
            ) from err

    @classmethod
    @holds_global_random_state
    def _read_saved(cls, folder: Path) -> "AnomalyDetector":
        meta = json.loads((folder / CONFIG_FILE).read_text())
        detector = cls(DetectorConfig.from_json(meta["config"]))
        detector.genes = list(meta["genes"])
        detector.history = meta.get("history", {})
        states = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        with np.load(folder / CALIBRATION_FILE, allow_pickle=False) as cal:
            detector._reference = sp.csr_matrix(
                (cal["reference_data"], cal["reference_indices"], cal["reference_indptr"]),
                shape=tuple(cal["reference_shape"]),
            )
            detector._folds = cal["folds"]
            for k in range(detector.config.folds):
                generator = _new_generator(detector.config, len(detector.genes))
                generator.load_state_dict(states[f"fold_{k}"])
                generator.eval()
                prefix = f"fold_{k}_"
                similarity = ReferenceSimilarity.from_arrays(
                    {name.removeprefix(prefix): cal[name] for name in cal.files if name.startswith(prefix)}
                )
                detector._models.append(_FoldModel(generator, cal[f"fold_{k}_gene_scale"], similarity))
        return detector

    def _require_fitted(self) -> None:
        if not self._models:
            raise ModelError("The detector has not been trained yet: call fit() or load a saved model.")


@dataclass
class _Statistics:
    """What scoring reads off one model (or the fold models' mean) for a set of cells, rows in their order."""

    base_score: np.ndarray
    dissimilarity: np.ndarray
    residual_norm: np.ndarray
    latent: np.ndarray


def _statistics(model: _FoldModel, X: sp.csr_matrix, config: DetectorConfig, cancel: Optional[CancelToken]) -> _Statistics:
    """Per-cell base scores (log mean square of the normalised residuals), residual norms, latents and
    reference dissimilarity of one fold model, batch by batch."""
    mean_square = np.empty(X.shape[0], dtype=np.float64)
    norms = np.empty(X.shape[0], dtype=np.float64)
    latent = np.empty((X.shape[0], config.latent_dim), dtype=np.float32)
    for rows, residual, z in model.residual_batches(X, cancel):
        norms[rows] = np.linalg.norm(residual, axis=1)
        mean_square[rows] = _mean_square(model.normalised(residual, config.residual_clip))
        latent[rows] = z
    check_cancel(cancel)
    return _Statistics(np.log(mean_square), model.similarity.dissimilarity(X), norms, latent)


def _residual_gene_scale(model: _FoldModel, X: sp.csr_matrix, cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Each gene's residual spread (RMS) over these cells, floored at the 10th percentile across
    genes; accumulated batch by batch, so no cells × genes array is held."""
    sum_of_squares = np.zeros(X.shape[1], dtype=np.float64)
    for _, residual, _ in model.residual_batches(X, cancel):
        sum_of_squares += np.einsum("ij,ij->j", residual, residual, dtype=np.float64)
    scale = np.sqrt(sum_of_squares / X.shape[0])
    floor = max(float(np.quantile(scale, 0.1)), 1e-3)
    return np.maximum(scale, floor).astype(np.float32)


def canonical_row_order(X: sp.csr_matrix) -> np.ndarray:
    """An order of the rows defined by their contents alone (a hash of each row's stored entries), so
    training does not depend on the order the cells came in; identical rows keep their relative order."""
    X = X.tocsr()
    X.sort_indices()
    keys = np.empty(X.shape[0], dtype=np.uint64)
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        digest = hashlib.blake2b(X.indices[lo:hi].tobytes() + X.data[lo:hi].tobytes(), digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "little")
    return np.argsort(keys, kind="stable")


def fold_assignment(n_cells: int, folds: int, seed: int) -> np.ndarray:
    """Each cell's fold, 0 … ``folds − 1``, in sizes differing by at most one, drawn from ``seed``."""
    return np.random.default_rng(seed).permutation(n_cells) % folds


def _offset_progress(progress: Optional[ProgressCallback], done: int, total: int) -> Optional[ProgressCallback]:
    """Report one fold model's epochs as part of all fold models' epochs."""
    if progress is None:
        return None
    return lambda event: progress(dataclasses.replace(event, epoch=done + event.epoch, n_epochs=total))


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


def _orient_by_reference(view: ViewScores) -> ViewScores:
    """Flip the predictor's logits when its anomalous group (logit > 0) holds a smaller share of the target
    than of the reference: the group a cell type missing from the reference falls in is target-enriched."""
    if np.mean(view.target > 0) < np.mean(view.reference > 0):
        return view.map(np.negative)
    return view


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy import stats

    return stats.rankdata(x) / x.size


def _mean_square(features: np.ndarray) -> np.ndarray:
    """Each row's mean square (float64 accumulation), floored so its log is finite."""
    return np.maximum(np.einsum("ij,ij->i", features, features, dtype=np.float64) / features.shape[1], 1e-12)


def _log_positive(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(x, 1e-12))
