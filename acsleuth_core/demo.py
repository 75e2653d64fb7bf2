"""The built-in demo: real PBMCs from scanpy's bundled ``pbmc68k_reduced``, offline.

Construction (fixed seed, so the demo is the same everywhere):

* Raw counts are recovered exactly from the bundled log-normalised values:
  ``round(expm1(x) · n_counts / 10⁴)`` for its 765 genes.
* Normal cells are every type except B cells (``CD19+ B``) and, unless
  ``with_progenitors``, the rare ``CD34+`` progenitors (dropped then).
* Half of the normal cells (stratified by type) form the **reference**; the
  rest plus all anomalous cells form the **target**, split at random into two
  samples, ``sample_A`` and ``sample_B``.
* ``sample_B`` carries a synthetic batch effect: every gene's expected count
  is multiplied by a factor ``exp(N(0, 0.5²))`` and counts are redrawn from a
  Poisson with that mean (a gene-specific, technology-like shift).
* ``obs['cell_type']`` keeps the original labels and ``obs['is_anomaly']`` the
  truth. ``obs['cell_type_fine']`` is ``cell_type`` with the plasma cells among
  the B cells named apart: the B cells of the source's own Louvain cluster 8,
  which express IGJ, MZB1 and TNFRSF17 (BCMA) and have lost MS4A1 and HLA
  class II (29 of the 95 B cells). All three are for evaluation only; no
  method in ACsleuth reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError

ANOMALY_TYPE = "CD19+ B"
PROGENITOR_TYPE = "CD34+"
LABEL_KEY = "cell_type"
FINE_LABEL_KEY = "cell_type_fine"
PLASMA_TYPE = "plasma cell"
#: the source's (``pbmc68k_reduced``) Louvain cluster holding its plasma cells
PLASMA_LOUVAIN = "8"
TRUTH_KEY = "is_anomaly"
BATCH_EFFECT_SAMPLE = "sample_B"
BATCH_EFFECT_SIGMA = 0.5
DEMO_SEED = 20240803


@dataclass
class DemoData:
    """Reference (normal cells only) and target samples, all raw counts."""

    reference: ad.AnnData
    targets: dict[str, ad.AnnData]

    @property
    def anomaly_types(self) -> list[str]:
        labels = pd.concat([t.obs for t in self.targets.values()])
        return sorted(labels.loc[labels[TRUTH_KEY], LABEL_KEY].unique())


def load_demo(*, with_progenitors: bool = False, anomalies: Optional[Sequence[str]] = None) -> DemoData:
    """Build the demo data sets (about 700 PBMCs, 765 genes, raw counts).

    ``anomalies`` names fine cell types (``cell_type_fine``) to make anomalous
    instead of the B cells (and progenitors), e.g. ``[PLASMA_TYPE]``: the plasma
    cells, with the other B cells normal and half of them in the reference.
    """
    import scanpy as sc

    rng = np.random.default_rng(DEMO_SEED)
    source = sc.datasets.pbmc68k_reduced()
    counts = _recover_counts(source)
    labels = source.obs["bulk_labels"].astype(str).to_numpy()
    fine_labels = np.where(
        (labels == ANOMALY_TYPE) & (source.obs["louvain"].astype(str).to_numpy() == PLASMA_LOUVAIN), PLASMA_TYPE, labels
    )
    anomalous_types = {ANOMALY_TYPE} | ({PROGENITOR_TYPE} if with_progenitors else set())
    keep = with_progenitors | (labels != PROGENITOR_TYPE)
    counts, labels, fine_labels, names = counts[keep], labels[keep], fine_labels[keep], source.obs_names[keep]
    if anomalies is None:
        is_anomaly = np.isin(labels, list(anomalous_types))
    else:
        unknown = sorted(set(anomalies) - set(fine_labels))
        if unknown:
            known = ", ".join(sorted(set(fine_labels)))
            raise InputError(f"The demo has no cell type {', '.join(unknown)}; its types are {known}.")
        is_anomaly = np.isin(fine_labels, list(anomalies))

    in_reference = np.zeros(labels.size, dtype=bool)
    for cell_type in np.unique(labels[~is_anomaly]):
        rows = np.nonzero((labels == cell_type) & ~is_anomaly)[0]
        in_reference[rng.permutation(rows)[: rows.size // 2]] = True
    target_rows = np.nonzero(~in_reference)[0]
    in_sample_b = rng.random(target_rows.size) < 0.5

    def make(rows: np.ndarray, X: sp.csr_matrix) -> ad.AnnData:
        obs = pd.DataFrame(
            {
                LABEL_KEY: pd.Categorical(labels[rows]),
                FINE_LABEL_KEY: pd.Categorical(fine_labels[rows]),
                TRUTH_KEY: is_anomaly[rows],
            },
            index=names[rows].astype(str),
        )
        return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=source.raw.var_names.astype(str)))

    rows_a, rows_b = target_rows[~in_sample_b], target_rows[in_sample_b]
    gene_factor = np.exp(rng.normal(0.0, BATCH_EFFECT_SIGMA, counts.shape[1]))
    shifted = sp.csr_matrix(rng.poisson(counts[rows_b].toarray() * gene_factor).astype(np.float32))
    reference_rows = np.nonzero(in_reference)[0]
    return DemoData(
        reference=make(reference_rows, counts[reference_rows]),
        targets={"sample_A": make(rows_a, counts[rows_a]), BATCH_EFFECT_SAMPLE: make(rows_b, shifted)},
    )


def _recover_counts(source: ad.AnnData) -> sp.csr_matrix:
    log_values = source.raw.X
    scale = source.obs["n_counts"].to_numpy()[:, None] / 1e4
    counts = np.rint(np.expm1(log_values.toarray()) * scale).astype(np.float32)
    return sp.csr_matrix(counts)
