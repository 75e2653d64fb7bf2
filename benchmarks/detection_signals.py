"""Which label-free signals separate anomalies, read off one trained detector per data set.

    python benchmarks/detection_signals.py [--data demo cellbench cellbench-dropseq] [--seeds 0]

A diagnosis, not a method comparison: for each data set (as in
``benchmarks/detection.py``) and seed, ``detect_anomalies`` trains module I and
scores the targets once; the AUROC of each signal below is then computed
against the truth (used for evaluation only). Every signal is label-free and
fitted on reference cells only:

* ``module I score``: the MMD predictor's probability, with the detector run as
  ``DetectorConfig(reference_similarity=False)`` (the paper's score);
* ``residual mean square``: each cell's mean squared residual feature (the
  predictor's warm start and fallback score);
* ``kNN distance …``: mean distance to the 15 nearest reference cells in the
  module-I latent, in residual-feature space, or in a 50-PC PCA of the log
  expression fitted on the reference;
* ``cosine similarity``: mean cosine similarity of the log expression to the 15
  most similar reference cells, negated (a scmap-like similarity score);
* ``reference dissimilarity``: ACsleuth's second view
  (:class:`acsleuth_core.similarity.ReferenceSimilarity`, fitted on all reference cells).
"""

from __future__ import annotations

import argparse

import numpy as np

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.detection_signals
    import _common as common
    import detection
except ImportError:  # pragma: no cover
    from benchmarks import _common as common
    from benchmarks import detection

SCRIPT = "benchmarks/detection_signals.py"
K = 15
N_PCS = 50
CHUNK = 2048


def knn_mean_distance(reference: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance of each query row to its ``K`` nearest reference rows."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=K).fit(reference).kneighbors(query)[0].mean(axis=1)


def top_cosine_similarity(reference: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of each query row to its ``K`` most similar reference rows (in row chunks)."""

    def unit(X: np.ndarray) -> np.ndarray:
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    reference, out = unit(reference), np.empty(query.shape[0])
    for start in range(0, query.shape[0], CHUNK):
        similarity = unit(query[start : start + CHUNK]) @ reference.T
        out[start : start + CHUNK] = np.sort(similarity, axis=1)[:, -K:].mean(axis=1)
    return out


def signal_aurocs(data: str, seed: int) -> dict[str, float]:
    """AUROC of every signal on one data set and seed."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import roc_auc_score

    from acsleuth_core import keys
    from acsleuth_core.detect import DetectorConfig
    from acsleuth_core.model_inputs import ModelInputs
    from acsleuth_core.pipeline import detect_anomalies
    from acsleuth_core.similarity import ReferenceSimilarity

    task = detection.load_task(data)
    run = detect_anomalies(task.reference, task.targets, config=DetectorConfig(seed=seed, reference_similarity=False))
    inputs, detector = ModelInputs.from_prepared(run.prepared), run.detector
    reference, target = (np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X) for a in (inputs.reference, inputs.target))
    features, reference_features = detector.residual_features(target), detector.residual_features(reference)
    pca = PCA(N_PCS, random_state=seed).fit(reference)
    signals = {
        "module I score (MMD predictor)": run.adata.obs[keys.SCORE].to_numpy(),
        "residual mean square": (features.astype(np.float64) ** 2).mean(axis=1),
        "kNN distance, module-I latent": knn_mean_distance(detector.encode(reference), detector.encode(target)),
        "kNN distance, residual features": knn_mean_distance(reference_features, features),
        f"kNN distance, {N_PCS}-PC expression PCA": knn_mean_distance(pca.transform(reference), pca.transform(target)),
        "cosine similarity to reference (negated)": -top_cosine_similarity(reference, target),
        "reference dissimilarity (ACsleuth's second view)": ReferenceSimilarity.fit(reference, seed=seed).dissimilarity(target),
    }
    return {name: float(roc_auc_score(task.truth, values)) for name, values in signals.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=detection.DATASETS, default=list(detection.DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    command = common.reproduce_command(SCRIPT, {"data": args.data, "seeds": args.seeds})
    code = common.code_state(common.package_digests())
    columns: dict[str, dict[str, float]] = {}
    for data in args.data:
        for seed in args.seeds:
            common.log(f"{data}, seed {seed} …")
            columns[f"{data} (seed {seed})"] = common.run_in_fresh_process(signal_aurocs, data, seed)
    names = next(iter(columns.values())).keys()
    rows = [{"signal (AUROC)": name} | {col: f"{values[name]:.3f}" for col, values in columns.items()} for name in names]
    report = "\n\n".join(["# Label-free anomaly signals", f"Reproduce: `{command}`", f"Code: {code}", common.markdown_table(rows)])
    print(report)
    common.log(f"written to {common.write_result('detection_signals.md', report)}")


if __name__ == "__main__":
    main()
