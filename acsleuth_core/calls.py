"""The anomaly call of a result, ``obs[keys.ANOMALY]``, derived in one place.

A cell is called anomalous when its score is above the threshold, unless the
subtype stage (module IV) found that it resembles the reference, its subtype
and its own neighbours alike (:mod:`resemblance`), and was asked to call such
cells normal. That second
part holds only while the subtypes match the current threshold: after a new
threshold the subtypes cover other cells, and the call is the threshold's
alone until subtypes are found again.

Every writer of a threshold or of subtypes ends with :func:`refresh_calls`, so
the call never depends on which stage ran last.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from . import keys


def threshold_calls(adata: ad.AnnData) -> np.ndarray:
    """Cells whose score is above the saved threshold: the call before any subtype check."""
    scores = adata.obs[keys.SCORE].to_numpy(dtype=np.float64)
    return scores > float(adata.uns[keys.UNS]["threshold"]["value"])


def threshold_changed_since(adata: ad.AnnData, entry: str) -> bool:
    """True when ``uns[UNS][entry]`` (a stage's record) names another anomaly threshold than the current
    one (False when the stage has not run)."""
    saved = adata.uns.get(keys.UNS, {}).get(entry)
    if not saved:
        return False
    return float(saved["threshold"]) != float(adata.uns[keys.UNS]["threshold"]["value"])


def called_normal_by_resemblance(adata: ad.AnnData) -> np.ndarray:
    """Cells past the threshold that the subtype stage called normal for resembling the reference
    (all False when it was not asked to, found none, or its subtypes are stale)."""
    entry = adata.uns[keys.UNS].get(keys.SUBTYPES)
    current = entry and entry["params"].get("reference_like_normal") and not threshold_changed_since(adata, keys.SUBTYPES)
    if not current or keys.SUBTYPE_LIKE_REFERENCE not in adata.obs:
        return np.zeros(adata.n_obs, dtype=bool)
    return adata.obs[keys.SUBTYPE_LIKE_REFERENCE].fillna(False).to_numpy(dtype=bool)


def refresh_calls(adata: ad.AnnData) -> None:
    """Set ``obs[keys.ANOMALY]`` and the calls per batch from the threshold and the subtype check."""
    adata.obs[keys.ANOMALY] = threshold_calls(adata) & ~called_normal_by_resemblance(adata)
    adata.uns[keys.UNS]["calls_per_batch"] = calls_per_batch(adata)


def calls_per_batch(adata: ad.AnnData) -> dict[str, int]:
    """Number of cells called anomalous in each batch."""
    calls = adata.obs[keys.ANOMALY].astype(bool)
    return {str(b): int(n) for b, n in calls.groupby(adata.obs[keys.BATCH], observed=True).sum().items()}
