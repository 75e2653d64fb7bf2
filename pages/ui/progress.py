"""Following a background job from a page: progress bar, Cancel button, and how it ended.

Detect (training) and Correct (batch correction) both start a job in
``acsleuth_core.jobs`` and follow it the same way: while it runs the page
shows a progress bar that polls the job once a second and stops drawing the
rest; when it failed or was cancelled, a warning with its message (never a
traceback).
"""

from __future__ import annotations

from typing import Optional

import streamlit as st

from acsleuth_core.jobs import CANCELLED, FAILED, QUEUED, Job
from pages.ui.frame import describe_progress


def follow_job(
    job: Optional[Job], *, running: str, cancel_label: str, noun: str, finishing: Optional[dict[str, str]] = None
) -> None:
    """While ``job`` runs: ``running`` as an info line, the progress bar and a Cancel button, then stop the page.

    ``finishing`` maps a stage to what the job does after that stage's last
    epoch, shown then instead of a bar that sits at 100 % in silence. Once the
    job has failed or was cancelled: a warning saying so (``noun`` names the
    work, e.g. "correction").
    """
    if job is None:
        return
    status = job.status()
    if status.active:
        st.info(running)
        _poll(job, cancel_label, finishing or {})
        st.stop()
    if status.state in (FAILED, CANCELLED):
        st.warning(f"The last {noun} {status.state}: {status.message}", icon="⚠️")


@st.fragment(run_every=1.0)
def _poll(job: Job, cancel_label: str, finishing: dict[str, str]) -> None:
    """Redraw the progress bar every second; rerun the whole page when the job ends."""
    status = job.status()
    if not status.active:
        st.rerun(scope="app")
    event = status.progress
    if status.state == QUEUED:
        st.progress(0.0, text=f"Waiting for other trainings on this server to finish: place {status.queue_place} in the queue")
    elif event is None:
        st.progress(0.0, text="Starting…")
    elif event.epoch >= event.n_epochs and event.stage in finishing:
        st.progress(1.0, text=finishing[event.stage])
    else:
        st.progress(event.fraction, text=describe_progress(event))
    if st.button(cancel_label):
        job.cancel()
