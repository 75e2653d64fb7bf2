"""Background jobs: long work off the caller's thread, with progress and cancellation.

A user interface starts a :class:`Job`, then polls ``job.status()`` on each
redraw; ``job.cancel()`` asks the work to stop at its next check. Jobs live
in a process-wide registry so a page that is re-run (or opened in another
tab of the same server) finds the job again by its id. The registry starts
at most one job per key (a run's stage) at a time, and queues trainings
beyond ``$ACSLEUTH_MAX_TRAININGS`` (:mod:`job_queue`).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Optional

from .errors import ACsleuthError, Cancelled, JobBusyError
from .job_queue import SlotQueue, max_trainings
from .progress import CancelToken, ProgressEvent

_log = logging.getLogger(__name__)

PENDING, QUEUED, RUNNING, DONE, FAILED, CANCELLED = "pending", "queued", "running", "done", "failed", "cancelled"

Work = Callable[[Callable[[ProgressEvent], None], CancelToken], Any]


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job for display."""

    state: str
    progress: Optional[ProgressEvent]
    message: str
    started: float
    finished: Optional[float]
    #: while ``queued``: the job's place in the queue (1 = next to start)
    queue_place: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.state in (PENDING, QUEUED, RUNNING)


class Job:
    """Run ``work(progress, cancel)`` on a daemon thread and keep its outcome.

    With a ``queue``, the work waits for a slot of it first (state ``queued``).
    Once the work has ended, the job drops it, and with it the data the work
    was given: only the result stays. ``on_end(status)`` is called with the
    final status just before the job shows it (e.g. to record a failure on disk).
    """

    def __init__(
        self,
        work: Work,
        *,
        name: str = "job",
        queue: Optional[SlotQueue] = None,
        on_end: Optional[Callable[[JobStatus], None]] = None,
    ):
        self.id = uuid.uuid4().hex[:12]
        self.name = name
        self._work: Optional[Work] = work
        self._queue = queue
        self._on_end = on_end
        self._cancel = CancelToken()
        self._lock = threading.Lock()
        self._status = JobStatus(PENDING, None, "", time.time(), None)
        self._result: Any = None
        self._thread = threading.Thread(target=self._run, name=f"acsleuth-{name}-{self.id}", daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def status(self) -> JobStatus:
        with self._lock:
            status = self._status
        if status.state == QUEUED and self._queue is not None:
            return replace(status, queue_place=self._queue.place(self.id))
        return status

    def result(self) -> Any:
        """The work's return value once the job is done (``None`` before)."""
        return self._result

    def cancel(self) -> None:
        self._cancel.cancel()

    def wait(self, timeout: Optional[float] = None) -> JobStatus:
        self._thread.join(timeout)
        return self.status()

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    def _run(self) -> None:
        try:
            self._result = self._queued_work()
            ending = {"state": DONE, "message": "finished"}
        except Cancelled as error:
            ending = {"state": CANCELLED, "message": str(error)}
        except ACsleuthError as error:
            ending = {"state": FAILED, "message": str(error)}
        except Exception as error:  # noqa: BLE001 - shown to the user; the trace goes to the server log
            _log.exception("job %s (%s) failed", self.id, self.name)
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            ending = {"state": FAILED, "message": f"Unexpected error: {detail}"}
        finally:
            self._work = None
        ending["finished"] = time.time()
        if self._on_end is not None:  # before the job counts as ended, so a job started next is not overwritten
            try:
                self._on_end(replace(self.status(), **ending))
            except Exception:  # noqa: BLE001 - the job's own outcome stands; the trace goes to the server log
                _log.exception("job %s (%s): recording its end failed", self.id, self.name)
        self._update(**ending)

    def _queued_work(self) -> Any:
        """The work's result, after waiting for a slot of the queue if there is one."""
        if self._queue is None:
            return self._work_now()
        self._update(state=QUEUED)
        with self._queue.slot(self.id, self._cancel):
            return self._work_now()

    def _work_now(self) -> Any:
        self._update(state=RUNNING)
        return self._work(lambda event: self._update(progress=event), self._cancel)


class JobRegistry:
    """Process-wide jobs by id, so a re-run page can find its job again.

    Trainings wait in one queue of ``training_slots`` slots (default:
    ``$ACSLEUTH_MAX_TRAININGS``, else 1).
    """

    def __init__(self, training_slots: Optional[int] = None) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[Hashable, Job] = {}
        self._lock = threading.Lock()
        self.trainings = SlotQueue(training_slots or max_trainings())

    def start(
        self,
        work: Work,
        *,
        name: str = "job",
        key: Optional[Hashable] = None,
        training: bool = False,
        on_end: Optional[Callable[[JobStatus], None]] = None,
    ) -> Job:
        """Start ``work`` as a job (``on_end`` as for :class:`Job`); a training waits for a slot of :attr:`trainings`.

        With ``key`` (say, a run and a stage), at most one job per key is active at a time: a second start
        while one runs raises :class:`JobBusyError`, whichever session asks.
        """
        job = Job(work, name=name, queue=self.trainings if training else None, on_end=on_end)
        with self._lock:
            if key is not None:
                self._refuse_if_busy(key)
                self._by_key[key] = job
            self._jobs[job.id] = job
        return job.start()

    def refuse_if_busy(self, key: Hashable) -> None:
        """Raise :class:`JobBusyError` when a job started with ``key`` is still active (check before
        recording that new work is about to start)."""
        with self._lock:
            self._refuse_if_busy(key)

    def _refuse_if_busy(self, key: Hashable) -> None:
        running = self._by_key.get(key)
        if running is not None and running.status().active:
            raise JobBusyError(
                f"'{running.name}' is already running (started in this or another browser tab): wait for it "
                "to finish, or cancel it, before starting it again."
            )

    def active_keys(self) -> set[Hashable]:
        """The keys of jobs that are queued or running now."""
        with self._lock:
            return {key for key, job in self._by_key.items() if job.status().active}

    def get(self, job_id: Optional[str]) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None
