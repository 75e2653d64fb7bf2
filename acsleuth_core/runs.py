"""Runs on disk: each trained model and its results in a folder of its own.

A run folder holds ``run.json`` (name, status, parameters, times, summary),
the trained model (``model/``), the cells as the model saw them (``inputs/``),
the annotated target (``result.h5ad``) and the UMAP layouts the pages draw:
after batch correction ``correction_layout.parquet``, after subtyping
``subtype_layout.parquet``.
Every file is written atomically, so a crash or a refresh never leaves a
half-written result behind; ``run.json`` changes are merged under a file lock
(:mod:`run_record`). Runs have unique ids, so two browser sessions never
create the same folder. A store made :meth:`RunStore.for_owner` lists, opens
and creates only one owner's runs (:mod:`owners`); a plain store sees every
run (the command line, tests, the server's start-up check).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import anndata as ad
import pandas as pd

from .calls import calls_per_batch, refresh_calls
from .correction import CorrectionConfig, annotate_correction, correct_batches
from .detect import AnomalyDetector, DetectorConfig
from .errors import InputError
from .export import atomic_path, write_h5ad
from .jobs import CANCELLED, FAILED, Job, JobRegistry, JobStatus
from . import keys
from .layout import correction_layout
from .model_inputs import ModelInputs
from .owners import shared_runs
from .pipeline import detect_anomalies
from .run_record import RUN_FILE, merge_record, merge_stage_record, read_record, run_lock, write_record
from .subtypes import SubtypeConfig
from .subtyping import annotate_subtypes, subtype_anomalies, subtype_layout

RUNS_DIR_ENV = "ACSLEUTH_RUNS_DIR"
MODEL_DIR = "model"
RESULT_FILE = "result.h5ad"
INPUTS_DIR = "inputs"
LAYOUT_FILE = "correction_layout.parquet"
SUBTYPE_LAYOUT_FILE = "subtype_layout.parquet"
#: runs hold users' data: their folders are for the server's account alone (files come from
#: :func:`export.atomic_path`, which creates them readable by their owner only)
PRIVATE_FOLDER = 0o700
_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
#: run statuses of training that has not ended; at a server's start they mean the server stopped during it
UNFINISHED = ("queued", "running")
#: the stages of a finished run, keyed as in ``run.json``
STAGES = ("correction", "subtypes")


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
    """The runs under one folder (default :func:`default_runs_dir`) that ``owner`` may see.

    ``owner=None`` sees every run. With an owner, runs are created with it and
    only its own runs are listed and opened, unless ``shared`` (default:
    ``$ACSLEUTH_SHARED_RUNS``) makes every run visible.
    """

    def __init__(self, root: Optional[Path] = None, *, owner: Optional[str] = None, shared: Optional[bool] = None):
        self.root = Path(root) if root is not None else default_runs_dir()
        self.owner = owner
        self.shared = shared_runs() if shared is None else shared

    def for_owner(self, owner: str) -> "RunStore":
        """This store as ``owner`` sees it."""
        return RunStore(self.root, owner=owner, shared=self.shared)

    def create(self, name: str, params: dict, *, status: str = "running") -> Run:
        """A new, empty run folder of this store's owner, readable by the server's account only."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = self.root / f"{stamp}-{uuid.uuid4().hex[:6]}"
        self.root.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        folder.mkdir(mode=PRIVATE_FOLDER)
        info = {"name": name, "status": status, "params": params, "created": _now(), "summary": {}, "owner": self.owner}
        return Run(folder, write_record(folder, info))

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
        """Set top-level ``fields`` of ``run.json``, merged into the file as it is now (under its lock)."""
        return Run(run.folder, merge_record(run.folder, fields))

    def update_stage(self, run: Run, stage: str, **fields) -> Run:
        """Set ``fields`` of ``run.json[stage]``, keeping the stage's other entries (under the file's lock)."""
        return Run(run.folder, merge_stage_record(run.folder, stage, fields))

    def get(self, run_id: str) -> Run:
        """The run ``run_id``, if it exists and this store's owner may see it (one message for both)."""
        if not isinstance(run_id, str) or not _ID.fullmatch(run_id):
            raise InputError(f"{run_id!r} is not a run id.")
        folder = self.root / run_id
        info = read_record(folder) if (folder / RUN_FILE).is_file() else None
        if info is None or not self._visible(info):
            raise InputError(f"There is no run {run_id} here (or it belongs to another browser).")
        return Run(folder, info)

    def list(self) -> list[Run]:
        """Every readable run this store's owner may see, newest first."""
        if not self.root.is_dir():
            return []
        runs = []
        for folder in sorted(self.root.iterdir(), reverse=True):
            if _ID.fullmatch(folder.name) and (folder / RUN_FILE).is_file():
                try:
                    info = read_record(folder)
                except (OSError, json.JSONDecodeError):
                    continue
                if self._visible(info):
                    runs.append(Run(folder, info))
        return runs

    def mark_interrupted(self, live_run_ids: set[str]) -> list[Run]:
        """Mark runs whose training or stage ``run.json`` says is queued or running, but that have no job in
        ``live_run_ids``, as ``interrupted`` (the server stopped during it), and delete their temporary
        files. Call it when a server starts: it assumes one server per runs folder. Returns those runs."""
        marked = []
        for run in self.list():
            if run.id in live_run_ids:
                continue
            stages = [stage for stage in STAGES if (run.info.get(stage) or {}).get("status") in UNFINISHED]
            if run.info.get("status") not in UNFINISHED and not stages:
                continue
            _remove_temporary_files(run.folder)
            message = "The server stopped before this finished."
            if run.info.get("status") in UNFINISHED:
                run = self.update(run, status="interrupted", message=message)
            for stage in stages:
                run = self.update_stage(run, stage, status="interrupted", message=message)
            marked.append(run)
        return marked

    def _visible(self, info: dict) -> bool:
        return self.owner is None or self.shared or info.get("owner") == self.owner


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


def _remove_temporary_files(folder: Path) -> None:
    """Delete what an atomic write left behind when its process stopped (``.<name>….tmp`` files and folders)."""
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


#: entries of a detection run's ``params`` that are not :class:`DetectorConfig` settings
RUN_PARAMS = ("n_hvg", "batch_key", "targets", "data")


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
    """Create a run folder (status ``queued``) and train + score in a background job that saves into it.

    The job waits for a training slot of ``registry`` first. The run's status
    on disk follows the job: ``running``, then ``done`` (with model and
    result), ``failed`` (with the message) or ``cancelled``. Once it ends, the
    job no longer holds ``reference`` and ``targets``.
    """
    params = {
        "n_hvg": n_hvg, "batch_key": batch_key, **config.to_json(), "targets": list(targets),
        "data": data_shapes(reference, targets),
    }
    run = store.create(name, params, status="queued")

    def work(progress, cancel):
        store.update(run, status="running", started=_now())
        result = detect_anomalies(
            reference, targets, batch_key=batch_key, n_hvg=n_hvg, config=config, progress=progress, cancel=cancel
        )
        summary = {"cells": int(result.adata.n_obs), "calls_per_batch": calls_per_batch(result.adata)}
        return store.finish(run, result.adata, result.detector, ModelInputs.from_prepared(result.prepared), summary)

    def record_end(status: JobStatus) -> None:
        if status.state in (FAILED, CANCELLED):
            store.update(run, status=status.state, message=status.message)

    job = registry.start(work, name=name, key=(run.id, "detection"), training=True, on_end=record_end)
    return run, job


def train_again(
    store: RunStore, registry: JobRegistry, run: Run, reference: ad.AnnData, targets: dict[str, ad.AnnData]
) -> tuple[Run, Job]:
    """Start a new detection run with ``run``'s settings on the same data (checked by names and sizes)."""
    params = run.info.get("params") or {}
    if params.get("data") != data_shapes(reference, targets):
        raise InputError(
            "The loaded data is not the data this run trained on (targets "
            f"{', '.join(params.get('targets') or [])}): load the same files on the Data page first."
        )
    config = DetectorConfig.from_json({key: value for key, value in params.items() if key not in RUN_PARAMS})
    return start_detection_run(
        store, registry, reference, targets, name=run.info.get("name", run.id), n_hvg=params["n_hvg"],
        batch_key=params["batch_key"], config=config,
    )


def data_shapes(reference: ad.AnnData, targets: dict[str, ad.AnnData]) -> dict:
    """Cells and genes of the reference and of each named target: what a run records of its data."""
    return {
        "reference": [int(reference.n_obs), int(reference.n_vars)],
        "targets": {name: [int(t.n_obs), int(t.n_vars)] for name, t in targets.items()},
    }


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
    metrics), ``failed`` (with the message) or ``cancelled``. A correction of
    this run that is still running is refused (:class:`~acsleuth_core.jobs.JobBusy`).
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

    return _start_stage(store, registry, run, "correction", work)


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
    cheap. ``run.json`` records the stage's status as for the correction, and
    a second subtyping of the same run while one runs is refused likewise.
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

    return _start_stage(store, registry, run, "subtypes", work)


def _require_inputs(run: Run) -> None:
    if not (run.has_result and run.has_inputs):
        raise InputError("This run has no saved model inputs; train a new detection run first.")


def _start_stage(store: RunStore, registry: JobRegistry, run: Run, stage: str, work) -> Job:
    """Start ``work`` as the one job of ``stage`` for ``run``; its failure or cancellation is recorded in
    ``run.json[stage]`` (keeping the stage's params)."""

    def record_end(status: JobStatus) -> None:
        if status.state in (FAILED, CANCELLED):
            store.update_stage(run, stage, status=status.state, message=status.message)

    name = f"{run.info.get('name', run.id)} · {stage}"
    return registry.start(work, name=name, key=(run.id, stage), on_end=record_end)
