"""Plot builders of the Subtypes page: the anomaly map, subtype sizes per sample, marker dot plot."""

from __future__ import annotations

from typing import Collection, Optional

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import keys
from .layout import CELL
from .markers import subtype_order
from .plots import REFERENCE_COLOUR, batch_colours, blank_axes, category_colours, embedding_layout
from .subtyping import UMAP


def subtype_map(
    layout: pd.DataFrame, values: Optional[pd.Series] = None, *, title: str = "subtype", like_reference: Collection[str] = ()
) -> go.Figure:
    """UMAP of the anomalous cells (:func:`subtyping.subtype_layout`), coloured by subtype or by ``values``.

    ``values`` (one per layout row) are drawn as categories, or as a colour
    scale when they are floats (missing values in grey). Categories named in
    ``like_reference`` (subtypes that resemble the reference) say so in the
    legend. Every point carries its cell name as ``customdata``, so a box or
    lasso selection names cells.
    """
    fig = go.Figure()
    values = layout[keys.SUBTYPE] if values is None else pd.Series(np.asarray(values), index=layout.index)
    if pd.api.types.is_float_dtype(values):
        missing = values.isna()
        if missing.any():
            fig.add_trace(_points(layout[missing], f"no value (n={int(missing.sum()):,})", REFERENCE_COLOUR))
        trace = _points(layout[~missing], title, None)
        trace.marker.update(
            color=values[~missing].to_numpy(), colorscale="Viridis",
            colorbar=dict(title=dict(text=title, side="right"), thickness=12),
        )
        trace.showlegend = False
        fig.add_trace(trace)
    else:
        values = values.astype(str)
        categories = sorted(set(values), key=subtype_order)
        colours = category_colours(values, reference_first=False)
        for category in categories:
            group = layout[values == category]
            note = ", like reference" if category in like_reference else ""
            fig.add_trace(_points(group, f"{category} (n={len(group):,}{note})", colours[category]))
    fig.update_layout(**embedding_layout(height=520), dragmode="lasso", legend_title=dict(text=f"{title}:", side="left"))
    blank_axes(fig)
    return fig


def subtype_sizes(layout: pd.DataFrame) -> go.Figure:
    """Cells per subtype, one bar per sample (batch) in each subtype."""
    counts = pd.crosstab(layout[keys.SUBTYPE].astype(str), layout[keys.BATCH].astype(str))
    counts = counts.loc[sorted(counts.index, key=subtype_order)]
    colours = batch_colours(counts.columns)
    fig = go.Figure(
        [go.Bar(x=counts.index, y=counts[batch], name=batch, marker_color=colours[batch]) for batch in counts.columns]
    )
    fig.update_layout(
        barmode="group", height=320, margin=dict(t=30, l=10, r=10, b=10),
        xaxis_title="subtype", yaxis_title="cells", legend_title_text="sample:",
    )
    fig.update_xaxes(type="category")
    return fig


def marker_dot_plot(dots: pd.DataFrame) -> go.Figure:
    """Dot plot of :func:`markers.marker_dots`: dot size = share of cells expressing, colour = mean log expression."""
    size = 6 + 22 * dots["fraction"].to_numpy()
    fig = go.Figure(
        go.Scatter(
            x=dots["gene"], y=dots["subtype"].astype(str), mode="markers",
            marker=dict(
                size=size, color=dots["mean"], colorscale="Reds", line=dict(width=0.5, color="#606060"),
                colorbar=dict(title=dict(text="mean log<br>expression", side="right"), thickness=12),
            ),
            customdata=np.column_stack([dots["fraction"] * 100, dots["mean"]]),
            hovertemplate="subtype %{y} · %{x}<br>%{customdata[0]:.0f}% of cells express it<br>mean %{customdata[1]:.2f}<extra></extra>",
        )
    )
    fig.update_layout(height=120 + 40 * dots["subtype"].nunique(), margin=dict(t=20, l=10, r=10, b=10), plot_bgcolor="white")
    fig.update_xaxes(type="category", tickangle=-45, showgrid=True, gridcolor="#eeeeee")
    fig.update_yaxes(type="category", title="subtype", showgrid=True, gridcolor="#eeeeee", autorange="reversed")
    return fig


def selected_cells(selection) -> list[str]:
    """Cell names of the points a box or lasso selection on :func:`subtype_map` picked (none: empty list)."""
    points = (selection or {}).get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    return list(dict.fromkeys(str(p["customdata"]) for p in points if p.get("customdata") is not None))


def _points(cells: pd.DataFrame, name: str, colour: Optional[str]) -> go.Scattergl:
    hover = (cells[CELL].astype(str) + "<br>" + cells[keys.BATCH].astype(str) + " · subtype " + cells[keys.SUBTYPE].astype(str)).tolist()
    return go.Scattergl(
        x=cells[UMAP[0]].to_numpy(), y=cells[UMAP[1]].to_numpy(), mode="markers", name=name,
        marker=dict(size=6, color=colour, opacity=0.85), hovertext=hover, hoverinfo="text",
        customdata=cells[CELL].astype(str).to_numpy(),
    )
