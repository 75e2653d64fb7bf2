"""Background jobs report progress and stop when cancelled; runs persist on disk."""

import json
import time

import numpy as np
import pytest

from acsleuth_core import jobs
from acsleuth_core.errors import InputError
from acsleuth_core.progress import ProgressEvent
from acsleuth_core.runs import RUN_FILE, RunStore


def _counting_work(n_steps, pause=0.0):
    def work(progress, cancel):
        for step in range(1, n_steps + 1):
            cancel.raise_if_cancelled()
            progress(ProgressEvent("count", step, n_steps))
            time.sleep(pause)
        return n_steps * 10

    return work


def test_job_runs_off_the_calling_thread_and_keeps_its_result():
    registry = jobs.JobRegistry()
    job = registry.start(_counting_work(3), name="count")
    status = job.wait(timeout=10)
    assert status.state == jobs.DONE
    assert status.progress.epoch == 3 and status.progress.fraction == 1.0
    assert job.result() == 30
    assert registry.get(job.id) is job
    assert registry.get("unknown") is None


def test_cancelled_job_stops_early_and_says_so():
    job = jobs.Job(_counting_work(1000, pause=0.01)).start()
    time.sleep(0.05)
    job.cancel()
    status = job.wait(timeout=10)
    assert status.state == jobs.CANCELLED
    assert status.progress.epoch < 1000
    assert job.result() is None


def test_failed_job_reports_a_message_instead_of_raising():
    def broken(progress, cancel):
        raise InputError("the target has no cells")

    status = jobs.Job(broken).start().wait(timeout=10)
    assert status.state == jobs.FAILED
    assert "no cells" in status.message
    assert not status.active


def test_runs_are_listed_newest_first_and_reloaded(tmp_path):
    store = RunStore(tmp_path)
    first = store.create("first", {"seed": 0})
    time.sleep(1.1)
    second = store.create("second", {"seed": 1})
    assert [r.id for r in store.list()] == [second.id, first.id]
    assert store.get(first.id).info["params"] == {"seed": 0}
    updated = store.update(first, status="failed", message="boom")
    assert json.loads((updated.folder / RUN_FILE).read_text())["status"] == "failed"
    assert not first.has_result


def test_run_ids_are_checked_before_touching_the_disk(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(InputError):
        store.get("../../etc")
    with pytest.raises(InputError):
        store.get("20260101-000000-abcdef")


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("run", {})
    for _ in range(3):
        store.update(run, summary={"n": int(np.int64(3))})
    assert sorted(p.name for p in run.folder.iterdir()) == [RUN_FILE]
