"""Plot builders returning plotly figures; the app draws them, tests check them without a browser."""

from __future__ import annotations

import anndata as ad
import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from . import keys

REFERENCE_LABEL = "reference cells held out of training"
LOSS_LABELS = {
    "reconstruction": "reconstruction error (L1)",
    "generator": "generator loss",
    "critic": "critic loss",
    "wasserstein": "critic's real-vs-reconstructed gap",
}


def score_histogram(adata: ad.AnnData, *, bins: int = 60) -> go.Figure:
    """Anomaly-score histogram per sample, with the held-out reference cells and the threshold.

    Bins span the observed scores (not the whole 0–1 range), so groups that
    sit close together stay readable; bars show the share of each sample.
    """
    result = adata.uns[keys.UNS]
    scores = adata.obs[keys.SCORE].to_numpy()
    reference = np.asarray(result["reference_scores"])
    threshold = float(result["threshold"]["value"])
    edges = _edges(np.concatenate([scores, reference, [threshold]]), bins)
    fig = go.Figure()
    batches = adata.obs[keys.BATCH].astype(str).to_numpy()
    palette = qualitative.Set2
    for i, batch in enumerate(sorted(set(batches))):
        values = scores[batches == batch]
        fig.add_trace(_bars(values, edges, f"{batch} (n={values.size:,})", palette[i % len(palette)]))
    fig.add_trace(_outline(reference, edges, f"{REFERENCE_LABEL} (n={reference.size:,})"))
    fig.add_vline(x=threshold, line_dash="dash", line_color="firebrick", line_width=2)
    fig.add_annotation(
        x=threshold, y=1, yref="paper", yanchor="bottom", showarrow=False,
        text=f"threshold {threshold:.3g}", font=dict(color="firebrick"),
    )
    fig.update_layout(
        barmode="overlay",
        xaxis_title="anomaly score (higher = more anomalous)",
        yaxis_title="share of the sample's cells",
        legend=dict(orientation="h", yanchor="top", y=-0.2),
        margin=dict(t=40, l=10, r=10, b=10),
        height=420,
    )
    return fig


def loss_curves(adata: ad.AnnData) -> go.Figure:
    """Module-I training curves by epoch, one panel per loss (their scales differ widely)."""
    history = adata.uns[keys.UNS]["history"]
    names = list(history)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[LOSS_LABELS.get(n, n) for n in names])
    for col, name in enumerate(names, start=1):
        values = np.asarray(history[name], dtype=float)
        fig.add_trace(
            go.Scatter(x=np.arange(1, values.size + 1), y=values, mode="lines", name=name, showlegend=False),
            row=1, col=col,
        )
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_layout(height=300, margin=dict(t=40, l=10, r=10, b=10))
    return fig


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    low, high = float(np.min(values)), float(np.max(values))
    pad = max((high - low) * 0.02, 1e-6)
    return np.linspace(max(low - pad, 0.0), min(high + pad, 1.0), bins + 1)


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts / max(values.size, 1)


def _bars(values: np.ndarray, edges: np.ndarray, name: str, colour: str) -> go.Bar:
    centres = (edges[:-1] + edges[1:]) / 2
    return go.Bar(
        x=centres, y=_shares(values, edges), width=edges[1] - edges[0], name=name,
        marker=dict(color=colour, line=dict(width=0)), opacity=0.75,
    )


def _outline(values: np.ndarray, edges: np.ndarray, name: str) -> go.Scatter:
    shares = _shares(values, edges)
    x = np.repeat(edges, 2)[1:-1]
    y = np.repeat(shares, 2)
    return go.Scatter(x=x, y=y, mode="lines", name=name, line=dict(color="black", width=1.5))
