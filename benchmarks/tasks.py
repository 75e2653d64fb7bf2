"""Benchmark tasks with ground truth: the demo PBMCs and the CellBench cell lines (raw counts).

Used by ``benchmarks/correction.py`` and ``benchmarks/subtypes.py``; the detection
suite (``benchmarks/suite.py``) builds its own, broader set from the same sources.

* ``demo`` = :func:`acsleuth_core.demo.load_demo`; ``demo-plasma`` = the same PBMCs
  with only the plasma cells anomalous (29 of 360 target cells, next to normal B
  cells, half of which are in the reference);
* ``cellbench`` = reference ``sc_celseq2`` (H1975, H2228, HCC827), targets = the
  three 5-line CEL-seq2 plates, anomalies = A549 and H838; ``cellbench-dropseq``
  = the same with reference ``sc_dropseq`` (another technology than the targets);
  ``cellbench-3types`` = reference ``sc_celseq2`` without H2228, so A549, H838 and
  H2228 are anomalous.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
#: a synthetic gene-wise batch effect multiplies every gene's mean count by exp(N(0, SHIFT_SIGMA²))
SHIFT_SIGMA = 0.5


@dataclass
class Task:
    """Raw-count reference and targets, and the truth for the stacked targets (evaluation only)."""

    reference: object  # AnnData
    targets: dict  # name -> AnnData
    truth: np.ndarray


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


def gene_shift(counts, rng: np.random.Generator):
    """Counts redrawn with every gene's mean multiplied by ``exp(N(0, SHIFT_SIGMA²))``."""
    import scipy.sparse as sp

    factor = np.exp(rng.normal(0.0, SHIFT_SIGMA, counts.shape[1]))
    return sp.csr_matrix(rng.poisson(counts.toarray() * factor).astype(np.float32))


def split_and_shift(reference, target, truth: np.ndarray, shift: str, seed: int) -> Task:
    """Split ``target`` at random into two samples and apply the shift (none, half, all)."""
    rng = np.random.default_rng(seed + 7)
    in_b = rng.random(target.n_obs) < 0.5
    samples = {"sample_A": target[~in_b].copy(), "sample_B": target[in_b].copy()}
    shifted = {"none": (), "half": ("sample_B",), "all": ("sample_A", "sample_B")}[shift]
    if shifted:
        factor_rng = np.random.default_rng(seed + 11)  # one technology: the same gene factors on each shifted sample
        state = factor_rng.bit_generator.state
        for name in shifted:
            factor_rng.bit_generator.state = state
            samples[name].X = gene_shift(samples[name].X, factor_rng)
    return Task(reference, samples, np.concatenate([truth[~in_b], truth[in_b]]))
