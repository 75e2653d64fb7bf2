"""What the user loaded, summarised for display: cells, genes, value kind, overlap, batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import anndata as ad
import pandas as pd

from .preprocess import detect_value_kind, input_warnings, shared_genes


@dataclass(frozen=True)
class InputOverview:
    table: pd.DataFrame
    gene_summary: str
    n_shared_genes: int
    warnings: list[str]


def describe_inputs(reference: ad.AnnData, targets: Mapping[str, ad.AnnData]) -> InputOverview:
    """One row per data set (role, cells, genes, detected values), the gene overlap and :func:`input_warnings`.

    Raises the same typed errors the pipeline would (e.g. scaled data, too few shared genes).
    """
    rows = [_row("reference", "reference", reference)]
    rows += [_row(name, "target", target) for name, target in targets.items()]
    genes, report = shared_genes(reference, targets)
    summary = f"**{len(genes):,}** genes are shared by the reference and every target: {report.summary()}."
    return InputOverview(pd.DataFrame(rows), summary, len(genes), input_warnings(reference, targets))


def shared_obs_columns(targets: Mapping[str, ad.AnnData], max_levels: int = 50) -> list[str]:
    """Categorical-looking obs columns present in every target: candidates for a batch column."""
    common = None
    for target in targets.values():
        columns = {c for c in target.obs.columns if 1 <= target.obs[c].nunique() <= max_levels}
        common = columns if common is None else common & columns
    return sorted(common or [])


def batch_sizes(targets: Mapping[str, ad.AnnData], batch_key: str | None = None) -> pd.DataFrame:
    """Cells per batch: one batch per target, or per value of ``batch_key`` across targets."""
    if batch_key is None:
        rows = [{"batch": name, "cells": t.n_obs} for name, t in targets.items()]
    else:
        values = pd.concat([t.obs[batch_key].astype(str) for t in targets.values()])
        rows = [{"batch": b, "cells": int(n)} for b, n in values.value_counts(sort=False).sort_index().items()]
    return pd.DataFrame(rows)


def _row(name: str, role: str, adata: ad.AnnData) -> dict:
    kind = detect_value_kind(adata.X, name=name)
    return {
        "data set": name,
        "role": role,
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "values": "raw counts (will be log-normalised)" if kind == "counts" else "log-normalised",
    }
