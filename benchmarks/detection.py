"""Anomaly detection benchmark: ACsleuth against reference-fitted baselines.

    python benchmarks/detection.py [--seeds 0 1 2] [--data demo|demo-plasma|cellbench|cellbench-dropseq|cellbench-3types]

Every (method, seed) runs in its own spawned process, so its peak RSS
(``ru_maxrss``) is its own; it includes the interpreter and imported libraries
(torch, scanpy), which every method's process loads. Time covers preparation
(normalisation, gene matching, HVGs), fitting and scoring, for every method.

ACsleuth rows: ``ACsleuth`` is the shipped score (module I's residual view
joined with the reference-similarity view, Fisher's combination of conformal
p-values); ``ACsleuth residual-only`` is ``DetectorConfig(reference_similarity=False)``,
module I + MMD predictor alone, as the paper scores cells.

Baselines use ACsleuth's own preparation (``prepare``: log-normalised, 3,000
reference HVGs) and its own label-free rule:

* the reference is split with ACsleuth's ``_split_holdout(n_ref, holdout_fraction, seed)``;
  everything (PCA, forest, neighbour index, clusters) is fitted on the fit part only;
* target and held-out reference cells are scored;
  ``cut = fit_anchored_mixture(t(target), t(held-out)).cut()`` on a monotone
  transform ``t`` of the score (identity for the isolation forest, whose scores
  are bounded; ``log`` for the kNN distance and for scmap's ``1 − r``, which
  are positive and right-skewed), and a cell is called when ``t(score) > cut``.

Baselines:

* IsolationForest (sklearn, ``random_state=seed``) in a 50-component PCA of the
  fit part; score = ``−score_samples``. The PCA input is, as in scanpy's and
  Seurat's standard workflow, each gene z-scored with the fit part's mean and
  standard deviation and clipped at ±10 (``--pca-input zscore``, default), or
  the centred log expression (``--pca-input log``); the baselines are sensitive
  to this choice, so both can be run.
* kNN distance: mean Euclidean distance to the 15 nearest fit-part cells in that PCA.
* scmap-cluster style: Leiden (scanpy, igraph flavour, resolution 1.0, 15-NN
  graph on that PCA) clusters of the fit part; centroids = mean log expression
  over the HVGs; score = ``1 − max`` Pearson correlation to a centroid.
  (scmap itself selects 500 genes with M3Drop and combines three similarities;
  this keeps its idea, not its details.) One warm-up clustering of random points
  runs before the timer, so numba's one-off compilation of scanpy's neighbour
  graph (about 5 s per process) is not counted.

Data: ``demo`` = :func:`acsleuth_core.demo.load_demo`; ``demo-plasma`` = the
same PBMCs with only the plasma cells anomalous (29 of 360 target cells, next
to normal B cells, half of which are in the reference): a rare anomaly beside
a related reference type; ``cellbench`` =
reference ``sc_celseq2`` (H1975, H2228, HCC827), targets = the three 5-line
CEL-seq2 plates, anomalies = A549 and H838; ``cellbench-dropseq`` = the same
with reference ``sc_dropseq`` (another technology than the targets);
``cellbench-3types`` = reference ``sc_celseq2`` without H2228, so A549, H838
and H2228 are anomalous (three types; added after the check on the call was
designed, as a task nothing was tuned on).

``--without-anomalies`` removes the anomalous cells from every target: each
call is then a false one, which checks that the label-free rule does not split
a target that has nothing to find (AUROC/AUPRC are undefined and left blank).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.detection
    import _common as common
except ImportError:  # pragma: no cover
    from benchmarks import _common as common

SCRIPT = "benchmarks/detection.py"
DATASETS = ("demo", "demo-plasma", "cellbench", "cellbench-dropseq", "cellbench-3types")
CELLBENCH_PATH = Path("/work/shared/data/cellbench_5sets.h5ad")
NORMAL_LINES = ("H1975", "H2228", "HCC827")
#: data -> (reference set, the lines it holds: normal; every other line in the targets is anomalous)
CELLBENCH_TASKS = {
    "cellbench": ("sc_celseq2", NORMAL_LINES),
    "cellbench-dropseq": ("sc_dropseq", NORMAL_LINES),
    "cellbench-3types": ("sc_celseq2", ("H1975", "HCC827")),
}
CELLBENCH_PLATES = ("sc_celseq2_5cl_p1", "sc_celseq2_5cl_p2", "sc_celseq2_5cl_p3")
N_PCS = 50
N_NEIGHBOURS = 15
LEIDEN_RESOLUTION = 1.0
CHUNK = 4096


# ----------------------------------------------------------------------- data
@dataclass
class Task:
    """Raw-count reference and targets, and the truth for the stacked targets (evaluation only)."""

    reference: object  # AnnData
    targets: dict  # name -> AnnData
    truth: np.ndarray

    def without_anomalies(self) -> "Task":
        """The same reference, each target without its anomalous cells: every call is a false one."""
        targets, start = {}, 0
        for name, target in self.targets.items():
            targets[name] = target[~self.truth[start : start + target.n_obs]].copy()
            start += target.n_obs
        return Task(self.reference, targets, np.zeros(int((~self.truth).sum()), dtype=bool))


def load_task(data: str) -> Task:
    """The reference, target samples and truth of benchmark ``data``."""
    if data == "demo":
        return _demo_task()
    if data == "demo-plasma":
        from acsleuth_core.demo import PLASMA_TYPE

        return _demo_task(anomalies=[PLASMA_TYPE])
    if data in CELLBENCH_TASKS:
        return _cellbench_task(*CELLBENCH_TASKS[data])
    raise ValueError(f"--data must be one of {', '.join(DATASETS)}, not {data!r}")


def _demo_task(anomalies=None) -> Task:
    from acsleuth_core.demo import TRUTH_KEY, load_demo

    demo = load_demo(anomalies=anomalies)
    truth = np.concatenate([t.obs[TRUTH_KEY].to_numpy(dtype=bool) for t in demo.targets.values()])
    return Task(demo.reference, demo.targets, truth)


def _cellbench_task(reference_set: str, normal_lines: tuple[str, ...]) -> Task:
    import anndata as ad

    cells = ad.read_h5ad(CELLBENCH_PATH)
    line = cells.obs["cell_line"].astype(str)
    dataset = cells.obs["dataset"].astype(str)
    reference = cells[(dataset == reference_set) & line.isin(normal_lines)].copy()
    targets = {plate.removeprefix("sc_"): cells[dataset == plate].copy() for plate in CELLBENCH_PLATES}
    truth = np.concatenate([~t.obs["cell_line"].isin(normal_lines).to_numpy() for t in targets.values()])
    return Task(reference, targets, truth)


# -------------------------------------------------------------------- methods
@dataclass
class MethodOutput:
    """Per-target-cell scores and calls of one method, with its wall time."""

    scores: np.ndarray
    calls: np.ndarray
    batches: np.ndarray
    seconds: float
    extra: dict


def acsleuth(task: Task, seed: int, *, reference_similarity: bool = True) -> MethodOutput:
    """``detect_anomalies`` with ``DetectorConfig(seed=seed)``; also the raw residual norm's AUROC."""
    from sklearn.metrics import roc_auc_score

    from acsleuth_core.detect import DetectorConfig

    config = DetectorConfig(seed=seed, reference_similarity=reference_similarity)
    out = common.run_acsleuth(task.reference, task.targets, config=config)
    extra = {"AUROC resid-norm": float(roc_auc_score(task.truth, out.residual_norm))}
    return MethodOutput(out.scores, out.calls, out.batches, out.seconds, extra)


PCA_INPUTS = ("zscore", "log")
ZSCORE_CLIP = 10.0


@dataclass
class Baseline:
    """A reference-fitted scorer.

    ``fit(X_fit, seed, pca_input)`` returns ``score(X) -> higher = more
    anomalous``; ``cut_scale`` is the monotone transform the label-free cut is
    fitted on; ``warm_up()`` (optional) pays one-off costs before timing.
    """

    fit: Callable
    cut_scale: Callable[[np.ndarray], np.ndarray]
    warm_up: Optional[Callable[[], None]] = None


def run_baseline(baseline: Baseline, task: Task, seed: int, pca_input: str) -> MethodOutput:
    """Prepare like ACsleuth, fit on the reference's fit part, call with the anchored-mixture cut."""
    from acsleuth_core.detect import DetectorConfig, _split_holdout
    from acsleuth_core.preprocess import prepare
    from acsleuth_core.threshold import fit_anchored_mixture

    start = time.perf_counter()
    prepared = prepare(task.reference, task.targets)
    reference = prepared.reference.X.tocsr()
    fit_rows, holdout_rows = _split_holdout(reference.shape[0], DetectorConfig().holdout_fraction, seed)
    score = baseline.fit(reference[fit_rows], seed, pca_input)
    target_scores, holdout_scores = score(prepared.target.X.tocsr()), score(reference[holdout_rows])
    target_scale = baseline.cut_scale(target_scores)
    cut = fit_anchored_mixture(target_scale, baseline.cut_scale(holdout_scores)).cut()
    calls = target_scale > cut
    seconds = time.perf_counter() - start
    return MethodOutput(target_scores, calls, np.asarray(prepared.batches, dtype=str), seconds, {})


def _dense_chunks(X) -> Iterator[np.ndarray]:
    """Dense float64 row blocks of a sparse matrix."""
    for start in range(0, X.shape[0], CHUNK):
        yield X[start : start + CHUNK].toarray().astype(np.float64)


def _fit_pca(X_fit, seed: int, pca_input: str) -> Callable[[object], np.ndarray]:
    """PCA (up to 50 components) of the fit part; returns a projector for any cells.

    ``pca_input``: "zscore" standardises each gene with the fit part's mean and
    standard deviation (constant genes get 1) and clips at ±10; "log" uses the
    log expression as is (PCA centres it).
    """
    from sklearn.decomposition import PCA

    dense = X_fit.toarray().astype(np.float64)
    if pca_input == "zscore":
        mean, sd = dense.mean(axis=0), dense.std(axis=0)
        sd[sd == 0] = 1.0
        transform = lambda block: np.clip((block - mean) / sd, -ZSCORE_CLIP, ZSCORE_CLIP)  # noqa: E731
    elif pca_input == "log":
        transform = lambda block: block  # noqa: E731
    else:
        raise ValueError(f"pca_input must be one of {', '.join(PCA_INPUTS)}, not {pca_input!r}")
    n_components = min(N_PCS, X_fit.shape[0] - 1, X_fit.shape[1])
    pca = PCA(n_components=n_components, random_state=seed).fit(transform(dense))
    return lambda X: np.vstack([pca.transform(transform(block)) for block in _dense_chunks(X)])


def fit_isolation_forest(X_fit, seed: int, pca_input: str) -> Callable:
    """Isolation forest in the fit part's PCA; score = ``−score_samples``."""
    from sklearn.ensemble import IsolationForest

    project = _fit_pca(X_fit, seed, pca_input)
    forest = IsolationForest(random_state=seed).fit(project(X_fit))
    return lambda X: -forest.score_samples(project(X))


def fit_knn_distance(X_fit, seed: int, pca_input: str) -> Callable:
    """Mean distance to the 15 nearest fit-part cells in the fit part's PCA."""
    from sklearn.neighbors import NearestNeighbors

    project = _fit_pca(X_fit, seed, pca_input)
    index = NearestNeighbors(n_neighbors=N_NEIGHBOURS).fit(project(X_fit))
    return lambda X: index.kneighbors(project(X))[0].mean(axis=1)


def fit_scmap_cluster(X_fit, seed: int, pca_input: str) -> Callable:
    """Leiden clusters of the fit part; score = 1 − max Pearson correlation to a cluster centroid."""
    labels = _leiden_labels(_fit_pca(X_fit, seed, pca_input)(X_fit), seed)
    centroids = np.vstack([np.asarray(X_fit[labels == k].mean(axis=0)).ravel() for k in np.unique(labels)])
    centroids = _row_standardise(centroids)

    def score(X) -> np.ndarray:
        best = [np.max(_row_standardise(block) @ centroids.T, axis=1) for block in _dense_chunks(X)]
        return 1.0 - np.concatenate(best)

    return score


def _leiden_labels(pcs: np.ndarray, seed: int) -> np.ndarray:
    """Leiden clusters (scanpy, igraph flavour) on the 15-NN graph of ``pcs``."""
    import anndata as ad
    import scanpy as sc

    cells = ad.AnnData(np.zeros((pcs.shape[0], 0), dtype=np.float32), obsm={"X_pca": pcs})
    sc.pp.neighbors(cells, n_neighbors=N_NEIGHBOURS, use_rep="X_pca", random_state=seed)
    sc.tl.leiden(
        cells, resolution=LEIDEN_RESOLUTION, random_state=seed, flavor="igraph", n_iterations=2, directed=False
    )
    return cells.obs["leiden"].astype(int).to_numpy()


def _warm_up_leiden() -> None:
    """Cluster random points once: compiles scanpy's numba neighbour code outside the timer."""
    _leiden_labels(np.random.default_rng(0).normal(size=(100, 10)), 0)


def _row_standardise(X: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (so a dot product is a Pearson correlation; constant rows → 0)."""
    centred = X - X.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


def _log_positive(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(x, 1e-12))


BASELINES = {
    "IsolationForest": Baseline(fit_isolation_forest, cut_scale=np.asarray),
    "kNN distance": Baseline(fit_knn_distance, cut_scale=_log_positive),
    "scmap-cluster": Baseline(fit_scmap_cluster, cut_scale=_log_positive, warm_up=_warm_up_leiden),
}
#: ACsleuth as shipped (two views) and with module I's residual view alone (the paper's score)
ACSLEUTH_VARIANTS = {"ACsleuth": True, "ACsleuth residual-only": False}
METHODS = (*ACSLEUTH_VARIANTS, *BASELINES)


def _import_libraries() -> None:
    """Import what any method uses, so import time is not counted in any method's time."""
    import scanpy  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.neighbors  # noqa: F401

    import acsleuth_core.pipeline  # noqa: F401


# ---------------------------------------------------------------- measurement
def measure(method: str, data: str, seed: int, pca_input: str, without_anomalies: bool = False) -> dict:
    """Run one method on one task and seed (meant for a fresh process); metrics and peak RSS."""
    _import_libraries()
    baseline = BASELINES.get(method)
    if baseline is not None and baseline.warm_up is not None:
        baseline.warm_up()
    task = load_task(data)
    if without_anomalies:
        task = task.without_anomalies()
    rss_start, cpu_start = common.current_rss_mib(), common.cpu_seconds()
    if baseline is None:
        out = acsleuth(task, seed, reference_similarity=ACSLEUTH_VARIANTS[method])
    else:
        out = run_baseline(baseline, task, seed, pca_input)
    cpu = common.cpu_seconds() - cpu_start
    peak = common.peak_rss_mib()
    n_cells = out.scores.size
    return {
        "method": method,
        "seed": seed,
        **common.anomaly_metrics(task.truth, out.scores, out.calls),
        "seconds": out.seconds,
        "CPU s": cpu,
        "cells/s": n_cells / out.seconds,
        "load": os.getloadavg()[0],
        "peak RSS MiB": peak,
        "peak above start MiB": peak - rss_start,
        **out.extra,
        "per_sample": common.calls_per_sample(task.truth, out.calls, out.batches),
    }


# ------------------------------------------------------------------ reporting
SUMMARY_COLUMNS = {  # column -> decimals
    "AUROC": 3,
    "AUPRC": 3,
    "F1": 3,
    "called": 1,
    "seconds": 1,
    "CPU s": 1,
    "cells/s": 0,
    "peak RSS MiB": 0,
    "peak above start MiB": 0,
    "AUROC resid-norm": 3,
}
COLUMN_TITLES = {"F1": "F1 (label-free)", "seconds": "time s", "AUROC resid-norm": "AUROC residual norm"}


def summary_rows(results: list[dict]) -> list[dict]:
    """Mean ± std over seeds per method."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        row = {"method": method, "seeds": len(runs)}
        for column, digits in SUMMARY_COLUMNS.items():
            row[COLUMN_TITLES.get(column, column)] = common.mean_std([r.get(column, np.nan) for r in runs], digits)
        rows.append(row)
    return rows


def per_sample_rows(results: list[dict]) -> list[dict]:
    """Per method and sample: cells, true anomalies, and mean ± std of calls and false positives."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        for sample, first in runs[0]["per_sample"].items():
            counts = [r["per_sample"][sample] for r in runs]
            rows.append(
                {
                    "method": method,
                    "sample": sample,
                    "cells": first["cells"],
                    "anomalies": first["anomalies"],
                    "called": common.mean_std([c["called"] for c in counts], 1),
                    "false positives": common.mean_std([c["false positives"] for c in counts], 1),
                }
            )
    return rows


def per_seed_rows(results: list[dict]) -> list[dict]:
    """Every run, unaggregated."""
    rows = []
    for r in results:
        called = ", ".join(f"{s}: {c['called']}" for s, c in r["per_sample"].items())
        rows.append(
            {
                "method": r["method"],
                "seed": r["seed"],
                "AUROC": f"{r['AUROC']:.3f}",
                "AUPRC": f"{r['AUPRC']:.3f}",
                "F1": f"{r['F1']:.3f}",
                "called (per sample)": f"{r['called']} ({called})",
                "time s": f"{r['seconds']:.1f}",
                "CPU s": f"{r['CPU s']:.1f}",
                "load (1 min)": f"{r['load']:.1f}",
                "peak RSS MiB": f"{r['peak RSS MiB']:.0f}",
            }
        )
    return rows


def warnings(results: list[dict]) -> list[str]:
    """Calls that look wrong whatever the scores: a whole sample called, or nothing called at all."""
    notes = []
    for r in results:
        for sample, c in r["per_sample"].items():
            normals = c["cells"] - c["anomalies"]
            if c["called"] >= 0.9 * c["cells"]:
                notes.append(f"{r['method']} seed {r['seed']}: {c['called']}/{c['cells']} cells of {sample} called")
            elif normals and c["false positives"] > 0.5 * normals:
                notes.append(
                    f"{r['method']} seed {r['seed']}: {c['false positives']}/{normals} normal cells of "
                    f"{sample} called"
                )
            elif c["anomalies"] and c["called"] == 0:
                notes.append(f"{r['method']} seed {r['seed']}: nothing called in {sample}")
    return notes


def render(command: str, title: str, results: list[dict], code: str) -> str:
    """The full markdown report."""
    notes = warnings(results) or ["none"]
    return "\n\n".join(
        [
            f"# Anomaly detection benchmark: {title}",
            f"Reproduce: `{command}`",
            f"Code: {code}",
            "Mean ± std over seeds. AUROC/AUPRC are threshold-free; F1 and `called` use each method's "
            "label-free call (`threshold.label_free_threshold`, checked on held-out reference cells). Time includes preparation "
            "(not imports); cells/s = target cells / time; CPU s = user + system CPU of the run (all threads); "
            "`load` is the machine's 1-minute load average when the run ended (2 cores: above ~2 other "
            "work competed and wall times are inflated). Peak RSS is the whole child process "
            "(interpreter and libraries included); `peak above start` subtracts its RSS after imports "
            "and loading the data.",
            common.markdown_table(summary_rows(results)),
            "## Calls per sample",
            common.markdown_table(per_sample_rows(results)),
            "## Every run",
            common.markdown_table(per_seed_rows(results)),
            "## Flags (whole sample called, most normals called, or nothing called)",
            "\n".join(f"- {n}" for n in notes),
        ]
    ) + "\n"


# ----------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", choices=DATASETS, default="demo")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--pca-input", choices=PCA_INPUTS, default="zscore", help="what the baselines' PCA is fitted on"
    )
    parser.add_argument(
        "--without-anomalies", action="store_true",
        help="drop the anomalous cells from the targets: a check that the label-free call then calls (almost) nothing",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    options = {"seeds": args.seeds, "data": args.data}
    if list(args.methods) != list(METHODS):
        options["methods"] = args.methods
    name = args.data
    if args.pca_input != "zscore":
        options["pca-input"] = args.pca_input
        name = f"{args.data}_pca-{args.pca_input}"
    if args.without_anomalies:
        options["without-anomalies"] = True
        name += "_without-anomalies"
    command = common.reproduce_command(SCRIPT, options)
    print(command, flush=True)
    digests = common.package_digests()
    code = common.code_state(digests)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            common.log(f"[{name}] {method}, seed {seed} …")
            results.append(
                common.run_in_fresh_process(measure, method, args.data, seed, args.pca_input, args.without_anomalies)
            )
    changed = common.changed_since(digests)
    if changed:
        code += f" (CHANGED during the run, results may mix versions: {', '.join(changed)})"
    report = render(command, f"{name} (baseline PCA input: {args.pca_input})", results, code)
    print(report)
    common.write_json(f"detection_{name}.json", {"command": command, "code": code, "results": results})
    common.log(f"written to {common.write_result(f'detection_{name}.md', report)}")


if __name__ == "__main__":
    main()
