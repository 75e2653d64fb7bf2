"""The kin-shift corrected layer: a known gene-wise batch effect is removed, cells keep their type."""

import numpy as np
import pytest
import scipy.sparse as sp

from acsleuth_core.kin_shift import EXPRESSION_FLOOR, ShiftConfig, shift_corrected_expression
from acsleuth_core.metrics import PrincipalAxes, reference_transfer

N_GENES = 60
N_TYPES = 3


def _cells(rng, profiles, types):
    """Log expression of Poisson counts drawn around each type's profile (sparse, like real data)."""
    return np.log1p(rng.poisson(profiles[types])).astype(np.float32)


@pytest.fixture(scope="module")
def shifted_copies():
    """Reference cells of three types; targets = shifted copies of reference cells in two samples, plus
    anomalies of a fourth type; each sample has its own gene-wise effect in log space."""
    rng = np.random.default_rng(0)
    baseline = rng.gamma(0.6, 3.0, N_GENES)
    profiles = np.tile(baseline, (N_TYPES + 1, 1))
    for profile in profiles:  # types differ on a few marker genes; the batch effects touch every gene
        markers = rng.choice(N_GENES, 8, replace=False)
        profile[markers] *= np.exp(rng.normal(0.0, 1.5, 8))
    reference_types = rng.integers(0, N_TYPES, 600)
    reference = _cells(rng, profiles, reference_types)
    partner = rng.choice(600, 400, replace=False)
    batches = np.where(rng.random(400) < 0.5, "sample_A", "sample_B")
    effects = {"sample_A": rng.normal(0.0, 1.2, N_GENES), "sample_B": rng.normal(0.0, 1.2, N_GENES)}
    effect = np.stack([effects[b] for b in batches]).astype(np.float32)
    normal_target = np.maximum(reference[partner] + effect, 0.0)
    anomaly_batches = np.where(rng.random(40) < 0.5, "sample_A", "sample_B")
    anomalies = np.maximum(
        _cells(rng, profiles, np.full(40, N_TYPES)) + np.stack([effects[b] for b in anomaly_batches]), 0.0
    )
    target = np.vstack([normal_target, anomalies]).astype(np.float32)
    all_batches = np.concatenate([batches, anomaly_batches])
    normal = np.arange(440) < 400
    # a latent that knows the cell type but not the sample: what module I's encoder aims for
    latent = np.vstack([profiles[reference_types[partner]], profiles[np.full(40, N_TYPES)]]).astype(np.float32)
    latent += rng.normal(0.0, 0.3, latent.shape).astype(np.float32)
    corrected = shift_corrected_expression(
        sp.csr_matrix(target), latent, all_batches, normal, partner, sp.csr_matrix(reference), ShiftConfig(neighbours=30)
    )
    return dict(
        reference=reference, reference_types=reference_types, target=target, partner=partner, effect=effect,
        corrected=corrected.toarray(), normal=normal, profiles=profiles,
    )


def test_shifted_copies_of_reference_cells_land_on_their_own_type(shifted_copies):
    d = shifted_copies
    axes = PrincipalAxes(d["reference"], n_components=10)
    types = d["reference_types"].astype(str)
    own = types[d["partner"]]
    reference_pcs = axes.transform(d["reference"])
    measured = reference_transfer(reference_pcs, types, axes.transform(d["target"][d["normal"]]), own)
    corrected = reference_transfer(reference_pcs, types, axes.transform(d["corrected"][d["normal"]]), own)
    assert measured < 0.8  # the effect does move cells onto other types
    assert corrected >= 0.95


def test_a_known_gene_wise_effect_is_removed(shifted_copies):
    d = shifted_copies
    partners = d["reference"][d["partner"]]
    before = np.abs((d["target"][d["normal"]] - partners).mean(axis=0)).mean()
    after = np.abs((d["corrected"][d["normal"]] - partners).mean(axis=0)).mean()
    assert after < 0.25 * before


def test_anomalies_keep_their_own_type(shifted_copies):
    d = shifted_copies
    anomalies = d["corrected"][~d["normal"]]
    centroids = np.vstack([np.log1p(d["profiles"])])
    distances = np.linalg.norm(anomalies[:, None, :] - centroids[None], axis=2)
    assert (distances.argmin(axis=1) == N_TYPES).mean() >= 0.95


def test_the_layer_is_non_negative_sparse_and_in_row_order(shifted_copies):
    d = shifted_copies
    corrected = d["corrected"]
    assert corrected.shape == d["target"].shape
    assert corrected.min() == 0.0 and ((corrected > 0) & (corrected < EXPRESSION_FLOOR)).sum() == 0
    # rows come back in the target's order although samples are corrected one after the other
    assert np.corrcoef(corrected[0], d["target"][0])[0, 1] > np.corrcoef(corrected[0], d["target"][1])[0, 1]


def test_a_sample_without_kin_pairs_is_an_error():
    X = sp.csr_matrix(np.ones((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="sample 'b' has no cell with a kin"):
        shift_corrected_expression(
            X, np.zeros((4, 2), np.float32), np.array(["a", "a", "b", "b"]), np.array([True, True, False, False]),
            np.array([0, 1]), X,
        )
