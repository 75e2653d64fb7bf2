"""Plot builders returning plotly figures; the app draws them, tests check them without a browser."""

from __future__ import annotations

import anndata as ad
import numpy as np
import plotly.graph_objects as go

from . import keys

REFERENCE_LABEL = "reference (held out)"


def score_histogram(adata: ad.AnnData, *, bins: int = 50) -> go.Figure:
    """Anomaly-score histogram per batch, the held-out reference cells overlaid, the threshold drawn."""
    result = adata.uns[keys.UNS]
    edges = np.linspace(0.0, 1.0, bins + 1)
    fig = go.Figure()
    batches = adata.obs[keys.BATCH].astype(str)
    for batch in sorted(batches.unique()):
        scores = adata.obs.loc[(batches == batch).to_numpy(), keys.SCORE].to_numpy()
        fig.add_trace(_histogram(scores, edges, f"{batch} (n={scores.size:,})"))
    reference = np.asarray(result["reference_scores"])
    fig.add_trace(_histogram(reference, edges, f"{REFERENCE_LABEL} (n={reference.size:,})", dash=True))
    value = float(result["threshold"]["value"])
    fig.add_vline(x=value, line_dash="dash", line_color="firebrick", annotation_text=f"threshold {value:.3f}")
    fig.update_layout(
        barmode="overlay",
        xaxis_title="anomaly score (higher = more anomalous)",
        yaxis_title="fraction of cells",
        legend_title="sample",
        margin=dict(t=30, l=10, r=10, b=10),
    )
    return fig


def loss_curves(adata: ad.AnnData) -> go.Figure:
    """Module-I training curves, one line per loss, by epoch."""
    fig = go.Figure()
    for name, values in adata.uns[keys.UNS]["history"].items():
        values = np.asarray(values)
        fig.add_trace(go.Scatter(x=np.arange(1, values.size + 1), y=values, mode="lines", name=name))
    fig.update_layout(xaxis_title="epoch", yaxis_title="loss", margin=dict(t=30, l=10, r=10, b=10))
    return fig


def _histogram(values: np.ndarray, edges: np.ndarray, name: str, *, dash: bool = False) -> go.Bar:
    counts, _ = np.histogram(values, bins=edges)
    share = counts / max(values.size, 1)
    centres = (edges[:-1] + edges[1:]) / 2
    marker = dict(line=dict(width=1, color="black")) if dash else None
    return go.Bar(x=centres, y=share, width=edges[1] - edges[0], name=name, opacity=0.55, marker=marker)
