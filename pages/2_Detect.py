"""Detect: train module I in the background, then inspect scores and set the threshold."""

import streamlit as st

from acsleuth_core import keys
from acsleuth_core.calls import called_normal_by_resemblance, calls_per_batch
from acsleuth_core.detect import DetectorConfig
from acsleuth_core.errors import ACsleuthError
from acsleuth_core.pipeline import call_anomalies
from acsleuth_core.plots import HISTOGRAM_SCALES, loss_curves, score_histogram
from acsleuth_core.runs import start_detection_run, train_again
from acsleuth_core.runtime import resolve_device
from acsleuth_core.threshold import explain as explain_threshold
from acsleuth_core.threshold import shift_warning
from acsleuth_core.views import VIEWS
from pages.ui.frame import (
    current_run,
    frame,
    job_registry,
    loaded_data,
    open_run,
    run_result,
    run_store,
    save_run_result,
    show_error,
)
from pages.ui.progress import follow_job

frame("Detect")
st.title("2 · Detect anomalous cells")

data = loaded_data()
job = job_registry().get(st.session_state.get("job_id"))
busy = job is not None and job.status().active

with st.expander("Train the detector", expanded=current_run() is None and not busy):
    if data is None:
        st.info("Load a reference and targets on the Data page first.")
    else:
        st.caption(f"Data: {data.source} · device: **{resolve_device('auto').type.upper()}** (detected)")
        left, right = st.columns(2)
        epochs = left.number_input(
            "Epochs (0 = automatic)", 0, 2000, 0, disabled=busy, key="epochs",
            help="Passes over the reference. Automatic trains for about 2,000 mini-batches; short runs give weak scores.",
        )
        seed = right.number_input("Seed", 0, 2**31 - 1, 0, disabled=busy, help="Same seed, same data → same results.")
        memory = left.checkbox("Memory bank", True, disabled=busy, help="Off is the paper's ablation; keep it on for real analyses.")
        views = left.multiselect(
            "Score views", list(VIEWS), default=list(VIEWS), disabled=busy,
            help="What the score joins: module I's reconstruction residual, how unlike its most similar reference "
            "cells a cell is, and the paper's MMD predictor on the residuals. 'predictor' alone is the paper's score.",
        )
        name = right.text_input("Run name", "detection", disabled=busy)
        if st.button("Train and score", type="primary", disabled=busy):
            config = DetectorConfig(
                epochs=int(epochs) or None,
                seed=int(seed),
                memory_size=DetectorConfig.memory_size if memory else 0,
                views=tuple(views) or VIEWS,
            )
            run, job = start_detection_run(
                run_store(), job_registry(), data.reference, data.targets,
                name=name, n_hvg=data.n_hvg, batch_key=data.batch_key, config=config,
            )
            st.session_state["job_id"] = job.id
            open_run(run.id)
            st.rerun()


follow_job(
    job, running="Training runs in the background: you can switch pages and come back.",
    cancel_label="Cancel training", noun="run",
    finishing={stage: "Scoring the target cells and saving the run…" for stage in ("module I", "predictor")},
)

run = current_run()
if run is not None and run.info.get("status") == "interrupted" and not busy:
    st.warning(f"Training of run {run.info.get('name', run.id)} was interrupted: {run.info.get('message', '')}", icon="⚠️")
    if data is None:
        st.info("To train it again, load the same data on the Data page first.")
    elif st.button("Train again with the same settings", type="primary"):
        try:
            run, job = train_again(run_store(), job_registry(), run, data.reference, data.targets)
        except ACsleuthError as error:
            show_error(error)
        else:
            st.session_state["job_id"] = job.id
            open_run(run.id)
            st.rerun()
if run is None or not run.has_result:
    st.stop()


adata = run_result(run)
saved = adata.uns[keys.UNS]["threshold"]
scores = adata.obs[keys.SCORE]
st.subheader(f"Anomaly scores · {run.info.get('name', run.id)}")

if keys.CORRECTION in adata.uns[keys.UNS]:
    st.caption("This run's batches were corrected: after a new threshold, correct them again (Correct step), since kin pairs are learnt from the calls.")
METHOD_LABELS = {"label_free": "label-free (default)", "fraction": "expected anomaly fraction", "manual": "manual"}
with st.form("threshold"):
    method = st.radio(
        "Threshold rule", list(METHOD_LABELS), index=list(METHOD_LABELS).index(saved["method"]),
        format_func=METHOD_LABELS.get, horizontal=True,
        help="Label-free: cells scoring beyond the reference cells (each scored by a model that did not train on "
        "it) at a 10% false discovery rate. The other two are your choice.",
    )
    left, right = st.columns(2)
    fraction = left.number_input(
        "Expected anomaly fraction (for 'expected anomaly fraction')", 0.001, 0.999,
        float(saved["detail"].get("fraction", 0.1)), 0.01, format="%.3f", key="threshold_fraction",
    )
    manual = right.number_input(
        "Score threshold (for 'manual')", float(scores.min()), float(scores.max()),
        float(min(max(saved["value"], scores.min()), scores.max())), format="%.4f", key="threshold_manual",
    )
    if st.form_submit_button("Apply threshold"):
        try:
            call_anomalies(adata, method, {"fraction": fraction, "manual": manual}.get(method))
            save_run_result(run, adata)
        except (ACsleuthError, ValueError) as error:
            show_error(error)

threshold = adata.uns[keys.UNS]["threshold"]
scale = st.radio(
    "Histogram axis", list(HISTOGRAM_SCALES), format_func={"pvalue": "−log10 p (as the call sees it)", "score": "score"}.get,
    horizontal=True, key="histogram_scale",
)
st.plotly_chart(score_histogram(adata, scale=scale), width="stretch")
shift = shift_warning(scores.to_numpy(), adata.obs[keys.BATCH].astype(str).to_numpy(), adata.uns[keys.UNS]["reference_scores"])
if shift:
    st.warning(shift, icon="⚠️")
counts = calls_per_batch(adata)
sizes = adata.obs[keys.BATCH].value_counts()
st.dataframe(
    [{"sample": b, "cells": int(sizes[b]), "called anomalous": n, "share": f"{n / sizes[b]:.1%}"} for b, n in counts.items()],
    hide_index=True,
)
how, needs_a_look = explain_threshold(threshold)
note = f"Cells scoring above {threshold['value']:.4g} are called anomalous. {how}"
n_called_normal = int(called_normal_by_resemblance(adata).sum())
if n_called_normal:
    note += (
        f" Of them, {n_called_normal:,} are called normal after all: they resemble the reference, and so does "
        "their subtype (Subtypes step)."
    )
if needs_a_look:
    st.warning(note, icon="⚠️")
else:
    st.caption(note)
with st.expander("Training curves"):
    st.plotly_chart(loss_curves(adata), width="stretch")
st.page_link("pages/3_Correct.py", label="Next: correct batch effects", icon="➡️")
st.page_link("pages/5_Export.py", label="Or skip correction: export the annotated cells", icon="⏭️")
