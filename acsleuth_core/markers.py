"""Marker genes of anomaly subtypes: Wilcoxon tests (scanpy ``rank_genes_groups``).

Two comparisons per subtype: against the other anomalous cells, and against
the reference's normal cells. Each comes back as one long table (subtype,
gene, score, log fold change, adjusted p-value), best genes first.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

GROUP = "subtype"
REFERENCE_GROUP = "reference"
COLUMNS = ["subtype", "gene", "score", "logfoldchange", "pval_adj"]
#: a Wilcoxon test needs at least this many cells in each group it compares
MIN_CELLS = 2


def subtype_markers(
    expression: sp.spmatrix | np.ndarray,
    labels: np.ndarray,
    reference_expression: sp.spmatrix | np.ndarray,
    genes: list[str],
    n_genes: int = 25,
) -> dict[str, pd.DataFrame]:
    """``{"vs_anomalies": table, "vs_reference": table}`` of each subtype's top ``n_genes`` markers
    (log-scale expression in, cells × ``genes``). Subtypes of a single cell cannot be tested and get
    no markers; with one subtype, ``vs_anomalies`` is empty."""
    labels = np.asarray(labels).astype(str)
    names, sizes = np.unique(labels, return_counts=True)
    testable = [name for name, size in zip(names, sizes) if size >= MIN_CELLS]
    anomalies = _labelled(expression, labels, genes, "anomaly")
    out = {"vs_anomalies": pd.DataFrame(columns=COLUMNS), "vs_reference": pd.DataFrame(columns=COLUMNS)}
    if len(names) > 1 and testable:
        out["vs_anomalies"] = _ranked(anomalies, "rest", n_genes, groups=testable)
    if testable and reference_expression.shape[0] >= MIN_CELLS:
        reference = _labelled(reference_expression, np.full(reference_expression.shape[0], REFERENCE_GROUP), genes, "reference")
        out["vs_reference"] = _ranked(ad.concat([anomalies, reference]), REFERENCE_GROUP, n_genes, groups=testable)
    return out


def _labelled(X, labels: np.ndarray, genes: list[str], prefix: str) -> ad.AnnData:
    X = sp.csr_matrix(X, dtype=np.float32)
    obs = pd.DataFrame({GROUP: pd.Categorical(labels)}, index=[f"{prefix}{i}" for i in range(X.shape[0])])
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    adata.uns["log1p"] = {"base": None}
    return adata


def _ranked(adata: ad.AnnData, reference: str, n_genes: int, groups: list[str]) -> pd.DataFrame:
    import scanpy as sc

    sc.tl.rank_genes_groups(adata, GROUP, groups=groups, reference=reference, method="wilcoxon", n_genes=n_genes, use_raw=False)
    table = sc.get.rank_genes_groups_df(adata, group=None)
    if "group" not in table:  # one group: scanpy leaves the column out
        table.insert(0, "group", groups[0])
    table = table.rename(columns={"group": "subtype", "names": "gene", "scores": "score", "logfoldchanges": "logfoldchange", "pvals_adj": "pval_adj"})
    table["subtype"] = table["subtype"].astype(str)
    return table[COLUMNS].reset_index(drop=True)


def marker_dots(
    expression: sp.spmatrix | np.ndarray, labels: np.ndarray, genes: list[str], markers: pd.DataFrame, n_per_subtype: int = 3
) -> pd.DataFrame:
    """For a dot plot: each subtype's mean log expression and share of cells expressing (> 0) each of the
    top ``n_per_subtype`` genes of every subtype in ``markers`` (columns subtype, gene, mean, fraction)."""
    top = markers.groupby("subtype", sort=True).head(n_per_subtype)["gene"]
    chosen = list(dict.fromkeys(top))
    columns = pd.Index(genes).get_indexer(chosen)
    X = sp.csr_matrix(expression)[:, columns]
    labels = np.asarray(labels).astype(str)
    rows = []
    for subtype in sorted(np.unique(labels), key=subtype_order):
        cells = X[labels == subtype]
        means = np.asarray(cells.mean(axis=0)).ravel()
        shares = np.asarray((cells > 0).mean(axis=0)).ravel()
        rows += [(subtype, gene, m, f) for gene, m, f in zip(chosen, means, shares)]
    return pd.DataFrame(rows, columns=["subtype", "gene", "mean", "fraction"])


def subtype_order(name: str):
    """Sort key putting subtype "2" before "10"."""
    return (0, int(name)) if name.isdigit() else (1, name)
