"""Helpers shared by the benchmark scripts: measuring, running ACsleuth, scoring, reporting.

Heavy libraries (torch, scanpy, acsleuth_core) are imported inside functions:
the parent process that launches measured children must stay small, because
a spawned child's ``ru_maxrss`` starts from the parent's RSS at fork time
(Linux keeps the high-water mark across ``execve``).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shlex
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024.0


# --------------------------------------------------------------------- memory
def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


def cpu_seconds() -> float:
    """User + system CPU time this process has used so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mib() -> float:
    """This process's resident set size now (``VmRSS``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / MIB
    return float("nan")


def run_in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a new spawned interpreter and return its (picklable) result.

    One process per call, so each run's ``ru_maxrss`` is its own.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def load_average() -> float:
    """The machine's 1-minute load average (2 cores here: above ~2, other work competed)."""
    return os.getloadavg()[0]


@dataclass
class Measured:
    """Wall time, CPU time, load average at the end and peak RSS of a block run in this process."""

    seconds: float = float("nan")
    cpu: float = float("nan")
    load: float = float("nan")
    peak_rss_mib: float = float("nan")
    _start: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> "Measured":
        self._start = (time.perf_counter(), cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, cpu = self._start
        self.seconds = time.perf_counter() - wall
        self.cpu = cpu_seconds() - cpu
        self.load = load_average()
        self.peak_rss_mib = peak_rss_mib()

    def as_dict(self) -> dict[str, float]:
        """The columns the benchmark reports use: ``seconds``, ``CPU s``, ``load``, ``peak RSS MiB``."""
        return {"seconds": self.seconds, "CPU s": self.cpu, "load": self.load, "peak RSS MiB": self.peak_rss_mib}


@dataclass
class RssSampler:
    """Sample this process's RSS in a background thread and attribute it to named phases.

    Entering starts phase ``first_phase``; ``mark(name)`` starts the next;
    ``phases()`` gives each phase's peak RSS and duration. Used to find which
    step of a run sets the peak.
    """

    first_phase: str = "start"
    interval: float = 0.02
    _marks: list[tuple[float, str]] = field(default_factory=list)
    _samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RssSampler":
        self.mark(self.first_phase)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._samples.append((time.perf_counter(), current_rss_mib()))
        self.mark("end")

    def mark(self, name: str) -> None:
        self._marks.append((time.perf_counter(), name))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.perf_counter(), current_rss_mib()))
            self._stop.wait(self.interval)

    def phases(self) -> list[dict]:
        """One row per phase (consecutive marks): name, seconds, peak RSS MiB seen in it."""
        times = np.array([t for t, _ in self._samples])
        rss = np.array([r for _, r in self._samples])
        rows = []
        for (start, name), (end, _) in zip(self._marks[:-1], self._marks[1:]):
            inside = (times >= start) & (times <= end)
            peak = float(rss[inside].max()) if inside.any() else float("nan")
            rows.append({"phase": name, "seconds": end - start, "peak RSS MiB": peak})
        return rows


# ------------------------------------------------------------------- ACsleuth
@dataclass
class AcsleuthOutput:
    """What the benchmarks read from one ``detect_anomalies`` run (rows in target order)."""

    scores: np.ndarray
    calls: np.ndarray
    residual_norm: np.ndarray
    batches: np.ndarray
    seconds: float
    threshold: float
    run: Any = None  # the DetectionRun, for later stages


def run_acsleuth(reference, targets, *, config, n_hvg: int | str = 3000, progress=None) -> AcsleuthOutput:
    """Time ``detect_anomalies`` (preparation, training and scoring) and collect its per-cell outputs."""
    from acsleuth_core import keys
    from acsleuth_core.pipeline import detect_anomalies

    start = time.perf_counter()
    run = detect_anomalies(reference, targets, n_hvg=n_hvg, config=config, progress=progress)
    seconds = time.perf_counter() - start
    obs = run.adata.obs
    return AcsleuthOutput(
        scores=obs[keys.SCORE].to_numpy(dtype=float),
        calls=obs[keys.ANOMALY].to_numpy(dtype=bool),
        residual_norm=obs[keys.RESIDUAL_NORM].to_numpy(dtype=float),
        batches=obs[keys.BATCH].astype(str).to_numpy(),
        seconds=seconds,
        threshold=float(run.adata.uns[keys.UNS]["threshold"]["value"]),
        run=run,
    )


# -------------------------------------------------------------------- metrics
def anomaly_metrics(truth: np.ndarray, scores: np.ndarray, calls: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC (threshold-free, on ``scores``), F1 and count of the calls; anomaly = positive."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    calls = np.asarray(calls, dtype=bool)
    ranked = 0 < truth.sum() < truth.size  # a ranking needs both classes (not so on a target without anomalies)
    return {
        "AUROC": float(roc_auc_score(truth, scores)) if ranked else float("nan"),
        "AUPRC": float(average_precision_score(truth, scores)) if ranked else float("nan"),
        "F1": float(f1_score(truth, calls, zero_division=0)),
        "called": int(calls.sum()),
    }


def calls_per_sample(truth: np.ndarray, calls: np.ndarray, batches: np.ndarray) -> dict[str, dict[str, int]]:
    """Per sample: cells, true anomalies, cells called, and false positives (normal cells called)."""
    out = {}
    for sample in dict.fromkeys(batches):
        rows = batches == sample
        out[str(sample)] = {
            "cells": int(rows.sum()),
            "anomalies": int(truth[rows].sum()),
            "called": int(calls[rows].sum()),
            "false positives": int((calls[rows] & ~truth[rows]).sum()),
        }
    return out


# ------------------------------------------------------------------ reporting
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "acsleuth_core"


def package_digests() -> dict[str, str]:
    """sha1 of every acsleuth_core source file, by path relative to the package."""
    import hashlib

    return {
        str(path.relative_to(PACKAGE_DIR)): hashlib.sha1(path.read_bytes()).hexdigest()[:10]
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    }


def code_state(digests: Mapping[str, str]) -> str:
    """The package benchmarked: HEAD commit, files differing from it, and a digest of all sources."""
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PACKAGE_DIR.parent, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("diff", "HEAD", "--name-only", "--", "acsleuth_core").split()
    total = hashlib.sha1("".join(f"{k}{v}" for k, v in digests.items()).encode()).hexdigest()[:10]
    changes = f"uncommitted changes to {', '.join(dirty)}" if dirty else "no uncommitted changes"
    return f"commit {head}, {changes}; acsleuth_core sources sha1 {total}"


def changed_since(digests: Mapping[str, str]) -> list[str]:
    """acsleuth_core files whose content differs now from ``digests`` (added and removed included)."""
    now = package_digests()
    return sorted(name for name in set(now) | set(digests) if now.get(name) != digests.get(name))


def reproduce_command(script: str, options: Mapping[str, Any]) -> str:
    """The shell command that reruns ``script`` with ``options`` (lists become repeated values)."""
    parts = ["python", script]
    for name, value in options.items():
        if value is False:  # a switch left off
            continue
        parts.append(f"--{name}")
        if value is True:  # a switch
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        parts.extend(str(v) for v in values)
    return shlex.join(parts)


def mean_std(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` over seeds (population std; just the value when there is one)."""
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if arr.size == 0:
        return "–"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=0):.{digits}f}"


def summarise(
    results: Sequence[Mapping[str, Any]], by: Sequence[str], columns: Mapping[str, int]
) -> list[dict]:
    """One row per distinct ``by`` values (first-seen order): ``seeds`` and mean ± std of each column (decimals)."""
    rows = []
    for group in dict.fromkeys(tuple(r[b] for b in by) for r in results):
        runs = [r for r in results if tuple(r[b] for b in by) == group]
        row = {**dict(zip(by, group)), "seeds": len(runs)}
        for column, digits in columns.items():
            row[column] = mean_std([r.get(column, np.nan) for r in runs], digits)
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table from dicts sharing their keys (first row's key order)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_json(name: str, data: Any) -> Path:
    """Write ``data`` as JSON to ``benchmarks/results/<name>`` (raw numbers behind a report)."""
    import json

    return write_result(name, json.dumps(data, indent=1, default=float) + "\n")


def write_result(name: str, text: str) -> Path:
    """Write ``text`` to ``benchmarks/results/<name>`` (git-ignored) and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(text)
    return path


def log(message: str) -> None:
    """Progress line on stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)
