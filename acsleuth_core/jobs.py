"""Background jobs: long work off the caller's thread, with progress and cancellation.

A user interface starts a :class:`Job`, then polls ``job.status()`` on each
redraw; ``job.cancel()`` asks the work to stop at its next check. Jobs live
in a process-wide registry so a page that is re-run (or opened in another
tab of the same server) finds the job again by its id.
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
from .progress import CancelToken, ProgressEvent

_log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"

Work = Callable[[Callable[[ProgressEvent], None], CancelToken], Any]


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job for display."""

    state: str
    progress: Optional[ProgressEvent]
    message: str
    started: float
    finished: Optional[float]

    @property
    def active(self) -> bool:
        return self.state in (PENDING, RUNNING)


class Job:
    """Run ``work(progress, cancel)`` on a daemon thread and keep its outcome."""

    def __init__(self, work: Work, *, name: str = "job"):
        self.id = uuid.uuid4().hex[:12]
        self.name = name
        self._work = work
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
            return self._status

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
        self._update(state=RUNNING)
        try:
            self._result = self._work(lambda event: self._update(progress=event), self._cancel)
        except Cancelled as error:
            self._update(state=CANCELLED, message=str(error), finished=time.time())
        except ACsleuthError as error:
            self._update(state=FAILED, message=str(error), finished=time.time())
        except Exception as error:  # noqa: BLE001 - shown to the user; the trace goes to the server log
            _log.exception("job %s (%s) failed", self.id, self.name)
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            self._update(state=FAILED, message=f"Unexpected error: {detail}", finished=time.time())
        else:
            self._update(state=DONE, message="finished", finished=time.time())
        finally:
            self._work = None  # the work holds the job's inputs (uploaded data): free them once it has ended


class JobRegistry:
    """Process-wide jobs by id, so a re-run page can find its job again."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[Hashable, Job] = {}
        self._lock = threading.Lock()

    def start(self, work: Work, *, name: str = "job", key: Optional[Hashable] = None) -> Job:
        """Start ``work`` as a job. With ``key`` (say, a run and a stage), at most one job per key is active
        at a time: a second start while one runs raises :class:`JobBusyError`, whichever session asks."""
        job = Job(work, name=name)
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

    def get(self, job_id: Optional[str]) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None
