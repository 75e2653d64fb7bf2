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
from acsleuth_core.jobs import Job, JobRegistry
from acsleuth_core.model_inputs import ModelInputs
from acsleuth_core.runs import RESULT_FILE, Run, RunStore
from pages.ui.owner import browser_owner

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STEPS = [
    ("Data", "a reference of normal cells and at least one target"),
    ("Detect", "loaded data (Data step)"),
    ("Correct", "a finished detection run"),
    ("Subtypes", "a finished detection run"),
    ("Export", "a finished detection run"),
]
#: the step each step can start after
PREREQUISITE = {"Detect": "Data", "Correct": "Detect", "Subtypes": "Detect", "Export": "Detect"}
#: steps that run as a stage of a finished run, keyed as in ``run.json``
STAGES = {"Correct": "correction", "Subtypes": "subtypes"}
#: how training stages are named to the user
STAGE_LABELS = {
    "module I": "Training the reconstruction model",
    "predictor": "Training the anomaly predictor",
    "module II": "Pairing target cells with reference kin",
    "module III": "Learning batch styles",
    "module IV": "Clustering anomaly subtypes",
}


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
def _server_run_store() -> RunStore:
    """One store of every run per server process. Made when the server shows its first page, it marks the
    runs an earlier server left queued or running as interrupted."""
    store = RunStore()
    store.mark_interrupted({run_id for run_id, _stage in job_registry().active_keys()})
    return store


def run_store() -> RunStore:
    """The runs this browser lists, opens and changes: its own (every run with ``ACSLEUTH_SHARED_RUNS=1``)."""
    return _server_run_store().for_owner(browser_owner())


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
        ready = {
            "Data": data is not None,
            "Detect": run is not None and run.has_result,
            **{name: run is not None and stage_status(run, stage) == "done" for name, stage in STAGES.items()},
        }
        for name, needs in STEPS:
            if ready.get(name):
                st.markdown(f"✓ **{name}** · done")
            elif name in STAGES and run is not None and stage_status(run, STAGES[name]) == "running":
                st.markdown(f"→ **{name}** · running")
            elif ready.get(PREREQUISITE.get(name)):
                st.markdown(f"→ **{name}** · ready")
            else:
                st.markdown(f"{'→' if name == step else '·'} **{name}** · needs {needs}")
        if run is not None:
            st.caption(f"Current run: {run.info.get('name', run.id)} ({run.info.get('status')})")
        st.caption(f"Runs are saved in `{run_store().root}`")


def demo_data(*, with_progenitors: bool = False) -> LoadedData:
    """The built-in demo as loaded data (PBMCs; B cells anomalous, and CD34+ progenitors too if asked)."""
    demo = load_demo(with_progenitors=with_progenitors)
    anomalies = "B cells and CD34+ progenitors" if with_progenitors else "B cells"
    return LoadedData(demo.reference, demo.targets, source=f"built-in demo (PBMCs, {anomalies} anomalous)")


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


def stage_status(run: Run, stage: str) -> Optional[str]:
    """``running``, ``done``, ``failed``, ``cancelled`` or None (never run) for a stage of ``run``
    (``correction`` or ``subtypes``), as ``run.json`` records it."""
    return (run.info.get(stage) or {}).get("status")


def stage_job(run: Run, stage: str) -> Optional[Job]:
    """This session's job of ``stage`` for ``run``, if it started one (running or ended)."""
    started = st.session_state.get(f"{stage}_job") or {}
    return job_registry().get(started.get("job")) if started.get("run") == run.id else None


def remember_stage_job(run: Run, stage: str, job: Job) -> None:
    st.session_state[f"{stage}_job"] = {"run": run.id, "job": job.id}


def run_inputs(run: Run) -> ModelInputs:
    """The cells as the run's model saw them, read once per session and run."""
    cached = st.session_state.get("inputs")
    if cached is None or cached[0] != run.id:
        cached = (run.id, run.load_inputs())
        st.session_state["inputs"] = cached
    return cached[1]


def run_result(run: Run) -> ad.AnnData:
    """The run's annotated AnnData, read from disk once per session and again only when the file changed
    (e.g. a correction finished), so every page sees the latest result."""
    stamp = (run.id, (run.folder / RESULT_FILE).stat().st_mtime_ns)
    cached = st.session_state.get("result")
    if cached is None or cached[0] != stamp:
        cached = (stamp, run.load_result())
        st.session_state["result"] = cached
    return cached[1]


def save_run_result(run: Run, adata: ad.AnnData) -> None:
    """Overwrite the run's result on disk (atomically) and keep it as this session's copy."""
    run_store().save_result(run, adata)
    st.session_state["result"] = ((run.id, (run.folder / RESULT_FILE).stat().st_mtime_ns), adata)


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
