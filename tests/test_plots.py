"""The plot builders: what they draw, checked on the figure objects (no browser)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from acsleuth_core import threshold as thr
from acsleuth_core import keys, plots, subtype_plots
from acsleuth_core.layout import AFTER, BEFORE, CELL, IS_REFERENCE, SOURCE
from acsleuth_core.markers import marker_dots


def small_layout() -> pd.DataFrame:
    """Three reference cells, four target cells in two batches (one anomalous, so without kin)."""
    return pd.DataFrame(
        {
            CELL: ["a1", "a2", "b1", "b2", "r1", "r2", "r3"],
            SOURCE: ["sample_A", "sample_A", "sample_B", "sample_B", "reference", "reference", "reference"],
            IS_REFERENCE: [False, False, False, False, True, True, True],
            keys.ANOMALY: [False, True, False, False, False, False, False],
            keys.KIN: ["r1", "", "r3", "r3", "", "", ""],
            keys.KIN_CONFIDENCE: [0.9, np.nan, 0.4, 0.6, np.nan, np.nan, np.nan],
            BEFORE[0]: [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0],
            BEFORE[1]: [0.0, -1.0, -2.0, -3.0, 20.0, 21.0, 22.0],
            AFTER[0]: [100.0, 101.0, 102.0, 103.0, 110.0, 111.0, 112.0],
            AFTER[1]: [0.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5],
        }
    )


def segments_of(fig) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) of each segment in the kin-pair trace (points separated by NaN gaps)."""
    trace = next(t for t in fig.data if t.mode == "lines")
    x, y = np.asarray(trace.x, dtype=float), np.asarray(trace.y, dtype=float)
    assert np.isnan(x[2::3]).all() and np.isnan(y[2::3]).all(), "segments are separated by gaps"
    return sorted(zip(x[0::3], y[0::3], x[1::3], y[1::3]))


def test_kin_map_draws_reference_each_batch_and_one_segment_trace():
    fig = plots.kin_pair_map(small_layout(), n_pairs=10)
    assert [t.type for t in fig.data] == ["scattergl"] * 4
    names = [t.name for t in fig.data]
    assert names == ["reference (n=3)", "sample_A, called normal (n=1)", "sample_B, called normal (n=2)", "kin pairs (3 shown)"]
    sample_a = fig.data[1]
    assert list(sample_a.x) == [0.0], "the anomalous cell a2 has no kin and is left out"
    assert fig.data[0].marker.color == plots.REFERENCE_COLOUR
    assert fig.data[1].marker.color == plots.batch_colours(["sample_A", "sample_B"])["sample_A"]


def test_kin_segments_join_each_target_cell_to_its_kin_in_the_chosen_layout():
    before = segments_of(plots.kin_pair_map(small_layout(), n_pairs=10, columns=BEFORE))
    assert before == [(0.0, 0.0, 10.0, 20.0), (2.0, -2.0, 12.0, 22.0), (3.0, -3.0, 12.0, 22.0)]
    after = segments_of(plots.kin_pair_map(small_layout(), n_pairs=10, columns=AFTER))
    assert after == [(100.0, 0.5, 110.0, 1.5), (102.0, 0.5, 112.0, 1.5), (103.0, 0.5, 112.0, 1.5)]


def test_kin_map_draws_at_most_the_requested_number_of_pairs():
    assert len(segments_of(plots.kin_pair_map(small_layout(), n_pairs=2))) == 2
    fig = plots.kin_pair_map(small_layout(), n_pairs=0)
    assert fig.data[-1].name == "kin pairs (0 shown)" and len(fig.data[-1].x) == 0


def test_kin_map_can_colour_target_cells_by_kin_confidence():
    fig = plots.kin_pair_map(small_layout(), colour_by="confidence")
    assert [t.name for t in fig.data] == ["reference (n=3)", "target cells called normal (n=3)", "kin pairs (3 shown)"]
    targets = fig.data[1]
    assert list(targets.marker.color) == pytest.approx([0.9, 0.4, 0.6])
    assert targets.marker.colorbar.title.text == "kin confidence"
    with pytest.raises(ValueError, match="colour_by"):
        plots.kin_pair_map(small_layout(), colour_by="cell_type")


def test_before_and_after_panels_colour_every_cell_by_source_alike():
    fig = plots.correction_umaps(small_layout())
    left = [t for t in fig.data if t.xaxis == "x"]
    right = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in left] == [t.name for t in right] == ["reference (n=3)", "sample_A (n=2)", "sample_B (n=2)"]
    assert [t.marker.color for t in left] == [t.marker.color for t in right]
    assert left[0].marker.color == plots.REFERENCE_COLOUR
    assert [t.showlegend for t in left] == [True] * 3 and [t.showlegend for t in right] == [False] * 3
    assert list(left[1].x) == [0.0, 1.0] and list(right[1].x) == [100.0, 101.0], "anomalies are drawn here"


def test_labels_come_from_target_obs_by_name_and_from_the_reference_when_it_has_the_column():
    layout = small_layout()
    target_obs = pd.DataFrame({"cell_type": ["B", "T", "T", "NK"]}, index=["b2", "a1", "a2", "b1"])
    reference_obs = pd.DataFrame({"cell_type": ["T", "NK", "T"]}, index=["r1", "r2", "r3"])
    labels = plots.layout_labels(layout, target_obs, reference_obs, "cell_type")
    assert list(labels) == ["T", "T", "NK", "B", "T", "NK", "T"]
    without = plots.layout_labels(layout, target_obs, reference_obs.drop(columns="cell_type"), "cell_type")
    assert list(without) == ["T", "T", "NK", "B", "reference", "reference", "reference"]

    fig = plots.correction_umaps(layout, labels, title="cell type")
    left = [t for t in fig.data if t.xaxis == "x"]
    assert [t.name for t in left] == ["B (n=1)", "NK (n=2)", "T (n=4)"]
    assert fig.layout.legend.title.text == "cell type:"


def test_grey_is_kept_for_reference_cells_even_with_many_categories():
    layout = pd.concat([small_layout()] * 3, ignore_index=True)
    layout[CELL] = [f"c{i}" for i in range(len(layout))]
    labels = pd.Series([f"type {i}" for i in range(len(layout) - 1)] + ["reference"])
    fig = plots.correction_umaps(layout, labels, title="cell type")
    colours = {t.name.split(" (")[0]: t.marker.color for t in fig.data if t.xaxis == "x"}
    assert len(colours) == len(layout)
    greys = [name for name, colour in colours.items() if plots._is_grey(colour)]
    assert greys == ["reference"]


def test_a_numeric_column_with_many_values_is_drawn_as_a_colour_scale():
    n = plots.MAX_CATEGORIES + 5
    layout = pd.concat([small_layout()] * n, ignore_index=True)
    layout[CELL] = [f"{c}_{i}" for i, c in enumerate(layout[CELL])]
    targets = layout[~layout[IS_REFERENCE]]
    target_obs = pd.DataFrame({keys.SCORE: np.linspace(0, 1, len(targets))}, index=targets[CELL])
    labels = plots.layout_labels(layout, target_obs, None, keys.SCORE)
    assert labels.dtype == float
    assert labels[layout[IS_REFERENCE]].isna().all(), "the reference has no score"
    fig = plots.correction_umaps(layout, labels, title="anomaly score")
    assert len(fig.data) == 4, "per panel: reference without a value in grey, then the coloured cells"
    grey, scored = fig.data[0], fig.data[1]
    assert grey.marker.color == plots.REFERENCE_COLOUR and len(grey.x) == 3 * n
    assert list(scored.marker.color) == pytest.approx(target_obs[keys.SCORE].to_numpy())
    assert scored.marker.showscale and not fig.data[3].marker.showscale


def test_only_numbers_and_short_categories_are_offered_as_colours():
    obs = pd.DataFrame(
        {
            "cell_type": ["T", "B"] * 40,
            "barcode_copy": [f"cell{i}" for i in range(80)],
            "n_genes": np.arange(80),
            "is_anomaly": [True, False] * 40,
        }
    )
    assert plots.colourable_columns(obs) == ["cell_type", "n_genes", "is_anomaly"]


def test_correction_curves_show_both_modules_and_every_loss():
    history = {
        f"{stage}_{loss}": np.arange(3, dtype=float) + i
        for i, (stage, loss) in enumerate((s, l) for s in ("kin", "style") for l in plots.LOSS_LABELS)
    }
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    adata.uns[keys.UNS] = {keys.CORRECTION: {"history": history}}
    fig = plots.correction_loss_curves(adata)
    assert len(fig.data) == 2 * len(plots.LOSS_LABELS)
    assert list(fig.data[0].y) == [0.0, 1.0, 2.0]
    assert list(fig.data[-1].y) == list(history["style_wasserstein"])
    assert [a.text for a in fig.layout.annotations] == list(plots.LOSS_LABELS.values())
    assert fig.layout.yaxis.title.text.startswith("module II") and fig.layout.yaxis5.title.text.startswith("module III")


def test_score_histogram_gives_each_sample_the_colour_it_has_on_the_correction_plots():
    adata = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    adata.obs[keys.SCORE] = [0.1, 0.2, 0.8, 0.9]
    adata.obs[keys.BATCH] = ["sample_B", "sample_A", "sample_B", "sample_A"]
    adata.uns[keys.UNS] = {"reference_scores": [0.1, 0.15], "threshold": {"value": 0.5}}
    fig = plots.score_histogram(adata)
    colours = plots.batch_colours(["sample_A", "sample_B"])
    assert [t.marker.color for t in fig.data[:2]] == [colours["sample_A"], colours["sample_B"]]


def test_score_histogram_draws_minus_log10_p_by_default_and_the_score_on_request():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 200)
    scores = np.r_[rng.normal(0, 1, 300), rng.normal(12, 1, 50)]  # 50 cells far beyond every reference cell
    adata = ad.AnnData(np.zeros((scores.size, 1), dtype=np.float32))
    adata.obs[keys.SCORE] = scores
    adata.obs[keys.BATCH] = "sample_A"
    adata.uns[keys.UNS] = {"reference_scores": reference, "threshold": {"value": 3.0}}
    by_p = plots.score_histogram(adata)
    assert by_p.layout.xaxis.title.text.startswith("−log10 p")
    # the far cells do not pile up in one bar at the edge: they spread past log10(n + 1)
    bars = by_p.data[0]
    far_bars = np.asarray(bars.y)[np.asarray(bars.x) > np.log10(201)]
    assert (far_bars > 0).sum() >= 5
    assert by_p.layout.shapes[0].x0 == pytest.approx(thr.minus_log10_pvalues(np.array([3.0]), reference)[0])
    by_score = plots.score_histogram(adata, scale="score")
    assert by_score.layout.shapes[0].x0 == 3.0 and "anomaly score" in by_score.layout.xaxis.title.text
    with pytest.raises(ValueError, match="scale"):
        plots.score_histogram(adata, scale="logit")


# ------------------------------------------------------------------ subtypes
def subtype_layout_table() -> pd.DataFrame:
    """Five anomalous cells: subtypes 1, 1, 2, 10, 10 over two samples."""
    return pd.DataFrame(
        {
            CELL: ["c1", "c2", "c3", "c4", "c5"],
            keys.BATCH: ["sample_A", "sample_B", "sample_A", "sample_A", "sample_B"],
            keys.SUBTYPE: ["1", "1", "2", "10", "10"],
            keys.SUBTYPE_CONFIDENCE: [0.9, 0.8, 0.7, 0.95, 0.6],
            "umap_1": [0.0, 1.0, 2.0, 3.0, 4.0],
            "umap_2": [0.0, 1.0, 2.0, 3.0, 4.0],
        }
    )


def test_subtype_map_has_one_trace_per_subtype_in_natural_order_and_names_every_cell():
    fig = subtype_plots.subtype_map(subtype_layout_table())
    assert [t.name for t in fig.data] == ["1 (n=2)", "2 (n=1)", "10 (n=2)"]
    assert sorted(c for t in fig.data for c in t.customdata) == ["c1", "c2", "c3", "c4", "c5"]
    assert fig.layout.dragmode == "lasso"
    flagged = subtype_plots.subtype_map(subtype_layout_table(), like_reference=["10"])
    assert [t.name for t in flagged.data] == ["1 (n=2)", "2 (n=1)", "10 (n=2, like reference)"]


def test_subtype_map_draws_gene_values_as_a_colour_scale_with_missing_in_grey():
    values = pd.Series([0.0, 1.5, np.nan, 2.0, 0.5])
    fig = subtype_plots.subtype_map(subtype_layout_table(), values, title="CD79A")
    grey, scale = fig.data
    assert list(grey.customdata) == ["c3"]
    assert list(scale.marker.color) == [0.0, 1.5, 2.0, 0.5]
    assert scale.marker.colorbar.title.text == "CD79A"


def test_subtype_sizes_count_cells_per_subtype_and_sample():
    fig = subtype_plots.subtype_sizes(subtype_layout_table())
    bars = {t.name: dict(zip(t.x, t.y)) for t in fig.data}
    assert bars == {"sample_A": {"1": 1, "2": 1, "10": 1}, "sample_B": {"1": 1, "2": 0, "10": 1}}


def test_selected_cells_reads_box_and_lasso_selections():
    selection = {"points": [{"customdata": "c2", "x": 1}, {"customdata": "c4"}, {"customdata": "c2"}]}
    assert subtype_plots.selected_cells(selection) == ["c2", "c4"]
    assert subtype_plots.selected_cells(None) == []
    assert subtype_plots.selected_cells({"points": []}) == []


def test_marker_dots_summarise_the_top_genes_of_each_subtype():
    expression = np.array([[0, 2, 1], [0, 4, 0], [3, 0, 0], [1, 0, 0]], dtype=np.float32)
    labels = np.array(["1", "1", "2", "2"])
    markers = pd.DataFrame({"subtype": ["1", "1", "2"], "gene": ["g1", "g2", "g0"]})
    dots = marker_dots(expression, labels, ["g0", "g1", "g2"], markers, n_per_subtype=1)
    assert list(dots.gene.unique()) == ["g1", "g0"]
    row = dots.query("subtype == '1' and gene == 'g1'").iloc[0]
    assert row["mean"] == pytest.approx(3.0) and row["fraction"] == pytest.approx(1.0)
    row = dots.query("subtype == '2' and gene == 'g0'").iloc[0]
    assert row["mean"] == pytest.approx(2.0) and row["fraction"] == pytest.approx(1.0)
    fig = subtype_plots.marker_dot_plot(dots)
    assert list(fig.data[0].x) == list(dots.gene)
