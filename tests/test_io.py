import gzip
import os
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
from scipy import sparse

from acsleuth_core.errors import (
    DuplicateNamesError,
    EmptyDataError,
    FileFormatError,
    FileTooLargeError,
    InputError,
    NonFiniteValuesError,
)
from acsleuth_core.io import TABLE_CHUNK_ROWS, check_server_path, data_roots, read_cells, validate_matrix

CELLS = [f"cell{i}" for i in range(6)]
GENES = ["CD3E", "MS4A1", "LYZ", "NKG7"]
COUNTS = np.array(
    [[1, 0, 3, 0], [0, 2, 0, 1], [4, 0, 0, 0], [0, 0, 5, 2], [1, 1, 0, 0], [0, 3, 1, 0]],
    dtype=float,
)
COUNTS.setflags(write=False)


def _table() -> pd.DataFrame:
    return pd.DataFrame(COUNTS.copy(), index=CELLS, columns=GENES)


def _assert_is_the_test_matrix(adata: ad.AnnData) -> None:
    assert sparse.isspmatrix_csr(adata.X)
    assert adata.X.dtype == np.float32
    assert list(adata.obs_names) == CELLS
    assert list(adata.var_names) == GENES
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS)


def _gzip(path):
    gz = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return gz


def _write_10x_folder(folder, genes=GENES, feature_types=None, gzipped=True):
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", sparse.coo_matrix(COUNTS.T))
    types = feature_types or ["Gene Expression"] * len(genes)
    features = pd.DataFrame({"id": [f"ENSG{i:011d}" for i in range(len(genes))], "name": genes, "type": types})
    features.to_csv(folder / "features.tsv", sep="\t", header=False, index=False)
    pd.Series(CELLS).to_csv(folder / "barcodes.tsv", header=False, index=False)
    if gzipped:
        for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
            _gzip(folder / name)
    return folder


def _write_10x_h5(path, genes=GENES):
    by_cell = sparse.csr_matrix(COUNTS)
    with h5py.File(path, "w") as f:
        matrix = f.create_group("matrix")
        matrix["barcodes"] = np.array(CELLS, dtype="S")
        matrix["data"] = by_cell.data.astype(np.int32)
        matrix["indices"] = by_cell.indices.astype(np.int64)
        matrix["indptr"] = by_cell.indptr.astype(np.int64)
        matrix["shape"] = np.array([len(genes), len(CELLS)], dtype=np.int32)
        features = matrix.create_group("features")
        features["id"] = np.array([f"ENSG{i:011d}" for i in range(len(genes))], dtype="S")
        features["name"] = np.array(genes, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
    return path


# --- formats that read -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sep"),
    [("cells.csv", ","), ("cells.csv.gz", ","), ("cells.tsv", "\t"), ("cells.txt", "\t"), ("cells.txt.gz", " ")],
)
def test_tables_are_read_with_cells_as_rows(tmp_path, name, sep):
    path = tmp_path / name
    _table().to_csv(path, sep=sep)
    _assert_is_the_test_matrix(read_cells(path))


def test_table_header_may_leave_out_the_cell_name_column(tmp_path):
    path = tmp_path / "r_style.tsv"
    lines = ["\t".join(GENES)] + ["\t".join([c, *map(str, row)]) for c, row in zip(CELLS, COUNTS)]
    path.write_text("\n".join(lines) + "\n")
    _assert_is_the_test_matrix(read_cells(path))


def test_h5ad_is_read_and_made_sparse_float32(tmp_path):
    path = tmp_path / "cells.h5ad"
    ad.AnnData(COUNTS, obs=pd.DataFrame(index=CELLS), var=pd.DataFrame(index=GENES)).write_h5ad(path)
    _assert_is_the_test_matrix(read_cells(path))


@pytest.mark.parametrize("gzipped", [True, False])
def test_10x_matrix_folder_is_read(tmp_path, gzipped):
    folder = _write_10x_folder(tmp_path / "filtered_feature_bc_matrix", gzipped=gzipped)
    adata = read_cells(folder)
    _assert_is_the_test_matrix(adata)
    assert adata.var["gene_ids"].iloc[0] == "ENSG00000000000"


def test_10x_matrix_file_path_reads_its_folder(tmp_path):
    folder = _write_10x_folder(tmp_path / "sample")
    _assert_is_the_test_matrix(read_cells(folder / "matrix.mtx.gz"))


def test_10x_folder_keeps_only_gene_expression_and_makes_symbols_unique(tmp_path):
    genes = ["CD3E", "CD3E", "LYZ", "CD4_TotalSeqB"]
    types = ["Gene Expression"] * 3 + ["Antibody Capture"]
    adata = read_cells(_write_10x_folder(tmp_path / "sample", genes=genes, feature_types=types))
    assert list(adata.var_names) == ["CD3E", "CD3E-1", "LYZ"]


def test_10x_h5_is_read_and_duplicate_symbols_made_unique(tmp_path):
    adata = read_cells(_write_10x_h5(tmp_path / "filtered.h5", genes=["CD3E", "CD3E", "LYZ", "NKG7"]))
    assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == CELLS
    assert list(adata.var_names) == ["CD3E", "CD3E-1", "LYZ", "NKG7"]
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS)


def test_size_limit_lets_small_files_through(tmp_path):
    path = tmp_path / "cells.csv"
    _table().to_csv(path)
    _assert_is_the_test_matrix(read_cells(path, max_bytes=10_000))


# --- bad inputs ----------------------------------------------------------------


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        read_cells(tmp_path / "nowhere.h5ad")
    assert "nowhere.h5ad" in str(err.value)


def test_unknown_extension_lists_accepted_formats(tmp_path):
    path = tmp_path / "cells.xlsx"
    path.write_bytes(b"not really excel")
    with pytest.raises(FileFormatError) as err:
        read_cells(path)
    message = str(err.value)
    assert "cells.xlsx" in message
    assert all(fmt in message for fmt in (".h5ad", ".h5", "matrix.mtx", ".csv"))


def test_file_over_the_size_limit_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / "big.csv"
    _table().to_csv(path)
    with pytest.raises(FileTooLargeError) as err:
        read_cells(path, max_bytes=50)
    message = str(err.value)
    assert "big.csv" in message and "50 bytes" in message
    assert "path on the server" in message and "limit setting" in message


@pytest.mark.parametrize("name", ["broken.h5ad", "broken.h5", "broken.csv.gz"])
def test_corrupt_file_is_reported_as_unreadable(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01garbage that is no HDF5 and no gzip\xff" * 10)
    with pytest.raises(FileFormatError, match="could not be read") as err:
        read_cells(path)
    assert name in str(err.value) and "corrupt" in str(err.value)


def test_10x_folder_without_barcodes_names_the_missing_file(tmp_path):
    folder = _write_10x_folder(tmp_path / "sample")
    (folder / "barcodes.tsv.gz").unlink()
    with pytest.raises(FileFormatError, match="barcodes.tsv"):
        read_cells(folder)


def test_folder_that_is_not_10x_is_refused(tmp_path):
    (tmp_path / "misc").mkdir()
    with pytest.raises(FileFormatError, match="not a 10x"):
        read_cells(tmp_path / "misc")


@pytest.mark.parametrize("content", ["", ",CD3E,LYZ\n"])
def test_table_without_cells_is_empty(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(EmptyDataError, match="no cells") as err:
        read_cells(path)
    assert "empty.csv" in str(err.value)


def test_table_without_genes_is_empty(tmp_path):
    path = tmp_path / "names_only.csv"
    path.write_text("cell\n" + "\n".join(CELLS) + "\n")
    with pytest.raises(EmptyDataError, match="0 genes"):
        read_cells(path)


def test_single_cell_is_refused(tmp_path):
    path = tmp_path / "one.csv"
    _table().iloc[:1].to_csv(path)
    with pytest.raises(EmptyDataError, match="only one cell"):
        read_cells(path)


def test_missing_values_are_counted(tmp_path):
    path = tmp_path / "holes.csv"
    table = _table()
    table.iloc[0, 1] = np.nan
    table.iloc[2, 3] = np.nan
    table.to_csv(path)
    with pytest.raises(NonFiniteValuesError, match="2 NaN") as err:
        read_cells(path)
    assert "holes.csv" in str(err.value)


def test_infinite_values_are_counted(tmp_path):
    path = tmp_path / "inf.csv"
    table = _table()
    table.iloc[1, 1] = np.inf
    table.to_csv(path)
    with pytest.raises(NonFiniteValuesError, match="1 infinite"):
        read_cells(path)


def test_duplicate_cell_names_are_shown_with_the_fix(tmp_path):
    path = tmp_path / "dup_cells.csv"
    table = _table()
    table.index = ["a", "b", "a", "c", "d", "b"]
    table.to_csv(path)
    with pytest.raises(DuplicateNamesError) as err:
        read_cells(path)
    message = str(err.value)
    assert "2 cell names" in message and "'a'" in message and "'b'" in message
    assert "obs_names_make_unique" in message and "dup_cells.csv" in message


def test_duplicate_gene_names_in_a_table_are_not_renamed_silently(tmp_path):
    path = tmp_path / "dup_genes.csv"
    table = _table()
    table.columns = ["CD3E", "LYZ", "CD3E", "NKG7"]
    table.to_csv(path)
    with pytest.raises(DuplicateNamesError) as err:
        read_cells(path)
    assert "gene names" in str(err.value) and "'CD3E'" in str(err.value)
    assert "var_names_make_unique" in str(err.value)


def test_non_numeric_table_values_point_at_the_culprit(tmp_path):
    path = tmp_path / "annotated.csv"
    table = _table()
    table.insert(2, "cell_type", ["T", "B", "mono", "NK", "T", "B"])
    table.to_csv(path)
    with pytest.raises(FileFormatError, match="not numbers") as err:
        read_cells(path)
    assert "column 4" in str(err.value) and "data row 1" in str(err.value) and "annotated.csv" in str(err.value)


SECRET = "hunter2-secret"


def test_text_in_a_table_is_located_but_never_quoted(tmp_path):
    path = tmp_path / "passwords.csv"
    rows = [f"c{i},{i},{i}" for i in range(TABLE_CHUNK_ROWS + 2)] + [f"{SECRET}-row,1,{SECRET}"]
    path.write_text("\n".join([f"site,user,{SECRET}-column", *rows]) + "\n")
    with pytest.raises(FileFormatError, match="not numbers") as err:
        read_cells(path)
    assert SECRET not in str(err.value)
    assert f"column 3, counting the cell names as column 1, data row {TABLE_CHUNK_ROWS + 3}" in str(err.value)


def test_a_reader_failure_never_quotes_the_file(tmp_path):
    """anndata's own message would name the unknown encoding stored in the file."""
    path = tmp_path / "odd.h5ad"
    _adata(COUNTS).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["obs"].attrs["encoding-type"] = SECRET
    with pytest.raises(FileFormatError, match="could not be read as an AnnData file") as err:
        read_cells(path)
    assert SECRET not in str(err.value)


# --- validate_matrix on objects built in Python ----------------------------------


def _adata(X) -> ad.AnnData:
    return ad.AnnData(X, obs=pd.DataFrame(index=CELLS[: X.shape[0]]), var=pd.DataFrame(index=GENES[: X.shape[1]]))


def test_valid_matrix_passes_and_is_left_alone():
    adata = _adata(sparse.csr_matrix(COUNTS))
    before = adata.X.copy()
    validate_matrix(adata, name="mine")
    assert (adata.X != before).nnz == 0


@pytest.mark.parametrize(
    ("X", "error", "words"),
    [
        (np.zeros((0, 4)), EmptyDataError, "0 cells"),
        (COUNTS[:1], EmptyDataError, "only one cell"),
        (np.where(COUNTS > 3, np.nan, COUNTS), NonFiniteValuesError, "2 NaN"),
        (sparse.csr_matrix(np.where(COUNTS == 5, np.inf, COUNTS)), NonFiniteValuesError, "1 infinite"),
    ],
)
def test_in_memory_data_get_the_same_checks(X, error, words):
    with pytest.raises(error, match=words) as err:
        validate_matrix(_adata(X), name="mine")
    assert "'mine'" in str(err.value)


def test_in_memory_duplicate_gene_names_are_refused():
    adata = _adata(COUNTS)
    adata.var_names = ["CD3E", "CD3E", "LYZ", "LYZ"]
    with pytest.raises(DuplicateNamesError, match="2 gene names"):
        validate_matrix(adata, name="mine")


# --- paths typed into the app ----------------------------------------------------


def test_server_path_is_resolved_and_accepted(tmp_path):
    path = tmp_path / "cells.csv"
    _table().to_csv(path)
    assert check_server_path(f'  "{tmp_path}/./cells.csv" ', [tmp_path]) == path.resolve()


def test_server_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _table().to_csv(tmp_path / "cells.csv")
    assert check_server_path("~/cells.csv", ["~"]) == (tmp_path / "cells.csv").resolve()


def test_server_path_accepts_a_10x_folder(tmp_path):
    folder = _write_10x_folder(tmp_path / "sample")
    assert check_server_path(str(folder), [tmp_path]) == folder.resolve()


def _refusal(text: str, roots) -> str:
    with pytest.raises(InputError) as err:
        check_server_path(text, roots)
    return str(err.value)


def test_missing_unreadable_and_forbidden_server_paths_get_one_message(tmp_path, monkeypatch):
    """Which of the three it is would tell a user what exists on the server."""
    (tmp_path / "data").mkdir()
    (tmp_path / "private").mkdir()
    _table().to_csv(tmp_path / "private" / "cells.csv")
    _table().to_csv(tmp_path / "data" / "locked.csv")
    roots = [tmp_path / "data"]
    missing = _refusal(str(tmp_path / "data" / "x.csv"), roots)
    outside = _refusal(str(tmp_path / "data" / ".." / "private" / "cells.csv"), roots)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked.csv")
    unreadable = _refusal(str(tmp_path / "data" / "locked.csv"), roots)
    assert "Cannot read" in missing and str(tmp_path / "data") in missing
    typed = [str(tmp_path / "data" / "x.csv"), str(tmp_path / "data" / ".." / "private" / "cells.csv"), str(tmp_path / "data" / "locked.csv")]
    assert missing.replace(typed[0], "P") == outside.replace(typed[1], "P") == unreadable.replace(typed[2], "P")


def test_symlink_escaping_allowed_roots_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    _table().to_csv(tmp_path / "secret.csv")
    (tmp_path / "data" / "link.csv").symlink_to(tmp_path / "secret.csv")
    message = _refusal(str(tmp_path / "data" / "link.csv"), [tmp_path / "data"])
    assert "Cannot read" in message and "secret" not in message


def test_server_paths_are_off_without_roots(tmp_path):
    _table().to_csv(tmp_path / "cells.csv")
    assert "ACSLEUTH_DATA_ROOTS" in _refusal(str(tmp_path / "cells.csv"), [])


def test_server_path_to_unsupported_file_or_plain_folder_is_refused(tmp_path):
    (tmp_path / "notes.docx").write_text("hello")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileFormatError, match="not a format"):
        check_server_path(str(tmp_path / "notes.docx"), [tmp_path])
    with pytest.raises(FileFormatError, match="not a 10x"):
        check_server_path(str(tmp_path / "plain"), [tmp_path])


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1", "::1", "[::1]"])
def test_data_roots_of_a_local_server_are_home_and_the_working_folder(tmp_path, monkeypatch, address):
    monkeypatch.delenv("ACSLEUTH_DATA_ROOTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert data_roots(address) == [(tmp_path / "home").resolve(), tmp_path.resolve()]


@pytest.mark.parametrize("address", ["0.0.0.0", "192.168.1.5", "::", None])
def test_data_roots_of_a_network_server_are_none(monkeypatch, address):
    monkeypatch.delenv("ACSLEUTH_DATA_ROOTS", raising=False)
    assert data_roots(address) == []


def test_data_roots_setting_wins_on_any_address(tmp_path, monkeypatch):
    monkeypatch.setenv("ACSLEUTH_DATA_ROOTS", f"{tmp_path / 'a'}{os.pathsep} {tmp_path / 'b'} {os.pathsep}")
    expected = [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert data_roots("0.0.0.0") == expected and data_roots("localhost") == expected


def test_empty_server_path_is_refused():
    with pytest.raises(InputError, match="No path"):
        check_server_path("   ", [])
