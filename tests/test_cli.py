"""The acsleuth command line, end to end on the built-in demo."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from acsleuth_core import cli, keys, resemblance
from acsleuth_core.calls import threshold_calls
from acsleuth_core.cli import main

QUICK = ["--epochs", "15", "--seed", "3", "--correction-epochs", "5"]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def demo_run(demo_files):
    out = demo_files / "annotated.h5ad"
    table = demo_files / "cells.csv"
    model = demo_files / "model"
    code = main([
        "run", "--reference", str(demo_files / "reference.h5ad"),
        "--target", str(demo_files / "sample_A.h5ad"), str(demo_files / "sample_B.h5ad"),
        "--out", str(out), "--table", str(table), "--save-model", str(model), *QUICK,
    ])
    assert code == 0
    return out, table, model


def test_demo_command_writes_reference_and_two_samples(demo_files):
    names = sorted(p.name for p in demo_files.glob("*.h5ad"))
    assert {"reference.h5ad", "sample_A.h5ad", "sample_B.h5ad"} <= set(names)


def test_run_writes_annotated_anndata_and_cell_table(demo_run, demo_files):
    out, table, _ = demo_run
    adata = ad.read_h5ad(out)
    targets = [ad.read_h5ad(demo_files / f"sample_{s}.h5ad") for s in "AB"]
    assert list(adata.obs_names) == [n for t in targets for n in t.obs_names]
    assert set(adata.obs[keys.BATCH]) == {"sample_A", "sample_B"}
    assert np.isfinite(adata.obs[keys.SCORE]).all()
    assert adata.obsm[keys.LATENT].shape[0] == adata.n_obs
    cells = pd.read_csv(table)
    assert len(cells) == adata.n_obs
    np.testing.assert_allclose(cells[keys.SCORE].to_numpy(), adata.obs[keys.SCORE].to_numpy())
    assert cells[keys.ANOMALY].sum() == adata.obs[keys.ANOMALY].sum()
    assert cells[keys.PVALUE].between(0, 1).all()  # the call's p-values and every view, exported
    assert all(np.isfinite(cells[column]).all() for column in keys.VIEW_COLUMNS.values())


def test_views_predictor_scores_with_the_papers_predictor_alone(demo_files, tmp_path):
    out = tmp_path / "paper.h5ad"
    code = main([
        "run", "--reference", str(demo_files / "reference.h5ad"), "--target", str(demo_files / "sample_A.h5ad"),
        "--out", str(out), "--views", "predictor", "--n-subtypes", "0", *QUICK,
    ])
    assert code == 0
    adata = ad.read_h5ad(out)
    assert list(adata.uns[keys.UNS]["params"]["views"]) == ["predictor"]
    assert adata.uns[keys.UNS]["threshold"]["detail"]["views"] == "predictor"
    np.testing.assert_allclose(adata.obs[keys.SCORE], adata.obs[keys.VIEW_COLUMNS["predictor"]])


def test_run_corrects_batches_by_default_when_targets_hold_two_batches(demo_run):
    out, table, _ = demo_run
    adata = ad.read_h5ad(out)
    normal = ~threshold_calls(adata)  # correction pairs the threshold's normal cells, whatever the subtype stage calls
    assert adata.obs[keys.KIN][normal].notna().all() and adata.obs[keys.KIN][~normal].isna().all()
    assert adata.obsm[keys.CORRECTED_LATENT].shape[0] == adata.n_obs
    assert adata.layers[keys.CORRECTED].shape == adata.shape
    assert set(adata.uns[keys.UNS][keys.CORRECTION]["metrics"]) == {"expression", "latent"}
    cells = pd.read_csv(table)
    assert cells[keys.KIN].notna().sum() == normal.sum()


def test_a_saved_model_scores_new_targets_identically_without_retraining(demo_run, demo_files, tmp_path):
    out, _, model = demo_run
    again = tmp_path / "again.h5ad"
    code = main([
        "run", "--reference", str(demo_files / "reference.h5ad"),
        "--target", str(demo_files / "sample_A.h5ad"), str(demo_files / "sample_B.h5ad"),
        "--out", str(again), "--model", str(model), "--no-correct", *QUICK,
    ])
    assert code == 0
    np.testing.assert_array_equal(ad.read_h5ad(again).obs[keys.SCORE], ad.read_h5ad(out).obs[keys.SCORE])


def test_expected_fraction_overrides_the_label_free_call(demo_run, demo_files, tmp_path):
    _, _, model = demo_run
    out = tmp_path / "fraction.h5ad"
    code = main([
        "run", "--reference", str(demo_files / "reference.h5ad"), "--target", str(demo_files / "sample_A.h5ad"),
        "--out", str(out), "--model", str(model), "--expected-fraction", "0.25",
    ])
    assert code == 0
    adata = ad.read_h5ad(out)
    assert abs(adata.obs[keys.ANOMALY].sum() - 0.25 * adata.n_obs) <= 1
    assert adata.uns[keys.UNS]["threshold"]["method"] == "fraction"
    assert keys.KIN not in adata.obs  # one target batch: correction is off unless asked for
    anomalous = adata.obs[keys.ANOMALY].to_numpy(bool)
    assert adata.obs[keys.SUBTYPE][anomalous].notna().all()  # subtypes are on by default (auto k)
    assert "silhouette" in adata.uns[keys.UNS][keys.SUBTYPES]["k_reason"]


def test_n_subtypes_fixes_k_and_zero_skips_the_stage(demo_run, demo_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resemblance, "RESEMBLANCE_LEVEL", 0.0)  # every subtype counts as like the reference
    _, _, model = demo_run
    common = [
        "run", "--reference", str(demo_files / "reference.h5ad"), "--target", str(demo_files / "sample_A.h5ad"),
        "--model", str(model), "--expected-fraction", "0.25",
    ]
    kept = ["--out", str(tmp_path / "k2.h5ad"), "--n-subtypes", "2", "--keep-reference-like"]
    kept += ["--table", str(tmp_path / "k2.csv")]
    assert main([*common, *kept]) == 0
    two = ad.read_h5ad(tmp_path / "k2.h5ad")
    assert list(two.obs[keys.SUBTYPE].cat.categories) == ["1", "2"]
    err = capsys.readouterr().err
    assert "Subtypes 1, 2 (" in err and "check the markers" in err and two.obs[keys.SUBTYPE_LIKE_REFERENCE].sum() > 0
    assert pd.read_csv(tmp_path / "k2.csv")[keys.SUBTYPE].dropna().isin([1, 2]).all()
    # by default the cells of subtypes like the reference are called normal: here, all of them
    assert main([*common, "--out", str(tmp_path / "normal.h5ad"), "--n-subtypes", "2"]) == 0
    normal = ad.read_h5ad(tmp_path / "normal.h5ad")
    assert not normal.obs[keys.ANOMALY].any() and normal.obs[keys.SUBTYPE].isna().all()
    assert normal.obs[keys.SUBTYPE_LIKE_REFERENCE].sum() == two.obs[keys.ANOMALY].sum()
    captured = capsys.readouterr()
    assert "so all their cells are called normal" in captured.err
    assert captured.out.startswith(f"0 of {normal.n_obs} cells called anomalous")
    assert main([*common, "--out", str(tmp_path / "none.h5ad"), "--n-subtypes", "0"]) == 0
    assert keys.SUBTYPE not in ad.read_h5ad(tmp_path / "none.h5ad").obs
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "bad.h5ad"), "--n-subtypes", "many"])
    assert "whole number or 'auto'" in capsys.readouterr().err


def test_too_few_anomalies_skip_subtypes_with_a_message_and_keep_the_run(demo_run, demo_files, tmp_path, capsys):
    _, _, model = demo_run
    out = tmp_path / "few.h5ad"
    code = main([
        "run", "--reference", str(demo_files / "reference.h5ad"), "--target", str(demo_files / "sample_A.h5ad"),
        "--out", str(out), "--model", str(model), "--threshold", "1e6",
    ])
    assert code == 0 and out.exists()
    assert "subtypes skipped" in capsys.readouterr().err


def test_a_failing_later_stage_keeps_the_detection_and_exits_partial(demo_run, demo_files, tmp_path, capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated failure in module IV")

    monkeypatch.setattr(cli, "subtype_detection_run", crash)
    _, _, model = demo_run
    out, table = tmp_path / "partial.h5ad", tmp_path / "partial.csv"
    code = main([
        "run", "--reference", str(demo_files / "reference.h5ad"), "--target", str(demo_files / "sample_A.h5ad"),
        "--out", str(out), "--table", str(table), "--model", str(model), "--expected-fraction", "0.25",
    ])
    assert code == cli.PARTIAL_EXIT
    adata = ad.read_h5ad(out)
    assert adata.obs[keys.ANOMALY].sum() > 0 and keys.SUBTYPE not in adata.obs
    assert adata.uns[keys.UNS][keys.FAILED_STAGES] == {keys.SUBTYPES: "RuntimeError: simulated failure in module IV"}
    assert len(pd.read_csv(table)) == adata.n_obs
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if "failed" in line]
    assert failures[0].startswith("acsleuth: subtypes failed (RuntimeError: simulated failure in module IV)")
    assert "Traceback" not in err
    assert "simulated failure" in (tmp_path / "partial.h5ad.error.log").read_text()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--table", "cells.xlsx", "name it .csv"), ("--out", "result.csv", "must name an .h5ad"), ("--out", "file.txt/out.h5ad", "not a writable folder")],
)
def test_output_paths_are_refused_before_any_work(tmp_path, monkeypatch, capsys, option, value, message):
    (tmp_path / "file.txt").write_text("a file, not a folder")

    def never(path):
        raise AssertionError(f"{path} was read before the outputs were checked")

    monkeypatch.setattr(cli, "read_cells", never)
    args = {"--out": str(tmp_path / "o.h5ad")} | {option: str(tmp_path / value)}
    code = main(["run", "--reference", "ref.h5ad", "--target", "t.h5ad", *[x for kv in args.items() for x in kv]])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_input_prints_one_line_and_exits_non_zero(tmp_path):
    missing = tmp_path / "nope.h5ad"
    result = subprocess.run(
        [sys.executable, "-m", "acsleuth_core.cli", "run", "--reference", str(missing),
         "--target", str(missing), "--out", str(tmp_path / "o.h5ad")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("acsleuth:")]
    assert len(lines) == 1 and "nope.h5ad" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.h5ad").exists()


def test_counts_declared_as_log_is_refused_with_the_fix(demo_files, tmp_path):
    code = main([
        "run", "--reference", str(demo_files / "reference.h5ad"), "--target", str(demo_files / "sample_A.h5ad"),
        "--out", str(tmp_path / "o.h5ad"), "--input-kind", "log", "--epochs", "1",
    ])
    assert code == 2
