"""How the default score joins its views: candidate joins re-scored from a suite run's saved views.

    python benchmarks/score_rules.py [benchmarks/results/suite.json]

``benchmarks/suite.py`` saves every task's per-view scores (target cells and,
out of fold, reference cells). This script joins them in each candidate way,
calls every join with the same label-free rule (``threshold.label_free_threshold``)
and prints one summary row per candidate, beside the suite's baselines. No
model is retrained, so every candidate sees the very same views.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.score_rules
    import _common as common
    import suite
except ImportError:  # pragma: no cover
    from benchmarks import _common as common
    from benchmarks import suite

SCRIPT = "benchmarks/score_rules.py"
VIEW_METHODS = {"residual": "residual view", "similarity": "similarity view", "predictor": "paper (predictor)"}


def _fisher(views, weights=None):
    """Weighted mean of ``−log p`` (tail p-values against the reference) over the views."""
    from acsleuth_core import threshold as thr
    from acsleuth_core.views import ViewScores

    names = list(views)
    w = np.array([1.0 if weights is None else weights[n] for n in names])
    w = w / w.sum()
    return ViewScores(
        sum(wi * -np.log(thr.tail_pvalues(views[n].target, views[n].reference)) for wi, n in zip(w, names)),
        sum(wi * -np.log(thr.tail_pvalues(views[n].reference, views[n].reference)) for wi, n in zip(w, names)),
    )


def _maximum(views):
    from acsleuth_core.views import ViewScores, standardised

    parts = [standardised(v) for v in views.values()]
    return ViewScores(np.max([p.target for p in parts], axis=0), np.max([p.reference for p in parts], axis=0))


def candidates() -> dict:
    """Candidate joins of the three views, by name; the shipped one is ``excess²-weighted mean``."""
    from acsleuth_core.views import combine, tail_excess, tail_excess_weights

    def pair(views):
        return {k: views[k] for k in ("residual", "similarity")}

    return {
        "mean (3 views)": combine,
        "mean (residual + similarity)": lambda v: combine(pair(v)),
        "maximum (3 views)": _maximum,
        "Fisher (3 views)": _fisher,
        "Fisher (residual + similarity)": lambda v: _fisher(pair(v)),
        "excess-weighted mean": lambda v: combine(v, {k: tail_excess(x) + 1e-3 for k, x in v.items()}),
        "excess²-weighted mean (shipped)": lambda v: combine(v, tail_excess_weights(v)),
        "excess²-weighted Fisher": lambda v: _fisher(v, tail_excess_weights(v)),
    }


def main(argv=None) -> None:
    from acsleuth_core.views import ViewScores

    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else common.RESULTS_DIR / "suite.json"
    saved = json.loads(path.read_text())
    rows = saved["rows"]
    rescored = []
    for row in rows:
        views = {n: ViewScores(*(np.asarray(a) for a in row["scores"][m])) for n, m in VIEW_METHODS.items()}
        joined = {name: join(views) for name, join in candidates().items()}
        scored = {name: suite.Scored(v.target, v.reference) for name, v in joined.items()}
        scored |= {b: suite.Scored(*(np.asarray(a) for a in row["scores"][b])) for b in suite.BASELINE_NAMES}
        task = suite.tasks.Task(None, {}, np.asarray(row["truth"], dtype=bool))
        rescored.append(row | {"metrics": suite.evaluate(task, scored)})
    names = [*candidates(), *suite.BASELINE_NAMES]
    table = suite.method_summary(rescored, names)
    for line in table:
        method = line["method"]
        closes = [
            r["metrics"][method]["AUROC"] >= suite.best_baseline(r, "AUROC")[1] - 0.01 for r in rescored if r["anomalies"]
        ]
        line["AUROC within 0.01 of the task's best baseline"] = f"{sum(closes)}/{len(closes)}"
    print(f"# Joining the views\n\nReproduce: `{common.reproduce_command(SCRIPT, {})} {path}` (views from: `{saved['command']}`, {saved['code']})\n")
    print(common.markdown_table(table))


if __name__ == "__main__":
    main()
