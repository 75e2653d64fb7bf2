"""Correct: remove batch effects around the anomalies (modules II and III), then show how well batches mix."""

import streamlit as st

from acsleuth_core import keys
from acsleuth_core.correction import KIN_SHIFT, METHODS, CorrectionConfig, correction_is_stale, shared_label_columns
from acsleuth_core.correction_quality import BIOLOGY, METRIC_NAMES, MIXING, biology_lost
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
from pages.ui.metrics import change_delta
from pages.ui.stage import stage_outcome, stage_run, start_stage
from pages.ui.progress import follow_job

STAGE = "correction"
NO_LABELS = "none"
METRIC_HELP = {
    "batch_entropy": "Entropy of the samples among each cell's 15 nearest neighbours: 0 = neighbours all from the cell's own sample, 1 = samples evenly mixed.",
    "ilisi": "Inverse Simpson index of neighbour samples, scaled to 0–1 (1 = evenly mixed).",
    "label_purity": "Share of each cell's 15 nearest neighbours with its own label: how much biology the correction keeps.",
    "label_asw": "Silhouette width of the labels, scaled to 0–1: how tight and apart the labelled groups are.",
    "reference_transfer": "Share of target cells whose 15 nearest reference cells (on the reference's own principal axes) mostly carry the target cell's label: whether corrected cells land on reference cells of their own kind.",
}
METHOD_NAMES = {
    "kin_shift": "Kin shift: measured expression minus the batch effect its kin pairs show (recommended)",
    "style_transfer": "Style transfer: the paper's module III, expression decoded by the model",
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
    "ACsleuth pairs each target cell called **normal** with a similar reference cell (its **kin**). The gaps "
    "between a sample's cells and their kin show that sample's **batch effect** where each cell sits; it is "
    "removed from every target cell's measured expression, anomalies included. This step is optional: Export "
    "works without it."
)
run = stage_run("Nothing to correct yet")

job = stage_job(run, STAGE)
busy = job is not None and job.status().active
adata, inputs = run_result(run), run_inputs(run)
correction = adata.uns[keys.UNS].get(keys.CORRECTION)

with st.expander("Correct batches", expanded=correction is None and not busy):
    with st.form("correction"):
        st.caption(f"Run: {run.info.get('name', run.id)} · device: **{resolve_device('auto').type.upper()}** (detected)")
        method = st.radio(
            "Corrected expression", METHODS, format_func=METHOD_NAMES.get, key="correction_method",
            help="Kin shift keeps each cell's measured expression and removes only the batch effect; style transfer "
            "trains another GAN and decodes every cell, which can move cells away from their own type.",
        )
        left, middle, right = st.columns(3)
        epochs = left.number_input(
            "Epochs per module (0 = automatic)", 0, 1000, 0, key="correction_epochs",
            help="Passes over the cells for kin pairing and for style learning. Automatic trains each for about 1,000 mini-batches.",
        )
        seed = middle.number_input("Seed", 0, 2**31 - 1, 0, key="correction_seed", help="Same seed, same run → same correction.")
        label_key = right.selectbox(
            "Labels to measure biology kept", [NO_LABELS, *shared_label_columns(adata, inputs)], key="correction_labels",
            help="An obs column of both the targets and the reference, e.g. a cell type: label purity, silhouette and "
            "reference transfer are measured on it. Never used to correct.",
        )
        if st.form_submit_button("Correct batches", type="primary", disabled=busy):
            n_epochs = int(epochs) or None
            config = CorrectionConfig.seeded(
                int(seed), method=method, kin=KinConfig(epochs=n_epochs), style=StyleConfig(epochs=n_epochs)
            )
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

st.subheader("Batch mixing and biology, before → after")
metrics = correction["metrics"]
expression = metrics["expression"]
label_name = correction["params"].get("label_key")


def metric_row(names: dict[str, str]) -> None:
    shown = [name for name in names if name in expression["after"]]
    for column, name in zip(st.columns(max(len(shown), 1)), shown):
        before, after = float(expression["before"][name]), float(expression["after"][name])
        label = f"{names[name]} ({label_name})" if name in BIOLOGY else names[name]
        delta, colour = change_delta(before, after)
        column.metric(label, f"{after:.3f}", delta=delta, delta_color=colour, help=METRIC_HELP[name])


metric_row(MIXING)
if expression["after"]["batch_entropy"] < expression["before"]["batch_entropy"]:
    st.warning(
        "Samples mix less after this correction than before it: the corrected cells sit further from the other "
        "samples' cells of their kind. Try the kin-shift method, or more epochs.", icon="⚠️",
    )
if label_name:
    metric_row(BIOLOGY)
    lost = biology_lost(metrics)
    if lost:
        st.warning(
            "The correction lost some biology: " + "; ".join(lost) + ". Cells of one kind sit less with their own "
            "kind than before correcting. Check the UMAPs coloured by the label below; the kin-shift method keeps "
            "measured expression and usually keeps biology better than style transfer.", icon="⚠️",
        )
    else:
        st.success(f"Biology kept: every {label_name} measure is within 0.02 of its value before correction.")
else:
    st.info("Pick a label column (e.g. a cell type) and correct again to see how much biology the correction keeps.")
method = correction["params"].get("method", KIN_SHIFT)
st.caption(
    f"Method: {METHOD_NAMES.get(method, method)}. Measured on the reference cells and the {correction['n_kin_pairs']:,} "
    "target cells called normal (each paired with a kin), on 50 principal components of their log expression: "
    "measured before, the corrected layer after."
)
with st.expander("The same in the model's latent space"):
    latent = metrics["latent"]
    st.dataframe(
        {
            "metric": [METRIC_NAMES[n] for n in latent["after"]],
            "before": [round(float(latent["before"][n]), 3) for n in latent["after"]],
            "after": [round(float(latent["after"][n]), 3) for n in latent["after"]],
        },
        hide_index=True,
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
