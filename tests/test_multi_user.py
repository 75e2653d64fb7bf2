"""Several users on one server: own runs, merged run.json updates, one correction per run, a training queue,
seeded training that other threads cannot disturb, interrupted runs after a restart."""

import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp

from acsleuth_core import jobs
from acsleuth_core.correction import CorrectionConfig
from acsleuth_core.detect import AnomalyDetector
from acsleuth_core.errors import InputError, JobBusyError
from acsleuth_core.owners import new_owner_token, valid_owner_token
from acsleuth_core.run_record import read_record
from acsleuth_core.runs import Run, RunStore, start_correction_run
from tiny_models import DEMO_DETECTOR

ALICE, BOB = new_owner_token(), new_owner_token()


def _waiting_work(release: threading.Event, result=None):
    def work(progress, cancel):
        while not release.wait(0.01):
            cancel.raise_if_cancelled()
        return result

    return work


def test_each_owner_lists_and_opens_only_its_own_runs(tmp_path):
    server = RunStore(tmp_path, shared=False)
    mine = server.for_owner(ALICE).create("alice's", {})
    theirs = server.for_owner(BOB).create("bob's", {})
    assert [r.id for r in server.for_owner(ALICE).list()] == [mine.id]
    assert server.for_owner(ALICE).get(mine.id).info["owner"] == ALICE
    with pytest.raises(InputError, match="no run"):
        server.for_owner(ALICE).get(theirs.id)
    assert {r.id for r in RunStore(tmp_path, shared=True).for_owner(ALICE).list()} == {mine.id, theirs.id}


def test_run_ids_and_owner_tokens_must_match_in_full(tmp_path):
    store = RunStore(tmp_path, shared=False).for_owner(ALICE)
    run = store.create("run", {})
    for bad in (run.id + "\n", run.id + "/../x", " " + run.id):
        with pytest.raises(InputError, match="not a run id"):
            store.get(bad)
    assert valid_owner_token(ALICE)
    assert not valid_owner_token(ALICE + ";") and not valid_owner_token("short") and not valid_owner_token(None)


def test_updates_of_the_run_and_of_a_stage_at_once_are_all_kept(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("run", {})
    stale = store.get(run.id)  # both writers start from the same snapshot, as two tabs or jobs would
    start = threading.Barrier(8)

    def write(i):
        start.wait()
        if i % 2:
            store.update(stale, **{f"field_{i}": i})
        else:
            store.update_stage(stale, "subtypes", **{f"entry_{i}": i})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    info = read_record(run.folder)
    assert all(info[f"field_{i}"] == i for i in (1, 3, 5, 7))
    assert info["subtypes"] == {f"entry_{i}": i for i in (0, 2, 4, 6)}
    assert info["status"] == "running", "an update merges into the file, not into the stale snapshot"


def test_a_second_tab_cannot_start_the_same_correction(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    run = store.create("run", {})
    release = threading.Event()
    monkeypatch.setattr("acsleuth_core.runs._require_inputs", lambda run: None)
    monkeypatch.setattr(Run, "load_result", lambda self: release.wait(10) and None)  # the first correction is busy
    registry = jobs.JobRegistry()
    first = start_correction_run(store, registry, run, config=CorrectionConfig())
    with pytest.raises(JobBusyError, match="run · correction' is already running"):
        start_correction_run(store, registry, store.get(run.id), config=CorrectionConfig())
    release.set()
    assert first.wait(10).state == jobs.FAILED
    assert store.get(run.id).info["correction"]["status"] == "failed", "the first correction's end is recorded"


def test_trainings_beyond_the_cap_wait_in_line_and_show_their_place():
    registry = jobs.JobRegistry(training_slots=1)
    release = threading.Event()
    first = registry.start(_waiting_work(release, 1), training=True)
    second = registry.start(_waiting_work(release, 2), training=True)
    third = registry.start(_waiting_work(release, 3), training=True)
    not_a_training = registry.start(_waiting_work(threading.Event(), None))
    deadline = time.time() + 10
    while time.time() < deadline and third.status().queue_place != 2:
        time.sleep(0.01)
    assert first.status().state == jobs.RUNNING and not_a_training.status().state == jobs.RUNNING
    assert (second.status().state, second.status().queue_place) == (jobs.QUEUED, 1)
    assert (third.status().state, third.status().queue_place) == (jobs.QUEUED, 2)
    second.cancel()
    assert second.wait(10).state == jobs.CANCELLED
    assert third.status().queue_place == 1, "a cancelled job leaves the queue"
    release.set()
    assert [first.wait(10).state, third.wait(10).state] == [jobs.DONE, jobs.DONE]
    assert third.result() == 3
    not_a_training.cancel()


def test_the_training_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ACSLEUTH_MAX_TRAININGS", "3")
    assert jobs.JobRegistry().trainings.slots == 3
    monkeypatch.setenv("ACSLEUTH_MAX_TRAININGS", "none")
    with pytest.raises(InputError, match="ACSLEUTH_MAX_TRAININGS"):
        jobs.JobRegistry()


def _reference_cells() -> sp.csr_matrix:
    counts = np.random.default_rng(1).poisson(1.0, size=(120, 40)).astype(np.float32)
    return sp.csr_matrix(np.log1p(counts))


def _first_weights(detector: AnomalyDetector) -> np.ndarray:
    return next(iter(detector._models[0].generator.state_dict().values())).numpy()


def test_two_trainings_at_once_with_one_seed_give_the_model_each_gives_alone():
    X, genes = _reference_cells(), [f"g{i}" for i in range(40)]
    alone = _first_weights(AnomalyDetector(DEMO_DETECTOR).fit(X, genes))
    together: list[np.ndarray] = [None, None]
    start = threading.Barrier(2)

    def train(i):
        start.wait()
        together[i] = _first_weights(AnomalyDetector(DEMO_DETECTOR).fit(X, genes))

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.array_equal(together[0], alone) and np.array_equal(together[1], alone)


def test_a_restarted_server_marks_unfinished_runs_interrupted_and_cleans_their_temporary_files(tmp_path):
    store = RunStore(tmp_path)
    queued = store.create("queued", {}, status="queued")
    training = store.create("training", {})
    (training.folder / ".result.h5ad.x1y2.tmp").write_text("half")
    (training.folder / ".model.tmp").mkdir()
    live = store.create("live", {})
    done = store.update(store.create("done", {}), status="done", correction={"status": "running", "params": {"a": 1}})
    marked = store.mark_interrupted({live.id})
    assert {r.id for r in marked} == {queued.id, training.id, done.id}
    assert store.get(queued.id).info["status"] == store.get(training.id).info["status"] == "interrupted"
    assert "server stopped" in store.get(training.id).info["message"]
    assert not [p for p in training.folder.iterdir() if p.name.endswith(".tmp")]
    assert store.get(live.id).info["status"] == "running"
    corrected = store.get(done.id).info
    assert corrected["status"] == "done" and corrected["correction"] == {
        "status": "interrupted", "params": {"a": 1}, "message": "The server stopped before this finished."
    }
