"""The frame every page shares: page setup, the sidebar of steps, and session state.

Pages stay short scripts: they call :func:`frame` first, then read state,
call ``acsleuth_core`` and draw. Nothing here does science.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import anndata as ad
import streamlit as st

from acsleuth_core.demo import load_demo
from acsleuth_core.errors import ACsleuthError
from acsleuth_core.jobs import JobRegistry
from acsleuth_core.runs import Run, RunStore

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STEPS = [
    ("Data", "a reference of normal cells and at least one target"),
    ("Detect", "loaded data (Data step)"),
    ("Export", "a finished detection run"),
]
#: how training stages are named to the user
STAGE_LABELS = {"module I": "Training the reconstruction model", "predictor": "Training the anomaly predictor"}


@dataclass
class LoadedData:
    """What the user loaded on the Data page, kept in this browser session only."""

    reference: ad.AnnData
    targets: dict[str, ad.AnnData]
    source: str
    n_hvg: int | str = 3000
    batch_key: Optional[str] = None
    notes: list[str] = field(default_factory=list)


@st.cache_resource
def run_store() -> RunStore:
    """One run store per server process (runs live on disk, shared by sessions)."""
    return RunStore()


@st.cache_resource
def job_registry() -> JobRegistry:
    """Background jobs of this server process, found again by id after a rerun."""
    return JobRegistry()


def frame(step: str) -> None:
    """Set up the page, restore the run named in the URL, draw the sidebar.

    Started as ``streamlit run app.py -- --demo``, every new session begins
    with the built-in demo data loaded.
    """
    st.set_page_config(page_title=f"ACsleuth Studio · {step}", page_icon=str(ASSETS / "logo.svg"), layout="wide")
    st.logo(str(ASSETS / "logo.svg"))
    _restore_run_from_url()
    if "--demo" in sys.argv[1:] and "data" not in st.session_state:
        set_loaded_data(demo_data())
    data, run = loaded_data(), current_run()
    if run is not None:
        st.query_params["run"] = run.id
    with st.sidebar:
        st.markdown("**Analysis steps**")
        ready = {"Data": data is not None, "Detect": run is not None and run.has_result}
        for name, needs in STEPS:
            if ready.get(name):
                st.markdown(f"✓ **{name}** · done")
            elif name == "Export" and ready["Detect"]:
                st.markdown(f"→ **{name}** · ready")
            else:
                st.markdown(f"{'→' if name == step else '·'} **{name}** · needs {needs}")
        if run is not None:
            st.caption(f"Current run: {run.info.get('name', run.id)} ({run.info.get('status')})")
        st.caption(f"Runs are saved in `{run_store().root}`")


def demo_data() -> LoadedData:
    """The built-in demo as loaded data (PBMCs, B cells anomalous)."""
    demo = load_demo()
    return LoadedData(demo.reference, demo.targets, source="built-in demo (PBMCs, B cells anomalous)")


def loaded_data() -> Optional[LoadedData]:
    return st.session_state.get("data")


def set_loaded_data(data: LoadedData) -> None:
    st.session_state["data"] = data


def current_run() -> Optional[Run]:
    run_id = st.session_state.get("run_id")
    if not run_id:
        return None
    try:
        return run_store().get(run_id)
    except ACsleuthError:
        st.session_state.pop("run_id", None)
        return None


def open_run(run_id: str) -> None:
    """Make ``run_id`` this session's run and put it in the URL, so a refresh reopens it."""
    st.session_state["run_id"] = run_id
    st.query_params["run"] = run_id


def _restore_run_from_url() -> None:
    run_id = st.query_params.get("run")
    if run_id and "run_id" not in st.session_state:
        try:
            run_store().get(run_id)
        except ACsleuthError:
            return
        st.session_state["run_id"] = run_id


def describe_progress(event) -> str:
    """One line for a progress bar: stage, epoch and the headline loss, in plain words."""
    stage = STAGE_LABELS.get(event.stage, event.stage)
    text = f"{stage}: epoch {event.epoch}/{event.n_epochs}"
    if "reconstruction" in event.losses:
        text += f" · reconstruction error {event.losses['reconstruction']:.3f}"
    if event.cells_per_second:
        text += f" · {event.cells_per_second:,.0f} cells/s"
    return text


def show_error(error: Exception) -> None:
    """A user-facing error in the page, never a traceback."""
    st.error(str(error), icon="⚠️")
