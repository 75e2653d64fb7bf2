import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from acsleuth_core.errors import (
    DuplicateNamesError,
    EmptyDataError,
    GeneOverlapError,
    InputError,
    ValueKindError,
)
from acsleuth_core.preprocess import (
    INPUT_KIND_KEY,
    GeneMatchReport,
    detect_value_kind,
    match_genes,
    normalise,
    prepare,
    select_hvgs,
)

N_GENES = 300


def _counts(n_cells=60, genes=None, seed=0, prefix="cell") -> ad.AnnData:
    """Gamma-Poisson counts, so genes differ in mean and variability."""
    genes = genes if genes is not None else [f"G{i}" for i in range(N_GENES)]
    rng = np.random.default_rng(seed)
    means = rng.gamma(0.6, 3.0, size=len(genes))
    rates = rng.gamma(2.0, means / 2.0, size=(n_cells, len(genes)))
    X = sparse.csr_matrix(rng.poisson(rates).astype(np.float32))
    obs = pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_cells)])
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))


def _log(adata: ad.AnnData) -> ad.AnnData:
    X = adata.X.multiply(1e4 / adata.X.sum(axis=1)).tocsr()
    X.data = np.log1p(X.data)
    return ad.AnnData(X.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())


def _snapshot(adata: ad.AnnData) -> dict:
    return {
        "X": adata.X.toarray().copy(),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": dict(adata.uns),
        "layers": list(adata.layers),
    }


def _assert_unchanged(adata: ad.AnnData, snapshot: dict) -> None:
    np.testing.assert_array_equal(adata.X.toarray(), snapshot["X"])
    pd.testing.assert_frame_equal(adata.obs, snapshot["obs"])
    pd.testing.assert_frame_equal(adata.var, snapshot["var"])
    assert dict(adata.uns) == snapshot["uns"]
    assert list(adata.layers) == snapshot["layers"]


# --- counts or log ------------------------------------------------------------------


def test_counts_are_detected_and_normalised():
    raw = _counts()
    before = _snapshot(raw)
    assert detect_value_kind(raw.X) == "counts"
    out = normalise(raw, name="sample")
    assert sparse.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(axis=1), 1e4, rtol=1e-3)
    assert out.uns[INPUT_KIND_KEY] == "counts"
    assert out is not raw
    _assert_unchanged(raw, before)


def test_log_values_are_detected_and_kept():
    logged = _log(_counts())
    assert detect_value_kind(logged.X) == "log"
    out = normalise(logged, name="sample")
    np.testing.assert_array_equal(out.X.toarray(), logged.X.toarray())
    assert out.uns[INPUT_KIND_KEY] == "log"


def test_dense_and_sparse_matrices_are_judged_alike():
    raw = _counts()
    assert detect_value_kind(raw.X.toarray()) == "counts"
    assert detect_value_kind(_log(raw).X.toarray()) == "log"


def test_binary_data_count_as_counts():
    binary = (_counts().X > 2).astype(np.float32)
    assert detect_value_kind(binary) == "counts"


def test_large_matrices_are_judged_on_a_sample():
    rng = np.random.default_rng(1)
    X = sparse.random(3000, 400, density=0.25, format="csr", random_state=rng, dtype=np.float32)
    assert X.nnz > 200_000
    X.data = np.ceil(X.data * 20)
    assert detect_value_kind(X) == "counts"
    X.data = np.log1p(X.data + 0.5)
    assert detect_value_kind(X) == "log"


def test_scaled_values_are_refused_with_the_fix():
    scaled = _log(_counts()).X.toarray()
    scaled = (scaled - scaled.mean(axis=0)) / (scaled.std(axis=0) + 1e-6)
    with pytest.raises(ValueKindError) as err:
        detect_value_kind(scaled, name="scaled.h5ad")
    message = str(err.value)
    assert "negative" in message and "sc.pp.scale" in message and "adata.raw" in message
    assert "scaled.h5ad" in message


def test_normalised_but_unlogged_values_are_refused():
    X = _counts().X.multiply(1e4 / _counts().X.sum(axis=1)).tocsr()
    with pytest.raises(ValueKindError, match="sc.pp.log1p"):
        detect_value_kind(X)


def test_all_zero_matrix_is_refused():
    with pytest.raises(EmptyDataError, match="only zeros"):
        detect_value_kind(sparse.csr_matrix((5, 4), dtype=np.float32))


def test_declared_counts_but_log_values_are_refused():
    with pytest.raises(ValueKindError) as err:
        normalise(_log(_counts()), declared="counts", name="ref.h5ad")
    message = str(err.value)
    assert "declared as raw counts" in message and "log" in message and "ref.h5ad" in message


def test_declared_log_but_counts_are_refused():
    with pytest.raises(ValueKindError) as err:
        normalise(_counts(), declared="log", name="ref.h5ad")
    assert "declared as log-normalised" in str(err.value) and "raw counts" in str(err.value)


def test_declared_counts_may_be_non_integer_corrected_counts():
    corrected = _counts()
    corrected.X = corrected.X * 1.37
    out = normalise(corrected, declared="counts", name="soupx")
    assert out.uns[INPUT_KIND_KEY] == "counts"
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(axis=1), 1e4, rtol=1e-3)


def test_unknown_declared_kind_is_refused():
    with pytest.raises(InputError, match="auto, counts, log"):
        normalise(_counts(), declared="tpm", name="x")


# --- gene matching ---------------------------------------------------------------------


def test_genes_are_matched_in_reference_order_and_reported():
    reference = _counts()
    genes = list(reference.var_names)
    target = _counts(genes=genes[10:][::-1] + ["EXTRA1", "EXTRA2"], seed=1)
    ref_out, targets_out, report = match_genes(reference, {"sample2": target})
    assert list(ref_out.var_names) == genes[10:]
    assert list(targets_out["sample2"].var_names) == genes[10:]
    np.testing.assert_array_equal(
        targets_out["sample2"].X.toarray(), target[:, genes[10:]].X.toarray()
    )
    assert report == GeneMatchReport(n_reference_genes=300, n_kept=290, dropped_per_target={"sample2": 10})
    assert report.summary() == "kept 290 of 300 reference genes; dropped 10 absent from target 'sample2'"


def test_full_overlap_is_summarised_as_all_kept():
    _, _, report = match_genes(_counts(), {"a": _counts(seed=1)})
    assert report.summary() == "kept all 300 reference genes"


def test_too_small_overlap_names_the_target():
    reference = _counts()
    target = _counts(genes=[f"G{i}" for i in range(150)] + [f"X{i}" for i in range(150)])
    with pytest.raises(GeneOverlapError) as err:
        match_genes(reference, {"good": _counts(seed=2), "odd": target})
    message = str(err.value)
    assert "target 'odd' share only 150" in message and "200" in message


def test_ensembl_ids_against_symbols_get_a_conversion_hint():
    reference = _counts(genes=[f"ENSG{i:011d}" for i in range(N_GENES)])
    target = _counts(genes=[f"GENE{i}" for i in range(N_GENES)])
    with pytest.raises(GeneOverlapError) as err:
        match_genes(reference, {"sample2": target})
    message = str(err.value)
    assert "Ensembl IDs" in message and "gene symbols" in message and "convert" in message


def test_capitalisation_differences_get_a_species_hint():
    human = [f"GENE{i}" for i in range(N_GENES)]
    mouse = [f"Gene{i}" for i in range(N_GENES)]
    with pytest.raises(GeneOverlapError, match="capitalisation") as err:
        match_genes(_counts(genes=human), {"mouse": _counts(genes=mouse)})
    assert "'GENE0' vs 'Gene0'" in str(err.value) and "orthologues" in str(err.value)


def test_ensembl_version_suffixes_get_a_hint():
    versioned = [f"ENSG{i:011d}.{i % 7 + 1}" for i in range(N_GENES)]
    bare = [f"ENSG{i:011d}" for i in range(N_GENES)]
    with pytest.raises(GeneOverlapError, match="version"):
        match_genes(_counts(genes=versioned), {"t": _counts(genes=bare)})


def test_reference_with_too_few_genes_is_refused():
    small = _counts(genes=[f"G{i}" for i in range(50)])
    with pytest.raises(GeneOverlapError, match="reference has only 50 genes"):
        match_genes(small, {"t": small.copy()})


# --- highly variable genes ------------------------------------------------------------


def test_hvgs_are_chosen_on_the_reference_in_its_order():
    reference = normalise(_counts(n_cells=80), name="ref")
    before = _snapshot(reference)
    hvgs = select_hvgs(reference, 50)
    assert len(hvgs) == 50
    order = {g: i for i, g in enumerate(reference.var_names)}
    assert [order[g] for g in hvgs] == sorted(order[g] for g in hvgs)
    _assert_unchanged(reference, before)


@pytest.mark.parametrize("n_top", ["all", 300, 5000])
def test_all_genes_are_kept_when_asked_or_when_too_few(n_top):
    reference = normalise(_counts(), name="ref")
    assert select_hvgs(reference, n_top) == list(reference.var_names)


@pytest.mark.parametrize("n_top", [0, -5, "many", 2.5, True])
def test_bad_hvg_number_is_refused(n_top):
    with pytest.raises(InputError, match="highly variable"):
        select_hvgs(normalise(_counts(), name="ref"), n_top)


# --- the whole preparation ---------------------------------------------------------------


def test_each_target_is_its_own_batch():
    prepared = prepare(
        _counts(), {"s1": _counts(20, seed=1, prefix="a"), "s2": _counts(30, seed=2, prefix="b")}, n_hvg=100
    )
    assert list(prepared.batches) == ["s1"] * 20 + ["s2"] * 30
    assert list(prepared.target.obs_names) == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(30)]
    assert len(prepared.genes) == 100
    for adata in (prepared.reference, prepared.target):
        assert list(adata.var_names) == prepared.genes
        assert sparse.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert prepared.input_kinds == {"reference": "counts", "s1": "counts", "s2": "counts"}
    assert prepared.gene_report.n_kept == N_GENES


def test_batch_column_gives_the_batch_labels():
    target = _counts(40, seed=1)
    target.obs["donor"] = ["d1"] * 25 + ["d2"] * 15
    prepared = prepare(_counts(), {"pool": target}, batch_key="donor", n_hvg=100)
    assert list(prepared.batches) == ["d1"] * 25 + ["d2"] * 15
    assert list(prepared.target.obs["donor"]) == list(target.obs["donor"])


def test_missing_batch_column_names_the_target_and_its_columns():
    first, second = _counts(20, seed=1, prefix="a"), _counts(20, seed=2, prefix="b")
    first.obs["donor"] = "d1"
    second.obs["sample"] = "x"
    second.obs["cell_type"] = "T"
    with pytest.raises(InputError) as err:
        prepare(_counts(), {"s1": first, "s2": second}, batch_key="donor")
    message = str(err.value)
    assert "'s2'" in message and "'donor'" in message and "sample, cell_type" in message


def test_colliding_cell_names_across_targets_are_refused():
    with pytest.raises(DuplicateNamesError) as err:
        prepare(_counts(), {"s1": _counts(20, seed=1), "s2": _counts(20, seed=2)})
    message = str(err.value)
    assert "more than one target" in message and "'s1' and 's2'" in message and "prefix" in message


def test_inputs_are_unchanged_after_prepare():
    reference = _counts()
    reference.layers["counts"] = reference.X.copy()
    logged_target = _log(_counts(30, seed=1, prefix="t"))
    logged_target.obs["donor"] = "d1"
    snapshots = [_snapshot(reference), _snapshot(logged_target)]
    prepare(reference, {"t": logged_target}, n_hvg=100)
    _assert_unchanged(reference, snapshots[0])
    _assert_unchanged(logged_target, snapshots[1])


def test_gene_activity_scores_from_another_modality_take_the_log_path():
    rna = _counts()
    rng = np.random.default_rng(3)
    scores = sparse.random(40, N_GENES, density=0.3, format="csr", random_state=rng, dtype=np.float32) * 6
    atac = ad.AnnData(scores, obs=pd.DataFrame(index=[f"atac{i}" for i in range(40)]), var=rna.var.copy())
    prepared = prepare(rna, {"atac": atac}, n_hvg=100)
    assert prepared.input_kinds == {"reference": "counts", "atac": "log"}
    np.testing.assert_allclose(
        prepared.target.X.toarray(), atac[:, prepared.genes].X.toarray(), rtol=1e-6
    )


def test_single_anndata_target_is_named_target():
    prepared = prepare(_counts(), _counts(20, seed=1, prefix="t"), n_hvg=100)
    assert set(prepared.batches) == {"target"}


def test_bad_target_inside_prepare_is_validated_by_name():
    target = _counts(20, seed=1, prefix="t")
    target.X = target.X.toarray()
    target.X[0, 0] = np.nan
    with pytest.raises(InputError, match="'broken'"):
        prepare(_counts(), {"broken": target})


def test_the_data_summary_explains_a_gene_naming_mismatch_like_the_pipeline():
    from acsleuth_core.errors import GeneOverlapError
    from acsleuth_core.summary import describe_inputs

    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, (30, 300)).astype(np.float32)
    reference = ad.AnnData(X, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(300)]))
    target = ad.AnnData(X.copy(), var=pd.DataFrame(index=[f"GENE{i}" for i in range(300)]))
    with pytest.raises(GeneOverlapError, match="Ensembl"):
        describe_inputs(reference, {"t": target})
