"""Detect: train module I in the background, then inspect scores and set the threshold."""

import time

import streamlit as st

from acsleuth_core import keys
from acsleuth_core.detect import DetectorConfig
from acsleuth_core.errors import ACsleuthError
from acsleuth_core.pipeline import call_anomalies, calls_per_batch
from acsleuth_core.plots import loss_curves, score_histogram
from acsleuth_core.runs import start_detection_run
from acsleuth_core.runtime import resolve_device
from pages.ui.frame import current_run, frame, job_registry, loaded_data, open_run, run_store, show_error

frame("Detect")
st.title("2 · Detect anomalous cells")

data = loaded_data()
run = current_run()
job = job_registry().get(st.session_state.get("job_id"))

with st.expander("Train the detector", expanded=run is None):
    if data is None:
        st.info("Load a reference and targets on the Data page first.")
    else:
        st.caption(f"Data: {data.source} · device: **{resolve_device('auto').type.upper()}** (detected)")
        left, right = st.columns(2)
        epochs = left.number_input("Epochs (0 = automatic, ~2,000 mini-batches)", 0, 2000, 0, help="Passes over the reference.")
        seed = right.number_input("Seed", 0, 2**31 - 1, 0, help="Same seed, same data → same results.")
        memory = left.checkbox("Memory bank", True, help="Off is the paper's ablation; keep it on for real analyses.")
        name = right.text_input("Run name", "detection")
        busy = job is not None and job.status().active
        if st.button("Train and score", type="primary", disabled=busy):
            config = DetectorConfig(
                epochs=int(epochs) or None,
                seed=int(seed),
                memory_size=DetectorConfig.memory_size if memory else 0,
            )
            run, job = start_detection_run(
                run_store(), job_registry(), data.reference, data.targets, name=name, n_hvg=data.n_hvg, config=config
            )
            st.session_state["job_id"] = job.id
            open_run(run.id)


@st.fragment(run_every=1.0)
def training_progress() -> None:
    """Poll the background job; rerun the page when it ends."""
    status = job.status()
    if status.active:
        event = status.progress
        if event is None:
            st.progress(0.0, text="starting…")
        else:
            losses = ", ".join(f"{k} {v:.3g}" for k, v in event.losses.items())
            speed = f" · {event.cells_per_second:,.0f} cells/s" if event.cells_per_second else ""
            st.progress(event.fraction, text=f"{event.stage}: epoch {event.epoch}/{event.n_epochs} · {losses}{speed}")
        if st.button("Cancel"):
            job.cancel()
    else:
        st.rerun()


if job is not None and job.status().active:
    training_progress()
    st.stop()
if job is not None and job.status().state in ("failed", "cancelled"):
    st.warning(f"The last run {job.status().state}: {job.status().message}")

run = current_run()
if run is None or not run.has_result:
    st.stop()


def result_for(run_id: str):
    """The run's annotated AnnData, read from disk once per session and kept while it is unchanged."""
    cached = st.session_state.get("result")
    if cached is None or cached[0] != run_id:
        cached = (run_id, run.load_result())
        st.session_state["result"] = cached
    return cached[1]


adata = result_for(run.id)
st.subheader("Anomaly scores")
method = st.radio(
    "Threshold",
    ["label_free", "fraction", "manual"],
    format_func={"label_free": "label-free (default)", "fraction": "expected anomaly fraction", "manual": "manual"}.get,
    horizontal=True,
)
value = None
if method == "fraction":
    value = st.slider("Expected anomaly fraction", 0.01, 0.9, 0.1, 0.01)
elif method == "manual":
    value = st.slider("Score threshold", 0.0, 1.0, float(adata.uns[keys.UNS]["threshold"]["value"]), 0.001)
try:
    threshold = call_anomalies(adata, method, value)
    run_store().save_result(run, adata)
except (ACsleuthError, ValueError) as error:
    show_error(error)
    st.stop()

st.plotly_chart(score_histogram(adata), use_container_width=True)
counts = calls_per_batch(adata)
sizes = adata.obs[keys.BATCH].value_counts()
st.dataframe(
    [{"sample": b, "cells": int(sizes[b]), "called anomalous": n, "share": f"{n / sizes[b]:.1%}"} for b, n in counts.items()],
    hide_index=True,
)
st.caption(f"Threshold {threshold.value:.4f} ({threshold.method}).")
with st.expander("Training curves"):
    st.plotly_chart(loss_curves(adata), use_container_width=True)
st.page_link("pages/3_Export.py", label="Next: export the annotated cells", icon="➡️")
