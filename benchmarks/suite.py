"""The detection task suite: every method on many tasks at once, judged on the mean and the worst case.

    python benchmarks/suite.py [--quick] [--seeds 0] [--tasks NAME ...] [--stability]

Tasks are built from what the repository has (raw counts throughout):

* ``pbmc``: the demo's source, scanpy's ``pbmc68k_reduced`` (700 PBMCs, 765 genes,
  counts recovered exactly). Half of each normal type forms the reference, the
  rest plus the anomalous cells the target, in two samples. Every type with
  ≥ 20 cells is made anomalous in turn, and several pairs; a synthetic gene-wise
  shift (each gene's mean times ``exp(N(0, 0.5²))``, counts redrawn) on one
  sample (``half``) or on both (``all``, a technology shift); rare anomalies
  (3 % of the target); no anomaly at all.
* ``cellbench``: five lung-cancer lines across technologies
  (``/work/shared/data``). Each line in turn anomalous with a reference of the
  same technology (CEL-seq2 plates 1–2 without that line; target plate 3), and
  H1975, H2228, HCC827 in turn with a Drop-seq or another CEL-seq2 experiment as
  reference (targets: the three plates' cells of those three lines); the classic
  task (A549 and H838 unseen) with a shift on all targets; rare anomalies; no anomaly.
* ``synthetic``: 6,000 target cells in two samples (one shifted) against 1,500
  reference cells, 2,000 genes (``benchmarks/memory.py``'s generator).

Methods, each giving a score to target cells and (out of fold) to every
reference cell, and all called by the same label-free rule
(``threshold.label_free_threshold``: conformal p-values, Benjamini–Hochberg at 10 %):

* ``ACsleuth``: the shipped default; ``paper (predictor)``, ``residual view``,
  ``similarity view``: the views it joins, read off the same trained models;
* baselines, fitted on the reference with the same two folds as ACsleuth (each
  reference cell scored by the fit that did not see it, target cells by the mean
  of both): ``scmap-cluster`` (correlation to Leiden-cluster centroids), ``kNN
  distance`` (mean distance to 15 nearest reference cells in a 50-PC PCA of
  z-scored genes), ``kNN per-batch`` (the same after z-scoring every gene within
  each sample and within the reference), ``PCA error`` (squared reconstruction
  error in that PCA), ``IsolationForest`` (in that PCA).

``--stability`` also re-runs the default with one torch thread and with the
reference's rows shuffled (same seed) and reports the share of cells whose call agrees.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.suite
    import _common as common
    import baselines
    import tasks
except ImportError:  # pragma: no cover
    from benchmarks import _common as common
    from benchmarks import baselines, tasks

SCRIPT = "benchmarks/suite.py"
RARE_SHARE = 0.03
MIN_TYPE_CELLS = 20
PBMC_PAIRS = (("CD19+ B", "CD56+ NK"), ("CD14+ Monocyte", "CD56+ NK"), ("CD4+/CD25 T Reg", "CD8+ Cytotoxic T"), ("CD19+ B", "CD14+ Monocyte"))
PBMC_SHIFT_ALL = ("CD19+ B", "CD56+ NK", "CD14+ Monocyte", "Dendritic")
PBMC_RARE = ("CD19+ B", "CD56+ NK", "CD14+ Monocyte", "Dendritic")
PBMC_NO_SHIFT = ("CD19+ B", "CD56+ NK", "CD14+ Monocyte")
CELL_LINES = ("A549", "H838", "H1975", "H2228", "HCC827")
THREE_LINES = ("H1975", "H2228", "HCC827")
QUICK = ("pbmc CD19+ B, shift half", "pbmc CD14+ Monocyte, shift half", "pbmc none, shift all",
         "cellbench H838, same tech", "cellbench H2228, ref dropseq", "cellbench A549+H838, shift all")
BASELINE_NAMES = ("scmap-cluster", "kNN distance", "kNN per-batch", "PCA error", "IsolationForest")
ACSLEUTH_METHODS = ("ACsleuth", "paper (predictor)", "residual view", "similarity view")
FOLDS = 2


@dataclass(frozen=True)
class TaskSpec:
    """A named task and how to build it (``build(seed)`` → :class:`tasks.Task`)."""

    name: str
    family: str
    build: Callable[[int], "tasks.Task"]


# ------------------------------------------------------------------ building
def _pbmc_source():
    import scanpy as sc

    from acsleuth_core.demo import _recover_counts
    import anndata as ad

    source = sc.datasets.pbmc68k_reduced()
    cells = ad.AnnData(_recover_counts(source), obs=source.obs[["bulk_labels"]].copy())
    cells.var_names = source.raw.var_names.astype(str)
    cells.obs["label"] = cells.obs["bulk_labels"].astype(str)
    return cells


def pbmc_task(anomalous: tuple[str, ...], shift: str, rare: bool = False) -> Callable[[int], "tasks.Task"]:
    def build(seed: int) -> "tasks.Task":
        cells = _pbmc_source()
        rng = np.random.default_rng(seed)
        label = cells.obs["label"].to_numpy()
        is_anomaly = np.isin(label, anomalous)
        in_reference = np.zeros(cells.n_obs, dtype=bool)
        for cell_type in np.unique(label[~is_anomaly]):
            rows = np.nonzero((label == cell_type) & ~is_anomaly)[0]
            in_reference[rng.permutation(rows)[: rows.size // 2]] = True
        in_target = ~in_reference
        if rare:
            anomalies = np.nonzero(is_anomaly)[0]
            n_normal_target = int(np.sum(in_target & ~is_anomaly))
            keep = max(3, round(RARE_SHARE * n_normal_target / (1 - RARE_SHARE)))
            in_target[rng.permutation(anomalies)[keep:]] = False
        target = cells[in_target].copy()
        return tasks.split_and_shift(cells[in_reference].copy(), target, is_anomaly[in_target], shift, seed)

    return build


def _cellbench():
    import anndata as ad

    cells = ad.read_h5ad(tasks.CELLBENCH_PATH)
    cells.obs["label"] = cells.obs["cell_line"].astype(str)
    return cells


def cellbench_same_tech(line: str) -> Callable[[int], "tasks.Task"]:
    def build(seed: int) -> "tasks.Task":
        cells = _cellbench()
        dataset, label = cells.obs["dataset"].astype(str), cells.obs["label"]
        reference = cells[dataset.isin(tasks.CELLBENCH_PLATES[:2]) & (label != line)].copy()
        target = cells[dataset == tasks.CELLBENCH_PLATES[2]].copy()
        return tasks.Task(reference, {"plate_3": target}, target.obs["label"].to_numpy() == line)

    return build


def cellbench_other_tech(line: str, reference_set: str) -> Callable[[int], "tasks.Task"]:
    def build(seed: int) -> "tasks.Task":
        cells = _cellbench()
        dataset, label = cells.obs["dataset"].astype(str), cells.obs["label"]
        reference = cells[(dataset == reference_set) & label.isin(THREE_LINES) & (label != line)].copy()
        targets = {
            plate.removeprefix("sc_celseq2_5cl_"): cells[(dataset == plate) & label.isin(THREE_LINES)].copy()
            for plate in tasks.CELLBENCH_PLATES
        }
        truth = np.concatenate([t.obs["label"].to_numpy() == line for t in targets.values()])
        return tasks.Task(reference, targets, truth)

    return build


def cellbench_classic(shift: str, rare: bool = False, anomaly_free: bool = False, reference_set: str = "sc_celseq2"):
    def build(seed: int) -> "tasks.Task":
        cells = _cellbench()
        dataset, label = cells.obs["dataset"].astype(str), cells.obs["label"]
        reference = cells[(dataset == reference_set) & label.isin(THREE_LINES)].copy()
        plates = cells[dataset.isin(tasks.CELLBENCH_PLATES)]
        is_anomaly = ~plates.obs["label"].isin(THREE_LINES).to_numpy()
        keep = np.ones(plates.n_obs, dtype=bool)
        if anomaly_free:
            keep = ~is_anomaly
        elif rare:
            rng = np.random.default_rng(seed)
            anomalies = np.nonzero(is_anomaly)[0]
            n_keep = round(RARE_SHARE * np.sum(~is_anomaly) / (1 - RARE_SHARE))
            keep[rng.permutation(anomalies)[n_keep:]] = False
        target = plates[keep].copy()
        return tasks.split_and_shift(reference, target, is_anomaly[keep], shift, seed)

    return build


def synthetic_task(seed: int) -> "tasks.Task":
    try:
        import memory
    except ImportError:  # pragma: no cover
        from benchmarks import memory

    data = memory.synthetic_data(1500, 6000, 2000, seed, expression_scale=0.3)
    return tasks.split_and_shift(data.reference, data.target, data.truth, "half", seed)


def task_specs() -> list[TaskSpec]:
    """Every task of the suite, in order."""
    source = _pbmc_source()
    counts = source.obs["label"].value_counts()
    types = [t for t, n in counts.items() if n >= MIN_TYPE_CELLS]
    specs = [TaskSpec(f"pbmc {t}, shift half", "pbmc type", pbmc_task((t,), "half")) for t in types]
    specs += [TaskSpec(f"pbmc {t}, no shift", "pbmc type", pbmc_task((t,), "none")) for t in PBMC_NO_SHIFT]
    specs += [TaskSpec(f"pbmc {t}, shift all", "pbmc shifted", pbmc_task((t,), "all")) for t in PBMC_SHIFT_ALL]
    specs += [TaskSpec(f"pbmc {a}+{b}, shift half", "pbmc pair", pbmc_task((a, b), "half")) for a, b in PBMC_PAIRS]
    specs += [TaskSpec(f"pbmc rare {t}, shift half", "rare", pbmc_task((t,), "half", rare=True)) for t in PBMC_RARE]
    specs += [TaskSpec(f"pbmc none, shift {s}", "anomaly-free", pbmc_task((), s)) for s in ("none", "half", "all")]
    specs += [TaskSpec(f"cellbench {line}, same tech", "cell line same tech", cellbench_same_tech(line)) for line in CELL_LINES]
    specs += [
        TaskSpec(f"cellbench {line}, ref {ref.removeprefix('sc_')}", "cell line other ref", cellbench_other_tech(line, ref))
        for ref in ("sc_dropseq", "sc_celseq2") for line in THREE_LINES
    ]
    specs += [
        TaskSpec("cellbench A549+H838, no shift", "cell line other ref", cellbench_classic("none")),
        TaskSpec("cellbench A549+H838, ref dropseq", "cell line other ref", cellbench_classic("none", reference_set="sc_dropseq")),
        TaskSpec("cellbench A549+H838, shift half", "cell line shifted", cellbench_classic("half")),
        TaskSpec("cellbench A549+H838, shift all", "cell line shifted", cellbench_classic("all")),
        TaskSpec("cellbench rare A549+H838", "rare", cellbench_classic("none", rare=True)),
        TaskSpec("cellbench rare A549+H838, ref dropseq", "rare", cellbench_classic("none", rare=True, reference_set="sc_dropseq")),
        TaskSpec("cellbench none", "anomaly-free", cellbench_classic("none", anomaly_free=True)),
        TaskSpec("cellbench none, ref dropseq", "anomaly-free", cellbench_classic("none", anomaly_free=True, reference_set="sc_dropseq")),
        TaskSpec("cellbench none, shift half", "anomaly-free", cellbench_classic("half", anomaly_free=True)),
        TaskSpec("synthetic 6,000 cells, shift half", "large", synthetic_task),
    ]
    return specs


# ------------------------------------------------------------------- methods
@dataclass
class Scored:
    """A method's scores of the target and (out of fold) of every reference cell."""

    target: np.ndarray
    reference: np.ndarray


def run_acsleuth(task: "tasks.Task", seed: int, *, threads: Optional[int] = None, shuffle_reference: bool = False):
    """Prepare, train and score with the default config; the score, every view, the calls and the seconds."""
    import torch

    from acsleuth_core.detect import AnomalyDetector, DetectorConfig
    from acsleuth_core.preprocess import prepare

    reference = task.reference
    if shuffle_reference:
        reference = reference[np.random.default_rng(12345).permutation(reference.n_obs)].copy()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        prepared = prepare(reference, task.targets)
        detector = AnomalyDetector(DetectorConfig(seed=seed)).fit(prepared.reference.X, prepared.genes)
        result = detector.score(prepared.target.X, prepared.batches)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
    scored = {"ACsleuth": Scored(result.scores, result.reference_scores)}
    names = {"predictor": "paper (predictor)", "residual": "residual view", "similarity": "similarity view"}
    scored |= {names[n]: Scored(v.target, v.reference) for n, v in result.views.items()}
    return scored, result.calls, np.asarray(prepared.batches, dtype=str), seconds


def _per_batch_zscore(X, batches: np.ndarray) -> np.ndarray:
    """Every gene z-scored within each batch (dense; the suite's matrices are small)."""
    dense = X.toarray().astype(np.float64)
    for b in np.unique(batches):
        rows = batches == b
        sd = dense[rows].std(axis=0)
        sd[sd == 0] = 1.0
        dense[rows] = (dense[rows] - dense[rows].mean(axis=0)) / sd
    return np.clip(dense, -baselines.ZSCORE_CLIP, baselines.ZSCORE_CLIP)


def _cross_fitted(fit: Callable, reference, target, seed: int, pca_input: str = "zscore") -> Scored:
    """Fit on all folds but one, score that fold; the target gets the mean of the fold fits' scores."""
    from acsleuth_core.detect import fold_assignment

    folds = fold_assignment(reference.shape[0], FOLDS, seed)
    out_of_fold = np.empty(reference.shape[0])
    target_scores = np.zeros(target.shape[0])
    for k in range(FOLDS):
        score = fit(reference[folds != k], seed, pca_input)
        out_of_fold[folds == k] = score(reference[folds == k])
        target_scores += score(target) / FOLDS
    return Scored(target_scores, out_of_fold)


def run_baselines(task: "tasks.Task", seed: int) -> dict[str, Scored]:
    """Every baseline's cross-fitted scores, on ACsleuth's own preparation."""
    import scipy.sparse as sp

    from acsleuth_core.preprocess import prepare

    prepared = prepare(task.reference, task.targets)
    reference, target = prepared.reference.X.tocsr(), prepared.target.X.tocsr()
    fits = {
        "scmap-cluster": baselines.fit_scmap_cluster,
        "kNN distance": baselines.fit_knn_distance,
        "PCA error": baselines.fit_pca_error,
        "IsolationForest": baselines.fit_isolation_forest,
    }
    scored = {name: _cross_fitted(fit, reference, target, seed) for name, fit in fits.items()}
    batches = np.asarray(prepared.batches, dtype=str)
    per_batch_ref = sp.csr_matrix(_per_batch_zscore(reference, np.zeros(reference.shape[0], dtype=str)))
    per_batch_target = sp.csr_matrix(_per_batch_zscore(target, batches))
    scored["kNN per-batch"] = _cross_fitted(baselines.fit_knn_distance, per_batch_ref, per_batch_target, seed, "log")
    return {name: scored[name] for name in BASELINE_NAMES}


def evaluate(task: "tasks.Task", scored: dict[str, Scored]) -> dict[str, dict[str, float]]:
    """AUROC (when the target has anomalies), label-free F1, cells called and share called, per method."""
    from sklearn.metrics import f1_score, roc_auc_score

    from acsleuth_core import threshold as thr

    out = {}
    for name, s in scored.items():
        calls = thr.call(s.target, thr.label_free_threshold(s.target, s.reference))
        has_anomalies = bool(task.truth.any())
        out[name] = {
            "AUROC": float(roc_auc_score(task.truth, s.target)) if has_anomalies else float("nan"),
            "F1": float(f1_score(task.truth, calls, zero_division=0.0)) if has_anomalies else float("nan"),
            "called": int(calls.sum()),
            "called share": float(calls.mean()),
            "anomalies called": int(np.sum(calls & task.truth)),
        }
    return out


def run_task(spec: TaskSpec, seed: int, stability: bool) -> dict:
    """Build one task, run every method, evaluate; with ``stability``, the default's agreement too."""
    task = spec.build(seed)
    scored, calls, batches, seconds = run_acsleuth(task, seed)
    scored |= run_baselines(task, seed)
    row = {
        "task": spec.name,
        "family": spec.family,
        "seed": seed,
        "reference cells": int(task.reference.n_obs),
        "target cells": int(task.truth.size),
        "anomalies": int(task.truth.sum()),
        "seconds": seconds,
        "metrics": evaluate(task, scored),
        "scores": {name: (s.target.tolist(), s.reference.tolist()) for name, s in scored.items()},
        "truth": task.truth.tolist(),
        "batches": batches.tolist(),
    }
    if stability:
        one_thread_scored, one_thread, _, _ = run_acsleuth(task, seed, threads=1)
        _, shuffled, _, _ = run_acsleuth(task, seed, shuffle_reference=True)
        row["agreement 1 thread"] = float(np.mean(one_thread == calls))
        row["agreement shuffled"] = float(np.mean(shuffled == calls))
        # so a calling rule or a join can be judged on stability without retraining (score_rules.py)
        row["scores 1 thread"] = {name: (s.target.tolist(), s.reference.tolist()) for name, s in one_thread_scored.items()}
    return row


# ------------------------------------------------------------------ reporting
def best_baseline(row: dict, key: str) -> tuple[str, float]:
    values = {name: row["metrics"][name][key] for name in BASELINE_NAMES}
    name = max(values, key=lambda n: values[n])
    return name, values[name]


def task_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        m = r["metrics"]
        line = {"task": r["task"], "seed": r["seed"], "ref/target/anom": f"{r['reference cells']}/{r['target cells']}/{r['anomalies']}"}
        if r["anomalies"]:
            name, value = best_baseline(r, "AUROC")
            line |= {f"AUROC {n}": f"{m[n]['AUROC']:.3f}" for n in ACSLEUTH_METHODS}
            line |= {"best baseline AUROC": f"{value:.3f} ({name})"}
            line |= {"F1 ACsleuth": f"{m['ACsleuth']['F1']:.3f}", "F1 best baseline": f"{best_baseline(r, 'F1')[1]:.3f}"}
            line |= {"called (of anomalies)": f"{m['ACsleuth']['anomalies called']}/{r['anomalies']} ({m['ACsleuth']['called']})"}
        else:
            line |= {"called (of anomalies)": f"{m['ACsleuth']['called']} of {r['target cells']} (anomaly-free)"}
        line["seconds"] = f"{r['seconds']:.1f}"
        out.append(line)
    return out


def method_summary(rows: list[dict], names: tuple[str, ...] = (*ACSLEUTH_METHODS, *BASELINE_NAMES)) -> list[dict]:
    """Per method: mean and worst AUROC and label-free F1 over tasks with anomalies, empty calls, and the share
    called on anomaly-free targets."""
    with_anomalies = [r for r in rows if r["anomalies"]]
    free = [r for r in rows if not r["anomalies"]]
    out = []
    for name in names:
        auroc = [r["metrics"][name]["AUROC"] for r in with_anomalies]
        f1 = [r["metrics"][name]["F1"] for r in with_anomalies]
        free_share = [100 * r["metrics"][name]["called share"] for r in free]
        out.append({
            "method": name,
            "mean AUROC": f"{np.mean(auroc):.3f}", "worst AUROC": f"{np.min(auroc):.3f}",
            "mean F1": f"{np.mean(f1):.3f}", "worst F1": f"{np.min(f1):.3f}",
            "empty calls": sum(r["metrics"][name]["called"] == 0 for r in with_anomalies),
            "anomaly-free % called (median / max)": f"{np.median(free_share):.1f} / {np.max(free_share):.1f}" if free else "",
        })
    return out


def acceptance(rows: list[dict]) -> list[str]:
    """The issue's acceptance checks, default against the best baseline of each task."""
    with_anomalies = [r for r in rows if r["anomalies"]]
    free = [r for r in rows if not r["anomalies"]]
    default_auroc = np.array([r["metrics"]["ACsleuth"]["AUROC"] for r in with_anomalies])
    best_auroc = np.array([best_baseline(r, "AUROC")[1] for r in with_anomalies])
    default_f1 = np.array([r["metrics"]["ACsleuth"]["F1"] for r in with_anomalies])
    best_f1 = np.array([best_baseline(r, "F1")[1] for r in with_anomalies])
    close = default_auroc >= best_auroc - 0.01
    half_called = [
        r["metrics"]["ACsleuth"]["anomalies called"] >= 0.5 * r["anomalies"]
        for r in with_anomalies
        if r["anomalies"] >= 0.05 * r["target cells"] and r["metrics"]["ACsleuth"]["AUROC"] >= 0.9
    ]
    free_share = [100 * r["metrics"]["ACsleuth"]["called share"] for r in free]
    lines = [
        f"mean AUROC: default {default_auroc.mean():.3f} vs best baseline per task {best_auroc.mean():.3f} "
        f"(needs ≥ +0.01: {'met' if default_auroc.mean() >= best_auroc.mean() + 0.01 else 'NOT met'})",
        f"mean label-free F1: default {default_f1.mean():.3f} vs best baseline per task {best_f1.mean():.3f} "
        f"(needs ≥ +0.05: {'met' if default_f1.mean() >= best_f1.mean() + 0.05 else 'NOT met'})",
        f"AUROC within 0.01 of the best baseline or better: {close.sum()}/{close.size} tasks "
        f"({close.mean():.0%}; needs ≥ 80 %: {'met' if close.mean() >= 0.8 else 'NOT met'})",
        f"tasks with ≥ 5 % anomalies and AUROC ≥ 0.9 calling at least half of them: {sum(half_called)}/{len(half_called)} "
        f"({'met' if all(half_called) else 'NOT met'})",
    ]
    if free_share:
        lines.append(
            f"anomaly-free targets, % of cells called: median {np.median(free_share):.1f}, max {np.max(free_share):.1f} "
            f"(needs ≤ 2 and ≤ 10: {'met' if np.median(free_share) <= 2 and np.max(free_share) <= 10 else 'NOT met'})"
        )
    if "agreement 1 thread" in rows[0]:
        worst = min(rows, key=lambda r: min(r["agreement 1 thread"], r["agreement shuffled"]))
        lines.append(
            f"stability: worst agreement 1 vs 2 threads {min(r['agreement 1 thread'] for r in rows):.1%}, "
            f"shuffled reference rows {min(r['agreement shuffled'] for r in rows):.1%} (worst task: {worst['task']}; needs ≥ 98 %)"
        )
    lines.append(f"seconds per task (ACsleuth: prepare, train, score, call): median {np.median([r['seconds'] for r in rows]):.1f}, "
                 f"max {np.max([r['seconds'] for r in rows]):.1f}")
    return lines


def render(command: str, code: str, rows: list[dict]) -> str:
    return "\n\n".join([
        "# Detection task suite",
        f"Reproduce: `{command}`",
        f"Code: {code}",
        f"{len(rows)} task runs ({sum(1 for r in rows if r['anomalies'])} with anomalies). Every method's calls come "
        "from the same label-free rule; AUROC and F1 are averaged over tasks with anomalies.",
        "## Summary",
        "\n".join(f"- {line}" for line in acceptance(rows)),
        common.markdown_table(method_summary(rows)),
        "## Every task",
        common.markdown_table(task_rows(rows)),
    ]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the {len(QUICK)}-task subset for iterating")
    parser.add_argument("--tasks", nargs="+", help="run only tasks whose name contains one of these")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--stability", action="store_true", help="also 1 torch thread and shuffled reference rows")
    args = parser.parse_args(argv)
    specs = task_specs()
    if args.quick:
        specs = [s for s in specs if s.name in QUICK]
    if args.tasks:
        specs = [s for s in specs if any(part in s.name for part in args.tasks)]
    options = {"quick": args.quick, "tasks": args.tasks, "seeds": args.seeds, "stability": args.stability}
    command = common.reproduce_command(SCRIPT, {k: v for k, v in options.items() if v})
    print(command, flush=True)
    digests = common.package_digests()
    code = common.code_state(digests)
    name = "suite_quick" if args.quick else "suite"
    rows = []
    for seed in args.seeds:
        for spec in specs:
            common.log(f"{spec.name}, seed {seed} …")
            rows.append(run_task(spec, seed, args.stability))
            # after every task, so a run cut short still leaves what it measured
            common.write_json(f"{name}.json", {"command": command, "code": code, "rows": rows})
    report = render(command, code, rows)
    print(report)
    common.log(f"written to {common.write_result(f'{name}.md', report)}")


if __name__ == "__main__":
    main()
