"""Look at what a data file declares before reading it.

An HDF5 file (``.h5ad``, 10x ``.h5``) may only hold its own data: an external
link, a dataset stored in an outside raw file or a virtual dataset would make
the reader return bytes of other files on the server, so such files are
refused.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from .errors import FileFormatError


def check_hdf5(path: Path) -> None:
    """Refuse an HDF5 file that reaches outside itself."""
    with h5py.File(path, "r") as f:
        # h5py stops visiting at the first link whose check returns something (an exception
        # raised inside its visit would leave h5py's lock in a bad state)
        problem = f.visit_links(lambda name: _link_problem(f, name, path.name))
    if problem:
        raise problem


def _link_problem(f: h5py.File, name: str, file_name: str) -> FileFormatError | None:
    link = f.get(name, getlink=True)
    if isinstance(link, h5py.SoftLink):
        return None  # points inside this file, whose objects are each checked through their hard link
    if not isinstance(link, h5py.HardLink):
        return _outside_error(file_name, name, "is a link to another file")
    item = f[name]
    return _dataset_problem(item, name, file_name) if isinstance(item, h5py.Dataset) else None


def _dataset_problem(dataset: h5py.Dataset, name: str, file_name: str) -> FileFormatError | None:
    if dataset.is_virtual:
        return _outside_error(file_name, name, "is a virtual dataset assembled from other files")
    if dataset.external:
        return _outside_error(file_name, name, "is stored in a separate raw file")
    return None


def _outside_error(file_name: str, name: str, how: str) -> FileFormatError:
    return FileFormatError(
        f"'{file_name}' is refused: its array '{name}' {how}, so reading it would read data from "
        "outside the file. ACsleuth reads only self-contained files: save the data again as a "
        "plain .h5ad (e.g. adata.write_h5ad after loading it yourself)."
    )
