"""What the Correct and Subtypes pages share: a stage of a finished run, started and followed as a job."""

from __future__ import annotations

from typing import Callable, Optional

import streamlit as st

from acsleuth_core.errors import ACsleuthError
from acsleuth_core.jobs import Job
from acsleuth_core.runs import Run
from pages.ui.frame import current_run, remember_stage_job, show_error, stage_status


def stage_run(nothing_yet: str) -> Run:
    """The session's run when it has a result and saved model inputs; otherwise say why and stop the page."""
    run = current_run()
    if run is None or not run.has_result:
        st.info(f"{nothing_yet}: finish a detection run first (Detect page), or reopen one from the home page.")
        st.stop()
    if not run.has_inputs:
        st.info("This run was saved without the cells as the model saw them: train it again on the Detect page.")
        st.stop()
    return run


def start_stage(run: Run, stage: str, start: Callable[[], Job]) -> None:
    """Start the stage's job (``start()``), remember it for this session and rerun; a refused start is shown."""
    try:
        job = start()
    except ACsleuthError as error:
        show_error(error)
    else:
        remember_stage_job(run, stage, job)
        st.rerun()


def stage_outcome(run: Run, stage: str, job: Optional[Job], noun: str) -> None:
    """Without a job of this session: how the stage's last run ended, as ``run.json`` records it."""
    if job is not None:
        return
    status = stage_status(run, stage)
    if status in ("failed", "cancelled", "interrupted"):
        st.warning(f"The last {noun} {status}: {run.info[stage].get('message', '')}", icon="⚠️")
    elif status == "running":
        st.info(
            f"A {noun} of this run was started in another browser session and has not finished (or the server "
            f"stopped during it). Reload this page to see its result, or start a new {noun} above."
        )
