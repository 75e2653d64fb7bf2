"""Background jobs report progress and stop when cancelled; runs persist on disk."""

import json
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from acsleuth_core import errors, jobs, keys
from acsleuth_core.errors import InputError
from acsleuth_core.progress import ProgressEvent
from acsleuth_core.run_record import LOCK_FILE
from acsleuth_core.runs import RUN_FILE, RunStore, copy_stage_keys


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


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_a_job_that_has_ended_lets_go_of_its_inputs(outcome):
    import gc
    import weakref

    class Uploaded:  # stands for the uploaded data a job's work closes over
        pass

    inputs = Uploaded()
    held = weakref.ref(inputs)

    def work(progress, cancel, data=inputs):
        if outcome == "failed":
            raise InputError("bad input")
        return "result"

    registry = jobs.JobRegistry()
    job = registry.start(work)
    del inputs, work
    job.wait(timeout=10)
    gc.collect()
    assert registry.get(job.id) is job, "the job itself stays findable"
    assert held() is None


def test_one_job_per_key_at_a_time_whichever_session_asks():
    import threading

    release = threading.Event()

    def waiting(progress, cancel):
        release.wait(10)
        return "done"

    registry = jobs.JobRegistry()
    first = registry.start(waiting, name="demo · correction", key=("run-1", "correction"))
    with pytest.raises(errors.JobBusyError, match="demo · correction"):
        registry.start(waiting, key=("run-1", "correction"))
    with pytest.raises(errors.JobBusyError):
        registry.refuse_if_busy(("run-1", "correction"))
    other_stage = registry.start(waiting, key=("run-1", "subtypes"))
    release.set()
    assert first.wait(10).state == other_stage.wait(10).state == jobs.DONE
    again = registry.start(_counting_work(1), key=("run-1", "correction"))
    assert again.wait(10).state == jobs.DONE, "a key is free again once its job has ended"


def test_updates_from_stale_copies_of_a_run_are_merged_not_lost(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("demo", {})
    seen_by_correction, seen_by_subtypes = store.get(run.id), store.get(run.id)
    store.update(seen_by_subtypes, subtypes={"status": "done"})
    store.update(seen_by_correction, correction={"status": "done"})  # read before the subtypes finished
    info = store.get(run.id).info
    assert info["subtypes"] == {"status": "done"} and info["correction"] == {"status": "done"}


def test_concurrent_updates_of_one_run_are_all_kept(tmp_path):
    import threading

    store = RunStore(tmp_path)
    run = store.create("demo", {})
    threads = [threading.Thread(target=store.update, args=(run,), kwargs={f"field_{i}": i}) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    info = store.get(run.id).info
    assert all(info[f"field_{i}"] == i for i in range(16))


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
    assert sorted(p.name for p in run.folder.iterdir()) == sorted([LOCK_FILE, RUN_FILE]), "only the lasting lock file beside it"


def _result(threshold: float) -> ad.AnnData:
    adata = ad.AnnData(np.zeros((4, 2), dtype=np.float32))
    adata.obs_names = [f"c{i}" for i in range(4)]
    adata.obs[keys.SCORE] = [0.9, 0.8, 0.1, 0.3]
    adata.obs[keys.ANOMALY] = adata.obs[keys.SCORE] > threshold
    adata.obs[keys.BATCH] = pd.Categorical(["s"] * 4)
    adata.uns[keys.UNS] = {"threshold": {"value": threshold}}
    return adata


def _subtyped(threshold: float) -> ad.AnnData:
    """What a subtype job loaded and annotated: subtype 2 (cell c1) resembles the reference."""
    finished = _result(threshold)
    finished.obs[keys.SUBTYPE] = pd.Categorical(["1", "2", None, None])
    finished.obs[keys.SUBTYPE_CONFIDENCE] = [0.9, 0.8, np.nan, np.nan]
    finished.obs[keys.SUBTYPE_LIKE_REFERENCE] = pd.array([False, True, None, None], dtype="boolean")
    finished.obsm[keys.FUSED] = np.ones((4, 3), dtype=np.float32)
    finished.uns[keys.UNS][keys.SUBTYPES] = {"k_chosen": 2, "threshold": threshold, "params": {"reference_like_normal": True}}
    return finished


def test_a_stage_saves_only_its_own_keys_so_a_threshold_changed_meanwhile_is_kept(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("run", {})
    store.save_result(run, _result(0.5))
    finished = _subtyped(0.5)
    store.save_result(run, _result(0.2))  # the user picked another threshold while the job ran
    layout = pd.DataFrame({"cell": ["c0", "c1"]})
    store.save_subtypes(run, finished, layout, {"k_chosen": 2})
    saved = run.load_result()
    assert saved.uns[keys.UNS]["threshold"]["value"] == 0.2
    # the subtypes are stale, so c1 keeps the new threshold's call although its subtype resembled the reference
    assert saved.obs[keys.ANOMALY].tolist() == [True, True, False, True]
    assert saved.obs[keys.SUBTYPE].tolist()[:2] == ["1", "2"]
    assert saved.obs[keys.SUBTYPE_LIKE_REFERENCE].tolist()[:2] == [False, True]
    assert saved.uns[keys.UNS][keys.SUBTYPES]["k_chosen"] == 2
    assert np.array_equal(saved.obsm[keys.FUSED], finished.obsm[keys.FUSED])
    assert store.get(run.id).info["subtypes"]["status"] == "done"
    assert run.load_subtype_layout().equals(layout)


def test_saving_current_subtypes_calls_reference_like_cells_normal(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("run", {})
    store.save_result(run, _result(0.5))
    store.save_subtypes(run, _subtyped(0.5), pd.DataFrame({"cell": ["c0"]}), {"k_chosen": 2})
    saved = run.load_result()
    assert saved.obs[keys.ANOMALY].tolist() == [True, False, False, False]
    assert saved.uns[keys.UNS]["calls_per_batch"] == {"s": 1}


def test_stage_keys_are_not_copied_onto_other_cells():
    other = _result(0.5)
    other.obs_names = [f"d{i}" for i in range(4)]
    with pytest.raises(InputError, match="no longer has the cells"):
        copy_stage_keys(_result(0.5), other, keys.SUBTYPES)
