"""Hostile or broken input files: refused with a clear message, before they can do harm."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from acsleuth_core.cli import main
from acsleuth_core.errors import FileFormatError
from acsleuth_core.io import read_cells

#: a value no test matrix holds, so its bytes would show in anything read from the secret file
SECRET_VALUE = 1234.5


def _small_adata(n_cells: int = 4, n_genes: int = 3) -> ad.AnnData:
    X = np.arange(1, n_cells * n_genes + 1, dtype=np.float32).reshape(n_cells, n_genes)
    return ad.AnnData(
        X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    )


def _replace_x(path, make):
    """Swap the dense X of the .h5ad at ``path`` for what ``make(file)`` creates, keeping X's attributes."""
    with h5py.File(path, "a") as f:
        attributes = dict(f["X"].attrs)
        del f["X"]
        made = make(f)
        for key, value in attributes.items():
            made.attrs[key] = value


@pytest.fixture
def secret(tmp_path):
    """A file on the server that no upload may read: 4 × 3 float32 values."""
    path = tmp_path / "secret.bin"
    path.write_bytes(np.full(12, SECRET_VALUE, dtype=np.float32).tobytes())
    return path


def _external_raw(f, secret):
    return f.create_dataset("X", shape=(4, 3), dtype=np.float32, external=[(str(secret), 0, 48)])


def _external_link(f, secret):
    other = secret.with_name("other.h5ad")
    adata = _small_adata()
    adata.X = np.full((4, 3), SECRET_VALUE, dtype=np.float32)
    adata.write_h5ad(other)
    f["X"] = h5py.ExternalLink(str(other), "/X")
    return f["X"]


def _virtual(f, secret):
    layout = h5py.VirtualLayout(shape=(4, 3), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(secret.with_name("other.h5ad")), "X", shape=(4, 3))
    _small_adata().write_h5ad(secret.with_name("other.h5ad"))
    return f.create_virtual_dataset("X", layout)


@pytest.mark.parametrize(
    ("make", "words"),
    [(_external_raw, "separate raw file"), (_external_link, "link to another file"), (_virtual, "virtual dataset")],
)
def test_h5ad_reaching_outside_itself_is_refused_before_reading(tmp_path, secret, make, words):
    path = tmp_path / "hostile.h5ad"
    _small_adata().write_h5ad(path)
    _replace_x(path, lambda f: make(f, secret))
    with pytest.raises(FileFormatError, match=words) as err:
        read_cells(path)
    assert "hostile.h5ad" in str(err.value) and "self-contained" in str(err.value)
    assert str(SECRET_VALUE) not in str(err.value)


def test_10x_h5_with_data_in_a_raw_file_is_refused(tmp_path, secret):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        matrix = f.create_group("matrix")
        matrix["barcodes"] = np.array([b"c0", b"c1", b"c2"])
        matrix.create_dataset("data", shape=(12,), dtype=np.float32, external=[(str(secret), 0, 48)])
        matrix["indices"] = np.tile(np.arange(4), 3)
        matrix["indptr"] = np.array([0, 4, 8, 12])
        matrix["shape"] = np.array([4, 3], dtype=np.int32)
        features = matrix.create_group("features")
        for field in ("id", "name"):
            features[field] = np.array([b"A", b"B", b"C", b"D"])
        features["feature_type"] = np.array([b"Gene Expression"] * 4)
    with pytest.raises(FileFormatError, match="separate raw file"):
        read_cells(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acsleuth: error: "), err
    return lines[0]


def test_cli_refuses_an_h5ad_with_an_external_link_in_one_line(tmp_path, secret, capsys):
    path = tmp_path / "hostile.h5ad"
    _small_adata().write_h5ad(path)
    _replace_x(path, lambda f: _external_link(f, secret))
    out = tmp_path / "out.h5ad"
    assert main(["run", "--reference", str(path), "--target", str(path), "--out", str(out)]) == 2
    assert "link to another file" in _one_error_line(capsys)
    assert not out.exists()
