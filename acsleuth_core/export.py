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
from .errors import InputError

#: a text cell starting with one of these is read as a formula by spreadsheet programs
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

#: obs columns of the cell table, in order, when present.
TABLE_COLUMNS = (
    keys.BATCH, keys.SCORE, keys.ANOMALY, keys.PVALUE, keys.RESIDUAL_NORM, *keys.VIEW_COLUMNS.values(), keys.KIN, keys.KIN_CONFIDENCE,
    keys.SUBTYPE, keys.SUBTYPE_CONFIDENCE, keys.SUBTYPE_LIKE_REFERENCE,
)


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


#: file endings :func:`write_table` can write
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")


def table_suffix(path: str | os.PathLike) -> str:
    """The table format ``path`` asks for (one of :data:`TABLE_SUFFIXES`), or an :class:`InputError` naming the fix."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"Cannot write a table to {path.name}: name it .csv, .tsv (optionally .gz) or .parquet.")
    return suffix


def spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose text cells and column names cannot run as spreadsheet formulas: any
    starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading apostrophe (the
    spreadsheet's own "this is text" mark). Numbers, negative ones included, are left as they are."""

    def safe(value):
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value

    out = table.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]) and not pd.api.types.is_bool_dtype(out[column]):
            out[column] = out[column].astype(object).map(safe)
    out.columns = [safe(str(column)) for column in out.columns]
    return out


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically as CSV, TSV or Parquet, chosen by the file extension (text made
    :func:`spreadsheet_safe` in CSV and TSV)."""
    path = Path(path)
    suffix = table_suffix(path)
    compression = "gzip" if suffix.endswith(".gz") else None
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            spreadsheet_safe(table).to_csv(tmp, index=False, sep="\t" if suffix.startswith(".tsv") else ",", compression=compression)
    return path


def provenance(adata: ad.AnnData) -> dict[str, str]:
    """Where a table came from: tool versions, inputs, parameters and date, as flat strings."""
    result = adata.uns.get(keys.UNS, {})
    versions = result.get("versions", {})
    params = result.get("params", {})
    threshold = result.get("threshold", {})
    return {
        "tool": f"ACsleuth Studio {versions.get('acsleuth-studio', 'unknown')}",
        "created": str(result.get("created", "")),
        "inputs": "; ".join(f"{k}: {v}" for k, v in result.get("input_kinds", {}).items()),
        "genes": str(result.get("genes", {}).get("matching", "")),
        "parameters": "; ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, dict)),
        "threshold": f"{threshold.get('method', '')} {threshold.get('value', '')}",
        "versions": "; ".join(f"{k} {v}" for k, v in versions.items()),
    }


def table_bytes(table: pd.DataFrame, fmt: str, meta: dict[str, str]) -> bytes:
    """A table as CSV (provenance as leading ``#`` lines) or Parquet (provenance in the file metadata)."""
    if fmt == "csv":
        header = "".join(f"# {key}: {value}\n" for key, value in meta.items())
        return (header + spreadsheet_safe(table).to_csv(index=False)).encode()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(table, preserve_index=False)
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **{f"acsleuth.{k}": v for k, v in meta.items()}})
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        return sink.getvalue().to_pybytes()
    raise ValueError(f"unknown table format {fmt!r}: use 'csv' or 'parquet'")
