"""Writing results: the annotated cell table and the annotated AnnData, atomically."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import anndata as ad
import pandas as pd

from . import keys

#: obs columns of the cell table, in order, when present.
TABLE_COLUMNS = (keys.BATCH, keys.SCORE, keys.ANOMALY, keys.RESIDUAL_NORM)


def cell_table(adata: ad.AnnData) -> pd.DataFrame:
    """One row per cell: its name, batch and every ACsleuth result column."""
    columns = [c for c in TABLE_COLUMNS if c in adata.obs]
    table = adata.obs[columns].copy()
    table.index.name = "cell"
    return table.reset_index()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` to ``path`` atomically (a half-written file never appears)."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically as CSV, TSV or Parquet, chosen by the file extension."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in (".csv", ".csv.gz"):
            table.to_csv(tmp, index=False, compression="gzip" if suffix.endswith(".gz") else None)
        elif suffix in (".tsv", ".tsv.gz"):
            table.to_csv(tmp, index=False, sep="\t", compression="gzip" if suffix.endswith(".gz") else None)
        elif suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            raise ValueError(f"cannot write a table to {path.name}: use .csv, .tsv (optionally .gz) or .parquet")
    return path
