"""A run's ``run.json``, changed safely while several jobs and browser tabs write to it.

Every change takes the run's lock (:func:`run_lock`: ``fcntl.flock`` on its lock file),
re-reads ``run.json``, merges the change into what is on disk now (not into
a snapshot read earlier) and writes the file atomically (a temporary file,
then a rename), so two changes made at once are both kept.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the in-process lock alone
    fcntl = None

from .export import atomic_path

RUN_FILE = "run.json"
#: taken (flock) around every read-modify-write of a run's files, by the app's jobs and the CLI alike
LOCK_FILE = ".lock"
_PROCESS_LOCK = threading.Lock()


def read_record(folder: Path) -> dict:
    """``run.json`` of the run in ``folder`` as it is on disk now."""
    return json.loads((folder / RUN_FILE).read_text())


def write_record(folder: Path, info: dict) -> dict:
    """Write a new run's ``run.json`` (atomically; nothing else writes to a new run yet) and return it."""
    _write(folder, info)
    return info


def merge_record(folder: Path, fields: dict) -> dict:
    """Set top-level ``fields`` in ``run.json``, keeping every other entry as it is on disk; return the result."""
    with run_lock(folder):
        info = {**read_record(folder), **fields}
        _write(folder, info)
    return info


def merge_stage_record(folder: Path, stage: str, fields: dict) -> dict:
    """Set ``fields`` inside ``run.json[stage]`` (e.g. its status), keeping the stage's other entries; return the result."""
    with run_lock(folder):
        info = read_record(folder)
        info[stage] = {**(info.get(stage) or {}), **fields}
        _write(folder, info)
    return info


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold the run's lock: one lock for the threads of this process, ``flock`` on the run's lock
    file for other processes (where the system has it)."""
    with _PROCESS_LOCK:
        if fcntl is None:
            yield
            return
        handle = os.open(folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)  # closing releases the flock


def _write(folder: Path, info: dict) -> None:
    with atomic_path(folder / RUN_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=1, default=str))
