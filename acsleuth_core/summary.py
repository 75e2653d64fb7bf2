"""What the user loaded, summarised for display: cells, genes, value kind, overlap, batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import anndata as ad
import pandas as pd

from .errors import GeneOverlapError
from .preprocess import detect_value_kind

MIN_SHARED_GENES = 200


@dataclass(frozen=True)
class InputOverview:
    table: pd.DataFrame
    gene_summary: str
    n_shared_genes: int


def describe_inputs(reference: ad.AnnData, targets: Mapping[str, ad.AnnData]) -> InputOverview:
    """One row per data set (role, cells, genes, detected values) and the gene overlap.

    Raises the same typed errors the pipeline would (e.g. scaled data, too few shared genes).
    """
    rows = [_row("reference", "reference", reference)]
    rows += [_row(name, "target", target) for name, target in targets.items()]
    shared = set(reference.var_names)
    for target in targets.values():
        shared &= set(target.var_names)
    if len(shared) < MIN_SHARED_GENES:
        raise GeneOverlapError(
            f"Reference and targets share only {len(shared):,} genes (at least {MIN_SHARED_GENES} are needed): "
            "check that all files use the same gene naming (symbols vs Ensembl IDs) and the same species."
        )
    summary = f"**{len(shared):,}** genes are shared by the reference and every target ({reference.n_vars:,} in the reference)."
    return InputOverview(pd.DataFrame(rows), summary, len(shared))


def _row(name: str, role: str, adata: ad.AnnData) -> dict:
    kind = detect_value_kind(adata.X, name=name)
    return {
        "data set": name,
        "role": role,
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "values": "raw counts (will be log-normalised)" if kind == "counts" else "log-normalised",
    }
