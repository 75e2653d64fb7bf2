"""Module I end to end: AnomalyDetector on synthetic cells, persistence, and the AnnData pipeline."""

import dataclasses
import json
import shutil

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from acsleuth_core import detect, keys, runtime
from acsleuth_core import threshold as thr
from acsleuth_core.demo import LABEL_KEY, TRUTH_KEY, load_demo
from acsleuth_core.detect import CALIBRATION_FILE, CONFIG_FILE, WEIGHTS_FILE, AnomalyDetector, DetectorConfig
from acsleuth_core.errors import InputError, ModelError
from acsleuth_core.mmd import PredictorConfig
from acsleuth_core.pipeline import call_anomalies, detect_anomalies

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

N_GENES = 60
GENES = [f"gene{i}" for i in range(N_GENES)]
CONFIG = DetectorConfig(
    epochs=15,
    latent_dim=16,
    hidden_dims=(32,),
    memory_size=64,
    batch_size=64,
    learning_rate=1e-2,  # 15 short epochs: a larger step than the default lets module I actually fit
    predictor=PredictorConfig(warmup_epochs=3, epochs=5),
)


def _log_expression(rng, profiles, types, depth=800.0):
    """Poisson counts from each type's profile, library-size normalised to 1e4 and log1p'd."""
    mean = profiles[types] * rng.lognormal(np.log(depth), 0.2, size=(types.size, 1))
    counts = rng.poisson(mean).astype(np.float64)
    return np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4).astype(np.float32)


def _synthetic(seed=0):
    """Three normal cell types in reference and target; a fourth type only in the target."""
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(1.0, 1.0, size=(4, N_GENES))
    for k in range(4):
        profiles[k, k * 12 : (k + 1) * 12] *= 8  # each type's own marker genes
    profiles /= profiles.sum(axis=1, keepdims=True)
    reference = _log_expression(rng, profiles, rng.integers(0, 3, 300))
    target_types = np.r_[rng.integers(0, 3, 200), np.full(40, 3)]
    target = _log_expression(rng, profiles, target_types)
    return reference, target, target_types == 3


@pytest.fixture(scope="module")
def data():
    return _synthetic()


@pytest.fixture(scope="module")
def fitted(data):
    reference, target, _ = data
    detector = AnomalyDetector(CONFIG).fit(reference, GENES)
    return detector, detector.score(target)


# ------------------------------------------------------------------ scoring
def test_scores_are_probabilities_and_anomalies_score_higher(data, fitted):
    _, _, is_anomaly = data
    _, result = fitted
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    assert result.scores[is_anomaly].mean() > result.scores[~is_anomaly].mean()
    assert roc_auc_score(is_anomaly, result.scores) > 0.9


def test_label_free_call_finds_the_anomalous_type(data, fitted):
    _, _, is_anomaly = data
    _, result = fitted
    assert result.threshold.method == "label_free"
    assert f1_score(is_anomaly, result.calls) > 0.8


def test_threshold_detail_records_the_route_of_the_two_view_call(fitted):
    _, result = fitted
    detail = result.threshold.detail
    assert detail["score"] == "residual mean square" and "Fisher" in detail["views"]
    assert "warm_start" not in detail  # no predictor was trained for the two-view score
    assert detail["route"] in {"mixture", "conformal_bh", "target_mixture"}
    if detail["route"] == "mixture":
        assert detail["reference_called"] <= thr.MAX_REFERENCE_CALLED
    # the reported share of held-out cells called is that of the final cut
    assert detail["reference_called"] == pytest.approx(np.mean(result.reference_scores > result.threshold.value))


def test_threshold_detail_records_the_route_of_the_papers_score(data, fitted, monkeypatch):
    _, target, _ = data
    detector, _ = fitted
    monkeypatch.setattr(detector, "_similarity", None)  # the residual view alone, as reference_similarity=False
    result = detector.score(target)
    detail = result.threshold.detail
    assert detail["score"] in {"predictor", "base"}
    assert detail["warm_start"] in {"mixture", "conformal_bh", "rank"}
    assert 0.0 <= detail["reference_in_anomalous_group"] <= 1.0
    if detail["score"] == "predictor":  # the self-check it passed
        assert detail["route"] == "mixture" or result.calls.any()
    assert detail["reference_called"] == pytest.approx(np.mean(result.reference_scores > result.threshold.value))


class _CallsEveryCell(torch.nn.Module):
    """A failed predictor: every cell, held-out reference cells too, in the anomalous group (p ≈ 0.95),
    so no cut on its scores separates target cells from held-out reference cells."""

    def forward(self, x):
        return torch.full((x.shape[0],), 3.0)


def test_a_predictor_that_calls_the_held_out_reference_falls_back_to_the_base_score(data, fitted, monkeypatch):
    _, target, is_anomaly = data
    detector, _ = fitted
    monkeypatch.setattr(detect, "fit_predictor", lambda *args, **kwargs: _CallsEveryCell())
    monkeypatch.setattr(detector, "_similarity", None)  # the residual view alone
    result = detector.score(target)
    detail = result.threshold.detail
    assert detail["reference_in_anomalous_group"] == 1.0
    assert detail["score"] == "base"
    base = detector._residual_statistics(detect._as_csr(target), None, keep_features=False).base_score
    # the scores are a monotone map of the base score, and the call follows them
    assert np.all(np.diff(result.scores[np.argsort(base, kind="stable")]) >= 0)
    np.testing.assert_array_equal(result.calls, result.scores > result.threshold.value)
    assert roc_auc_score(is_anomaly, result.scores) > 0.9
    assert result.calls.mean() < 0.5  # not every cell, unlike the failed predictor


def test_warm_start_uses_a_trusted_mixture_posterior():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 200)
    base = np.r_[rng.normal(0, 1, 400), rng.normal(6, 0.5, 100)]
    warm, route = detect._warm_start_targets(base, reference)
    assert route == "mixture"
    assert warm[400:].mean() > 0.95 and warm[:400].mean() < 0.05


def test_warm_start_falls_back_to_conformal_bh_labels_when_the_mixture_is_degenerate():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 100)
    base = np.r_[rng.normal(2.5, 1.5, 950), rng.normal(9, 0.3, 50)]  # mixture fraction > 0.9: not trusted
    warm, route = detect._warm_start_targets(base, reference)
    assert route == "conformal_bh"
    assert set(np.unique(warm)) == {0.0, 1.0}
    assert warm[950:].all()
    np.testing.assert_array_equal(warm == 1, base > thr.conformal_bh_cut(base, reference))


def test_warm_start_falls_back_to_ranks_when_nothing_clears_the_reference():
    rng = np.random.default_rng(0)
    reference, base = rng.normal(0, 1, 100), rng.normal(0, 1, 300)
    warm, route = detect._warm_start_targets(base, reference)
    assert route == "rank"
    np.testing.assert_array_equal(np.argsort(warm, kind="stable"), np.argsort(base, kind="stable"))


def test_result_has_one_row_per_target_cell(data, fitted):
    _, target, _ = data
    _, result = fitted
    n = target.shape[0]
    assert result.scores.shape == result.residual_norm.shape == result.calls.shape == (n,)
    assert result.latent.shape == (n, CONFIG.latent_dim)
    assert result.calls.dtype == bool
    np.testing.assert_array_equal(result.calls, result.scores > result.threshold.value)
    assert np.all(result.residual_norm > 0)
    assert set(result.batches) == {"target"}


def test_reference_scores_come_from_held_out_reference_cells(data, fitted):
    reference, _, _ = data
    detector, result = fitted
    assert result.reference_scores.shape == (round(reference.shape[0] * CONFIG.holdout_fraction),)
    assert np.all((result.reference_scores >= 0) & (result.reference_scores <= 1))


def test_dense_batches_are_sized_by_gene_count():
    assert runtime.dense_batch_rows(765) == 2048
    wide = runtime.dense_batch_rows(33_000)
    assert 64 < wide and wide * 33_000 <= runtime.DENSE_BATCH_VALUES
    assert runtime.dense_batch_rows(10**9) == 64  # never fewer than 64 cells


def test_scores_do_not_depend_on_the_scoring_batch_size(data, fitted, monkeypatch):
    _, target, _ = data
    detector, result = fitted
    monkeypatch.setattr(detect, "dense_batch_rows", lambda n_genes: 7)
    small_batches = detector.score(target)
    np.testing.assert_allclose(small_batches.scores, result.scores, rtol=0, atol=1e-9)
    np.testing.assert_allclose(small_batches.residual_norm, result.residual_norm, rtol=1e-6)
    np.testing.assert_allclose(small_batches.latent, result.latent, rtol=1e-5, atol=1e-6)


def test_residual_statistics_hold_no_cells_by_genes_array_unless_asked(data, fitted, monkeypatch):
    """The default score needs only per-cell summaries; the full residual features (cells × genes)
    are built only for the predictor, so wide data is scored in memory that does not scale with genes."""
    import tracemalloc

    _, target, _ = data
    detector, _ = fitted
    many_cells = detect._as_csr(np.tile(target, (20, 1)))  # 4,800 cells × 60 genes
    monkeypatch.setattr(detect, "dense_batch_rows", lambda n_genes: 64)
    feature_bytes = many_cells.shape[0] * many_cells.shape[1] * 4

    def peak_bytes(keep_features):
        tracemalloc.start()
        stats = detector._residual_statistics(many_cells, None, keep_features=keep_features)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return stats, peak

    lean, lean_peak = peak_bytes(False)
    full, full_peak = peak_bytes(True)
    assert lean.features is None and full.features.shape == many_cells.shape
    np.testing.assert_array_equal(lean.base_score, full.base_score)
    assert full_peak >= feature_bytes
    assert lean_peak < 0.6 * feature_bytes


def test_gene_scale_accumulated_over_batches_is_each_genes_residual_rms(data, fitted, monkeypatch):
    reference, _, _ = data
    detector, _ = fitted
    X = detect._as_csr(reference)
    monkeypatch.setattr(detect, "dense_batch_rows", lambda n_genes: 7)  # 300 cells in 43 batches
    residuals = detector.reconstruction_residuals(X).astype(np.float64)
    rms = np.sqrt((residuals**2).mean(axis=0))
    expected = np.maximum(rms, max(float(np.quantile(rms, 0.1)), 1e-3))
    np.testing.assert_allclose(detector._residual_gene_scale(X), expected, rtol=1e-6)


def test_training_history_has_one_value_per_epoch(fitted):
    detector, _ = fitted
    assert set(detector.history) == {"reconstruction", "generator", "critic", "wasserstein"}
    assert all(len(values) == CONFIG.epochs for values in detector.history.values())


def test_scoring_a_target_with_other_genes_raises_model_error(data, fitted):
    _, target, _ = data
    detector, _ = fitted
    with pytest.raises(ModelError, match="genes"):
        detector.score(target[:, :-1])


def test_scoring_before_fitting_raises_model_error(data):
    with pytest.raises(ModelError):
        AnomalyDetector(CONFIG).score(data[1])


def test_fitting_needs_twenty_reference_cells(data):
    with pytest.raises(ModelError, match="20"):
        AnomalyDetector(CONFIG).fit(data[0][:19], GENES)


def test_same_seed_gives_identical_scores(data, fitted):
    reference, target, _ = data
    _, result = fitted
    again = AnomalyDetector(CONFIG).fit(reference, GENES).score(target)
    np.testing.assert_array_equal(again.scores, result.scores)


def test_another_seed_gives_other_scores(data, fitted):
    reference, target, _ = data
    _, result = fitted
    other = AnomalyDetector(dataclasses.replace(CONFIG, seed=1)).fit(reference, GENES).score(target)
    assert not np.array_equal(other.scores, result.scores)


def test_memory_bank_ablation_trains_and_scores(data):
    reference, target, is_anomaly = data
    detector = AnomalyDetector(dataclasses.replace(CONFIG, memory_size=0)).fit(reference, GENES)
    assert detector.generator.memory is None
    result = detector.score(target)
    assert np.all(np.isfinite(result.scores))
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    assert roc_auc_score(is_anomaly, result.scores) > 0.8


# ------------------------------------------------------------------ persistence
@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    detector, _ = fitted
    return detector.save(tmp_path_factory.mktemp("model") / "detector")


def test_save_then_load_gives_identical_scores(data, fitted, saved):
    _, target, _ = data
    _, result = fitted
    loaded = AnomalyDetector.load(saved)
    assert loaded.config == CONFIG
    assert loaded.genes == GENES
    np.testing.assert_array_equal(loaded.score(target).scores, result.scores)


def test_saved_weights_load_with_weights_only(saved, fitted):
    detector, _ = fitted
    state = torch.load(saved / WEIGHTS_FILE, weights_only=True)
    assert set(state) == set(detector.generator.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.testing.assert_close(state["memory.queue"], detector.generator.memory.queue)


def test_saved_config_is_json_with_the_genes(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert meta["genes"] == GENES
    assert meta["config"]["latent_dim"] == CONFIG.latent_dim
    assert meta["config"]["hidden_dims"] == list(CONFIG.hidden_dims)
    assert meta["config"]["predictor"]["epochs"] == CONFIG.predictor.epochs
    assert len(meta["history"]["reconstruction"]) == CONFIG.epochs


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE, CALIBRATION_FILE])
def test_loading_a_folder_with_a_missing_file_raises_model_error(saved, tmp_path, missing):
    copy = shutil.copytree(saved, tmp_path / "incomplete")
    (copy / missing).unlink()
    with pytest.raises(ModelError, match=missing):
        AnomalyDetector.load(copy)


def test_loading_an_empty_folder_raises_model_error(tmp_path):
    with pytest.raises(ModelError):
        AnomalyDetector.load(tmp_path)


# ------------------------------------------------------------------ pipeline over AnnData
DEMO_CONFIG = dataclasses.replace(
    CONFIG,
    epochs=5,
    learning_rate=DetectorConfig.learning_rate,
    predictor=PredictorConfig(warmup_epochs=2, epochs=3),
)


def _snapshot(adata: ad.AnnData):
    return adata.X.toarray().copy(), adata.obs.copy(), adata.var_names.copy()


def _strip_labels(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.obs = out.obs.drop(columns=[LABEL_KEY, TRUTH_KEY])
    return out


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def demo_run(demo):
    before = {"reference": _snapshot(demo.reference)} | {n: _snapshot(t) for n, t in demo.targets.items()}
    run = detect_anomalies(demo.reference, demo.targets, n_hvg=200, config=DEMO_CONFIG)
    return run, before


def test_pipeline_returns_a_new_annotated_anndata(demo, demo_run):
    run, _ = demo_run
    adata = run.adata
    assert all(adata is not t for t in demo.targets.values())
    for key in (keys.SCORE, keys.ANOMALY, keys.BATCH, keys.RESIDUAL_NORM):
        assert key in adata.obs
    assert adata.obsm[keys.LATENT].shape == (adata.n_obs, DEMO_CONFIG.latent_dim)
    assert {"params", "threshold", "versions"} <= set(adata.uns[keys.UNS])
    assert adata.uns[keys.UNS]["params"]["latent_dim"] == DEMO_CONFIG.latent_dim
    assert adata.uns[keys.UNS]["threshold"]["method"] == "label_free"
    assert adata.uns[keys.UNS]["threshold"]["detail"]["score"] == "residual mean square"
    assert "torch" in adata.uns[keys.UNS]["versions"]
    scores = adata.obs[keys.SCORE].to_numpy()
    assert np.all((scores >= 0) & (scores <= 1))
    assert adata.obs[keys.ANOMALY].dtype == bool


def test_pipeline_keeps_the_targets_cells_in_order(demo, demo_run):
    run, _ = demo_run
    expected = [name for t in demo.targets.values() for name in t.obs_names]
    assert list(run.adata.obs_names) == expected
    batches = run.adata.obs[keys.BATCH].astype(str).to_numpy()
    expected_batches = np.concatenate([np.full(t.n_obs, name) for name, t in demo.targets.items()])
    np.testing.assert_array_equal(batches, expected_batches)


def test_pipeline_scores_rank_the_demo_anomalies_first(demo_run):
    run, _ = demo_run
    assert roc_auc_score(run.adata.obs[TRUTH_KEY], run.adata.obs[keys.SCORE]) > 0.8


def test_pipeline_leaves_its_inputs_unchanged(demo, demo_run):
    _, before = demo_run
    for name, adata in {"reference": demo.reference, **demo.targets}.items():
        X, obs, var_names = before[name]
        np.testing.assert_array_equal(adata.X.toarray(), X)
        assert adata.obs.equals(obs)
        assert list(adata.obs.columns) == list(obs.columns)
        assert adata.var_names.equals(var_names)
        assert keys.UNS not in adata.uns


def test_pipeline_result_writes_to_h5ad_and_reads_back(demo_run, tmp_path):
    run, _ = demo_run
    path = tmp_path / "result.h5ad"
    run.adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obs[keys.SCORE].to_numpy(), run.adata.obs[keys.SCORE].to_numpy())
    np.testing.assert_array_equal(back.obsm[keys.LATENT], run.adata.obsm[keys.LATENT])
    assert back.uns[keys.UNS]["threshold"]["value"] == run.adata.uns[keys.UNS]["threshold"]["value"]
    assert list(back.obs_names) == list(run.adata.obs_names)


def test_call_anomalies_by_fraction_calls_that_share_and_updates_uns(demo_run):
    run, _ = demo_run
    adata = run.adata.copy()
    threshold = call_anomalies(adata, "fraction", 0.2)
    called = adata.obs[keys.ANOMALY].to_numpy()
    assert abs(int(called.sum()) - 0.2 * adata.n_obs) <= 1
    assert adata.uns[keys.UNS]["threshold"]["method"] == "fraction"
    assert adata.uns[keys.UNS]["threshold"]["value"] == threshold.value
    assert sum(adata.uns[keys.UNS]["calls_per_batch"].values()) == int(called.sum())
    # the scores themselves are not touched, nor what the threshold says about them
    np.testing.assert_array_equal(adata.obs[keys.SCORE], run.adata.obs[keys.SCORE])
    assert adata.uns[keys.UNS]["threshold"]["detail"]["views"] == run.adata.uns[keys.UNS]["threshold"]["detail"]["views"]


def test_redrawing_the_label_free_call_keeps_the_score_description(demo_run):
    run, _ = demo_run
    adata = run.adata.copy()
    call_anomalies(adata, "fraction", 0.2)
    threshold = call_anomalies(adata, "label_free")
    assert threshold.value == run.adata.uns[keys.UNS]["threshold"]["value"]
    assert adata.uns[keys.UNS]["threshold"]["detail"]["score"] == "residual mean square"
    np.testing.assert_array_equal(adata.obs[keys.ANOMALY], run.adata.obs[keys.ANOMALY])


def test_call_anomalies_needs_scores_first(demo):
    with pytest.raises(InputError):
        call_anomalies(demo.targets["sample_A"].copy(), "fraction", 0.2)


def test_pipeline_calls_need_no_labels(demo, demo_run):
    run, _ = demo_run
    unlabelled = detect_anomalies(
        _strip_labels(demo.reference),
        {name: _strip_labels(t) for name, t in demo.targets.items()},
        n_hvg=200,
        config=DEMO_CONFIG,
    )
    assert LABEL_KEY not in unlabelled.adata.obs and TRUTH_KEY not in unlabelled.adata.obs
    np.testing.assert_array_equal(unlabelled.adata.obs[keys.SCORE].to_numpy(), run.adata.obs[keys.SCORE].to_numpy())
    np.testing.assert_array_equal(
        unlabelled.adata.obs[keys.ANOMALY].to_numpy(), run.adata.obs[keys.ANOMALY].to_numpy()
    )
