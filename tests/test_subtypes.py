"""Module IV: fusion, DESC-style clustering, automatic k, markers and the pipeline stage."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import normalized_mutual_info_score

from acsleuth_core import keys, resemblance
from acsleuth_core.correction import CorrectionConfig, correct_batches
from acsleuth_core.demo import ANOMALY_TYPE, FINE_LABEL_KEY, LABEL_KEY, PLASMA_TYPE, TRUTH_KEY, load_demo
from acsleuth_core.errors import InputError
from acsleuth_core.export import cell_table, write_h5ad
from acsleuth_core.kin import KinConfig
from acsleuth_core.markers import COLUMNS, subtype_markers
from acsleuth_core.model_inputs import ModelInputs
from acsleuth_core.pipeline import call_anomalies, detect_anomalies, subtype_detection_run
from acsleuth_core.resemblance import (
    cell_resemblance, cells_like_reference, describe_resemblance, resembling_subtypes,
    subtype_resemblance,
)
from acsleuth_core.style import StyleConfig
from acsleuth_core.subtypes import SubtypeConfig, find_subtypes, principal_tokens, sharpened_target, soft_assignments
from acsleuth_core.subtyping import (
    UMAP, annotate_subtypes, batch_adjusted, kin_batch_shifts, subtype_anomalies, subtype_layout, subtypes_are_stale,
)

from tiny_models import DEMO_DETECTOR


def _clusters(n=240, n_types=4, dim=16, spread=6.0, seed=0):
    """``z`` and ``ζ`` of cells from ``n_types`` well-separated groups (both carry the group)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n)
    z = rng.normal(scale=spread, size=(n_types, dim))[types] + rng.normal(size=(n, dim))
    zeta = rng.normal(scale=spread, size=(n_types, dim))[types] + rng.normal(size=(n, dim))
    return z.astype(np.float32), zeta.astype(np.float32), types


FAST = SubtypeConfig(max_epochs=20)
FAST_CORRECTION = CorrectionConfig(kin=KinConfig(epochs=2), style=StyleConfig(epochs=2))


# ------------------------------------------------------------ DESC pieces
def test_soft_assignments_are_probabilities():
    fused, centroids = torch.randn(50, 8), torch.randn(3, 8)
    q = soft_assignments(fused, centroids)
    assert (q > 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(50))


def test_a_cell_on_a_centroid_is_assigned_to_it():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    q = soft_assignments(centroids.clone(), centroids)
    assert q.argmax(dim=1).tolist() == [0, 1]
    assert (q.max(dim=1).values > 0.9).all()


@pytest.mark.parametrize("balance", [0.0, 0.5, 1.0])
def test_target_distribution_is_sharper_than_the_assignments(balance):
    generator = torch.Generator().manual_seed(0)
    q = soft_assignments(torch.randn(100, 4, generator=generator), torch.randn(3, 4, generator=generator))
    p = sharpened_target(q, balance)
    assert torch.allclose(p.sum(dim=1), torch.ones(100))
    entropy = lambda d: -(d * d.log()).sum(dim=1)  # noqa: E731
    assert entropy(p).mean() < entropy(q).mean()
    if balance == 0:  # pure sharpening keeps every cell's most likely cluster
        assert torch.equal(p.argmax(dim=1), q.argmax(dim=1))


def test_balance_pulls_mass_towards_small_clusters():
    q = torch.tensor([[0.6, 0.4]] * 9 + [[0.2, 0.8]])  # cluster 1 is the small one
    unbalanced, balanced = sharpened_target(q, 0.0), sharpened_target(q, 1.0)
    assert (balanced[:, 1] > unbalanced[:, 1]).all()


# ----------------------------------------------------------------- tokens
def test_standardised_principal_tokens_keep_a_rare_subtype_marked_by_weak_genes():
    rng = np.random.default_rng(2)
    types = np.r_[np.zeros(100, int), np.ones(90, int), np.full(12, 2)]
    expression = rng.normal(0.0, 0.3, (types.size, 60))
    expression[types == 1, :20] += 3.0  # a large subtype, strongly marked
    expression[types == 2, 50:58] += 1.5  # a rare one, marked by eight genes that vary little overall
    tokens = principal_tokens(expression, 16, seed=0, standardise=True)
    assert tokens.shape == (types.size, 16)
    found = find_subtypes(tokens, None, SubtypeConfig(use_residual=False, max_epochs=20))
    assert found.k_chosen == 3, found.k_reason
    assert normalized_mutual_info_score(types, found.labels) >= 0.9


def test_principal_tokens_of_few_cells_have_fewer_components():
    assert principal_tokens(np.random.default_rng(0).normal(size=(6, 40)), 32, seed=0, standardise=False).shape == (6, 5)


def test_an_unknown_encoder_is_refused():
    with pytest.raises(InputError, match="encoder must be one of pca, module_one"):
        SubtypeConfig(encoder="umap")


def test_kin_shifts_recover_a_known_batch_shift():
    rng = np.random.default_rng(0)
    reference = ad.AnnData(rng.uniform(2.0, 3.0, (30, 4)).astype(np.float32))
    reference.obs_names = [f"r{i}" for i in range(30)]
    kin = rng.integers(0, 30, 40)
    shift = {"a": np.array([0.5, -0.5, 0.0, 1.0]), "b": np.zeros(4)}
    batches = np.repeat(["a", "b"], 20)
    measured = reference.X[kin] + np.stack([shift[b] for b in batches])
    measured[0, 0] = 0.2  # an unpaired cell (an anomaly) low on gene 0, which batch a raised by 0.5
    target = ad.AnnData(measured.astype(np.float32))
    target.obs[keys.BATCH] = batches
    target.obs[keys.KIN] = pd.Series(np.where(np.arange(40) == 0, None, reference.obs_names[kin]), dtype=object).to_numpy()
    shifts = kin_batch_shifts(target, ModelInputs(reference, target))
    assert np.allclose(shifts["a"], -shift["a"], atol=1e-5) and np.allclose(shifts["b"], 0, atol=1e-5)
    adjusted = batch_adjusted(target.X[1:], batches[1:], shifts)
    assert np.allclose(adjusted, reference.X[kin[1:]], atol=1e-5)
    assert batch_adjusted(target.X[:1], batches[:1], shifts)[0, 0] == 0.0  # floored: log expression is never negative


# ------------------------------------------------------------- clustering
@pytest.mark.parametrize("use_residual", [True, False])
def test_separated_clusters_are_recovered_and_auto_k_finds_their_number(use_residual):
    z, zeta, types = _clusters()
    found = find_subtypes(z, zeta if use_residual else None, SubtypeConfig(use_residual=use_residual, max_epochs=20))
    assert found.k_chosen == 4, found.k_reason
    assert "silhouette" in found.k_reason
    assert normalized_mutual_info_score(types, found.labels) >= 0.95
    assert found.fused.shape[0] == len(types)
    assert np.allclose(found.soft_assignments.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(found.confidence, found.soft_assignments.max(axis=1))


def test_a_given_k_is_used_and_every_cluster_has_cells():
    z, zeta, types = _clusters(n_types=3)
    found = find_subtypes(z, zeta, SubtypeConfig(n_subtypes=3, max_epochs=20))
    assert found.k_chosen == 3
    assert normalized_mutual_info_score(types, found.labels) >= 0.95
    many = find_subtypes(z, zeta, SubtypeConfig(n_subtypes=8, max_epochs=20))
    assert many.k_chosen <= 8
    assert np.array_equal(np.unique(many.labels), np.arange(many.k_chosen))
    assert many.soft_assignments.shape[1] == many.k_chosen


def test_a_rare_subtype_is_not_swallowed_by_a_large_one():
    rng = np.random.default_rng(1)
    types = np.r_[np.zeros(180, int), np.ones(12, int)]
    centres = rng.normal(scale=5.0, size=(2, 16))
    z = (centres[types] + rng.normal(size=(192, 16))).astype(np.float32)
    found = find_subtypes(z, None, SubtypeConfig(use_residual=False, max_epochs=30))
    assert normalized_mutual_info_score(types, found.labels) >= 0.9


def test_the_same_seed_gives_the_same_subtypes():
    z, zeta, _ = _clusters(seed=3)
    first, second = (find_subtypes(z, zeta, SubtypeConfig(seed=7, max_epochs=10)) for _ in range(2))
    assert np.array_equal(first.labels, second.labels)
    assert np.allclose(first.fused, second.fused)


def test_too_few_anomalies_give_a_clear_message():
    z, zeta, _ = _clusters(n=2)
    with pytest.raises(InputError, match="too few"):
        find_subtypes(z, zeta, SubtypeConfig())
    z, zeta, _ = _clusters(n=5)
    with pytest.raises(InputError, match="too few to split into 6"):
        find_subtypes(z, zeta, SubtypeConfig(n_subtypes=6))
    with pytest.raises(InputError, match="at least 1"):
        find_subtypes(z, zeta, SubtypeConfig(n_subtypes=0))


def test_training_reports_progress_and_stops_when_labels_settle():
    z, zeta, _ = _clusters()
    events = []
    found = find_subtypes(z, zeta, SubtypeConfig(max_epochs=50), progress=events.append)
    assert len(events) == found.n_epochs == len(found.label_changes)
    assert found.n_epochs < 50 and found.label_changes[-1] < SubtypeConfig.tol


# ---------------------------------------------------------------- markers
def test_markers_find_the_gene_that_marks_a_subtype():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(30)]
    anomalies = rng.poisson(1.0, size=(60, 30)).astype(np.float32)
    labels = np.repeat(["1", "2"], 30)
    anomalies[labels == "2", 7] += 6
    reference = rng.poisson(1.0, size=(40, 30)).astype(np.float32)
    markers = subtype_markers(np.log1p(anomalies), labels, np.log1p(reference), genes, n_genes=5)
    for table in markers.values():
        assert list(table.columns) == COLUMNS
    top = markers["vs_anomalies"].query("subtype == '2'").iloc[0]
    assert top.gene == "g7" and top.logfoldchange > 0
    assert markers["vs_reference"].query("subtype == '2'").iloc[0].gene == "g7"
    assert set(markers["vs_reference"].subtype) == {"1", "2"}


def test_one_subtype_has_reference_markers_only():
    rng = np.random.default_rng(0)
    X = np.log1p(rng.poisson(1.0, size=(20, 10)).astype(np.float32))
    markers = subtype_markers(X, np.full(20, "1"), X, [f"g{i}" for i in range(10)], n_genes=3)
    assert markers["vs_anomalies"].empty
    assert len(markers["vs_reference"]) == 3


# --------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def subtyped():
    demo = load_demo(with_progenitors=True)
    run = detect_anomalies(demo.reference, demo.targets, n_hvg=200, config=DEMO_DETECTOR)
    call_anomalies(run.adata, "fraction", 0.35)  # more than the 26 % anomalies: normal cells past the cut
    before = run.adata.copy()
    result = subtype_detection_run(run, SubtypeConfig(n_subtypes=3, max_epochs=10))
    return run, before, result


def test_reference_like_subtypes_are_called_normal_and_only_anomalies_get_a_subtype(subtyped):
    run, before, result = subtyped
    obs = run.adata.obs
    past_threshold = before.obs[keys.ANOMALY].to_numpy(bool)
    like_reference = obs[keys.SUBTYPE_LIKE_REFERENCE]
    assert like_reference[~past_threshold].isna().all() and like_reference[past_threshold].notna().all()
    flagged = like_reference.fillna(False).to_numpy(bool)
    # the fixture's 35 % call takes in normal cells, which gather in a subtype of their own
    assert resembling_subtypes(result.resemblance) and flagged.any()
    assert np.array_equal(flagged[past_threshold], result.like_reference)
    assert result.resemblance.cells_like_reference.sum() == flagged.sum()
    assert set(result.names[result.like_reference]) <= set(resembling_subtypes(result.resemblance))
    assert (~obs[TRUTH_KEY][flagged]).any(), "normal cells past the threshold are among those called normal"
    anomalous = obs[keys.ANOMALY].to_numpy(bool)
    assert np.array_equal(anomalous, past_threshold & ~flagged)
    assert isinstance(obs[keys.SUBTYPE].dtype, pd.CategoricalDtype)
    kept = sorted(set(result.names[~result.like_reference]), key=int)
    assert list(obs[keys.SUBTYPE].cat.categories) == kept == result.kept_subtypes
    assert obs[keys.SUBTYPE][anomalous].notna().all() and obs[keys.SUBTYPE][~anomalous].isna().all()
    assert obs[keys.SUBTYPE_CONFIDENCE][anomalous].between(1 / 3, 1).all()
    assert obs[keys.SUBTYPE_CONFIDENCE][~anomalous].isna().all()
    fused = run.adata.obsm[keys.FUSED]
    assert np.isfinite(fused[anomalous]).all() and np.isnan(fused[~anomalous]).all()
    saved = run.adata.uns[keys.UNS]
    assert saved[keys.SUBTYPES]["called_normal"] == flagged.sum()
    assert sum(saved["calls_per_batch"].values()) == anomalous.sum()
    assert not result.used_correction  # the run was not corrected


def test_reference_like_subtypes_can_stay_anomalous(subtyped):
    run, before, _ = subtyped
    adata = before.copy()
    inputs = ModelInputs.from_prepared(run.prepared)
    result = subtype_anomalies(adata, inputs, run.detector, SubtypeConfig(n_subtypes=3, max_epochs=10), reference_like_normal=False)
    annotate_subtypes(adata, result)
    assert np.array_equal(adata.obs[keys.ANOMALY], before.obs[keys.ANOMALY])
    assert list(adata.obs[keys.SUBTYPE].cat.categories) == ["1", "2", "3"]
    assert adata.uns[keys.UNS][keys.SUBTYPES]["called_normal"] == 0
    flagged = resembling_subtypes(result.resemblance)
    anomalous = adata.obs[keys.ANOMALY].to_numpy(bool)
    like_reference = adata.obs[keys.SUBTYPE_LIKE_REFERENCE][anomalous].to_numpy(bool)
    assert flagged and like_reference.any()
    assert adata.obs[keys.SUBTYPE][anomalous][like_reference].isin(flagged).all(), "only cells of flagged subtypes"
    assert set(adata.uns[keys.UNS][keys.SUBTYPES]["markers_vs_anomalies"].subtype) == {"1", "2", "3"}


def test_the_call_follows_the_threshold_and_reclustering_sees_every_cell_past_it(subtyped):
    run, before, _ = subtyped
    adata = run.adata.copy()
    past_threshold = before.obs[keys.ANOMALY].to_numpy(bool)
    called = adata.obs[keys.ANOMALY].to_numpy(bool)
    call_anomalies(adata, "manual", adata.uns[keys.UNS]["threshold"]["value"])  # the same cut again
    assert np.array_equal(adata.obs[keys.ANOMALY], called), "cells called normal by subtyping stay normal"
    inputs = ModelInputs.from_prepared(run.prepared)
    again = subtype_anomalies(adata, inputs, run.detector, SubtypeConfig(n_subtypes=2, max_epochs=5))
    assert np.array_equal(again.anomalous, past_threshold), "re-clustering starts from the threshold's call"
    call_anomalies(adata, "fraction", 0.1)
    assert subtypes_are_stale(adata)
    assert np.array_equal(adata.obs[keys.ANOMALY], adata.obs[keys.SCORE] > adata.uns[keys.UNS]["threshold"]["value"])


def test_correction_after_subtyping_learns_from_the_thresholds_call(subtyped):
    run, before, _ = subtyped
    assert not run.adata.obs[keys.ANOMALY].equals(before.obs[keys.ANOMALY]), "subtyping called some cells normal"
    adata = run.adata.copy()
    result = correct_batches(adata, ModelInputs.from_prepared(run.prepared), run.detector, FAST_CORRECTION)
    past_threshold = before.obs[keys.ANOMALY].to_numpy(bool)
    assert pd.isna(result.kin[past_threshold]).all() and pd.notna(result.kin[~past_threshold]).all()


def test_the_papers_encoder_can_embed_the_tokens(subtyped):
    run, _, _ = subtyped
    inputs = ModelInputs.from_prepared(run.prepared)
    result = subtype_anomalies(run.adata, inputs, run.detector, SubtypeConfig(encoder="module_one", n_subtypes=2, max_epochs=5))
    assert result.subtypes.k_chosen == 2 and result.subtypes.fused.shape == (int(result.anomalous.sum()), 32)


def test_a_subtype_of_reference_like_cells_is_flagged_and_a_missing_type_is_not():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(3, 40))  # two reference types and one type missing from the reference
    reference = np.repeat(centres[:2], 150, axis=0) + rng.normal(size=(300, 40))
    new_type = centres[2] + rng.normal(size=(60, 40))
    normal_past_threshold = centres[0] + rng.normal(size=(12, 40))
    cells = cell_resemblance(np.vstack([new_type, normal_past_threshold]), reference, np.array(["1"] * 60 + ["2"] * 12))
    table = subtype_resemblance(cells)
    assert list(table.subtype) == ["1", "2"] and list(table.cells) == [60, 12]
    assert table.chance.iloc[0] == pytest.approx(300 / 371)
    new, normal = table.mixing
    assert new < 0.1 and normal > 0.8
    assert resembling_subtypes(table) == ["2"]
    message = describe_resemblance(table)
    assert "Subtype 2 (12 cells) resembles the reference" in message and "check the markers" in message
    assert "the 11 of its cells that also mix with the reference" in describe_resemblance(table, called_normal=11)
    assert "the other 1 stays anomalous" in describe_resemblance(table, called_normal=11)
    assert "so all its cells are called normal" in describe_resemblance(table, called_normal=12)
    assert describe_resemblance(table[table.subtype == "1"]) is None


def test_in_a_flagged_subtype_only_the_cells_that_mix_with_the_reference_themselves_resemble_it():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(3, 40))
    reference = np.repeat(centres[:2], 150, axis=0) + rng.normal(size=(300, 40))
    # a rare new type gathered into one subtype with more normal cells; with 15 neighbours per cell, its
    # cells keep mostly each other as neighbours (a group of fewer than about 8 would not)
    rare_new_type = centres[2] + rng.normal(size=(12, 40))
    normal_past_threshold = centres[0] + rng.normal(size=(28, 40))
    subtypes = np.full(40, "1")
    cells = cell_resemblance(np.vstack([rare_new_type, normal_past_threshold]), reference, subtypes)
    table = subtype_resemblance(cells)
    assert resembling_subtypes(table) == ["1"]
    like = cells_like_reference(cells, table)
    assert not like[:12].any() and like[12:].all()
    assert table.cells_like_reference.tolist() == [28]


def test_a_small_subtype_of_a_missing_type_is_not_flagged_and_a_tiny_one_is_not_judged():
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=3.0, size=(4, 40))
    reference = sp.csr_matrix(np.repeat(centres[:2], 1000, axis=0) + rng.normal(size=(2000, 40)))
    new_small = centres[2] + rng.normal(size=(5, 40))  # fewer cells than the 15 neighbours asked for
    new_tiny = centres[3] + rng.normal(size=(2, 40))
    like_reference = centres[1] + rng.normal(size=(6, 40))
    anomalies = sp.csr_matrix(np.vstack([new_small, new_tiny, like_reference]))
    table = subtype_resemblance(cell_resemblance(anomalies, reference, np.array(["1"] * 5 + ["2"] * 2 + ["3"] * 6)))
    small, tiny, normal = table.itertuples(index=False)
    assert small.neighbours == 4 and small.mixing < 0.1 and not small.resembles_reference
    assert tiny.neighbours == 0 and np.isnan(tiny.mixing) and not tiny.resembles_reference
    assert normal.neighbours == 5 and normal.resembles_reference


def test_subtype_summary_and_markers_are_recorded(subtyped):
    run, _, result = subtyped
    saved = run.adata.uns[keys.UNS][keys.SUBTYPES]
    assert saved["k_chosen"] == 3 and "given" in saved["k_reason"]
    assert sum(saved["sizes"].values()) == int(run.adata.obs[keys.ANOMALY].sum())
    assert set(saved["markers_vs_anomalies"].subtype) == set(saved["sizes"]) == set(result.kept_subtypes)
    assert set(saved["markers_vs_reference"].gene) <= set(run.adata.var_names)


def test_subtyping_changes_nothing_but_its_own_keys_and_the_call(subtyped):
    run, before, _ = subtyped
    others = [c for c in before.obs.columns if c != keys.ANOMALY]
    pd.testing.assert_frame_equal(run.adata.obs[others], before.obs[others])
    assert np.array_equal(run.adata.obsm[keys.LATENT], before.obsm[keys.LATENT])


def test_subtypes_reach_the_table_the_h5ad_and_the_layout(subtyped, tmp_path):
    run, _, _ = subtyped
    table = cell_table(run.adata)
    assert {keys.SUBTYPE, keys.SUBTYPE_CONFIDENCE, keys.SUBTYPE_LIKE_REFERENCE} <= set(table.columns)
    back = ad.read_h5ad(write_h5ad(run.adata, tmp_path / "out.h5ad"))
    assert back.obs[keys.SUBTYPE].equals(run.adata.obs[keys.SUBTYPE])
    assert back.obs[keys.SUBTYPE_LIKE_REFERENCE].equals(run.adata.obs[keys.SUBTYPE_LIKE_REFERENCE])
    assert isinstance(back.uns[keys.UNS][keys.SUBTYPES]["markers_vs_reference"], pd.DataFrame)
    saved_resemblance = back.uns[keys.UNS][keys.SUBTYPES]["reference_resemblance"]
    assert list(saved_resemblance.subtype) == ["1", "2", "3"]
    assert saved_resemblance.cells.sum() == table[keys.SUBTYPE_LIKE_REFERENCE].notna().sum()
    layout = subtype_layout(run.adata)
    assert len(layout) == int(run.adata.obs[keys.ANOMALY].sum())
    assert np.isfinite(layout[list(UMAP)].to_numpy()).all()


def test_a_new_threshold_marks_the_subtypes_stale(subtyped):
    run, _, _ = subtyped
    adata = run.adata.copy()
    assert not subtypes_are_stale(adata)
    call_anomalies(adata, "fraction", 0.1)
    assert subtypes_are_stale(adata)


def test_a_one_cell_subtype_gets_no_markers_but_the_others_do():
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, (21, 10)).astype(np.float32)
    labels = np.r_[np.full(10, "1"), np.full(10, "2"), ["3"]]
    markers = subtype_markers(np.log1p(X), labels, np.log1p(X), [f"g{i}" for i in range(10)], n_genes=3)
    for table in markers.values():
        assert set(table.subtype) == {"1", "2"}


def test_the_demo_names_its_plasma_cells_apart_only_among_its_b_cells():
    demo = load_demo(with_progenitors=True)
    targets = ad.concat(list(demo.targets.values()))
    coarse, fine = targets.obs[LABEL_KEY].astype(str), targets.obs[FINE_LABEL_KEY].astype(str)
    plasma = (fine == PLASMA_TYPE).to_numpy()
    assert plasma.sum() == 29 and (coarse[plasma] == ANOMALY_TYPE).all()
    assert (fine[~plasma] == coarse[~plasma]).all()
    other_b = (coarse == ANOMALY_TYPE).to_numpy() & ~plasma
    counts = targets.to_df()
    for gene, higher in (("IGJ", True), ("MZB1", True), ("MS4A1", False)):
        plasma_mean, b_mean = counts.loc[plasma, gene].mean(), counts.loc[other_b, gene].mean()
        assert (plasma_mean > 3 * b_mean) if higher else (b_mean > 3 * plasma_mean), gene


def test_sampled_reference_and_pca_fit_do_not_bias_the_resemblance(monkeypatch):
    """With more cells than the PCA is fitted on, reference-like anomalies still mix with the reference as chance would."""
    monkeypatch.setattr(resemblance, "MAX_REFERENCE_CELLS", 400)
    monkeypatch.setattr(resemblance, "MAX_FIT_CELLS", 300)
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=2.0, size=(3, 100))
    reference = centres[rng.integers(0, 2, 1500)] + rng.normal(size=(1500, 100))
    types = rng.integers(0, 3, 900)  # types 0 and 1 are in the reference, type 2 is not
    cells = cell_resemblance(centres[types] + rng.normal(size=(900, 100)), reference, types.astype(str))
    table = subtype_resemblance(cells)
    assert table.chance.iloc[0] == pytest.approx(400 / 1299)
    like_reference, missing = table.mixing.iloc[:2], table.mixing.iloc[2]
    assert like_reference.between(0.8, 1.4).all(), like_reference.tolist()
    assert missing < 0.05
    assert resembling_subtypes(table) == ["0", "1"]


def test_the_demo_can_make_another_fine_type_anomalous():
    demo = load_demo(anomalies=[PLASMA_TYPE])
    targets = ad.concat(list(demo.targets.values()))
    anomalous = targets.obs["is_anomaly"].to_numpy(bool)
    assert set(targets.obs[FINE_LABEL_KEY][anomalous]) == {PLASMA_TYPE} and anomalous.sum() == 29
    assert PLASMA_TYPE not in set(demo.reference.obs[FINE_LABEL_KEY])
    assert ANOMALY_TYPE in set(demo.reference.obs[FINE_LABEL_KEY]), "the other B cells are normal"
    with pytest.raises(InputError, match="no cell type platelets"):
        load_demo(anomalies=["platelets"])
