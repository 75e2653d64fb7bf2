"""Anomaly subtype benchmark (module IV): ACsleuth, its ablations, and clustering baselines on its calls.

    python benchmarks/subtypes.py [--data demo|cellbench|cellbench-dropseq|cellbench-3types] [--seeds 0 1 2] [--methods ...]
    python benchmarks/subtypes.py --from-json benchmarks/results/subtypes_demo.json

Data (``--data``):

* ``demo`` (default): :func:`acsleuth_core.demo.load_demo` with
  ``with_progenitors=True``: a reference of normal PBMCs and two target samples
  (``sample_B`` with a synthetic gene-wise batch effect); two anomaly types,
  ``CD19+ B`` and the rare ``CD34+``. ``obs['is_anomaly']`` and
  ``obs['cell_type']`` are the truth.
* ``cellbench`` / ``cellbench-dropseq``: the CellBench
  tasks (``benchmarks/tasks.py``): two anomaly types, the lines A549 and
  H838 absent from the reference; ``cell_line`` is the truth.
  ``cellbench-3types``: three anomaly types (H2228 left out of the reference too).

The truth is read for evaluation only, except where a baseline is given the
true k (below).

Every (method, seed) runs in its own spawned process, so its peak RSS
(``ru_maxrss``, interpreter and libraries included) and its time are its own.
Nothing is shared between rows: each process runs the detection it needs
itself, so a row's time is its whole pipeline, detection (module I, scoring,
label-free call) + correction (modules II and III, where used) + subtyping or
clustering, and the three stages are also reported separately. Time excludes
imports, loading the data, and one warm-up Leiden clustering of random points
that every process runs first (numba's one-off compilation of scanpy's
neighbour graph, about 5 s, which ACsleuth's automatic k also uses).

Methods (``seed`` = the run's seed everywhere):

* ``acsleuth``: ``detect_anomalies(…, DetectorConfig(seed))``,
  ``correct_detection_run(run, CorrectionConfig.seeded(seed))``,
  ``subtype_detection_run(run, SubtypeConfig(seed), use_correction=True)``
  (automatic k); subtypes read from ``obs['acsleuth_subtype']``.
* ``no_memory_bank``: as ``acsleuth`` with ``DetectorConfig(seed, memory_size=0)``.
* ``no_correction``: as ``acsleuth`` without correction (not run) and
  ``use_correction=False`` (module IV reads the expression the model saw).
* ``no_residual``: as ``acsleuth`` with ``SubtypeConfig(seed, use_residual=False)``.
* ``paper_encoder``: as ``acsleuth`` with ``SubtypeConfig(seed, encoder="module_one")``:
  tokens from module I's encoder, as the paper does, instead of principal components.
* ``kmeans`` and ``leiden`` (baselines) cluster the cells called by the full
  ACsleuth detection of the same seed (rerun in their own process; the report
  checks that the calls are identical, by a digest). Input: the called cells'
  rows of the model inputs (``ModelInputs.from_prepared(run.prepared).target.X``:
  ``normalize_total(1e4)`` + ``log1p``, the model genes), PCA with
  ``scanpy.pp.pca`` (``min(30, n − 1)`` components, centred, not scaled).
  ``kmeans``: sklearn ``KMeans(k, n_init=10)`` with k = the true number of
  anomaly types among the called cells, i.e. the baseline is *given* the
  answer ACsleuth has to infer (this favours the baseline). ``leiden``:
  ``scanpy.pp.neighbors`` (15 neighbours) + ``scanpy.tl.leiden`` (igraph
  flavour, resolution 1.0; via ``acsleuth_core.subtypes.leiden_labels``); its
  number of clusters is reported as its k.

Metrics per run: detection F1 of the label-free calls against ``is_anomaly``
(anomaly = positive); NMI (sklearn, arithmetic normalisation) and ARI of the
subtype labels against ``cell_type``, computed on the cells that are both
called and truly anomalous (false positives have no true subtype, so they are
left out; missed anomalies have no subtype, so they weigh only through F1);
``F1×NMI`` (the paper's metric); k (chosen / given / found); true k = the
number of anomaly types among the called cells. ``NMI fine`` and ``fine k``
use ``cell_type_fine`` instead, where the demo names its plasma cells apart
from its B cells (:mod:`acsleuth_core.demo`); on CellBench the fine types are
the lines themselves. Acceptance (the issue's), on
the full method's means: NMI ≥ 0.85 and F1×NMI ≥ 0.80, both ahead of both
baselines, and automatic k = true k in most seeds.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.subtypes
    import _common as common
    import baselines
    import tasks
except ImportError:  # pragma: no cover
    from benchmarks import _common as common
    from benchmarks import baselines, tasks

SCRIPT = "benchmarks/subtypes.py"
DATASETS = ("demo", "cellbench", "cellbench-dropseq", "cellbench-3types")
TITLES = {
    "demo": "demo with B cells and CD34+ progenitors anomalous",
    "cellbench": "CellBench, CEL-seq2 reference, lines A549 and H838 anomalous",
    "cellbench-dropseq": "CellBench, Drop-seq reference, lines A549 and H838 anomalous",
    "cellbench-3types": "CellBench, CEL-seq2 reference without H2228, lines A549, H838 and H2228 anomalous",
}
N_PCS = 30
N_NEIGHBOURS = 15
LEIDEN_RESOLUTION = 1.0
NMI_TARGET = 0.85
F1_NMI_TARGET = 0.80
FULL = "acsleuth"
BASELINE_NAMES = ("kmeans", "leiden")


# ------------------------------------------------------------------ clusterings
@dataclass
class Clustering:
    """Labels of the called cells (in target order), their number and how it was set."""

    labels: np.ndarray
    k: int
    how: str


def acsleuth_subtypes(
    run, seed: int, true_k: int, *, use_correction: bool = True, use_residual: bool = True, encoder: str = "pca"
) -> Clustering:
    """Module IV with automatic k on the run's calls; labels as written to ``obs``, after the cells of
    subtypes that resemble the reference were called normal (the default)."""
    from acsleuth_core import keys
    from acsleuth_core.pipeline import subtype_detection_run
    from acsleuth_core.subtypes import SubtypeConfig

    config = SubtypeConfig(seed=seed, use_residual=use_residual, encoder=encoder)
    result = subtype_detection_run(run, config, use_correction=use_correction)
    called = run.adata.obs[keys.ANOMALY].to_numpy(dtype=bool)
    labels = run.adata.obs[keys.SUBTYPE].astype(str).to_numpy()[called]
    return Clustering(labels, len(result.kept_subtypes), result.subtypes.k_reason)


def called_cells_pca(run, seed: int) -> np.ndarray:
    """PCA (``min(30, n − 1)`` components) of the called cells' log expression on the model genes."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    from acsleuth_core import keys
    from acsleuth_core.model_inputs import ModelInputs

    called = run.adata.obs[keys.ANOMALY].to_numpy(dtype=bool)
    X = sp.csr_matrix(ModelInputs.from_prepared(run.prepared).target.X)[called]
    cells = ad.AnnData(X.astype(np.float32))
    sc.pp.pca(cells, n_comps=min(N_PCS, X.shape[0] - 1), random_state=seed)
    return cells.obsm["X_pca"]


def kmeans_baseline(run, seed: int, true_k: int) -> Clustering:
    """k-means (given the true k) on the PCA of the called cells."""
    from sklearn.cluster import KMeans

    labels = KMeans(true_k, n_init=10, random_state=seed).fit_predict(called_cells_pca(run, seed))
    return Clustering(labels, true_k, "given: the true k")


def leiden_baseline(run, seed: int, true_k: int) -> Clustering:
    """Leiden (15-NN graph, resolution 1.0) on the PCA of the called cells."""
    from acsleuth_core.subtypes import leiden_labels

    labels = leiden_labels(called_cells_pca(run, seed), LEIDEN_RESOLUTION, N_NEIGHBOURS, seed)
    return Clustering(labels, int(labels.max()) + 1, f"found: Leiden at resolution {LEIDEN_RESOLUTION}")


@dataclass(frozen=True)
class Method:
    """One row: detector options, whether modules II + III run, and how the called cells are clustered."""

    cluster: Callable[..., Clustering]
    detector: dict = field(default_factory=dict)
    correct: bool = True
    options: dict = field(default_factory=dict)
    description: str = ""


METHODS = {
    FULL: Method(acsleuth_subtypes, description="full: memory bank, correction, residual branch, automatic k"),
    "no_memory_bank": Method(
        acsleuth_subtypes, detector={"memory_size": 0}, description="DetectorConfig(memory_size=0)"
    ),
    "no_correction": Method(
        acsleuth_subtypes, correct=False, options={"use_correction": False}, description="no modules II + III"
    ),
    "no_residual": Method(
        acsleuth_subtypes, options={"use_residual": False}, description="SubtypeConfig(use_residual=False)"
    ),
    "paper_encoder": Method(
        acsleuth_subtypes, options={"encoder": "module_one"}, description="SubtypeConfig(encoder='module_one')"
    ),
    "kmeans": Method(kmeans_baseline, correct=False, description="PCA + KMeans, given the true k"),
    "leiden": Method(leiden_baseline, correct=False, description="PCA + 15-NN + Leiden (res. 1.0)"),
}


# ---------------------------------------------------------------- measurement
def _import_libraries() -> None:
    """Import what any method uses, so import time is not counted in any method's time."""
    import scanpy  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.metrics  # noqa: F401

    import acsleuth_core.pipeline  # noqa: F401


def calls_digest(calls: np.ndarray) -> str:
    """Short sha1 of the call vector, to check that rows meant to share a detection really do."""
    import hashlib

    return hashlib.sha1(np.packbits(calls).tobytes()).hexdigest()[:8]


def subtype_metrics(truth: np.ndarray, calls: np.ndarray, types: np.ndarray, labels: np.ndarray) -> dict:
    """NMI and ARI of ``labels`` (one per called cell) against ``types`` on the called, truly anomalous cells."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    true_positive = truth[calls]
    predicted, actual = np.asarray(labels)[true_positive], types[calls][true_positive]
    return {
        "NMI": float(normalized_mutual_info_score(actual, predicted)),
        "ARI": float(adjusted_rand_score(actual, predicted)),
    }


def load_task(data: str) -> tuple[object, dict, np.ndarray, np.ndarray, np.ndarray]:
    """Reference, targets, and per stacked target cell the truth (anomalous?), the true type and the
    fine type (the demo's plasma cells apart from its B cells; the type itself where no finer one exists)."""
    if data == "demo":
        from acsleuth_core.demo import FINE_LABEL_KEY, LABEL_KEY, TRUTH_KEY, load_demo

        demo = load_demo(with_progenitors=True)
        obs = [t.obs for t in demo.targets.values()]

        def column(key: str) -> np.ndarray:
            return np.concatenate([o[key].astype(str).to_numpy() for o in obs])

        truth = np.concatenate([o[TRUTH_KEY].to_numpy(dtype=bool) for o in obs])
        return demo.reference, demo.targets, truth, column(LABEL_KEY), column(FINE_LABEL_KEY)
    task = tasks.load_task(data)
    types = np.concatenate([t.obs["cell_line"].astype(str).to_numpy() for t in task.targets.values()])
    return task.reference, task.targets, task.truth, types, types


def measure(name: str, seed: int, data: str = "demo") -> dict:
    """Run one method for one seed (meant for a fresh process); its metrics and measurements."""
    import time

    from acsleuth_core import keys
    from acsleuth_core.correction import CorrectionConfig
    from acsleuth_core.detect import DetectorConfig
    from acsleuth_core.errors import InputError
    from acsleuth_core.pipeline import correct_detection_run, detect_anomalies

    method = METHODS[name]
    _import_libraries()
    baselines._warm_up_leiden()
    reference, targets, truth, types, fine_types = load_task(data)
    error = None
    with common.Measured() as measured:
        start = time.perf_counter()
        run = detect_anomalies(reference, targets, config=DetectorConfig(seed=seed, **method.detector))
        detected = time.perf_counter()
        if method.correct:
            correct_detection_run(run, CorrectionConfig.seeded(seed))
        corrected = time.perf_counter()
        obs = run.adata.obs
        detected_calls = obs[keys.ANOMALY].to_numpy(dtype=bool)
        # anomaly types the detection found: ACsleuth's subtype stage calling a whole type normal lowers its k
        # below this, it does not make the truth smaller
        true_k = int(np.unique(types[detected_calls & truth]).size)
        try:
            clustering = method.cluster(run, seed, true_k, **method.options)
        except InputError as exc:  # e.g. too few cells called to split
            error = str(exc)
        clustered = time.perf_counter()
    scores = obs[keys.SCORE].to_numpy(dtype=float)
    calls = obs[keys.ANOMALY].to_numpy(dtype=bool)  # ACsleuth's subtype stage may call some cells normal
    out = {
        "method": name,
        "seed": seed,
        **common.anomaly_metrics(truth, scores, calls),
        "true anomalies": int(truth.sum()),
        "calls digest": calls_digest(detected_calls),
        **measured.as_dict(),
        "detect s": detected - start,
        "correct s": corrected - detected if method.correct else float("nan"),
        "cluster s": clustered - corrected,
    }
    if error is not None:
        return out | {"error": error}
    metrics = subtype_metrics(truth, calls, types, clustering.labels)
    fine = {
        "NMI fine": subtype_metrics(truth, calls, fine_types, clustering.labels)["NMI"],
        "fine k": int(np.unique(fine_types[detected_calls & truth]).size),
    }
    extra = {
        "F1×NMI": out["F1"] * metrics["NMI"],
        "k": clustering.k,
        "true k": true_k,
        "k how": clustering.how,
    }
    return out | metrics | fine | extra


# ------------------------------------------------------------------ reporting
SUMMARY_COLUMNS = {  # column -> decimals
    "F1": 3,
    "NMI": 3,
    "ARI": 3,
    "F1×NMI": 3,
    "NMI fine": 3,
    "k": 1,
    "true k": 1,
    "fine k": 1,
    "called": 1,
    "seconds": 1,
    "detect s": 1,
    "correct s": 1,
    "cluster s": 1,
    "CPU s": 1,
    "load": 1,
    "peak RSS MiB": 0,
}
COLUMN_TITLES = {"F1": "F1 (label-free)", "seconds": "time s", "load": "load (1 min)"}


def _k_matches(runs: list[dict], truth: str = "true k") -> str:
    """How many runs found ``truth``'s k, as "n/runs"; "–" when no run reports both."""
    pairs = [(r.get("k"), r.get(truth)) for r in runs]
    if not any(f is not None and t is not None and f == f for f, t in pairs):  # f == f: not NaN
        return "–"
    return f"{sum(f == t for f, t in pairs if f is not None and t is not None)}/{len(runs)}"


def summary_rows(results: list[dict]) -> list[dict]:
    """Mean ± std over seeds per method, with how many seeds had k = true k."""
    rows = []
    for row in common.summarise(results, ("method",), SUMMARY_COLUMNS):
        runs = [r for r in results if r["method"] == row["method"]]
        row = {COLUMN_TITLES.get(c, c): v for c, v in row.items()}
        row["k = true k"] = _k_matches(runs)
        row["k = fine k"] = _k_matches(runs, "fine k")
        rows.append(row)
    return rows


def per_seed_rows(results: list[dict], data: str = "demo") -> list[dict]:
    """Every run, unaggregated, with the command that reruns it alone."""
    rows = []
    for r in results:
        row = {
            "method": r["method"],
            "seed": r["seed"],
            "called (true anomalies)": f"{r['called']} ({r['true anomalies']})",
            "calls digest": r["calls digest"],
        }
        if "error" in r:
            row["F1"] = r["error"]
        else:
            row |= {
                "F1": f"{r['F1']:.3f}",
                "NMI": f"{r['NMI']:.3f}",
                "ARI": f"{r['ARI']:.3f}",
                "F1×NMI": f"{r['F1×NMI']:.3f}",
                "NMI fine": f"{r.get('NMI fine', float('nan')):.3f}",
                "k (true k, fine k)": f"{r['k']} ({r['true k']}, {r.get('fine k', '?')})",
                "time s": f"{r['seconds']:.1f}",
                "peak RSS MiB": f"{r['peak RSS MiB']:.0f}",
            }
        options = {"seeds": [r["seed"]], "methods": [r["method"]]} | ({"data": data} if data != "demo" else {})
        row["rerun alone"] = f"`{common.reproduce_command(SCRIPT, options)}`"
        rows.append(row)
    return rows


#: what the acceptance is judged against: the cell type, or the fine type (the demo's plasma cells apart)
TRUTHS = {
    "cell type": {"NMI": "NMI", "k": "true k"},
    "fine type": {"NMI": "NMI fine", "k": "fine k"},
}


def acceptance_lines(results: list[dict], truth: str = "cell type") -> list[str]:
    """PASS/FAIL for each of the issue's targets, on the full method's means over seeds, against ``truth``."""
    columns = TRUTHS[truth]

    def mean(method: str, quantity: str) -> float:
        rows = [r for r in results if r["method"] == method]
        values = [r[columns["NMI"]] * (r["F1"] if quantity == "F1×NMI" else 1.0) for r in rows]
        return float(np.mean(values)) if values else float("nan")

    full = [r for r in results if r["method"] == FULL]
    if not full:
        return [f"(no `{FULL}` runs: acceptance not checked)"]
    nmi, f1_nmi = mean(FULL, "NMI"), mean(FULL, "F1×NMI")
    baselines = [b for b in BASELINE_NAMES if any(r["method"] == b for r in results)]
    ahead = bool(baselines) and all(nmi > mean(b, "NMI") and f1_nmi > mean(b, "F1×NMI") for b in baselines)
    versus = "; ".join(f"{b}: NMI {mean(b, 'NMI'):.3f}, F1×NMI {mean(b, 'F1×NMI'):.3f}" for b in baselines)
    matches = sum(r["k"] == r[columns["k"]] for r in full)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    return [
        f"{verdict(nmi >= NMI_TARGET)}  mean NMI ≥ {NMI_TARGET} (against the {truth}): {nmi:.3f}",
        f"{verdict(f1_nmi >= F1_NMI_TARGET)}  mean F1×NMI ≥ {F1_NMI_TARGET}: {f1_nmi:.3f}",
        f"{verdict(ahead)}  ahead of both baselines on mean NMI and F1×NMI ({versus or 'no baseline run'})",
        f"{verdict(matches > len(full) / 2)}  automatic k = {columns['k']} in most seeds: {matches}/{len(full)}",
    ]


def has_fine_types(results: list[dict]) -> bool:
    """Whether the fine types differ from the cell types in these runs (the demo's plasma cells)."""
    return any(r.get("fine k", r["true k"]) != r["true k"] for r in results if "error" not in r)


def notes(results: list[dict]) -> list[str]:
    """Errors, and rows meant to share the full detection of a seed whose calls differ from it."""
    out = [f"{r['method']} seed {r['seed']}: {r['error']}" for r in results if "error" in r]
    for seed in dict.fromkeys(r["seed"] for r in results):
        shared = [r for r in results if r["seed"] == seed and not METHODS[r["method"]].detector]
        digests = {r["method"]: r["calls digest"] for r in shared}
        if len(set(digests.values())) > 1:
            out.append(f"seed {seed}: the same detection gave different calls across processes: {digests}")
    return out


def render(command: str, results: list[dict], code: str, data: str = "demo") -> str:
    """The full markdown report."""
    ok = [r for r in results if "error" not in r]
    reasons = [f"seed {r['seed']}: {r['k how']}" for r in ok if r["method"] == FULL]
    methods = [{"method": m, "what": METHODS[m].description} for m in dict.fromkeys(r["method"] for r in results)]
    return "\n\n".join(
        [
            f"# Anomaly subtype benchmark (module IV): {TITLES[data]}",
            f"Reproduce: `{command}`",
            f"Code: {code}",
            "Mean ± std over seeds (population std). F1 = label-free calls vs truth. NMI and ARI compare subtype "
            "labels with the true cell type on the cells both called and truly anomalous; F1×NMI is the paper's "
            "metric. k = subtypes chosen (ACsleuth, automatic), given (kmeans: the true k, which favours it) or "
            "found (leiden); true k = anomaly types among the detection's calls (before the subtype stage calls any cell normal). `NMI fine` and `fine k` use the fine "
            "types instead: on the demo its plasma cells (29 of the 95 B cells, the source's own Louvain cluster 8) "
            "count as a type of their own, as the subtypes find them; on CellBench the fine types are the lines. "
            "Acceptance is checked against the cell types and, where they differ, the fine types. ACsleuth rows use the final call: the "
            "subtype stage calls normal the cells of subtypes that resemble the reference "
            "(`uns['acsleuth']['subtypes']['reference_resemblance']`), so their F1, `called` and k count after that "
            "check; `calls digest` is the detection's call before it. Baselines cluster the full ACsleuth "
            "detection's calls (no check). Every row is its own process and its time is its whole pipeline (detection + "
            "correction where used + clustering; not imports); CPU s = user + system CPU (all threads); `load` = "
            "the machine's 1-minute load average when the run ended (2 cores, shared: above ~2 other work "
            "competed and times are inflated). Peak RSS is the whole child process (libraries included).",
            common.markdown_table(summary_rows(ok)),
            "## Acceptance (the issue's targets, full method)",
            "\n".join(f"- {line}" for line in acceptance_lines(ok)),
            *(
                ["Against the fine types:", "\n".join(f"- {line}" for line in acceptance_lines(ok, "fine type"))]
                if has_fine_types(ok)
                else []
            ),
            "## Methods",
            common.markdown_table(methods),
            f"## Automatic k of `{FULL}`",
            "\n".join(f"- {reason}" for reason in reasons) or "(none)",
            "## Every run",
            common.markdown_table(per_seed_rows(results, data)),
            "## Notes",
            "\n".join(f"- {n}" for n in notes(results) or ["none"]),
        ]
    ) + "\n"


# ----------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", choices=DATASETS, default="demo")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--from-json", metavar="PATH", help="re-render the report of a saved run (its .json) without running anything"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        print(rerender(args.from_json))
        return
    options = {"seeds": args.seeds}
    if args.data != "demo":
        options["data"] = args.data
    if list(args.methods) != list(METHODS):
        options["methods"] = args.methods
    command = common.reproduce_command(SCRIPT, options)
    print(command, flush=True)
    digests = common.package_digests()
    code = common.code_state(digests)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            common.log(f"{method}, seed {seed} …")
            results.append(common.run_in_fresh_process(measure, method, seed, args.data))
            # runs done so far, in case the benchmark is stopped before the end
            common.write_json(f"subtypes_{args.data}.partial.json", {"command": command, "code": code, "results": results})
    changed = common.changed_since(digests)
    if changed:
        code += f" (CHANGED during the run, results may mix versions: {', '.join(changed)})"
    report = render(command, results, code, args.data)
    print(report)
    common.write_json(f"subtypes_{args.data}.json", {"command": command, "code": code, "data": args.data, "results": results})
    common.log(f"written to {common.write_result(f'subtypes_{args.data}.md', report)}")


def rerender(path: str) -> str:
    """Render a saved run's report again (e.g. after a change to the report) and rewrite its .md beside it."""
    import json
    from pathlib import Path

    saved = json.loads(Path(path).read_text())
    report = render(saved["command"], saved["results"], saved["code"], saved.get("data", "demo"))
    Path(path).with_suffix(".md").write_text(report)
    return report


if __name__ == "__main__":
    main()
