"""Plot builders returning plotly figures; the app draws them, tests check them without a browser."""

from __future__ import annotations

from typing import Optional

import anndata as ad
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from . import keys
from . import threshold as thr
from .correction import REFERENCE_BATCH
from .layout import AFTER, BEFORE, CELL, IS_REFERENCE, SOURCE, kin_segments

REFERENCE_LABEL = "reference cells (each scored by a model that did not train on it)"
LOSS_LABELS = {
    "reconstruction": "reconstruction error (L1)",
    "generator": "generator loss",
    "critic": "critic loss",
    "wasserstein": "critic's real-vs-reconstructed gap",
}
#: colour of reference cells wherever they are drawn beside target cells
REFERENCE_COLOUR = "#9a9a9a"
KIN_LINE_COLOUR = "rgba(30, 30, 30, 0.35)"
#: a label column with more distinct numeric values than this is drawn as a colour scale
MAX_CATEGORIES = 20
CORRECTION_STAGES = {"kin": "module II: kin pairing", "style": "module III: batch styles"}


#: x axes of the score histogram: the call's p-values on a log scale, or the score itself
HISTOGRAM_SCALES = {
    "pvalue": "−log10 p against the reference cells (higher = more anomalous)",
    "score": "anomaly score (mean of the standardised views; higher = more anomalous)",
}


def score_histogram(adata: ad.AnnData, *, scale: str = "pvalue", bins: int = 60) -> go.Figure:
    """Histogram per sample, with the reference cells' own scores and the threshold.

    ``scale="pvalue"`` (default) draws ``−log10 p`` of each cell against the
    reference cells' out-of-fold scores (:func:`threshold.minus_log10_pvalues`,
    the values the label-free call reads): typical normal cells sit near 0,
    and cells beyond every reference cell keep spreading out instead of piling
    up. ``"score"`` draws the score itself. Bars show the share of each sample.
    """
    if scale not in HISTOGRAM_SCALES:
        raise ValueError(f"scale must be one of {', '.join(HISTOGRAM_SCALES)}, not {scale!r}")
    result = adata.uns[keys.UNS]
    scores = adata.obs[keys.SCORE].to_numpy(dtype=np.float64)
    reference = np.asarray(result["reference_scores"], dtype=np.float64)
    threshold = float(result["threshold"]["value"])
    if scale == "pvalue":
        scores, threshold, reference = (
            thr.minus_log10_pvalues(x, reference) for x in (scores, np.array([threshold]), reference)
        )
        threshold = float(threshold[0])
    edges = _edges(np.concatenate([scores, reference, [threshold]]), bins)
    fig = go.Figure()
    batches = adata.obs[keys.BATCH].astype(str).to_numpy()
    colours = batch_colours(batches)
    for batch, colour in colours.items():
        values = scores[batches == batch]
        fig.add_trace(_bars(values, edges, f"{batch} (n={values.size:,})", colour))
    fig.add_trace(_outline(reference, edges, f"{REFERENCE_LABEL} (n={reference.size:,})"))
    fig.add_vline(x=threshold, line_dash="dash", line_color="firebrick", line_width=2)
    fig.add_annotation(
        x=threshold, y=1, yref="paper", yanchor="bottom", showarrow=False,
        text=f"threshold {threshold:.3g}", font=dict(color="firebrick"),
    )
    fig.update_layout(
        barmode="overlay",
        xaxis_title=HISTOGRAM_SCALES[scale],
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
    """Bins spanning the values (with a 2 % margin), so groups close together stay readable."""
    values = values[np.isfinite(values)]
    low, high = float(np.min(values)), float(np.max(values))
    pad = max((high - low) * 0.02, 1e-6)
    return np.linspace(low - pad, high + pad, bins + 1)


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


def batch_colours(batches) -> dict[str, str]:
    """One colour per batch (sorted names, Set2), the same on every plot of the app."""
    palette = qualitative.Set2
    return {b: palette[i % len(palette)] for i, b in enumerate(sorted(set(map(str, batches)) - {REFERENCE_BATCH}))}


def kin_pair_map(
    layout: pd.DataFrame,
    *,
    n_pairs: int = 100,
    colour_by: str = "source",
    columns: tuple[str, str] = BEFORE,
    seed: int = 0,
) -> go.Figure:
    """Reference cells and target cells called normal on a UMAP, with kin pairs as line segments.

    ``colour_by`` is ``"source"`` (each batch, reference in grey) or
    ``"confidence"`` (target cells by kin confidence, the scale spanning the
    values shown, as they are often all small). ``columns`` picks the
    layout: :data:`~acsleuth_core.layout.BEFORE` or ``AFTER`` correction.
    Up to ``n_pairs`` pairs (a fixed random choice for ``seed``) are drawn in
    one trace, segments separated by gaps.
    """
    cells = layout[layout[IS_REFERENCE] | ~layout[keys.ANOMALY].astype(bool)]
    reference, targets = cells[cells[IS_REFERENCE]], cells[~cells[IS_REFERENCE]]
    fig = go.Figure()
    fig.add_trace(_points(reference, columns, f"reference (n={len(reference):,})", REFERENCE_COLOUR))
    if colour_by == "confidence":
        confidence = targets[keys.KIN_CONFIDENCE].to_numpy(dtype=float)
        trace = _points(targets, columns, f"target cells called normal (n={len(targets):,})", None)
        trace.marker.update(
            color=confidence, colorscale="Viridis",
            colorbar=dict(title=dict(text="kin confidence", side="right"), thickness=12),
        )
        trace.hovertext = [f"{c}<br>kin confidence {v:.2f}" for c, v in zip(trace.hovertext, confidence)]
        fig.add_trace(trace)
    elif colour_by == "source":
        for batch, colour in batch_colours(targets[SOURCE]).items():
            group = targets[targets[SOURCE] == batch]
            fig.add_trace(_points(group, columns, f"{batch}, called normal (n={len(group):,})", colour))
    else:
        raise ValueError(f"colour_by must be 'source' or 'confidence', not {colour_by!r}")
    segments = kin_segments(layout, columns, n_pairs, seed)
    fig.add_trace(_segments(segments, f"kin pairs ({len(segments):,} shown)"))
    fig.update_layout(**embedding_layout(height=560))
    blank_axes(fig)
    return fig


def correction_umaps(layout: pd.DataFrame, labels: Optional[pd.Series] = None, *, title: str = "sample") -> go.Figure:
    """Before and after correction side by side, all laid-out cells coloured the same way in both.

    Without ``labels`` cells are coloured by source (batch, or reference);
    ``labels`` (one value per layout row, from :func:`layout_labels`) is drawn
    as categories, or as a colour scale when numeric (missing values in grey).
    ``title`` names the colouring in the legend.
    """
    panels = (("before correction", BEFORE), ("after correction", AFTER))
    fig = make_subplots(rows=1, cols=2, subplot_titles=[name for name, _ in panels], horizontal_spacing=0.04)
    values = layout[SOURCE].astype(str) if labels is None else pd.Series(np.asarray(labels), index=layout.index)
    continuous = labels is not None and pd.api.types.is_float_dtype(values)
    for col, (_, columns) in enumerate(panels, start=1):
        if continuous:
            missing = values.isna()
            grey = _points(layout[missing], columns, f"no value (n={int(missing.sum()):,})", REFERENCE_COLOUR)
            grey.update(legendgroup="missing", showlegend=col == 1)
            trace = _points(layout[~missing], columns, title, None)
            trace.marker.update(
                color=values[~missing].to_numpy(), colorscale="Viridis", cmin=values.min(), cmax=values.max(),
                colorbar=dict(title=dict(text=title, side="right"), thickness=12), showscale=col == 1,
            )
            trace.showlegend = False
            if missing.any():
                fig.add_trace(grey, row=1, col=col)
            fig.add_trace(trace, row=1, col=col)
            continue
        for category, colour in category_colours(values, reference_first=labels is None).items():
            group = layout[values.astype(str) == category]
            trace = _points(group, columns, f"{category} (n={len(group):,})", colour)
            trace.update(legendgroup=category, showlegend=col == 1)
            fig.add_trace(trace, row=1, col=col)
    fig.update_layout(**embedding_layout(height=500))
    fig.update_layout(legend_title=dict(text=f"{title}:", side="left"))
    fig.update_annotations(yshift=6)
    blank_axes(fig)
    return fig


def layout_labels(
    layout: pd.DataFrame, target_obs: pd.DataFrame, reference_obs: Optional[pd.DataFrame], column: str
) -> pd.Series:
    """The ``column`` value of every layout row, to colour :func:`correction_umaps` by.

    Target cells take it from ``target_obs`` (by cell name); reference cells
    from ``reference_obs`` when that has the column, else they are labelled
    ``"reference"`` (or left missing for a numeric column). A numeric column
    with more than :data:`MAX_CATEGORIES` values comes back as floats (a colour
    scale); anything else as strings (categories, ``"missing"`` for gaps).
    """
    is_reference = layout[IS_REFERENCE].to_numpy(bool)
    names = layout[CELL]
    sources = [(~is_reference, target_obs[column])]
    if reference_obs is not None and column in reference_obs.columns:
        sources.append((is_reference, reference_obs[column]))
    continuous = all(_is_continuous(values) for _, values in sources)
    out = pd.Series(np.nan if continuous else REFERENCE_BATCH, index=layout.index, dtype=float if continuous else object)
    for rows, values in sources:
        if not continuous:
            values = values.astype(object).where(values.notna(), "missing").astype(str)
        out[rows] = values.reindex(names[rows]).to_numpy(dtype=out.dtype)
    return out if continuous else out.fillna("missing")


def colourable_columns(obs: pd.DataFrame, *, max_categories: int = 50) -> list[str]:
    """``obs`` columns :func:`correction_umaps` can colour by: numeric ones, and categories with at most
    ``max_categories`` values (a column of cell names would draw one legend entry per cell)."""
    return [
        c for c in obs.columns
        if _is_continuous(obs[c]) or obs[c].nunique(dropna=False) <= max_categories
    ]


def correction_loss_curves(adata: ad.AnnData) -> go.Figure:
    """Training curves of the correction's GANs by epoch (module II, and module III when it ran): one row per
    module, one panel per loss."""
    history = adata.uns[keys.UNS][keys.CORRECTION]["history"]
    stages = {s: label for s, label in CORRECTION_STAGES.items() if any(k.startswith(f"{s}_") for k in history)}
    losses = list(LOSS_LABELS)
    fig = make_subplots(
        rows=len(stages), cols=len(losses), subplot_titles=[LOSS_LABELS[n] for n in losses], vertical_spacing=0.12,
    )
    for row, (stage, stage_label) in enumerate(stages.items(), start=1):
        for col, name in enumerate(losses, start=1):
            values = np.asarray(history.get(f"{stage}_{name}", []), dtype=float)
            fig.add_trace(
                go.Scatter(x=np.arange(1, values.size + 1), y=values, mode="lines", name=f"{stage} {name}", showlegend=False),
                row=row, col=col,
            )
        fig.update_yaxes(title_text=stage_label, row=row, col=1)
    fig.update_xaxes(title_text="epoch", row=len(stages))
    fig.update_annotations(font_size=12)
    fig.update_layout(height=260 * len(stages), margin=dict(t=40, l=10, r=10, b=10))
    return fig


def _points(cells: pd.DataFrame, columns: tuple[str, str], name: str, colour: Optional[str]) -> go.Scattergl:
    hover = (cells[CELL].astype(str) + "<br>" + cells[SOURCE].astype(str)).tolist()
    return go.Scattergl(
        x=cells[columns[0]].to_numpy(), y=cells[columns[1]].to_numpy(), mode="markers", name=name,
        marker=dict(size=4, color=colour, opacity=0.8), hovertext=hover, hoverinfo="text",
    )


def _segments(segments: pd.DataFrame, name: str) -> go.Scattergl:
    """All segments in one trace: x0, x1, gap, x0, x1, gap, ..."""
    gap = np.full(len(segments), np.nan)
    x = np.column_stack([segments["x0"], segments["x1"], gap]).ravel()
    y = np.column_stack([segments["y0"], segments["y1"], gap]).ravel()
    return go.Scattergl(x=x, y=y, mode="lines", name=name, line=dict(color=KIN_LINE_COLOUR, width=1), hoverinfo="skip")


def _is_continuous(values: pd.Series) -> bool:
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    return numeric and values.nunique() > MAX_CATEGORIES


def category_colours(values: pd.Series, *, reference_first: bool) -> dict[str, str]:
    """Batches keep their app-wide colours; other categories get a long qualitative palette; reference is grey."""
    categories = sorted(set(values.astype(str)))
    if reference_first:
        colours = batch_colours(categories)
    else:
        palette = [c for c in qualitative.D3 + qualitative.Alphabet if not _is_grey(c)]
        others = [c for c in categories if c != REFERENCE_BATCH]
        colours = {c: palette[i % len(palette)] for i, c in enumerate(others)}
    if REFERENCE_BATCH in categories:
        colours = {REFERENCE_BATCH: REFERENCE_COLOUR, **colours}
    return colours


def _is_grey(colour: str) -> bool:
    """True for hex colours close to grey, kept for reference cells only."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return max(r, g, b) - min(r, g, b) < 24


def embedding_layout(height: int) -> dict:
    return dict(
        height=height,
        margin=dict(t=40, l=10, r=10, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.02, itemsizing="constant"),
        plot_bgcolor="white",
    )


def blank_axes(fig: go.Figure) -> None:
    """UMAP coordinates have no units: no ticks, no grid, no axis titles (the page says it is a UMAP)."""
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, showline=True, linecolor="#d0d0d0", mirror=True)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, showline=True, linecolor="#d0d0d0", mirror=True)
