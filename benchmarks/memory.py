"""Peak memory of ``detect_anomalies`` on a large synthetic sparse target.

    python benchmarks/memory.py [--cells 50000 --genes 2000 --reference-cells 5000 --seed 0]
                                [--expression-scale 1.0] [--whole-pipeline]

Synthetic data: Poisson counts from a few normal cell-type profiles (a shared
log-normal gene baseline, each type with log-normal fold changes, log-sd 1.5,
on 10% of the genes; log-normal library sizes); about 10% of the target cells come from one
more profile, the anomalies. ``--expression-scale`` multiplies every expected
count: at 1 about 40 % of the values are non-zero; 0.08 gives about 6 %, like
droplet data over every gene (the paper's "full" gene setting). Both matrices are built chunk by chunk as sparse
CSR, so generating them never holds a dense cells × genes array.

ACsleuth runs with every gene (``n_hvg="all"``) and a short schedule
(5 module-I epochs; 2 + 3 predictor epochs, which only the paper's score, not
the default, trains): the point is memory, not accuracy.
``--whole-pipeline`` splits the target into two samples and goes on as the CLI
does: batch correction (10 epochs each for modules II and III), subtypes
(k = 2, 5 epochs) and writing the annotated result to an ``.h5ad`` file.
RSS is sampled in a background thread and split into phases at the training
loops' progress reports, so the step that sets the peak is named. Target:
peak RSS (``ru_maxrss`` of this process) below 4 GiB.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.memory
    import _common as common
except ImportError:  # pragma: no cover
    from benchmarks import _common as common

SCRIPT = "benchmarks/memory.py"
TARGET_GIB = 4.0
N_NORMAL_TYPES = 4
ANOMALY_FRACTION = 0.10
MARKER_SHARE = 0.10
MARKER_LOG_SD = 1.5
CHUNK = 5000


# ----------------------------------------------------------------------- data
@dataclass
class SyntheticData:
    """Raw-count reference (normal cells) and target AnnData, with the target's truth."""

    reference: object  # AnnData
    target: object  # AnnData
    truth: np.ndarray


def cell_type_profiles(n_genes: int, n_types: int, rng: np.random.Generator) -> np.ndarray:
    """Expected counts per gene (rows = types) at library-size factor 1."""
    baseline = np.exp(rng.normal(-1.0, 1.2, n_genes))
    profiles = np.tile(baseline, (n_types, 1))
    n_markers = max(1, int(MARKER_SHARE * n_genes))
    for profile in profiles:
        markers = rng.choice(n_genes, n_markers, replace=False)
        profile[markers] *= np.exp(rng.normal(0.0, MARKER_LOG_SD, n_markers))
    return profiles


def poisson_cells(profiles: np.ndarray, types: np.ndarray, rng: np.random.Generator):
    """Sparse CSR float32 counts, one row per entry of ``types``, drawn chunk by chunk."""
    import scipy.sparse as sp

    blocks = []
    for start in range(0, types.size, CHUNK):
        rows = types[start : start + CHUNK]
        size = np.exp(rng.normal(0.0, 0.3, rows.size))[:, None]
        counts = rng.poisson(profiles[rows] * size)
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
        del counts
    return sp.vstack(blocks, format="csr")


def synthetic_data(
    n_reference: int, n_target: int, n_genes: int, seed: int, expression_scale: float = 1.0
) -> SyntheticData:
    """Reference of normal types only; target with ~10% cells of an extra (anomalous) type; ``obs["cell_type"]``."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    profiles = expression_scale * cell_type_profiles(n_genes, N_NORMAL_TYPES + 1, rng)
    anomalous_type = N_NORMAL_TYPES
    reference_types = rng.integers(0, N_NORMAL_TYPES, n_reference)
    truth = rng.random(n_target) < ANOMALY_FRACTION
    target_types = np.where(truth, anomalous_type, rng.integers(0, N_NORMAL_TYPES, n_target))
    genes = pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)])

    def make(types: np.ndarray, prefix: str) -> ad.AnnData:
        names = np.where(types == anomalous_type, "anomalous", np.char.add("type_", types.astype(str)))
        obs = pd.DataFrame({"cell_type": pd.Categorical(names)}, index=[f"{prefix}{i}" for i in range(types.size)])
        return ad.AnnData(poisson_cells(profiles, types, rng), obs=obs, var=genes)

    return SyntheticData(make(reference_types, "ref"), make(target_types, "cell"), truth)


# ---------------------------------------------------------------- measurement
def phase_marker(sampler: common.RssSampler):
    """A progress callback that starts a new RSS phase at each training loop's first and last epoch."""
    next_phase = {
        ("module I", "first"): "module I epochs 2+",
        ("module I", "last"): "after module I: gene scale, scoring (predictor epoch 1 if any), threshold",
        ("predictor", "first"): "predictor epochs 2+",
        ("predictor", "last"): "predict, threshold, annotate",
    }

    def progress(event) -> None:
        if event.epoch == 1:
            sampler.mark(next_phase.get((event.stage, "first"), f"{event.stage} epochs 2+"))
        if event.epoch == event.n_epochs:
            sampler.mark(next_phase.get((event.stage, "last"), f"after {event.stage}"))

    return progress


def sparse_mib(X) -> float:
    """Memory held by a CSR matrix's three arrays."""
    return (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20


def run(
    n_cells: int, n_genes: int, n_reference: int, seed: int, expression_scale: float = 1.0, whole_pipeline: bool = False
) -> dict:
    """Build the data, run ACsleuth under the RSS sampler, and collect the numbers."""
    from sklearn.metrics import roc_auc_score

    from acsleuth_core.detect import DetectorConfig
    from acsleuth_core.mmd import PredictorConfig

    data = synthetic_data(n_reference, n_cells, n_genes, seed, expression_scale)
    described = (
        f"{n_cells:,} × {n_genes:,}, {data.target.X.nnz / (n_cells * n_genes):.1%} non-zero, "
        f"{sparse_mib(data.target.X):.0f} MiB as CSR; {int(data.truth.sum()):,} anomalies"
    )
    targets = two_samples(data.target) if whole_pipeline else data.target
    data.target = None  # from here only `targets` holds the target cells
    config = DetectorConfig(epochs=5, predictor=PredictorConfig(warmup_epochs=2, epochs=3), seed=seed)
    rss_before = common.current_rss_mib()
    peak_before = common.peak_rss_mib()
    with common.RssSampler(first_phase="prepare, module I epoch 1") as sampler:
        out = common.run_acsleuth(data.reference, targets, config=config, n_hvg="all", progress=phase_marker(sampler))
        later = later_stages(out.run, sampler, seed) if whole_pipeline else {}
    metrics = common.anomaly_metrics(data.truth, out.scores, out.calls)
    metrics["AUROC residual norm"] = float(roc_auc_score(data.truth, out.residual_norm))
    return {
        "target": described,
        "reference": f"{n_reference:,} cells",
        "peak RSS MiB": common.peak_rss_mib(),
        "peak RSS MiB while generating data": peak_before,
        "RSS MiB before detect_anomalies": rss_before,
        "seconds": out.seconds,
        "cells/s": n_cells / out.seconds,
        **metrics,
        **later,
        "phases": sampler.phases(),
    }


def two_samples(target) -> dict:
    """The target's first and second halves as two samples (batches), so correction has work to do."""
    half = target.n_obs // 2
    return {"sample_1": target[:half].copy(), "sample_2": target[half:].copy()}


def later_stages(run, sampler: common.RssSampler, seed: int) -> dict:
    """Correction, subtypes and the export after detection, each its own phase; their seconds and sizes."""
    import dataclasses
    import tempfile
    import time
    from pathlib import Path

    from acsleuth_core import keys
    from acsleuth_core.correction import CorrectionConfig
    from acsleuth_core.export import write_h5ad
    from acsleuth_core.pipeline import correct_detection_run, subtype_detection_run
    from acsleuth_core.subtypes import SubtypeConfig

    seconds = {}
    correction = CorrectionConfig.seeded(seed)
    correction = dataclasses.replace(
        correction,
        kin=dataclasses.replace(correction.kin, epochs=10),
        style=dataclasses.replace(correction.style, epochs=10),
    )
    start = time.perf_counter()
    sampler.mark("correction (modules II and III)")
    correct_detection_run(run, correction, progress=phase_marker(sampler))
    seconds["correction seconds"] = time.perf_counter() - start
    sampler.mark("subtypes (module IV)")
    start = time.perf_counter()
    subtype_detection_run(run, SubtypeConfig(n_subtypes=2, max_epochs=5, seed=seed))
    seconds["subtypes seconds"] = time.perf_counter() - start
    sampler.mark("export (.h5ad)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = write_h5ad(run.adata, Path(folder) / "result.h5ad")
        size = path.stat().st_size / 2**20
    seconds["export seconds"] = time.perf_counter() - start
    layer = run.adata.layers[keys.CORRECTED]
    return seconds | {
        "corrected layer": f"{layer.nnz / np.prod(layer.shape):.0%} non-zero, {sparse_mib(layer):.0f} MiB as CSR",
        "exported .h5ad MiB": size,
    }


# ------------------------------------------------------------------ reporting
def render(command: str, result: dict, code: str) -> str:
    """Markdown report: headline numbers, verdict against the 4 GiB target, and the RSS per phase."""
    peak = result["peak RSS MiB"]
    verdict = "below" if peak < TARGET_GIB * 1024 else "ABOVE"
    worst = max(result["phases"], key=lambda row: row["peak RSS MiB"])
    headline = [{"quantity": k, "value": _format(v)} for k, v in result.items() if k != "phases"]
    phases = [
        {"phase": row["phase"], "seconds": f"{row['seconds']:.1f}", "peak RSS MiB": f"{row['peak RSS MiB']:.0f}"}
        for row in result["phases"]
    ]
    return "\n\n".join(
        [
            "# Memory benchmark: detect_anomalies on a synthetic sparse target",
            f"Reproduce: `{command}`",
            f"Code: {code}",
            common.markdown_table(headline),
            f"Peak RSS {peak:,.0f} MiB = {peak / 1024:.2f} GiB: {verdict} the {TARGET_GIB:.0f} GiB target. "
            f"Highest sampled RSS in phase '{worst['phase']}' ({worst['peak RSS MiB']:,.0f} MiB).",
            "## RSS by phase (sampled every 20 ms; phases split at progress reports)",
            common.markdown_table(phases),
        ]
    ) + "\n"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


# ----------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=50_000, help="target cells")
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--reference-cells", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expression-scale", type=float, default=1.0, help="multiplies every expected count")
    parser.add_argument("--whole-pipeline", action="store_true", help="also correct, subtype and export")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = common.reproduce_command(
        SCRIPT,
        {
            "cells": args.cells,
            "genes": args.genes,
            "reference-cells": args.reference_cells,
            "seed": args.seed,
            "expression-scale": args.expression_scale,
            "whole-pipeline": args.whole_pipeline,
        },
    )
    print(command, flush=True)
    code = common.code_state(common.package_digests())
    result = run(args.cells, args.genes, args.reference_cells, args.seed, args.expression_scale, args.whole_pipeline)
    report = render(command, result, code)
    print(report)
    scale = "" if args.expression_scale == 1.0 else f"_scale{args.expression_scale:g}"
    name = f"memory_{args.cells}x{args.genes}{scale}{'_pipeline' if args.whole_pipeline else ''}"
    common.write_json(f"{name}.json", {"command": command, "code": code, "result": result})
    common.log(f"written to {common.write_result(f'{name}.md', report)}")


if __name__ == "__main__":
    main()
