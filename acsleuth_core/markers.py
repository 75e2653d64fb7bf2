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


def subtype_markers(
    expression: sp.spmatrix | np.ndarray,
    labels: np.ndarray,
    reference_expression: sp.spmatrix | np.ndarray,
    genes: list[str],
    n_genes: int = 25,
) -> dict[str, pd.DataFrame]:
    """``{"vs_anomalies": table, "vs_reference": table}`` of each subtype's top ``n_genes`` markers
    (log-scale expression in, cells × ``genes``). With one subtype, ``vs_anomalies`` is empty."""
    labels = np.asarray(labels).astype(str)
    anomalies = _labelled(expression, labels, genes, "anomaly")
    out = {"vs_anomalies": pd.DataFrame(columns=COLUMNS)}
    if len(np.unique(labels)) > 1:
        out["vs_anomalies"] = _ranked(anomalies, "rest", n_genes)
    both = ad.concat([anomalies, _labelled(reference_expression, np.full(reference_expression.shape[0], REFERENCE_GROUP), genes, "reference")])
    out["vs_reference"] = _ranked(both, REFERENCE_GROUP, n_genes, groups=sorted(np.unique(labels)))
    return out


def _labelled(X, labels: np.ndarray, genes: list[str], prefix: str) -> ad.AnnData:
    X = sp.csr_matrix(X, dtype=np.float32)
    obs = pd.DataFrame({GROUP: pd.Categorical(labels)}, index=[f"{prefix}{i}" for i in range(X.shape[0])])
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    adata.uns["log1p"] = {"base": None}
    return adata


def _ranked(adata: ad.AnnData, reference: str, n_genes: int, groups="all") -> pd.DataFrame:
    import scanpy as sc

    sc.tl.rank_genes_groups(adata, GROUP, groups=groups, reference=reference, method="wilcoxon", n_genes=n_genes, use_raw=False)
    table = sc.get.rank_genes_groups_df(adata, group=None)
    if "group" not in table:  # one group: scanpy leaves the column out
        table.insert(0, "group", groups[0] if groups != "all" else adata.obs[GROUP].cat.categories[0])
    table = table.rename(columns={"group": "subtype", "names": "gene", "scores": "score", "logfoldchanges": "logfoldchange", "pvals_adj": "pval_adj"})
    table["subtype"] = table["subtype"].astype(str)
    return table[COLUMNS].reset_index(drop=True)
