"""Batch-correction benchmark: ACsleuth (kin pairs + kin shift) against ComBat and Harmony; kin-pair scaling.

    python benchmarks/correction.py [--seeds 0 1 2] [--settings demo hard cellbench cellbench-dropseq synthetic-20k]
    python benchmarks/correction.py --kin-scale 20000 [--seeds 0]

Every (method, setting, seed) runs in its own spawned process, so its peak RSS
(``ru_maxrss``) is its own; it includes the interpreter and the imported
libraries (torch, scanpy). Time covers preparation (normalisation, gene
matching) and the correction itself; for ACsleuth it is the whole pipeline,
detection (module I, scoring, label-free call) plus correction (module II and
the corrected expression), and both parts are also reported separately.

Settings (raw counts in, truth used only for evaluation):

* ``demo``: :func:`acsleuth_core.demo.load_demo` (reference + ``sample_A`` +
  ``sample_B``, which carries gene factors ``exp(N(0, 0.5²))``; B cells anomalous).
* ``hard``: built from the demo's real PBMC counts. Same reference and same
  target cells, but each target sample's *original* counts (recovered from
  scanpy's ``pbmc68k_reduced`` by cell name, i.e. without the demo's shift) get
  their own effect: every gene's expected count is multiplied by a
  sample-specific factor ``exp(N(0, 0.8²))`` and by a library-size factor
  (``sample_A`` 0.5, ``sample_B`` 1.6), and counts are redrawn from a Poisson
  with that mean. Composition differs between batches: ``sample_A`` keeps only
  15 % of its Dendritic cells and ``sample_B`` only 15 % of its CD14+
  Monocytes (the reference keeps both). Fixed construction seed
  (``HARD_SEED``), so the data do not change with ``--seeds``.
* ``cellbench`` / ``cellbench-dropseq``: CellBench, reference = CEL-seq2 or
  Drop-seq cells of three lines, targets = three CEL-seq2 5-line plates (real
  plate and technology effects); labels = ``cell_line``; A549 and H838 are the
  anomalies.
* ``synthetic-20k``: ``memory.synthetic_data`` counts, 4,000 reference cells of
  four types, 20,000 target cells (10 % of a fifth type) split into two
  samples, one with gene factors ``exp(N(0, 0.5²))``; fixed construction seed.

Methods, all given the same cells (reference + every target cell, anomalies
included, since no method may know which cells are anomalous), evaluated on the
same cells: the reference plus the target cells that are truly normal.

* ``uncorrected``: ACsleuth's preparation (``prepare``: counts →
  ``normalize_total(1e4)`` + ``log1p``, reference HVGs = the model genes).
* ``ComBat``: ``scanpy.pp.combat`` on that log expression (dense),
  batch = reference / each sample; negative values floored at zero.
* ``Harmony``: ``harmonypy.run_harmony`` (``random_state=seed``) on 50
  principal components of that log expression of all cells; evaluated on its
  corrected PCs (before: the same PCs uncorrected).
* ``ACsleuth``: ``detect_anomalies(…, DetectorConfig(seed))`` then
  ``correct_detection_run(run, CorrectionConfig.seeded(seed), label_key=…)``;
  two rows of the one run: ``ACsleuth layer`` (the corrected expression layer
  beside the reference's measured expression) and ``ACsleuth latent`` (module-I
  latent before, corrected latent after).

Metrics are the core's (``acsleuth_core.correction_quality``, k = 15): kNN
batch entropy and normalised iLISI (batches = reference + each sample; 1 =
fully mixed), kNN label purity, label ASW (0–1) and reference transfer.
Expression rows are measured on 50 principal axes of the evaluated cells' log
expression (fitted again on the corrected expression after), reference
transfer on the reference cells' own axes; ``mixing + purity`` = batch entropy
after + label purity after.

``--kin-scale N`` instead builds a synthetic latent set in a child process:
``N`` reference cells in 256 dimensions (50 Gaussian clusters, centres
``N(0, 3²)``, cells ``N(centre, 1)``) and ``N`` target cells, each a copy of a
distinct reference cell (its exact partner) plus ``N(0, 0.3²)`` noise, split
into two batches shifted by per-batch offsets ``N(0, 1)`` per dimension (norm
≈ 16, near the reference's nearest-neighbour distance, so the offset has to be
removed). It times ``find_kin_pairs`` (``KinConfig(seed=seed)``), and reports
peak RSS (target < 4 GiB), exact-partner recovery, and the offset error.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import numpy as np

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.correction
    import _common as common
    import tasks
except ImportError:  # pragma: no cover
    from benchmarks import _common as common
    from benchmarks import tasks

SCRIPT = "benchmarks/correction.py"
SETTINGS = ("demo", "hard", "cellbench", "cellbench-dropseq", "synthetic-20k")
LABEL_KEYS = {"cellbench": "cell_line", "cellbench-dropseq": "cell_line"}  # others: cell_type
METHODS = ("uncorrected", "ComBat", "Harmony", "ACsleuth")
REFERENCE_BATCH = "reference"  # as in acsleuth_core.correction
N_PCS = 50
K = 15

HARD_SEED = 20261124
HARD_GENE_SIGMA = 0.8
HARD_LIBRARY_FACTOR = {"sample_A": 0.5, "sample_B": 1.6}
HARD_KEEP_FRACTION = {"sample_A": ("Dendritic", 0.15), "sample_B": ("CD14+ Monocyte", 0.15)}

SYNTHETIC_REFERENCE = 4000
SYNTHETIC_TARGET = 20000
SYNTHETIC_GENES = 2000

KIN_DIM = 256
KIN_CLUSTERS = 50
KIN_CENTRE_SD = 3.0
KIN_NOISE_SD = 0.3
KIN_OFFSET_SD = 1.0
KIN_BATCHES = ("batch_1", "batch_2")
KIN_RSS_LIMIT_MIB = 4096.0


# ----------------------------------------------------------------------- data
@dataclass
class Setting:
    """Raw-count reference and targets; truth (stacked targets) and labels for evaluation only."""

    reference: object  # AnnData
    targets: dict  # name -> AnnData
    truth: np.ndarray
    label_key: str


def load_setting(name: str) -> Setting:
    if name == "demo":
        task = tasks.load_task("demo")
    elif name == "hard":
        task = _hard_task()
    elif name in ("cellbench", "cellbench-dropseq"):
        task = tasks.load_task(name)
    elif name == "synthetic-20k":
        task = _synthetic_task()
    else:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, not {name!r}")
    return Setting(task.reference, task.targets, task.truth, LABEL_KEYS.get(name, "cell_type"))


def _synthetic_task() -> "tasks.Task":
    """Synthetic counts (``memory.synthetic_data``): a reference of five types, 20,000 target cells in two
    samples, one with a gene-wise effect (``tasks.split_and_shift``); fixed construction seed."""
    try:
        import memory
    except ImportError:  # pragma: no cover
        from benchmarks import memory

    data = memory.synthetic_data(SYNTHETIC_REFERENCE, SYNTHETIC_TARGET, SYNTHETIC_GENES, HARD_SEED, expression_scale=0.3)
    return tasks.split_and_shift(data.reference, data.target, data.truth, "half", HARD_SEED)


def _hard_task() -> "tasks.Task":
    """The demo's cells with stronger per-sample gene and depth effects and unequal composition (see docstring)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    from acsleuth_core.demo import LABEL_KEY, TRUTH_KEY, _recover_counts, load_demo

    demo = load_demo()
    source = sc.datasets.pbmc68k_reduced()
    original = ad.AnnData(_recover_counts(source), obs=source.obs[[]].copy())
    original.obs_names = source.obs_names.astype(str)
    rng = np.random.default_rng(HARD_SEED)
    targets = {}
    for name, sample in demo.targets.items():
        cell_type, keep_fraction = HARD_KEEP_FRACTION[name]
        types = sample.obs[LABEL_KEY].astype(str).to_numpy()
        keep = rng.random(types.size) < keep_fraction
        keep |= types != cell_type
        sample = sample[keep]
        counts = original[sample.obs_names].X.toarray()
        gene_factor = np.exp(rng.normal(0.0, HARD_GENE_SIGMA, counts.shape[1]))
        mean = counts * gene_factor * HARD_LIBRARY_FACTOR[name]
        X = sp.csr_matrix(rng.poisson(mean).astype(np.float32))
        targets[name] = ad.AnnData(X=X, obs=sample.obs.copy(), var=sample.var.copy())
    truth = np.concatenate([t.obs[TRUTH_KEY].to_numpy(dtype=bool) for t in targets.values()])
    return tasks.Task(demo.reference, targets, truth)


def describe(setting: Setting) -> str:
    """Cells per batch and label (markdown), to show the composition a setting has."""
    import pandas as pd

    frames = {REFERENCE_BATCH: setting.reference.obs[setting.label_key].astype(str)}
    frames.update({name: t.obs[setting.label_key].astype(str) for name, t in setting.targets.items()})
    table = pd.DataFrame({name: labels.value_counts() for name, labels in frames.items()}).fillna(0).astype(int)
    rows = [{"label": label, **{c: int(v) for c, v in row.items()}} for label, row in table.iterrows()]
    return common.markdown_table(rows)


# ----------------------------------------------------------------- evaluation
@dataclass
class Cells:
    """Log expression (model genes) of reference then stacked target cells, with batches and labels."""

    reference_X: object  # csr
    target_X: object  # csr
    target_batches: np.ndarray
    reference_labels: np.ndarray
    target_labels: np.ndarray

    @classmethod
    def from_prepared(cls, prepared, setting: Setting) -> "Cells":
        import scipy.sparse as sp

        labels = [t.obs[setting.label_key].astype(str).to_numpy() for t in setting.targets.values()]
        return cls(
            reference_X=sp.csr_matrix(prepared.reference.X),
            target_X=sp.csr_matrix(prepared.target.X),
            target_batches=np.asarray(prepared.batches, dtype=str),
            reference_labels=setting.reference.obs[setting.label_key].astype(str).to_numpy(),
            target_labels=np.concatenate(labels),
        )

    @property
    def all_batches(self) -> np.ndarray:
        return np.concatenate([np.full(self.reference_X.shape[0], REFERENCE_BATCH), self.target_batches])

    def labels(self, target_rows: np.ndarray):
        from acsleuth_core.correction_quality import Labels

        return Labels(self.reference_labels, self.target_labels[target_rows])


def embedding_metrics(reference: np.ndarray, targets: np.ndarray, target_rows: np.ndarray, cells: Cells) -> dict:
    """The core's metrics of an embedding of reference + chosen target rows (transfer in that embedding)."""
    from acsleuth_core.correction_quality import embedding_quality

    return embedding_quality(reference, targets, cells.target_batches[target_rows], cells.labels(target_rows), K)


def expression_metrics(reference_X, target_X, target_rows: np.ndarray, cells: Cells) -> dict[str, float]:
    """The core's expression-space metrics (acsleuth_core.correction_quality) on reference + chosen target rows."""
    from acsleuth_core.correction_quality import expression_quality

    rows = target_X[target_rows]
    return expression_quality(reference_X, rows, cells.target_batches[target_rows], cells.labels(target_rows), K)


METRIC_COLUMNS = {
    "batch_entropy": "entropy",
    "ilisi": "iLISI",
    "label_purity": "purity",
    "label_asw": "ASW",
    "reference_transfer": "transfer",
}


def row(method: str, setting: str, seed: int, n_cells: int, before: dict, after: dict, run: dict) -> dict:
    """One result row: before/after metrics and the run's measurements."""
    metrics = {}
    for name, column in METRIC_COLUMNS.items():
        metrics[f"{column} before"] = before.get(name, float("nan"))
        metrics[f"{column} after"] = after.get(name, float("nan"))
    return {
        "method": method, "setting": setting, "seed": seed, "cells": n_cells, **metrics,
        "mixing + purity": after["batch_entropy"] + after["label_purity"], **run,
    }


# -------------------------------------------------------------------- methods
def _import_libraries() -> None:
    """Import what any method uses, so import time is not counted in any method's time."""
    import anndata  # noqa: F401
    import harmonypy  # noqa: F401
    import scanpy  # noqa: F401
    import sklearn.decomposition  # noqa: F401

    import acsleuth_core.pipeline  # noqa: F401


def measure(method: str, setting_name: str, seed: int) -> list[dict]:
    """Run one method on one setting and seed (meant for a fresh process); result rows."""
    if method == "Harmony":
        try:
            import harmonypy  # noqa: F401
        except ImportError:
            return [{"method": method, "setting": setting_name, "seed": seed, "error": "harmonypy not installed"}]
    _import_libraries()
    setting = load_setting(setting_name)
    normal_rows = np.nonzero(~setting.truth)[0]
    n_eval = setting.reference.n_obs + normal_rows.size
    if method == "ACsleuth":
        return _measure_acsleuth(setting, setting_name, seed, normal_rows, n_eval)

    from acsleuth_core.preprocess import prepare

    with common.Measured() as measured:
        prepared = prepare(setting.reference, setting.targets)
        cells = Cells.from_prepared(prepared, setting)
        corrected = CORRECTIONS[method](cells, seed)
    before = expression_metrics(cells.reference_X, cells.target_X, normal_rows, cells)
    n_ref = cells.reference_X.shape[0]
    if corrected is None:  # uncorrected
        after = before
    elif isinstance(corrected, tuple):  # Harmony: uncorrected and corrected PCs of all cells
        pcs, corrected_pcs = corrected
        before = embedding_metrics(pcs[:n_ref], pcs[n_ref:][normal_rows], normal_rows, cells)
        after = embedding_metrics(corrected_pcs[:n_ref], corrected_pcs[n_ref:][normal_rows], normal_rows, cells)
    else:  # corrected expression of all cells, reference first
        after = expression_metrics(corrected[:n_ref], corrected[n_ref:], normal_rows, cells)
    return [row(method, setting_name, seed, n_eval, before, after, measured.as_dict())]


def correct_nothing(cells: Cells, seed: int) -> None:
    return None


def correct_combat(cells: Cells, seed: int) -> np.ndarray:
    """``scanpy.pp.combat`` on the dense log expression of all cells, batch = reference / sample."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    X = sp.vstack([cells.reference_X, cells.target_X]).toarray().astype(np.float64)
    adata = ad.AnnData(X, obs=pd.DataFrame({"batch": pd.Categorical(cells.all_batches)}))
    sc.pp.combat(adata, key="batch")
    return sp.csr_matrix(np.clip(adata.X, 0.0, None).astype(np.float32))


def correct_harmony(cells: Cells, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Harmony on 50 PCs of the log expression of all cells; the PCs and its corrected PCs (all cells)."""
    import harmonypy
    import pandas as pd
    import scipy.sparse as sp

    from acsleuth_core.metrics import PrincipalAxes

    X = sp.vstack([cells.reference_X, cells.target_X], format="csr")
    pcs = PrincipalAxes(X, n_components=N_PCS, seed=seed).transform(X)
    meta = pd.DataFrame({"batch": cells.all_batches})
    result = harmonypy.run_harmony(pcs, meta, "batch", random_state=seed, verbose=False)
    corrected = np.asarray(result.Z_corr)
    return pcs, (corrected.T if corrected.shape[0] != pcs.shape[0] else corrected)


CORRECTIONS = {"uncorrected": correct_nothing, "ComBat": correct_combat, "Harmony": correct_harmony}
LAYER_ROW = "ACsleuth layer"
LATENT_ROW = "ACsleuth latent"


def _measure_acsleuth(setting: Setting, setting_name: str, seed: int, normal_rows: np.ndarray, n_eval: int) -> list[dict]:
    """Detect then correct; the corrected layer and the corrected latent, evaluated like the other methods."""
    import time

    from acsleuth_core import keys
    from acsleuth_core.correction import CorrectionConfig
    from acsleuth_core.detect import DetectorConfig
    from acsleuth_core.pipeline import correct_detection_run, detect_anomalies

    with common.Measured() as measured:
        start = time.perf_counter()
        run = detect_anomalies(setting.reference, setting.targets, config=DetectorConfig(seed=seed))
        detect_seconds = time.perf_counter() - start
        result = correct_detection_run(run, CorrectionConfig.seeded(seed), label_key=setting.label_key)
        correct_seconds = time.perf_counter() - start - detect_seconds
    cells = Cells.from_prepared(run.prepared, setting)
    called = run.adata.obs[keys.ANOMALY].to_numpy(dtype=bool)
    run_info = measured.as_dict() | {
        "detect s": detect_seconds,
        "correct s": correct_seconds,
        "called": int(called.sum()),
        "true anomalies": int(setting.truth.sum()),
        "false positives": int((called & ~setting.truth).sum()),
        "missed": int((~called & setting.truth).sum()),
    }
    before = expression_metrics(cells.reference_X, cells.target_X, normal_rows, cells)
    layer = expression_metrics(cells.reference_X, result.corrected_expression, normal_rows, cells)
    latent = np.asarray(run.adata.obsm[keys.LATENT])
    return [
        row(LAYER_ROW, setting_name, seed, n_eval, before, layer, run_info),
        row(
            LATENT_ROW, setting_name, seed, n_eval,
            embedding_metrics(result.reference_latent, latent[normal_rows], normal_rows, cells),
            embedding_metrics(result.reference_corrected_latent, result.corrected_latent[normal_rows], normal_rows, cells),
            run_info,
        ),
    ]


# ------------------------------------------------------------------ kin scale
def measure_kin(n_cells: int, seed: int) -> dict:
    """``find_kin_pairs`` on a synthetic ``n_cells`` × ``n_cells`` latent set (meant for a fresh process)."""
    from acsleuth_core.kin import KinConfig, find_kin_pairs

    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, KIN_CENTRE_SD, (KIN_CLUSTERS, KIN_DIM)).astype(np.float32)
    clusters = rng.integers(0, KIN_CLUSTERS, n_cells)
    reference = centres[clusters] + rng.normal(0.0, 1.0, (n_cells, KIN_DIM)).astype(np.float32)
    partner = rng.permutation(n_cells)
    batches = np.asarray(KIN_BATCHES)[rng.integers(0, len(KIN_BATCHES), n_cells)]
    true_offsets = {b: rng.normal(0.0, KIN_OFFSET_SD, KIN_DIM).astype(np.float32) for b in KIN_BATCHES}
    target = reference[partner] + rng.normal(0.0, KIN_NOISE_SD, (n_cells, KIN_DIM)).astype(np.float32)
    target += np.stack([true_offsets[b] for b in batches])
    rss_start = common.current_rss_mib()
    with common.Measured() as measured:
        pairs = find_kin_pairs(target, reference, batches, KinConfig(seed=seed))
    offset_error = max(
        float(np.linalg.norm(pairs.offsets[b] - true_offsets[b]) / np.linalg.norm(true_offsets[b])) for b in KIN_BATCHES
    )
    return {
        "seed": seed,
        "targets": n_cells,
        "reference": n_cells,
        "dim": KIN_DIM,
        **measured.as_dict(),
        "peak above start MiB": measured.peak_rss_mib - rss_start,
        "exact partner": float(np.mean(pairs.kin == partner)),
        "partner among candidates": float(np.mean(np.asarray(pairs.mapping[np.arange(n_cells), partner]).ravel() > 0)),
        "mean confidence": float(pairs.confidence.mean()),
        "offset error": offset_error,
        "mapping nnz": int(pairs.mapping.nnz),
    }


def render_kin(command: str, results: list[dict], code: str) -> str:
    rows = [
        {
            "seed": r["seed"],
            "targets × reference": f"{r['targets']:,} × {r['reference']:,} ({r['dim']}-dim)",
            "time s": f"{r['seconds']:.1f}",
            "CPU s": f"{r['CPU s']:.1f}",
            "load (1 min)": f"{r['load']:.1f}",
            "peak RSS MiB": f"{r['peak RSS MiB']:.0f}",
            "above start MiB": f"{r['peak above start MiB']:.0f}",
            "< 4 GiB": "yes" if r["peak RSS MiB"] < KIN_RSS_LIMIT_MIB else "NO",
            "exact partner": f"{r['exact partner']:.4f}",
            "partner in candidates": f"{r['partner among candidates']:.4f}",
            "mean confidence": f"{r['mean confidence']:.3f}",
            "offset rel. error": f"{r['offset error']:.3f}",
        }
        for r in results
    ]
    return "\n\n".join(
        [
            "# Kin-pair (module II) scaling",
            f"Reproduce: `{command}`",
            f"Code: {code}",
            "Synthetic latents (see the script docstring): every target is a noisy, batch-shifted copy of one "
            "distinct reference cell, so its exact partner is known. Time and CPU s cover `find_kin_pairs` only "
            "(offset estimation, candidate search, adversarial training of the sparse mapping). Peak RSS is the "
            "whole child process (interpreter, torch and the synthetic data included); `above start` subtracts "
            "its RSS once the data were built. `load` is the 1-minute load average at the end (2 cores).",
            common.markdown_table(rows),
        ]
    ) + "\n"


# ------------------------------------------------------------------ reporting
SUMMARY_COLUMNS = {
    **{f"{c} {stage}": 3 for c in METRIC_COLUMNS.values() for stage in ("before", "after")},
    "mixing + purity": 3,
    "seconds": 1,
    "CPU s": 1,
    "load": 1,
    "peak RSS MiB": 0,
}
COLUMN_TITLES = {"seconds": "time s"}
MIXING_GAIN = 0.15
MIXING_ENOUGH = 0.85
BIOLOGY_TOLERANCE = 0.02


def _titled(rows: list[dict]) -> list[dict]:
    return [{COLUMN_TITLES.get(k, k): v for k, v in r.items()} for r in rows]


def per_seed_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"method": r["method"], "setting": r["setting"], "seed": r["seed"], "cells": r["error"]})
            continue
        out = {"method": r["method"], "setting": r["setting"], "seed": r["seed"], "cells": r["cells"]}
        for column, digits in SUMMARY_COLUMNS.items():
            out[column] = f"{r[column]:.{digits}f}"
        rows.append(out)
    return _titled(rows)


def acceptance_rows(results: list[dict]) -> list[dict]:
    """Per ACsleuth run: the issue's checks (mixing gain, purity and reference transfer kept, Harmony's sum)."""
    uncorrected = {(r["setting"], r["seed"]): r for r in results if r["method"] == "uncorrected"}
    harmony = {(r["setting"], r["seed"]): r["mixing + purity"] for r in results if r["method"] == "Harmony"}
    rows = []
    for r in results:
        if r["method"] != LAYER_ROW:
            continue
        latent = next(x for x in results if x["method"] == LATENT_ROW and x["setting"] == r["setting"] and x["seed"] == r["seed"])
        mixing_ok = r["entropy after"] >= min(r["entropy before"] + MIXING_GAIN, MIXING_ENOUGH)
        purity_ok = r["purity after"] >= r["purity before"] - BIOLOGY_TOLERANCE
        transfer_ok = r["transfer after"] >= r["transfer before"] - BIOLOGY_TOLERANCE
        versus = harmony.get((r["setting"], r["seed"]))
        rows.append(
            {
                "setting": r["setting"],
                "seed": r["seed"],
                "detect s": f"{r['detect s']:.1f}",
                "correct s": f"{r['correct s']:.1f}",
                "peak RSS MiB": f"{r['peak RSS MiB']:.0f}",
                "called (true anomalies)": f"{r['called']} ({r['true anomalies']})",
                "mixing": f"{r['entropy before']:.3f} → {r['entropy after']:.3f} {'ok' if mixing_ok else 'FAIL'}",
                "purity": f"{r['purity before']:.3f} → {r['purity after']:.3f} {'ok' if purity_ok else 'FAIL'}",
                "transfer": f"{r['transfer before']:.3f} → {r['transfer after']:.3f} {'ok' if transfer_ok else 'FAIL'}",
                "latent mixing / purity": f"{latent['entropy before']:.3f} → {latent['entropy after']:.3f} / "
                f"{latent['purity before']:.3f} → {latent['purity after']:.3f}",
                "sum vs Harmony": "—" if versus is None else f"{r['mixing + purity']:.3f} vs {versus:.3f} "
                f"{'ok' if r['mixing + purity'] >= versus else 'behind'}",
                "uncorrected sum": "—" if (r["setting"], r["seed"]) not in uncorrected
                else f"{uncorrected[(r['setting'], r['seed'])]['mixing + purity']:.3f}",
            }
        )
    return rows


def render(command: str, results: list[dict], code: str, compositions: dict[str, str], notes: list[str]) -> str:
    ok = [r for r in results if "error" not in r]
    summary = common.summarise(ok, ("method", "setting"), SUMMARY_COLUMNS)
    parts = [
        "# Batch-correction benchmark",
        f"Reproduce: `{command}`",
        f"Code: {code}",
        "Mean ± std over seeds (population std). Every method gets all cells (anomalies included) and is "
        "evaluated on the same cells: the reference + the target cells that are truly normal (truth used for "
        "evaluation only), k = 15. Expression rows (uncorrected, ComBat, ACsleuth layer): the core's expression "
        "space, 50 principal axes of the log expression of the evaluated cells, fitted again after correction; "
        "reference transfer = share of target cells whose 15 nearest reference cells (on the reference's own "
        "axes) vote for their label. Harmony: the 50 PCs of all cells before, its corrected PCs after, transfer "
        "in the same PCs. ACsleuth latent: module-I latent before, corrected latent after. Batch entropy and "
        "iLISI are normalised (1 = fully mixed); ASW = label silhouette rescaled to 0–1; `mixing + purity` = "
        "batch entropy after + label purity after. Time: preparation + correction (not imports); for ACsleuth "
        "detection + correction. CPU s = user + system CPU; `load` = 1-minute load average at the end (2 cores). "
        "Peak RSS: the whole child process.",
        common.markdown_table(_titled(summary)),
        "## Acceptance (issue 18), per ACsleuth run",
        f"mixing: batch entropy after ≥ before + {MIXING_GAIN} (or ≥ {MIXING_ENOUGH}); purity and transfer: "
        f"after ≥ before − {BIOLOGY_TOLERANCE}; sum = mixing + purity of the layer against Harmony's (same cells).",
        common.markdown_table(acceptance_rows(ok)),
        "## Every run",
        common.markdown_table(per_seed_rows(results)),
    ]
    for name, table in compositions.items():
        parts += [f"## Cells per batch: {name}", table]
    parts += ["## Notes", "\n".join(f"- {n}" for n in notes or ["none"])]
    return "\n\n".join(parts) + "\n"


def _composition(setting_name: str) -> str:
    return describe(load_setting(setting_name))



# ----------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=["demo", "hard"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--from-json", metavar="PATH", help="re-render the report of a saved run (its .json) without running anything"
    )
    parser.add_argument(
        "--kin-scale", type=int, default=None, metavar="N", help="run only the kin-pair scaling test on N × N cells"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        print(rerender(args.from_json))
        return
    digests = common.package_digests()
    code = common.code_state(digests)
    if args.kin_scale:
        options = {"kin-scale": args.kin_scale, "seeds": args.seeds}
        command = common.reproduce_command(SCRIPT, options)
        print(command, flush=True)
        results = []
        for seed in args.seeds:
            common.log(f"[kin {args.kin_scale}] seed {seed} …")
            results.append(common.run_in_fresh_process(measure_kin, args.kin_scale, seed))
        name = f"correction_kin-{args.kin_scale}"
        code = _code_after(code, digests)
        report = render_kin(command, results, code)
    else:
        options = {"seeds": args.seeds, "settings": args.settings}
        if list(args.methods) != list(METHODS):
            options["methods"] = args.methods
        command = common.reproduce_command(SCRIPT, options)
        print(command, flush=True)
        results, notes = [], []
        name = "correction_" + "_".join(args.settings)
        for setting in args.settings:
            for seed in args.seeds:
                for method in args.methods:
                    common.log(f"[{setting}] {method}, seed {seed} …")
                    rows = common.run_in_fresh_process(measure, method, setting, seed)
                    results.extend(rows)
                    notes.extend(f"{r['method']} ({r['setting']}): {r['error']}" for r in rows if "error" in r)
                    # runs done so far, in case the benchmark is stopped before the end
                    common.write_json(f"{name}.partial.json", {"command": command, "code": code, "results": results})
        compositions = {s: common.run_in_fresh_process(_composition, s) for s in args.settings}
        code = _code_after(code, digests)
        report = render(command, results, code, compositions, sorted(set(notes)))
    print(report)
    common.write_json(f"{name}.json", {"command": command, "code": code, "results": results})
    common.log(f"written to {common.write_result(f'{name}.md', report)}")


def rerender(path: str) -> str:
    """Render a saved run's report again (e.g. after a change to the report) and rewrite its .md beside it."""
    import json
    from pathlib import Path

    saved = json.loads(Path(path).read_text())
    results = saved["results"]
    if results and "exact partner" in results[0]:
        report = render_kin(saved["command"], results, saved["code"])
    else:
        settings = list(dict.fromkeys(r["setting"] for r in results))
        compositions = {s: common.run_in_fresh_process(_composition, s) for s in settings}
        notes = sorted({f"{r['method']} ({r['setting']}): {r['error']}" for r in results if "error" in r})
        report = render(saved["command"], results, saved["code"], compositions, notes)
    Path(path).with_suffix(".md").write_text(report)
    return report


def _code_after(code: str, digests) -> str:
    changed = common.changed_since(digests)
    if changed:
        code += f" (CHANGED during the run, results may mix versions: {', '.join(changed)})"
    return code


if __name__ == "__main__":
    main()
