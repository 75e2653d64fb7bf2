"""Subtypes: split the anomalous cells into subtypes (module IV), explore them, export a selection."""

import numpy as np
import pandas as pd
import streamlit as st

from acsleuth_core import keys
from acsleuth_core.calls import called_normal_by_resemblance, threshold_calls
from acsleuth_core.export import cell_table, provenance, table_bytes
from acsleuth_core.markers import marker_dots
from acsleuth_core.plots import colourable_columns
from acsleuth_core.resemblance import describe_resemblance, resembling_subtypes
from acsleuth_core.runs import start_subtype_run
from acsleuth_core.subtype_plots import marker_dot_plot, selected_cells, subtype_map, subtype_sizes
from acsleuth_core.subtypes import SubtypeConfig
from acsleuth_core.subtyping import anomaly_expression, subtypes_are_stale
from pages.ui.frame import frame, job_registry, run_inputs, run_result, run_store, stage_job
from pages.ui.stage import stage_outcome, stage_run, start_stage
from pages.ui.progress import follow_job

STAGE = "subtypes"
COLOUR_MODES = ("subtype", "a cell annotation", "a gene")
MARKER_TABLES = {"markers_vs_anomalies": "vs the other anomalies", "markers_vs_reference": "vs the reference's normal cells"}

frame("Subtypes")
st.title("4 · Anomaly subtypes")
st.markdown(
    "ACsleuth embeds each anomalous cell's expression and the detector's reconstruction residual of it "
    "(principal components over the anomalous cells), fuses the two, and clusters the fused embedding "
    "(DESC-style) into **subtypes**. Re-clustering with another number of subtypes retrains no GAN and takes "
    "seconds."
)
run = stage_run("No anomalies to split yet")

job = stage_job(run, STAGE)
busy = job is not None and job.status().active
adata, inputs = run_result(run), run_inputs(run)
saved = adata.uns[keys.UNS].get(keys.SUBTYPES)
corrected = keys.CORRECTED in adata.layers
n_past_threshold = int(threshold_calls(adata).sum())

with st.expander("Find subtypes", expanded=saved is None and not busy):
    with st.form("subtypes"):
        st.caption(f"Run: {run.info.get('name', run.id)} · {n_past_threshold:,} cells past the anomaly threshold")
        left, middle, right = st.columns(3)
        mode = left.radio("Number of subtypes", ["automatic", "fixed"], horizontal=True, key="subtype_mode")
        k = left.number_input("Subtypes (when fixed)", 1, 50, 3, key="subtype_k")
        resolution = middle.slider(
            "Leiden resolution (automatic mode)", 0.05, 2.0, SubtypeConfig.resolution, 0.05, key="subtype_resolution",
            help="The automatic mode compares k-means for k = 2–10 with Leiden at this resolution and keeps the "
            "partition with the best silhouette. Higher resolution: more, smaller Leiden clusters.",
        )
        seed = middle.number_input("Seed", 0, 2**31 - 1, 0, key="subtype_seed")
        use_correction = right.checkbox(
            "Use the batch correction", value=corrected, disabled=not corrected, key="subtype_corrected",
            help=(
                "On: each sample's expression is shifted by its batch effect, learnt from its kin pairs. Off, or "
                "before a correction, the expression as the model saw it is used (the paper's ablation)."
            ),
        )
        use_residual = right.checkbox(
            "Fuse the reconstruction residual", value=True, key="subtype_residual",
            help="Off: cluster on the expression embedding alone (the paper's ablation).",
        )
        reference_like_normal = right.checkbox(
            "Call cells like the reference normal", value=True, key="subtype_reference_like_normal",
            help="A subtype whose cells have many reference cells among their nearest neighbours is most likely "
            "normal cells past the threshold. On: its cells that have many reference neighbours themselves are "
            "called normal (and leave the subtypes). Off: they stay anomalous and the subtype is only marked.",
        )
        if st.form_submit_button("Find subtypes", type="primary", disabled=busy):
            config = SubtypeConfig(
                n_subtypes="auto" if mode == "automatic" else int(k), resolution=float(resolution),
                use_residual=use_residual, seed=int(seed),
            )
            start_stage(
                run, STAGE,
                lambda: start_subtype_run(
                    run_store(), job_registry(), run, config=config, use_correction=use_correction,
                    reference_like_normal=reference_like_normal,
                ),
            )

follow_job(
    job, running="Subtypes are being found in the background: you can switch pages and come back.",
    cancel_label="Cancel", noun="subtyping",
    finishing={"module IV": "Finding marker genes and laying out the UMAP…"},
)
stage_outcome(run, STAGE, job, "subtyping")

if saved is None or not run.has_subtype_layout:
    st.stop()
if subtypes_are_stale(adata):
    st.warning(
        "The anomaly threshold changed on the Detect step after these subtypes were found, so they cover other "
        "cells than the current calls. Find subtypes again to use the current calls.", icon="⚠️",
    )

layout = run.load_subtype_layout()
if not saved["params"]["used_correction"] and layout[keys.BATCH].nunique() > 1:
    st.info(
        "These subtypes were found on uncorrected expression of several samples, so a subtype may be a sample "
        "rather than a biology (check the sizes per sample below). Correct batches first (Correct step), then "
        "find subtypes again.", icon="ℹ️",
    )
resemblance = saved.get("reference_resemblance")  # absent from runs saved before the check existed
like_reference = resembling_subtypes(resemblance) if isinstance(resemblance, pd.DataFrame) else []
# the check calls cells normal only when asked to and while the subtypes match the threshold
reference_like_normal = bool(saved["params"].get("reference_like_normal")) and not subtypes_are_stale(adata)
called_normal = int(called_normal_by_resemblance(adata).sum())
n_subtypes = len(adata.obs[keys.SUBTYPE].cat.categories)
if called_normal:
    headline = f" ({called_normal:,} cells like the reference called normal)"
else:
    headline = f" ({len(like_reference)} like the reference)" if like_reference else ""
st.subheader(f"{n_subtypes} subtype{'' if n_subtypes == 1 else 's'} of {len(layout):,} anomalous cells{headline}")
passes = f"{saved['n_epochs']} training pass{'' if saved['n_epochs'] == 1 else 'es'}"
st.caption(
    f"{saved['k_reason']}. Clustering "
    f"{'on batch-adjusted expression' if saved['params']['used_correction'] else 'on uncorrected expression'}"
    f"{'' if saved['params']['use_residual'] else ', without the residual branch'}; {passes}."
)
if isinstance(resemblance, pd.DataFrame):
    message = describe_resemblance(resemblance, called_normal=called_normal if reference_like_normal else None)
    if message:
        (st.info if reference_like_normal else st.warning)(message, icon="ℹ️" if reference_like_normal else "⚠️")
    with st.expander("How much each subtype resembles the reference"):
        st.dataframe(resemblance.round(3), hide_index=True)
        st.caption(
            "reference_neighbours: mean share of reference cells among a subtype's cells' nearest neighbours (PCA "
            "of reference and anomalous cells together); chance: the reference's share of all those cells; "
            "mixing: their ratio. A type missing from the reference mixes little with it. cells_like_reference: "
            "the cells of a subtype that resembles the reference whose own neighbours mix with it as much "
            "(called normal unless kept)."
        )

if layout.empty:
    st.info("Every cell past the threshold resembled the reference, so none is left called anomalous.", icon="ℹ️")
    st.stop()
rows = adata.obs[keys.SUBTYPE].notna().to_numpy()
expression = anomaly_expression(inputs, rows)  # measured: what markers are tested on
left, right = st.columns([1, 2])
colour_mode = left.radio("Colour cells by", COLOUR_MODES, horizontal=True, key="subtype_colour_mode")
values, title = None, "subtype"
if colour_mode == "a cell annotation":
    choices = [c for c in colourable_columns(adata.obs[rows]) if not c.startswith("acsleuth_")] + [keys.BATCH]
    title = right.selectbox("Annotation", choices, key="subtype_colour_column")
    values = adata.obs[title].reindex(layout["cell"]).astype(str).to_numpy()
elif colour_mode == "a gene":
    top = next((t["gene"].iloc[0] for t in (saved[e] for e in MARKER_TABLES) if isinstance(t, pd.DataFrame) and len(t)), None)
    title = right.selectbox(
        "Gene", inputs.genes, index=inputs.genes.index(top) if top in inputs.genes else 0, key="subtype_colour_gene",
        help="Measured log expression. Starts at the top marker gene.",
    )
    column = expression[:, inputs.genes.index(title)]
    values = np.asarray(column.todense()).ravel().astype(float)
event = st.plotly_chart(
    # marked only while they stay anomalous: called normal, such cells are not on the map
    subtype_map(
        layout, values, title=title, like_reference=like_reference if values is None and not reference_like_normal else (),
    ),
    key="subtype_map", on_select="rerun", selection_mode=("box", "lasso"),
)
st.caption(
    "UMAP of the fused embedding of the anomalous cells. Draw a box or a lasso around cells (toolbar, top right) "
    "to list and export them."
)

chosen = selected_cells(event.selection if event else None)
if chosen:
    table = cell_table(adata).set_index("cell").loc[chosen].reset_index()
    st.markdown(f"**{len(table):,} cells selected**")
    st.dataframe(table, hide_index=True)
    st.download_button(
        f"Export the {len(table):,} selected cells (CSV)", table_bytes(table, "csv", provenance(adata)),
        "acsleuth_selected_cells.csv", "text/csv", key="export_selection",
    )

st.subheader("Subtype sizes per sample")
st.plotly_chart(subtype_sizes(layout), key="subtype_sizes")

st.subheader("Marker genes")
labels = adata.obs[keys.SUBTYPE][rows].astype(str).to_numpy()
for tab, (entry, name) in zip(st.tabs([name for name in MARKER_TABLES.values()]), MARKER_TABLES.items()):
    with tab:
        markers = saved[entry]
        if not isinstance(markers, pd.DataFrame) or markers.empty:
            one_subtype = n_subtypes == 1 and entry == "markers_vs_anomalies"
            st.info(
                "One subtype only: there are no other anomalies to compare it with." if one_subtype
                else "No markers: a Wilcoxon test needs at least 2 cells in a subtype."
            )
            continue
        st.plotly_chart(marker_dot_plot(marker_dots(expression, labels, inputs.genes, markers)), key=f"dots_{entry}")
        st.caption(
            f"Top 3 genes per subtype {name} (Wilcoxon test on the measured log expression): dot size = share of "
            "the subtype's cells expressing the gene, colour = mean log expression."
        )
        st.dataframe(markers, hide_index=True)
st.page_link("pages/5_Export.py", label="Next: export every cell with its subtype", icon="➡️")
