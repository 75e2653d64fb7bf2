"""Hostile or broken input files: refused with a clear message, before they can do harm."""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import streamlit as st
from scipy import sparse
from streamlit.testing.v1 import AppTest

from acsleuth_core import cli, io, preprocess
from acsleuth_core.cli import main
from acsleuth_core.detect import CALIBRATION_FILE, CONFIG_FILE, WEIGHTS_FILE, DetectorConfig
from acsleuth_core.errors import ACsleuthError, FileFormatError, MatrixTooLargeError, ValueRangeError
from acsleuth_core.io import dataset_names, read_cells
from acsleuth_core.preflight import MAX_MATRIX_ENTRIES
from acsleuth_core.summary import describe_inputs

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


def _secret_h5ad(secret) -> str:
    """Another HDF5 file on the server holding the secret values in its X."""
    other = secret.with_name("other.h5ad")
    adata = _small_adata()
    adata.X = np.full((4, 3), SECRET_VALUE, dtype=np.float32)
    adata.write_h5ad(other)
    return str(other)


def _external_link(f, secret):
    f["X"] = h5py.ExternalLink(_secret_h5ad(secret), "/X")
    return f["X"]


def _virtual(f, secret):
    layout = h5py.VirtualLayout(shape=(4, 3), dtype=np.float32)
    layout[:] = h5py.VirtualSource(_secret_h5ad(secret), "X", shape=(4, 3))
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


# --- memory bombs: small files declaring huge matrices -------------------------------------

#: the peak a refused bomb may reach: far below what reading any of them would take (3.4 GB and up)
BOMB_PEAK_LIMIT_MB = 1536
#: address space the reading process may reserve, so a bomb that got through fails fast instead of
#: eating the shared machine's memory (importing the readers alone reserves about 1 GB)
CHILD_ADDRESS_SPACE = 3 * 2**30
READ_IN_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from acsleuth_core.io import dataset_names, read_cells
try:
    read_cells(sys.argv[1])
    outcome = {{"error": None, "message": ""}}
except Exception as error:
    outcome = {{"error": type(error).__name__, "message": str(error)}}
# VmHWM: this process's own peak resident memory (ru_maxrss would start from the parent's at the fork)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
outcome["peak_mb"] = peak_kb / 1024
print(json.dumps(outcome))
"""


def _read_in_child(path) -> dict:
    """read_cells(path) in a fresh process: the error it raised and the process's peak resident memory."""
    script = READ_IN_CHILD.format(limit=CHILD_ADDRESS_SPACE)
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _dense_bomb(path):
    _small_adata().write_h5ad(path)
    _replace_x(path, lambda f: f.create_dataset("X", shape=(30_000, 30_000), dtype=np.float32))  # never written


def _nnz_bomb(path):
    adata = _small_adata()
    adata.X = sparse.csr_matrix(adata.X)
    adata.write_h5ad(path)
    with h5py.File(path, "a") as f:
        for name, dtype in (("data", np.float32), ("indices", np.int64)):
            del f["X"][name]
            f["X"].create_dataset(name, shape=(3_000_000_000,), dtype=dtype)


def _shape_bomb(path):
    adata = _small_adata()
    adata.X = sparse.csr_matrix(adata.X)
    adata.write_h5ad(path)
    with h5py.File(path, "a") as f:
        f["X"].attrs["shape"] = np.array([2_000_000_000, 2_000_000_000])


def _mtx_bomb(path):
    path.mkdir()
    (path / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n%\n3 2000000000 2\n1 1 5\n2 7 3\n")
    (path / "features.tsv").write_text("".join(f"ENSG{i}\tG{i}\tGene Expression\n" for i in range(3)))
    (path / "barcodes.tsv").write_text("AAAC-1\nAAAG-1\n")


@pytest.mark.parametrize(
    ("make", "name", "declared"),
    [
        (_dense_bomb, "dense.h5ad", "900,000,000 values (30,000 × 30,000) in 'X'"),
        (_nnz_bomb, "nnz.h5ad", "3,000,000,000 values (3,000,000,000) in 'X/data'"),
        (_shape_bomb, "shape.h5ad", "a 2,000,000,000 × 2,000,000,000 matrix in 'X'"),
        (_mtx_bomb, "sample", "2,000,000,000 cells in its header"),
    ],
)
def test_a_declared_huge_matrix_is_refused_before_memory_is_spent(tmp_path, make, name, declared):
    path = tmp_path / name
    make(path)
    outcome = _read_in_child(path)
    assert outcome["error"] == "MatrixTooLargeError", outcome
    assert declared in outcome["message"] and f"{MAX_MATRIX_ENTRIES:,}" in outcome["message"]
    assert "ACSLEUTH_MAX_MATRIX_ENTRIES" in outcome["message"]
    assert outcome["peak_mb"] < BOMB_PEAK_LIMIT_MB, outcome


def test_cli_refuses_a_matrix_bomb_in_one_line(tmp_path, capsys):
    _mtx_bomb(tmp_path / "sample")
    out = tmp_path / "out.h5ad"
    args = ["run", "--reference", str(tmp_path / "sample"), "--target", str(tmp_path / "sample"), "--out", str(out)]
    assert main(args) == 2
    assert "2,000,000,000 cells" in _one_error_line(capsys)
    assert not out.exists()


def test_the_limit_is_set_by_an_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "small.h5ad"
    _small_adata().write_h5ad(path)
    monkeypatch.setenv("ACSLEUTH_MAX_MATRIX_ENTRIES", "11")
    with pytest.raises(MatrixTooLargeError, match="12 values"):
        read_cells(path)
    monkeypatch.setenv("ACSLEUTH_MAX_MATRIX_ENTRIES", "12")
    assert read_cells(path).shape == (4, 3)
    monkeypatch.setenv("ACSLEUTH_MAX_MATRIX_ENTRIES", "lots")
    with pytest.raises(ACsleuthError, match="ACSLEUTH_MAX_MATRIX_ENTRIES must be a whole number"):
        read_cells(path)


def _out_of_memory(*args, **kwargs):
    raise MemoryError


def test_running_out_of_memory_while_reading_is_an_input_error(tmp_path, monkeypatch):
    path = tmp_path / "big.h5ad"
    _small_adata().write_h5ad(path)
    monkeypatch.setattr(io.ad, "read_h5ad", _out_of_memory)
    with pytest.raises(MatrixTooLargeError, match="not enough memory to read 'big.h5ad'"):
        read_cells(path)


def test_running_out_of_memory_while_preparing_is_an_input_error(monkeypatch):
    monkeypatch.setattr(preprocess.sc.pp, "normalize_total", _out_of_memory)
    counts = _small_adata(n_cells=6, n_genes=300)
    with pytest.raises(MatrixTooLargeError, match="not enough memory to prepare the reference and targets"):
        preprocess.prepare(counts, {"t": counts.copy()}, n_hvg="all")


# --- silent nonsense: values no measurement holds --------------------------------------------


def _counts(n_cells: int = 8, n_genes: int = 300, seed: int = 0, prefix: str = "c") -> ad.AnnData:
    X = np.random.default_rng(seed).poisson(1.0, (n_cells, n_genes)).astype(np.float32)
    return ad.AnnData(
        X, obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


def test_values_that_overflow_float32_cell_sums_are_refused_not_normalised_to_zero(tmp_path):
    """Two values near 3e38 in a cell make its float32 total infinite: every value became 0 after normalising."""
    path = tmp_path / "overflow.h5ad"
    adata = _counts()
    adata.X[[1, 4], :2] = 3e38
    adata.write_h5ad(path)
    with pytest.raises(ValueRangeError, match="holds values up to 3e[+]38 in 2 cells") as err:
        read_cells(path)
    assert "overflow.h5ad" in str(err.value) and "out of range" not in str(err.value)


def test_a_count_of_2_to_the_62_is_refused_when_prepared(tmp_path):
    target = _counts(prefix="t")
    target.X = target.X.astype(np.int64)
    target.X[3, 7] = 2**62
    with pytest.raises(ValueRangeError, match="up to 4.61e[+]18 in 1 cell[.]") as err:
        preprocess.prepare(_counts(seed=1), {"sample": target}, n_hvg="all")
    assert "'sample'" in str(err.value) and "16,777,216" in str(err.value)


def test_a_value_beyond_float32_is_named_out_of_range_not_infinite(tmp_path, capsys):
    path = tmp_path / "huge.csv"
    table = _counts().to_df().astype(np.float64)
    table.iloc[5, 2] = 1e39
    table.to_csv(path)
    with pytest.raises(ValueRangeError, match="1e[+]39 in 1 cell, out of range for 32-bit floats") as err:
        read_cells(path)
    assert "infinite" not in str(err.value)
    assert main(["run", "--reference", str(path), "--target", str(path), "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "out of range for 32-bit floats" in _one_error_line(capsys)


# --- usable but misleading: warned about, with the number of cells --------------------------


def _with_empty_cells(n_empty: int) -> ad.AnnData:
    target = _counts(n_cells=60, prefix="t")
    target.X[:n_empty] = 0
    return target


def test_cells_without_expression_and_tiny_targets_are_warned_about_with_their_numbers():
    targets = {"empty3": _with_empty_cells(3), "pair": _counts(n_cells=2, prefix="p")}
    warnings = preprocess.input_warnings(_counts(), targets)
    assert len(warnings) == 2
    assert warnings[0].startswith("'empty3': 3 cells of 60 have no expression at all")
    assert warnings[1].startswith("Target 'pair' has only 2 cells: too few to call anomalies reliably")
    assert describe_inputs(_counts(), targets).warnings == warnings  # what the Data page shows


def test_a_sound_input_gets_no_warning_and_an_all_zero_one_is_refused():
    assert preprocess.input_warnings(_counts(), {"t": _counts(n_cells=60, prefix="t")}) == []
    with pytest.raises(ACsleuthError, match="holds only zeros"):
        preprocess.prepare(_counts(), {"zeros": _with_empty_cells(60)}, n_hvg="all")


def test_cli_prints_the_warnings_before_training(tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise ACsleuthError("stopped before training")

    monkeypatch.setattr(cli, "detect_anomalies", stop)
    _counts().write_h5ad(tmp_path / "reference.h5ad")
    _counts(n_cells=2, prefix="p").write_h5ad(tmp_path / "pair.h5ad")
    code = main([
        "run", "--reference", str(tmp_path / "reference.h5ad"), "--target", str(tmp_path / "pair.h5ad"),
        "--out", str(tmp_path / "o.h5ad"),
    ])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("acsleuth: warning: Target 'pair' has only 2 cells: too few to call anomalies reliably")
    assert lines[1] == "acsleuth: error: stopped before training"


# --- the command line: refuse before any work, in one line ----------------------------------


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if the CLI reads any input: what is refused must be refused before that."""

    def never(path):
        raise AssertionError(f"{path} was read before the refusal")

    monkeypatch.setattr(cli, "read_cells", never)


#: a folder the file system refuses to write into, though permission bits let root (and os.access) through
READ_ONLY_FOLDER = "/sys"


@pytest.mark.skipif(not os.path.isdir(READ_ONLY_FOLDER), reason="needs Linux's /sys")
@pytest.mark.parametrize("option", ["--out", "--table", "--save-model"])
def test_an_output_place_the_file_system_refuses_is_caught_before_any_work(tmp_path, capsys, no_reading, option):
    places = {"--out": "o.h5ad", "--table": "cells.csv", "--save-model": "model"}
    args = {"--out": str(tmp_path / "o.h5ad")} | {option: f"{READ_ONLY_FOLDER}/acsleuth-out/{places[option]}"}
    code = main(["run", "--reference", "ref.h5ad", "--target", "t.h5ad", *[x for kv in args.items() for x in kv]])
    assert code == 2
    assert f"{READ_ONLY_FOLDER} is not a writable folder" in _one_error_line(capsys)


def _saved_model_files(folder, config="{}", weights=b"not torch", calibration=b"not numpy"):
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(config)
    (folder / WEIGHTS_FILE).write_bytes(weights)
    (folder / CALIBRATION_FILE).write_bytes(calibration)
    return folder


@pytest.mark.parametrize(
    ("config", "cause"),
    [
        ("{not json", "JSONDecodeError"),
        (json.dumps({"name": "a model of another tool"}), "KeyError"),
        (json.dumps({"config": DetectorConfig().to_json(), "genes": ["g0"]}), "UnpicklingError"),
    ],
    ids=["corrupt-json", "foreign-json", "corrupt-weights"],
)
def test_a_corrupt_or_foreign_model_folder_is_one_model_error_line(tmp_path, capsys, no_reading, config, cause):
    model = _saved_model_files(tmp_path / "model", config=config)
    code = main(["run", "--reference", "r.h5ad", "--target", "t.h5ad", "--out", str(tmp_path / "o.h5ad"), "--model", str(model)])
    assert code == 2
    line = _one_error_line(capsys)
    assert f"{model} holds a model ACsleuth cannot load ({cause}" in line and "Train a new model" in line


def test_training_options_given_with_a_model_are_named_as_ignored(tmp_path, capsys, no_reading):
    model = _saved_model_files(tmp_path / "model", config="{not json")
    code = main([
        "run", "--reference", "r.h5ad", "--target", "t.h5ad", "--out", str(tmp_path / "o.h5ad"), "--model", str(model),
        "--epochs", "5", "--hvg", "all", "--seed", "2",
    ])
    assert code == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("acsleuth: warning: --epochs, --hvg only shape training")
    assert "they are ignored" in warning and "--seed" not in warning
    assert error.startswith("acsleuth: error: ")


# --- two targets with the same file stem: named apart in the CLI and the app alike -------------


def test_targets_sharing_a_stem_are_named_apart_by_file_name_or_folders():
    tenx = ["/data/s1/outs/filtered_feature_bc_matrix.h5", "/data/s2/outs/filtered_feature_bc_matrix.h5"]
    assert dataset_names([*tenx, "/data/B.h5ad.gz"]) == [
        "s1_outs_filtered_feature_bc_matrix.h5", "s2_outs_filtered_feature_bc_matrix.h5", "B",
    ]
    assert dataset_names(["A.h5ad", "A.csv", "sample_A.h5ad"]) == ["A.h5ad", "A.csv", "sample_A"]
    with pytest.raises(ACsleuthError, match="cannot all be told apart"):
        dataset_names(["/data/A.h5ad", "/data/A.h5ad"])


def _two_10x_named_samples(folder) -> list[Path]:
    paths = []
    for seed, sample in enumerate(("s1", "s2")):
        paths.append(folder / sample / "outs" / "filtered_feature_bc_matrix.h5")
        paths[-1].parent.mkdir(parents=True)
        _counts(seed=seed, prefix=f"{sample}_").write_h5ad(paths[-1])  # an AnnData saved under a 10x name
    return paths


def test_cli_keeps_both_targets_sharing_a_stem(tmp_path, capsys, monkeypatch):
    given = {}

    def stop(reference, targets, **kwargs):
        given.update(targets)
        raise ACsleuthError("stopped before training")

    monkeypatch.setattr(cli, "detect_anomalies", stop)
    _counts().write_h5ad(tmp_path / "reference.h5ad")
    targets = [str(path) for path in _two_10x_named_samples(tmp_path)]
    main(["run", "--reference", str(tmp_path / "reference.h5ad"), "--target", *targets, "--out", str(tmp_path / "o.h5ad")])
    assert list(given) == ["s1_outs_filtered_feature_bc_matrix.h5", "s2_outs_filtered_feature_bc_matrix.h5"]
    assert given["s2_outs_filtered_feature_bc_matrix.h5"].obs_names[0] == "s2_0"


@pytest.fixture
def data_page(tmp_path, monkeypatch):
    """The Data page, run through the app's entry page with a run folder of its own."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("ACSLEUTH_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ACSLEUTH_DATA_ROOTS", str(tmp_path))
    monkeypatch.chdir(root)
    st.cache_resource.clear()
    at = AppTest.from_file(str(root / "app.py"), default_timeout=60)
    at.switch_page("pages/1_Data.py")
    yield at.run()
    st.cache_resource.clear()


def _click(at: AppTest, label: str) -> AppTest:
    return [b for b in at.button if b.label == label][0].click().run()


def test_data_page_keeps_both_server_targets_sharing_a_stem_and_shows_the_warnings(tmp_path, data_page):
    _counts().write_h5ad(tmp_path / "reference.h5ad")
    data_page.text_input[0].input(str(tmp_path / "reference.h5ad"))
    data_page.text_area[0].input("\n".join(str(path) for path in _two_10x_named_samples(tmp_path))).run()
    at = _click(data_page, "Read files from the server")
    assert not at.exception and not at.error
    names = list(at.dataframe[0].value["data set"])
    assert names == ["reference", "s1_outs_filtered_feature_bc_matrix.h5", "s2_outs_filtered_feature_bc_matrix.h5"]
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("Target 's1_outs_filtered_feature_bc_matrix.h5' has only 8 cells") for w in warnings)


def test_data_page_keeps_both_uploads_sharing_a_stem(tmp_path, data_page):
    _counts().write_h5ad(tmp_path / "reference.h5ad")
    _counts(seed=1, prefix="a").write_h5ad(tmp_path / "A.h5ad")
    _counts(seed=2, prefix="b").to_df().to_csv(tmp_path / "A.csv")
    upload = {name: (tmp_path / name).read_bytes() for name in ("reference.h5ad", "A.h5ad", "A.csv")}
    data_page.file_uploader(key="reference_upload").set_value(("reference.h5ad", upload["reference.h5ad"], "application/octet-stream"))
    data_page.file_uploader(key="target_upload").set_value(
        [(name, upload[name], "application/octet-stream") for name in ("A.h5ad", "A.csv")]
    )
    at = _click(data_page.run(), "Read uploaded files")
    assert not at.exception and not at.error
    assert list(at.dataframe[0].value["data set"]) == ["reference", "A.h5ad", "A.csv"]
