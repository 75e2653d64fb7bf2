"""Runs on disk: each trained model and its results in a folder of its own.

A run folder holds ``run.json`` (name, status, parameters, times, summary),
the trained model (``model/``), the cells as the model saw them (``inputs/``),
the annotated target (``result.h5ad``) and the UMAP layouts the pages draw:
after batch correction ``correction_layout.parquet``, after subtyping
``subtype_layout.parquet``.
Every file is written atomically, so a crash or a refresh never leaves a
half-written result behind. Runs have unique ids, so two browser sessions
never write into the same folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the in-process lock alone
    fcntl = None

import anndata as ad
import pandas as pd

from .calls import calls_per_batch, refresh_calls
from .correction import CorrectionConfig, annotate_correction, correct_batches
from .detect import AnomalyDetector, DetectorConfig
from .errors import Cancelled, InputError
from .export import atomic_path, write_h5ad
from .jobs import Job, JobRegistry
from . import keys
from .layout import correction_layout
from .model_inputs import ModelInputs
from .pipeline import detect_anomalies
from .subtypes import SubtypeConfig
from .subtyping import annotate_subtypes, subtype_anomalies, subtype_layout

RUNS_DIR_ENV = "ACSLEUTH_RUNS_DIR"
RUN_FILE = "run.json"
#: taken (flock) around every read-modify-write of a run's files, by the app's jobs and the CLI alike
LOCK_FILE = ".lock"
MODEL_DIR = "model"
RESULT_FILE = "result.h5ad"
INPUTS_DIR = "inputs"
LAYOUT_FILE = "correction_layout.parquet"
SUBTYPE_LAYOUT_FILE = "subtype_layout.parquet"
#: runs hold users' data: their folders are for the server's account alone (files come from
#: :func:`export.atomic_path`, which creates them readable by their owner only)
PRIVATE_FOLDER = 0o700
_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")


def default_runs_dir() -> Path:
    """``$ACSLEUTH_RUNS_DIR`` if set, else ``~/.acsleuth/runs``."""
    return Path(os.environ.get(RUNS_DIR_ENV) or Path.home() / ".acsleuth" / "runs").expanduser()


@dataclass(frozen=True)
class Run:
    """A run folder and what its ``run.json`` says."""

    folder: Path
    info: dict

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def has_result(self) -> bool:
        return (self.folder / RESULT_FILE).is_file()

    def load_result(self) -> ad.AnnData:
        return ad.read_h5ad(self.folder / RESULT_FILE)

    def load_detector(self) -> AnomalyDetector:
        return AnomalyDetector.load(self.folder / MODEL_DIR)

    @property
    def has_inputs(self) -> bool:
        return (self.folder / INPUTS_DIR).is_dir()

    def load_inputs(self) -> ModelInputs:
        return ModelInputs.read(self.folder / INPUTS_DIR)

    @property
    def has_layout(self) -> bool:
        return (self.folder / LAYOUT_FILE).is_file()

    def load_layout(self) -> pd.DataFrame:
        return pd.read_parquet(self.folder / LAYOUT_FILE)

    @property
    def has_subtype_layout(self) -> bool:
        return (self.folder / SUBTYPE_LAYOUT_FILE).is_file()

    def load_subtype_layout(self) -> pd.DataFrame:
        return pd.read_parquet(self.folder / SUBTYPE_LAYOUT_FILE)


class RunStore:
    """All runs under one folder (default :func:`default_runs_dir`)."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else default_runs_dir()

    def create(self, name: str, params: dict) -> Run:
        """A new, empty run folder with status ``running``, readable by the server's account only."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = self.root / f"{stamp}-{uuid.uuid4().hex[:6]}"
        self.root.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        folder.mkdir(mode=PRIVATE_FOLDER)
        info = {"name": name, "status": "running", "params": params, "created": _now(), "summary": {}}
        _write_json(folder / RUN_FILE, info)
        return Run(folder, info)

    def finish(
        self, run: Run, adata: ad.AnnData, detector: AnomalyDetector, inputs: ModelInputs, summary: dict
    ) -> Run:
        """Save the model, the model's inputs and the annotated result, then mark the run done."""
        _replace_folder(run.folder / MODEL_DIR, detector.save)
        _replace_folder(run.folder / INPUTS_DIR, inputs.write)
        write_h5ad(adata, run.folder / RESULT_FILE)
        return self.update(run, status="done", summary=summary, finished=_now())

    def save_correction(self, run: Run, adata: ad.AnnData, layout: pd.DataFrame, metrics: dict) -> Run:
        """Save a correction's keys and layout into the run; record the metrics in ``run.json``."""
        self._save_stage_result(run, keys.CORRECTION, adata, layout, LAYOUT_FILE)
        return self.update(run, correction={"status": "done", "metrics": metrics, "finished": _now()})

    def save_subtypes(self, run: Run, adata: ad.AnnData, layout: pd.DataFrame, summary: dict) -> Run:
        """Save the subtype keys and layout into the run; record the summary (k, why, sizes) in ``run.json``."""
        self._save_stage_result(run, keys.SUBTYPES, adata, layout, SUBTYPE_LAYOUT_FILE)
        return self.update(run, subtypes={"status": "done", **summary, "finished": _now()})

    def _save_stage_result(self, run: Run, stage: str, adata: ad.AnnData, layout: pd.DataFrame, layout_file: str) -> None:
        """Write the layout, and the stage's keys from ``adata`` into the result as it is on disk now: what
        changed there while the stage ran (a new threshold, say) is kept, not overwritten; the call is
        then derived again (subtyping may call cells normal)."""
        with atomic_path(run.folder / layout_file) as tmp:
            layout.to_parquet(tmp, index=False)
        with run_lock(run.folder):
            current = run.load_result()
            copy_stage_keys(adata, current, stage)
            refresh_calls(current)
            write_h5ad(current, run.folder / RESULT_FILE)

    def save_result(self, run: Run, adata: ad.AnnData) -> None:
        """Overwrite a finished run's result (e.g. after a new threshold), atomically."""
        write_h5ad(adata, run.folder / RESULT_FILE)

    def update(self, run: Run, **fields) -> Run:
        """Set ``fields`` in the run's ``run.json`` as it is on disk now (under the run's lock), so what
        another job recorded since ``run`` was read is kept."""
        with run_lock(run.folder):
            info = {**_read_info(run.folder, fallback=run.info), **fields}
            _write_json(run.folder / RUN_FILE, info)
        return Run(run.folder, info)

    def get(self, run_id: str) -> Run:
        if not _ID.fullmatch(run_id or ""):
            raise InputError(f"{run_id!r} is not a run id.")
        folder = self.root / run_id
        if not (folder / RUN_FILE).is_file():
            raise InputError(f"There is no run {run_id} under {self.root}.")
        return Run(folder, json.loads((folder / RUN_FILE).read_text()))

    def list(self) -> list[Run]:
        """Every readable run, newest first."""
        if not self.root.is_dir():
            return []
        runs = []
        for folder in sorted(self.root.iterdir(), reverse=True):
            if _ID.fullmatch(folder.name) and (folder / RUN_FILE).is_file():
                try:
                    runs.append(Run(folder, json.loads((folder / RUN_FILE).read_text())))
                except (OSError, json.JSONDecodeError):
                    continue
        return runs


def copy_stage_keys(source: ad.AnnData, dest: ad.AnnData, stage: str) -> None:
    """Copy what ``stage`` (``keys.CORRECTION`` or ``keys.SUBTYPES``) wrote from ``source`` into ``dest``
    (same cells and genes), replacing ``dest``'s earlier values of those keys."""
    if not (source.obs_names.equals(dest.obs_names) and source.var_names.equals(dest.var_names)):
        raise InputError("The run's result no longer has the cells and genes this stage worked on.")
    for slot, names in keys.STAGE_KEYS[stage].items():
        for name in names:
            if slot == "uns":
                dest.uns[keys.UNS][name] = source.uns[keys.UNS][name]
            else:
                getattr(dest, slot)[name] = getattr(source, slot)[name]


def _replace_folder(folder: Path, write) -> None:
    """Let ``write(tmp_folder)`` fill a temporary folder, then swap it in for ``folder``."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


_PROCESS_LOCK = threading.Lock()


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


def _read_info(folder: Path, *, fallback: dict) -> dict:
    """``run.json`` as it is on disk, or ``fallback`` when it cannot be read."""
    try:
        return json.loads((folder / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return dict(fallback)


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def start_detection_run(
    store: RunStore,
    registry: JobRegistry,
    reference: ad.AnnData,
    targets: dict[str, ad.AnnData],
    *,
    name: str,
    n_hvg: int | str,
    config: DetectorConfig,
    batch_key: Optional[str] = None,
) -> tuple[Run, Job]:
    """Create a run folder and train + score in a background job that saves into it.

    The run's status on disk follows the job: ``done`` (with model and
    result), ``failed`` (with the message) or ``cancelled``.
    """
    params = {"n_hvg": n_hvg, "batch_key": batch_key, **config.to_json(), "targets": list(targets)}
    run = store.create(name, params)

    def work(progress, cancel):
        try:
            result = detect_anomalies(
                reference, targets, batch_key=batch_key, n_hvg=n_hvg, config=config, progress=progress, cancel=cancel
            )
            summary = {"cells": int(result.adata.n_obs), "calls_per_batch": calls_per_batch(result.adata)}
            return store.finish(run, result.adata, result.detector, ModelInputs.from_prepared(result.prepared), summary)
        except Cancelled as error:
            store.update(run, status="cancelled", message=str(error))
            raise
        except Exception as error:
            store.update(run, status="failed", message=str(error))
            raise

    return run, registry.start(work, name=name)


def start_correction_run(
    store: RunStore,
    registry: JobRegistry,
    run: Run,
    *,
    config: CorrectionConfig,
    label_key: Optional[str] = None,
) -> Job:
    """Correct a finished run's batches in a background job and save the result and layout into it.

    ``run.json`` records the correction's status: ``running``, ``done`` (with
    metrics), ``failed`` (with the message) or ``cancelled``.
    """
    _require_inputs(run)
    registry.refuse_if_busy((run.id, "correction"))
    run = store.update(run, correction={"status": "running", "params": config.to_json(), "label_key": label_key})

    def work(progress, cancel):
        adata, inputs, detector = run.load_result(), run.load_inputs(), run.load_detector()
        result = correct_batches(adata, inputs, detector, config, label_key=label_key, progress=progress, cancel=cancel)
        annotate_correction(adata, result, inputs.genes, config)
        layout = correction_layout(adata, result, inputs.reference.obs_names, seed=config.kin.seed)
        return store.save_correction(run, adata, layout, result.metrics)

    return registry.start(
        _tracked(store, run, "correction", work), name=f"{run.info.get('name', run.id)} · correction", key=(run.id, "correction"),
    )


def start_subtype_run(
    store: RunStore,
    registry: JobRegistry,
    run: Run,
    *,
    config: SubtypeConfig,
    use_correction: bool = True,
    reference_like_normal: bool = True,
) -> Job:
    """Split a finished run's anomalous cells into subtypes in a background job; save the result and layout.

    No GAN is retrained, so re-clustering with another k or resolution is
    cheap. ``run.json`` records the stage's status as for the correction.
    """
    _require_inputs(run)
    registry.refuse_if_busy((run.id, "subtypes"))
    params = config.to_json() | {
        "n_subtypes": str(config.n_subtypes),
        "use_correction": use_correction,
        "reference_like_normal": reference_like_normal,
    }
    run = store.update(run, subtypes={"status": "running", "params": params})

    def work(progress, cancel):
        adata, inputs, detector = run.load_result(), run.load_inputs(), run.load_detector()
        result = subtype_anomalies(
            adata, inputs, detector, config, use_correction=use_correction,
            reference_like_normal=reference_like_normal, progress=progress, cancel=cancel,
        )
        annotate_subtypes(adata, result)
        layout = subtype_layout(adata, seed=config.seed)
        saved = adata.uns[keys.UNS][keys.SUBTYPES]
        summary = {"params": params, "k_chosen": saved["k_chosen"], "k_reason": saved["k_reason"], "sizes": saved["sizes"]}
        return store.save_subtypes(run, adata, layout, summary)

    return registry.start(
        _tracked(store, run, "subtypes", work), name=f"{run.info.get('name', run.id)} · subtypes", key=(run.id, "subtypes"),
    )


def _require_inputs(run: Run) -> None:
    if not (run.has_result and run.has_inputs):
        raise InputError("This run has no saved model inputs; train a new detection run first.")


def _tracked(store: RunStore, run: Run, stage: str, work):
    """``work`` with its failure or cancellation recorded as ``run.json[stage]`` (keeping the stage's params)."""

    def tracked(progress, cancel):
        try:
            return work(progress, cancel)
        except Cancelled as error:
            store.update(run, **{stage: {**run.info.get(stage, {}), "status": "cancelled", "message": str(error)}})
            raise
        except Exception as error:
            store.update(run, **{stage: {**run.info.get(stage, {}), "status": "failed", "message": str(error)}})
            raise

    return tracked
