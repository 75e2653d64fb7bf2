"""Read cell × gene data from disk and check it is usable.

Readers never unpickle anything: AnnData ``.h5ad`` and 10x ``.h5`` files
are read as HDF5, 10x matrix folders and text tables as text.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import io as spio
from scipy import sparse

from .errors import (
    ACsleuthError,
    DuplicateNamesError,
    EmptyDataError,
    FileFormatError,
    FileTooLargeError,
    InputError,
    NonFiniteValuesError,
    ValueRangeError,
    memory_error_as_input,
)
from .preflight import check_hdf5, check_mtx_header

ACCEPTED_FORMATS = (
    "an AnnData file (.h5ad), a 10x Cell Ranger HDF5 file (.h5), a 10x matrix folder "
    "(matrix.mtx[.gz] with features.tsv[.gz] or genes.tsv[.gz] and barcodes.tsv[.gz]), "
    "or a table with cells as rows and genes as columns (.csv, .tsv or .txt, optionally .gz)"
)
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
#: each kind of input as an error message names it
READER_NAMES = {
    "h5ad": "an AnnData file", "10x_h5": "a 10x HDF5 file", "10x_mtx": "a 10x matrix", "table": "a table",
}
MAX_EXAMPLES = 5
TABLE_CHUNK_ROWS = 5_000
#: largest value a matrix may hold: the largest whole number a 32-bit float holds exactly, far
#: above any count of one gene's molecules in one cell or any normalised value
MAX_VALUE = 2**24
#: environment variable: the folders paths typed into the app may lie in, separated by ``os.pathsep``
DATA_ROOTS_VARIABLE = "ACSLEUTH_DATA_ROOTS"
#: bind addresses of a server only this machine can reach
LOCAL_ADDRESSES = ("localhost", "127.0.0.1", "::1")
SERVER_PATHS_OFF = (
    "Reading files by their path on the server is off: this server is reachable over the network "
    f"and no folders have been allowed. Whoever runs ACsleuth can allow folders with the environment "
    f"variable {DATA_ROOTS_VARIABLE} (separated by '{os.pathsep}'). Upload the files instead."
)


def read_cells(path: str | os.PathLike, *, max_bytes: int | None = None) -> ad.AnnData:
    """Read a cell × gene file or 10x folder into a validated AnnData.

    ``X`` is CSR float32; cell and gene names are unique (duplicate gene
    symbols in 10x data are made unique, as Cell Ranger users expect). What
    the file declares is checked first (:mod:`preflight`): nothing outside the
    file, no array beyond ``$ACSLEUTH_MAX_MATRIX_ENTRIES`` values.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(
            f"'{path.name}' was not found (looked for {path}): check the path and spelling."
        )
    kind = _file_kind(path)
    _check_size(path, kind, max_bytes)
    with memory_error_as_input(f"read '{path.name}'"):
        adata = _read_kind(path, kind)
        validate_matrix(adata, name=path.name)
        adata.X = as_csr32(adata.X)
    return adata


def dataset_names(sources: Sequence[str | os.PathLike]) -> list[str]:
    """A name per input file or folder, for its batch: its name up to the first dot (``sample_A.h5ad.gz``
    → ``sample_A``).

    Files that would share a name are named apart by their whole file name (``A.h5ad``, ``A.csv``)
    or, when that is shared too, by as many of their folders as it takes, joined by ``_``
    (``s1_outs_filtered_feature_bc_matrix.h5``). The same file given twice is refused.
    """
    paths = [Path(_unquoted(str(source))) for source in sources]
    names = [path.name.split(".")[0] for path in paths]
    for name, count in Counter(names).items():
        if count > 1:
            sharing = [i for i, other in enumerate(names) if other == name]
            for i, apart in zip(sharing, _names_apart([paths[i] for i in sharing])):
                names[i] = apart
    if len(set(names)) < len(names):
        raise _not_told_apart(paths)
    return names


def _names_apart(paths: list[Path]) -> list[str]:
    """The shortest ends of ``paths`` that differ, or an InputError when the paths are the same."""
    for depth in range(1, max(len(path.parts) for path in paths) + 1):
        ends = ["_".join(path.parts[-depth:]).lstrip("/_") for path in paths]
        if len(set(ends)) == len(ends):
            return ends
    raise _not_told_apart(paths)


def _not_told_apart(paths: list[Path]) -> InputError:
    return InputError(
        f"The targets {', '.join(map(str, paths))} cannot all be told apart by their names: give each "
        "sample a file of its own (not the same file twice; rename one of two uploads of the same name)."
    )


def validate_matrix(adata: ad.AnnData, *, name: str) -> None:
    """Raise a typed error if ``adata`` is empty, has one cell, duplicate names, or values that are
    non-finite or beyond :data:`MAX_VALUE`."""
    _check_shape(adata, name)
    _check_numeric(adata.X, name)
    _check_unique(adata.obs_names, name, what="cell")
    _check_unique(adata.var_names, name, what="gene")
    _check_finite(adata.X, name)
    _check_range(adata.X, name)


def data_roots(bind_address: str | None) -> list[Path]:
    """The folders a path typed into the app may lie in.

    ``$ACSLEUTH_DATA_ROOTS`` (folders separated by ``os.pathsep``) when set; otherwise the home
    folder and the working folder when the server listens on this machine only (``bind_address``
    is ``localhost``, ``127.0.0.1`` or ``::1``), and no folder at all when it listens on a network
    address (or on every address, ``None``).
    """
    setting = os.environ.get(DATA_ROOTS_VARIABLE, "")
    if setting.strip():
        return [Path(root.strip()).expanduser().resolve() for root in setting.split(os.pathsep) if root.strip()]
    if (bind_address or "").strip().strip("[]") in LOCAL_ADDRESSES:
        return [Path.home().resolve(), Path.cwd().resolve()]
    return []


def check_server_path(text: str, allowed_roots: Sequence[str | os.PathLike]) -> Path:
    """Turn a path typed into the app into a resolved, readable data file or 10x folder under one of
    ``allowed_roots``.

    Links are followed before the check, so a link out of the roots is refused. A path that does
    not exist, cannot be read or lies outside the roots gets one and the same message, which never
    says which of these it is.
    """
    cleaned = _unquoted(text)
    if not cleaned:
        raise InputError("No path was given: type the full path of a data file on the server.")
    try:
        path = Path(cleaned).expanduser().resolve()
    except (OSError, RuntimeError):  # a link loop, or a name the system refuses
        raise _unreadable_server_path(cleaned, allowed_roots) from None
    if not (_is_under(path, allowed_roots) and _is_readable(path)):
        raise _unreadable_server_path(cleaned, allowed_roots)
    _file_kind(path)
    return path


def as_csr32(X) -> sparse.csr_matrix:
    """Return ``X`` as a new CSR float32 matrix (never the object passed in)."""
    return sparse.csr_matrix(X, dtype=np.float32, copy=True)


def cell_count(n: int) -> str:
    """"1 cell", "2,000 cells": a count of cells for a message."""
    return f"{n:,} cell" + ("" if n == 1 else "s")


def _unquoted(text: str) -> str:
    """A path as typed or pasted, without surrounding blanks and quotes."""
    return text.strip().strip("'\"").strip()


def _file_kind(path: Path) -> str:
    if path.is_dir():
        _mtx_files(path)
        return "10x_mtx"
    name = path.name.lower()
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith((".h5", ".hdf5")):
        return "10x_h5"
    if name.removesuffix(".gz").endswith(".mtx"):
        return "10x_mtx"
    if name.removesuffix(".gz").endswith(TABLE_SUFFIXES):
        return "table"
    raise FileFormatError(
        f"'{path.name}' is not a format ACsleuth reads. Accepted: {ACCEPTED_FORMATS}. "
        "Convert the data to one of these (a Seurat .rds can be converted to .h5ad with "
        "SeuratDisk or zellkonverter)."
    )


def _mtx_files(path: Path) -> dict[str, Path]:
    """The matrix, features and barcodes files of a 10x folder or of its given matrix file.

    File names may carry a sample prefix (``GSM123_matrix.mtx.gz``), as on GEO.
    """
    folder, matrix = (path.parent, path) if path.is_file() else (path, _only_matrix(path))
    prefix = matrix.name.removesuffix(".gz").removesuffix("matrix.mtx")
    files = {"matrix": matrix}
    for role, stems in (("features", ("features", "genes")), ("barcodes", ("barcodes",))):
        candidates = [folder / f"{prefix}{stem}.tsv{gz}" for stem in stems for gz in (".gz", "")]
        found = [p for p in candidates if p.is_file()]
        if not found:
            wanted = " or ".join(f"{prefix}{stem}.tsv[.gz]" for stem in stems)
            raise FileFormatError(
                f"The 10x folder '{folder.name}' has {matrix.name} but no {wanted}: "
                "copy the missing file from the Cell Ranger output next to the matrix."
            )
        files[role] = found[0]
    return files


def _only_matrix(folder: Path) -> Path:
    matrices = sorted(p for p in folder.iterdir() if p.name.endswith(("matrix.mtx", "matrix.mtx.gz")))
    if not matrices:
        raise FileFormatError(
            f"The folder '{folder.name}' holds no matrix.mtx or matrix.mtx.gz, so it is not a 10x "
            f"matrix folder. Accepted: {ACCEPTED_FORMATS}."
        )
    if len(matrices) > 1:
        names = ", ".join(p.name for p in matrices)
        raise FileFormatError(
            f"The folder '{folder.name}' holds several matrices ({names}): give the path of one "
            "matrix file, or put each sample's files in a folder of its own."
        )
    return matrices[0]


def _check_size(path: Path, kind: str, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    files = _mtx_files(path).values() if kind == "10x_mtx" else [path]
    size = sum(p.stat().st_size for p in files)
    if size > max_bytes:
        raise FileTooLargeError(
            f"'{path.name}' is {_human_size(size)}, more than the limit of "
            f"{_human_size(max_bytes)}. Give a big file as a path on the server instead of "
            "uploading it, or raise the file-size limit setting."
        )


def _human_size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes:,} bytes"
    size = n_bytes / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


def _read_kind(path: Path, kind: str) -> ad.AnnData:
    readers = {"h5ad": ad.read_h5ad, "10x_h5": _read_10x_h5, "10x_mtx": _read_10x_mtx, "table": _read_table}
    try:
        with warnings.catch_warnings():
            # duplicates are made unique (10x) or reported by validate_matrix
            warnings.filterwarnings("ignore", message=".* names are not unique")
            _check_declared(path, kind)
            return readers[kind](path)
    except (ACsleuthError, MemoryError):
        raise
    except Exception as err:  # any reader failure means the file cannot be used as given
        # the library's own message may quote the file's bytes, so only its kind is named
        raise FileFormatError(
            f"'{path.name}' could not be read as {READER_NAMES[kind]} ({type(err).__name__}). The "
            "file may be corrupt, cut short by an interrupted upload or download, or not really "
            "in the format its name says: check it, or export it again."
        ) from err


def _check_declared(path: Path, kind: str) -> None:
    """What the file declares, checked before anything is read from it (:mod:`preflight`)."""
    if kind in ("h5ad", "10x_h5"):
        check_hdf5(path)
    elif kind == "10x_mtx":
        check_mtx_header(_mtx_files(path)["matrix"])


def _read_10x_h5(path: Path) -> ad.AnnData:
    if _is_anndata_h5(path):
        return ad.read_h5ad(path)
    adata = sc.read_10x_h5(path)
    adata.var_names_make_unique()
    return adata


def _is_anndata_h5(path: Path) -> bool:
    """An AnnData file saved with an ``.h5`` name rather than a 10x file."""
    with h5py.File(path, "r") as f:
        return f.attrs.get("encoding-type") == "anndata" or {"X", "obs", "var"} <= set(f.keys())


def _read_10x_mtx(path: Path) -> ad.AnnData:
    files = _mtx_files(path)
    matrix = sparse.csr_matrix(spio.mmread(files["matrix"]).T)
    features = pd.read_csv(files["features"], sep="\t", header=None, dtype=str)
    barcodes = pd.read_csv(files["barcodes"], sep="\t", header=None, dtype=str)
    var = pd.DataFrame({"gene_ids": features[0].to_numpy()})
    var.index = features[1 if features.shape[1] > 1 else 0].to_numpy()
    adata = ad.AnnData(matrix, obs=pd.DataFrame(index=barcodes[0].to_numpy()), var=var)
    if features.shape[1] > 2:
        adata = _gene_expression_only(adata, features[2].to_numpy())
    adata.var_names_make_unique()
    return adata


def _gene_expression_only(adata: ad.AnnData, feature_types: np.ndarray) -> ad.AnnData:
    """Drop antibody, CRISPR and other non-RNA features when RNA features are present."""
    is_rna = feature_types == "Gene Expression"
    return adata[:, is_rna].copy() if is_rna.any() else adata


def _read_table(path: Path) -> ad.AnnData:
    sep = _delimiter(_first_line(path))
    header = _table_header(path, sep)
    blocks, cells, genes = [], [], []
    for chunk in _table_chunks(path, sep):
        genes = genes or _gene_names(header, chunk.shape[1], path.name)
        _check_table_numeric(chunk, sum(len(names) for names in cells), path.name)
        blocks.append(sparse.csr_matrix(chunk.to_numpy(dtype=np.float64)))  # 1e39 stays 1e39 until checked
        cells.append(chunk.index.astype(str).to_numpy())
    if not blocks:
        raise _no_cells_error(path.name)
    obs = pd.DataFrame(index=np.concatenate(cells))
    return ad.AnnData(sparse.vstack(blocks, format="csr"), obs=obs, var=pd.DataFrame(index=genes))


def _first_line(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        return handle.readline()


def _delimiter(line: str) -> str:
    if "\t" in line:
        return "\t"
    return "," if "," in line else r"\s+"


def _table_header(path: Path, sep: str) -> list[str]:
    try:
        first = pd.read_csv(
            path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError as err:
        raise _no_cells_error(path.name) from err
    return first.iloc[0].tolist()


def _table_chunks(path: Path, sep: str):
    """Rows below the header, a chunk at a time; nothing at all for a header-only file."""
    try:
        yield from pd.read_csv(
            path, sep=sep, header=None, skiprows=1, index_col=0,
            chunksize=TABLE_CHUNK_ROWS, encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        return


def _no_cells_error(file_name: str) -> EmptyDataError:
    return EmptyDataError(
        f"'{file_name}' has no cells: the table is empty or has only a header row. "
        "Put one cell per row below a header row of gene names."
    )


def _check_table_numeric(chunk: pd.DataFrame, first_row: int, file_name: str) -> None:
    """Refuse a chunk holding text, naming where the first text is (never the text itself: the file
    may be one its reader should not see)."""
    for position, (_, values) in enumerate(chunk.items()):
        if pd.api.types.is_numeric_dtype(values):
            continue
        is_text = (pd.to_numeric(values, errors="coerce").isna() & values.notna()).to_numpy()
        raise FileFormatError(
            f"'{file_name}' holds values that are not numbers (the first in column {position + 2}, "
            f"counting the cell names as column 1, data row {first_row + int(is_text.argmax()) + 1}). "
            "ACsleuth reads a table with one cell "
            "per row, cell names in the first column, gene names in the header row and numbers "
            "everywhere else: remove annotation columns (e.g. cell type) and check the table is "
            "not transposed."
        )


def _gene_names(header: list[str], n_genes: int, file_name: str) -> list[str]:
    """Gene names from the header, which may or may not name the cell-name column."""
    if len(header) == n_genes + 1:
        return header[1:]
    if len(header) == n_genes:
        return header
    raise FileFormatError(
        f"'{file_name}' has {len(header):,} names in its header row but {n_genes:,} values per "
        "cell: every column of numbers needs a gene name in the header."
    )


def _check_shape(adata: ad.AnnData, name: str) -> None:
    if adata.X is None:
        raise EmptyDataError(
            f"'{name}' has no expression matrix in X: store the expression there before "
            "saving (e.g. adata.X = adata.layers['counts'])."
        )
    n_cells, n_genes = adata.shape
    if n_cells == 0 or n_genes == 0:
        raise EmptyDataError(
            f"'{name}' has {n_cells:,} cells and {n_genes:,} genes: ACsleuth needs a non-empty "
            "cell × gene matrix. Check the right file or layer was given."
        )
    if n_cells == 1:
        raise EmptyDataError(
            f"'{name}' has only one cell: ACsleuth needs at least two cells (in practice "
            "hundreds). Check the table is not transposed (cells must be rows)."
        )


def _check_numeric(X, name: str) -> None:
    if np.dtype(X.dtype).kind not in "biuf":
        raise InputError(
            f"'{name}' holds {X.dtype} values, not numbers: ACsleuth needs a numeric expression matrix."
        )


def _check_unique(names: pd.Index, name: str, *, what: str) -> None:
    if names.is_unique:
        return
    duplicated = names[names.duplicated()].unique()
    examples = ", ".join(f"'{n}'" for n in duplicated[:MAX_EXAMPLES])
    fix = "obs_names_make_unique()" if what == "cell" else "var_names_make_unique()"
    raise DuplicateNamesError(
        f"'{name}' has {len(duplicated):,} {what} names used more than once (e.g. {examples}). "
        f"Make the {what} names unique: fix the file, or call adata.{fix} before passing the data."
    )


def _check_finite(X, name: str) -> None:
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.dtype.kind != "f":
        return
    n_nan = int(np.isnan(values).sum())
    n_inf = int(np.isinf(values).sum())
    if n_nan or n_inf:
        raise NonFiniteValuesError(
            f"'{name}' holds {n_nan:,} NaN (missing) and {n_inf:,} infinite values: ACsleuth "
            "needs a finite number for every cell and gene. Fill missing values (with 0 if they "
            "mean 'not detected') or remove the affected cells or genes."
        )


def _check_range(X, name: str) -> None:
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.size == 0:
        return
    largest = max(abs(float(values.max())), abs(float(values.min())))
    if largest <= MAX_VALUE:
        return
    too_large = abs(X) > MAX_VALUE
    n_cells = np.count_nonzero(too_large.getnnz(axis=1) if sparse.issparse(X) else too_large.any(axis=1))
    float32_max = float(np.finfo(np.float32).max)
    beyond = f", out of range for 32-bit floats (at most {float32_max:.3g})" if largest > float32_max else ""
    raise ValueRangeError(
        f"'{name}' holds values up to {largest:.3g} in {cell_count(n_cells)}{beyond}. Expression values "
        f"above {MAX_VALUE:,} (the largest whole number a 32-bit float holds exactly) are no "
        "measurement, and normalising them would turn those cells into nonsense. The file may be "
        "corrupt, or an overflow or missing-value code was stored as a number: check how it was "
        "made, or remove those cells."
    )


def _is_under(path: Path, roots: Sequence[str | os.PathLike]) -> bool:
    """Whether the resolved ``path`` lies in (or is) one of ``roots``."""
    return any(path.is_relative_to(Path(root).expanduser().resolve()) for root in roots)


def _is_readable(path: Path) -> bool:
    """A regular file this account can read, or a folder it can list."""
    if path.is_dir():
        return os.access(path, os.R_OK | os.X_OK)
    return path.is_file() and os.access(path, os.R_OK)


def _unreadable_server_path(typed: str, roots: Sequence[str | os.PathLike]) -> InputError:
    """The one message for a typed path that is missing, unreadable or outside ``roots``."""
    if not roots:
        return InputError(SERVER_PATHS_OFF)
    listed = ", ".join(str(Path(root).expanduser()) for root in roots)
    return InputError(
        f"Cannot read '{typed}' on the server: the path must name a readable file or folder inside "
        f"the folders ACsleuth may read here ({listed}). Check the spelling; the path is on the "
        "machine running ACsleuth, not on your own computer, so upload the file instead if it is "
        "only on yours, or ask whoever runs ACsleuth to allow its folder."
    )
