"""Look at what a data file declares before reading it.

An HDF5 file (``.h5ad``, 10x ``.h5``) may only hold its own data: an external
link, a dataset stored in an outside raw file or a virtual dataset would make
the reader return bytes of other files on the server, so such files are
refused. The sizes a file declares (HDF5 dataset shapes and sparse-matrix
shapes, the size line of a ``matrix.mtx``) are checked against
:func:`max_matrix_entries` before anything is allocated, so a small file that
declares a huge matrix is refused instead of exhausting the server's memory.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import h5py
import numpy as np

from .errors import ACsleuthError, FileFormatError, InputError, MatrixTooLargeError

#: most values one array may declare: cells × genes of a dense matrix, the stored
#: values of a sparse one, and its cells and its genes each; 500 million 32-bit
#: values take 2 GB. ``$ACSLEUTH_MAX_MATRIX_ENTRIES`` overrides it.
MAX_MATRIX_ENTRIES = 500_000_000
MAX_ENTRIES_VARIABLE = "ACSLEUTH_MAX_MATRIX_ENTRIES"
#: HDF5 attributes in which AnnData (and older h5sparse files) declare a sparse matrix's shape
SPARSE_SHAPE_ATTRIBUTES = ("shape", "h5sparse_shape")
#: bytes counted as one value: a wider item (text, records) counts once per 8 bytes
VALUE_BYTES = 8
MTX_HEADER_LINES = 1_000
MTX_LINE_CHARS = 4_096


def max_matrix_entries() -> int:
    """The limit in force: ``$ACSLEUTH_MAX_MATRIX_ENTRIES`` when set, else :data:`MAX_MATRIX_ENTRIES`."""
    text = os.environ.get(MAX_ENTRIES_VARIABLE, "").replace("_", "").replace(",", "").strip()
    if not text:
        return MAX_MATRIX_ENTRIES
    if not text.isdigit() or int(text) == 0:
        raise ACsleuthError(
            f"{MAX_ENTRIES_VARIABLE} must be a whole number of values above 0, not "
            f"{os.environ[MAX_ENTRIES_VARIABLE]!r}: fix or unset it."
        )
    return int(text)


def check_hdf5(path: Path) -> None:
    """Refuse an HDF5 file that reaches outside itself or declares arrays beyond the limit."""
    limit = max_matrix_entries()
    with h5py.File(path, "r") as f:
        # h5py stops visiting at the first link whose check returns something (an exception
        # raised inside its visit would leave h5py's lock in a bad state)
        problem = _group_problem(f, "/", path.name, limit) or f.visit_links(
            lambda name: _link_problem(f, name, path.name, limit)
        )
    if problem:
        raise problem


def check_mtx_header(path: Path) -> None:
    """Refuse a Matrix Market file whose size line declares more than the limit."""
    rows, columns, stored = _mtx_sizes(path)
    limit = max_matrix_entries()
    for count, what in ((rows, "genes"), (columns, "cells"), (stored, "stored values")):
        if count > limit:
            raise _too_large(path.name, f"{count:,} {what} in its header", limit)


def _link_problem(f: h5py.File, name: str, file_name: str, limit: int) -> InputError | None:
    link = f.get(name, getlink=True)
    if isinstance(link, h5py.SoftLink):
        return None  # points inside this file, whose objects are each checked through their hard link
    if not isinstance(link, h5py.HardLink):
        return _outside_error(file_name, name, "is a link to another file")
    item = f[name]
    if isinstance(item, h5py.Dataset):
        return _dataset_problem(item, name, file_name, limit)
    return _group_problem(item, name, file_name, limit)


def _dataset_problem(dataset: h5py.Dataset, name: str, file_name: str, limit: int) -> InputError | None:
    if dataset.is_virtual:
        return _outside_error(file_name, name, "is a virtual dataset assembled from other files")
    if dataset.external:
        return _outside_error(file_name, name, "is stored in a separate raw file")
    values = dataset.size * math.ceil(dataset.dtype.itemsize / VALUE_BYTES)
    if values > limit:
        return _too_large(file_name, f"{values:,} values ({_shape(dataset.shape)}) in '{name}'", limit)
    if name.rsplit("/", 1)[-1] == "shape" and dataset.size <= 2 and dataset.dtype.kind in "iu":
        return _dims_problem(np.atleast_1d(dataset[()]), name, file_name, limit)  # 10x: genes, cells
    return None


def _group_problem(group: h5py.Group, name: str, file_name: str, limit: int) -> InputError | None:
    shapes = [np.atleast_1d(group.attrs[a]) for a in SPARSE_SHAPE_ATTRIBUTES if a in group.attrs]
    return next((p for dims in shapes if (p := _dims_problem(dims, name, file_name, limit))), None)


def _dims_problem(dims: np.ndarray, name: str, file_name: str, limit: int) -> InputError | None:
    if any(int(d) > limit for d in dims):
        return _too_large(file_name, f"a {_shape(dims)} matrix in '{name}'", limit)
    return None


def _shape(dims) -> str:
    return " × ".join(f"{int(d):,}" for d in dims)


def _too_large(file_name: str, what: str, limit: int) -> MatrixTooLargeError:
    return MatrixTooLargeError(
        f"'{file_name}' declares {what}, more than the {limit:,} ACsleuth reads in one array. Give "
        "fewer cells or genes (or store the matrix sparse), or, if this server has the memory, raise "
        f"the limit with the environment variable {MAX_ENTRIES_VARIABLE}."
    )


def _outside_error(file_name: str, name: str, how: str) -> FileFormatError:
    return FileFormatError(
        f"'{file_name}' is refused: its array '{name}' {how}, so reading it would read data from "
        "outside the file. ACsleuth reads only self-contained files: save the data again as a "
        "plain .h5ad (e.g. adata.write_h5ad after loading it yourself)."
    )


def _mtx_sizes(path: Path) -> tuple[int, int, int]:
    """(rows, columns, stored values) from the size line; a dense array stores rows × columns."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="ascii", errors="replace") as handle:
        banner = handle.readline(MTX_LINE_CHARS).lower().split()
        if banner[:2] != ["%%matrixmarket", "matrix"] or len(banner) < 3:
            raise _mtx_error(path, "does not start with a %%MatrixMarket matrix line")
        for _ in range(MTX_HEADER_LINES):
            line = handle.readline(MTX_LINE_CHARS).strip()
            if line and not line.startswith("%"):
                break
        else:
            raise _mtx_error(path, "has no size line after its comments")
    numbers = line.split()
    wanted = 3 if banner[2] == "coordinate" else 2
    if len(numbers) != wanted or not all(n.isdigit() for n in numbers):
        raise _mtx_error(path, f"has a size line '{line[:80]}' instead of {wanted} whole numbers")
    rows, columns = int(numbers[0]), int(numbers[1])
    return rows, columns, int(numbers[2]) if wanted == 3 else rows * columns


def _mtx_error(path: Path, problem: str) -> FileFormatError:
    return FileFormatError(
        f"'{path.name}' {problem}, so it is not a Matrix Market file: check it, or copy "
        "matrix.mtx[.gz] again from the Cell Ranger output."
    )
