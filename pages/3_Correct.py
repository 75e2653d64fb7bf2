"""Correct: remove batch effects around the anomalies (modules II and III), then show how well batches mix."""

import streamlit as st

from acsleuth_core import keys
from acsleuth_core.correction import CorrectionConfig, correction_is_stale, shared_label_columns
from acsleuth_core.kin import KinConfig
from acsleuth_core.layout import AFTER, BEFORE
from acsleuth_core.plots import (
    colourable_columns,
    correction_loss_curves,
    correction_umaps,
    kin_pair_map,
    layout_labels,
)
from acsleuth_core.runs import start_correction_run
from acsleuth_core.runtime import resolve_device
from acsleuth_core.style import StyleConfig
from pages.ui.frame import frame, job_registry, run_inputs, run_result, run_store, stage_job
from pages.ui.stage import stage_outcome, stage_run, start_stage
from pages.ui.progress import follow_job

STAGE = "correction"
NO_LABELS = "none"
METRICS = {
    "batch_entropy": ("Batch mixing (kNN batch entropy)", "Entropy of the samples among each cell's 15 nearest neighbours: 0 = neighbours all from the cell's own sample, 1 = samples evenly mixed."),
    "ilisi": ("iLISI", "Inverse Simpson index of neighbour samples, scaled to 0–1 (1 = evenly mixed)."),
    "label_purity": ("Label purity", "Share of each cell's neighbours with its own label: how much biology the correction keeps."),
}
#: how result columns are named in the colour menu
COLUMN_NAMES = {
    keys.ANOMALY: "anomaly call",
    keys.SCORE: "anomaly score",
    keys.RESIDUAL_NORM: "reconstruction residual norm",
    keys.KIN_CONFIDENCE: "kin confidence",
}
#: result columns that make no sense as a colour (one value per cell, or the same as "sample")
NOT_COLOURS = {keys.KIN, keys.BATCH}

frame("Correct")
st.title("3 · Correct batch effects")
st.markdown(
    "ACsleuth pairs each target cell called **normal** with a similar reference cell (its **kin**), learns each "
    "sample's technical **style** from those pairs and removes it from every target cell, anomalies included. "
    "This step is optional: Export works without it."
)
run = stage_run("Nothing to correct yet")

job = stage_job(run, STAGE)
busy = job is not None and job.status().active
adata, inputs = run_result(run), run_inputs(run)
correction = adata.uns[keys.UNS].get(keys.CORRECTION)

with st.expander("Correct batches", expanded=correction is None and not busy):
    with st.form("correction"):
        st.caption(f"Run: {run.info.get('name', run.id)} · device: **{resolve_device('auto').type.upper()}** (detected)")
        left, middle, right = st.columns(3)
        epochs = left.number_input(
            "Epochs per module (0 = automatic)", 0, 1000, 0, key="correction_epochs",
            help="Passes over the cells for kin pairing and for style learning. Automatic trains each for about 1,000 mini-batches.",
        )
        seed = middle.number_input("Seed", 0, 2**31 - 1, 0, key="correction_seed", help="Same seed, same run → same correction.")
        label_key = right.selectbox(
            "Labels for label purity", [NO_LABELS, *shared_label_columns(adata, inputs)], key="correction_labels",
            help="An obs column of both the targets and the reference, e.g. a cell type. Only measured, never used to correct.",
        )
        if st.form_submit_button("Correct batches", type="primary", disabled=busy):
            n_epochs = int(epochs) or None
            config = CorrectionConfig.seeded(int(seed), kin=KinConfig(epochs=n_epochs), style=StyleConfig(epochs=n_epochs))
            labels = None if label_key == NO_LABELS else label_key
            start_stage(
                run, STAGE, lambda: start_correction_run(run_store(), job_registry(), run, config=config, label_key=labels)
            )

follow_job(
    job, running="Batch correction runs in the background: you can switch pages and come back.",
    cancel_label="Cancel correction", noun="correction",
    finishing={"module III": "Correcting every cell, measuring batch mixing and laying out the UMAPs (up to a minute)…"},
)
stage_outcome(run, STAGE, job, "correction")

if correction is None or not run.has_layout:
    st.stop()
if correction_is_stale(adata):
    st.warning(
        "The anomaly threshold changed on the Detect step after this correction, so its kin pairs were learnt from "
        "different calls. Correct batches again to use the current calls.", icon="⚠️",
    )

st.subheader("Batch mixing before → after")
metrics = correction["metrics"]
label_name = correction["params"].get("label_key")
columns = st.columns(3)
for column, (name, (label, help_text)) in zip(columns, ((n, m) for n, m in METRICS.items() if n in metrics["after"])):
    before, after = float(metrics["before"][name]), float(metrics["after"][name])
    if name == "label_purity":
        label = f"{label} ({label_name})"
    column.metric(label, f"{after:.3f}", delta=f"{after - before:+.3f} (before {before:.3f})", help=help_text)
st.caption(
    f"Measured on the target cells called normal and the reference cells, in the model's latent space; "
    f"{correction['n_kin_pairs']:,} target cells were paired with kin."
)

layout = run.load_layout()
st.subheader("Kin pairs")
left, middle, right = st.columns(3)
n_pairs = left.slider("Kin pairs drawn", 0, 500, 100, 10, key="kin_pairs_drawn")
colour_by = middle.radio("Colour target cells by", ["sample", "kin confidence"], horizontal=True, key="kin_colour")
coordinates = right.radio("Layout", ["before correction", "after correction"], horizontal=True, key="kin_layout")
st.plotly_chart(
    kin_pair_map(
        layout, n_pairs=n_pairs, colour_by="source" if colour_by == "sample" else "confidence",
        columns=BEFORE if coordinates == "before correction" else AFTER,
    ),
    width="stretch",
)
st.caption(
    "UMAP of the reference cells and the target cells called normal; each line joins a target cell to its kin. "
    "Anomalous target cells have no kin and are left out here."
)

st.subheader("Before and after correction")
st.plotly_chart(correction_umaps(layout, title="sample"), width="stretch")
st.caption(
    "UMAPs of every target cell (anomalies included) and the reference cells: left in the detector's latent space, "
    "right in the corrected one. After a good correction the samples overlap where they hold the same cell types."
)
choices = [c for c in colourable_columns(adata.obs) if c not in NOT_COLOURS]
colour = st.selectbox(
    "Also colour by", [NO_LABELS, *choices], format_func=lambda c: COLUMN_NAMES.get(c, c), key="umap_colour",
    help="An obs column of the targets; reference cells take the reference's value when it has the column.",
)
if colour != NO_LABELS:
    labels = layout_labels(layout, adata.obs, inputs.reference.obs, colour)
    st.plotly_chart(correction_umaps(layout, labels, title=COLUMN_NAMES.get(colour, colour)), width="stretch")
with st.expander("Training curves"):
    st.plotly_chart(correction_loss_curves(adata), width="stretch")
st.page_link("pages/4_Subtypes.py", label="Next: split the anomalies into subtypes", icon="➡️")
