"""The ``acsleuth`` command line: the same core the app uses, from a shell.

    acsleuth run --reference REF --target T1 [T2 ...] --out OUT.h5ad [options]
    acsleuth demo --out FOLDER
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import keys
from . import threshold as thr
from .demo import load_demo
from .detect import AnomalyDetector, DetectorConfig
from .errors import ACsleuthError, Cancelled, EmptyDataError, InputError
from .export import atomic_path, cell_table, table_suffix, write_h5ad, write_table
from .io import dataset_names, read_cells
from .preprocess import input_warnings
from .correction import METHODS as CORRECTION_METHODS
from .correction import CorrectionConfig
from .correction_quality import METRIC_NAMES, biology_lost
from .pipeline import call_anomalies, correct_detection_run, detect_anomalies, drop_stage_keys, subtype_detection_run
from .progress import ProgressEvent
from .resemblance import describe_resemblance
from .runtime import DEVICES
from .subtypes import SubtypeConfig
from .views import VIEWS


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``acsleuth`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ACsleuthError as error:
        print(f"acsleuth: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("acsleuth: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acsleuth", description="Find anomalous cells in single-cell data (ACsleuth).")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train on a reference of normal cells and score target cells")
    run.add_argument("--reference", required=True, type=Path, help="normal reference cells (.h5ad, 10x .h5 or folder, .csv/.tsv)")
    run.add_argument("--target", required=True, nargs="+", type=Path, help="one or more target files; each is its own batch")
    run.add_argument("--batch-key", help="obs column naming each target cell's batch (instead of one batch per file)")
    run.add_argument("--out", required=True, type=Path, help="annotated target AnnData to write (.h5ad)")
    run.add_argument("--table", type=Path, help="also write the cell table (.csv, .tsv or .parquet)")
    run.add_argument("--hvg", default="3000", help="number of highly variable genes chosen on the reference, or 'all'")
    run.add_argument("--input-kind", default="auto", choices=("auto", "counts", "log"), help="what X holds (default: detect)")
    run.add_argument("--epochs", type=int, help="module I training epochs (default: about 2,000 mini-batches)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", choices=DEVICES)
    run.add_argument("--no-memory-bank", action="store_true", help="ablation: decode the latent directly")
    run.add_argument(
        "--views", nargs="+", choices=VIEWS, default=list(VIEWS),
        help="the views the score joins (default: all); '--views predictor' is the paper's score, module I's MMD "
        "predictor on the residuals alone",
    )
    call = run.add_mutually_exclusive_group()
    call.add_argument("--expected-fraction", type=float, help="call this fraction of target cells anomalous")
    call.add_argument("--threshold", type=float, help="call cells with score above this value anomalous")
    correction = run.add_mutually_exclusive_group()
    correction.add_argument(
        "--correct", dest="correct", action="store_true", default=None,
        help="batch-correct the targets (modules II and III; default: on when the targets hold more than one batch)",
    )
    correction.add_argument("--no-correct", dest="correct", action="store_false", help="skip batch correction")
    run.add_argument("--correction-epochs", type=int, help="training epochs of modules II and III (default: automatic)")
    run.add_argument(
        "--correction-method", choices=[m.replace("_", "-") for m in CORRECTION_METHODS], default="kin-shift",
        help="kin-shift (default): measured expression minus the batch effect its kin pairs show; "
        "style-transfer: the paper's module III, expression decoded from the style-free latent",
    )
    run.add_argument(
        "--n-subtypes", default="auto", type=_n_subtypes,
        help="split the anomalies into K subtypes (module IV), 'auto' to choose K, or 0 to skip (default: auto)",
    )
    run.add_argument("--subtype-resolution", type=float, default=SubtypeConfig.resolution, help="Leiden resolution tried in the automatic mode")
    run.add_argument(
        "--keep-reference-like", action="store_true",
        help="keep cells of subtypes that resemble the reference called anomalous (default: they are called normal)",
    )
    run.add_argument("--label-key", help="obs column in targets and reference (e.g. cell type) to measure label purity")
    run.add_argument("--save-model", type=Path, help="folder to save the trained model in")
    run.add_argument("--model", type=Path, help="score with a saved model instead of training")
    run.set_defaults(handler=_run, training_defaults={dest: run.get_default(dest) for dest in TRAINING_ONLY})

    demo = commands.add_parser("demo", help="write the built-in demo data set (PBMCs, B cells anomalous) as .h5ad files")
    demo.add_argument("--out", required=True, type=Path, help="folder to write into")
    demo.add_argument("--with-progenitors", action="store_true", help="also make CD34+ progenitors anomalous")
    demo.set_defaults(handler=_demo)
    return parser


#: exit status of a run whose detection was written but a later stage failed
PARTIAL_EXIT = 3
#: options of ``run`` that only shape training, so a saved model (``--model``) ignores them
TRAINING_ONLY = ("epochs", "no_memory_bank", "views", "hvg")


def _run(args: argparse.Namespace) -> int:
    _check_outputs(args)
    detector = _load_model(args) if args.model else None
    names = dataset_names(args.target)
    reference = read_cells(args.reference)
    targets = {name: read_cells(path) for name, path in zip(names, args.target)}
    for message in input_warnings(reference, targets):
        _warn(message)
    config = DetectorConfig(
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        memory_size=0 if args.no_memory_bank else DetectorConfig.memory_size,
        views=tuple(args.views),
    )
    with _ProgressBar() as bar:
        run = detect_anomalies(
            reference,
            targets,
            batch_key=args.batch_key,
            n_hvg=_hvg(args.hvg),
            declared=args.input_kind,
            config=config,
            detector=detector,
            progress=bar.update,
        )
    adata = run.adata
    if args.expected_fraction is not None:
        call_anomalies(adata, "fraction", args.expected_fraction)
    elif args.threshold is not None:
        call_anomalies(adata, "manual", args.threshold)
    _write_outputs(adata, args)  # the detection is safe on disk before the later stages start
    if args.save_model:
        run.detector.save(args.save_model)
    n_batches = adata.obs[keys.BATCH].nunique()
    stages = []
    if args.correct if args.correct is not None else n_batches > 1:
        stages.append((keys.CORRECTION, "batch correction", lambda: _correct(run, args)))
    if args.n_subtypes != 0:
        stages.append((keys.SUBTYPES, "subtypes", lambda: _subtype(run, args)))
    failed = [name for stage, name, work in stages if not _later_stage(run, stage, name, work, args.out)]
    if stages:
        _write_outputs(adata, args)
    called = adata.uns[keys.UNS]["calls_per_batch"]
    summary = ", ".join(f"{batch}: {n}" for batch, n in called.items())
    print(f"{int(adata.obs[keys.ANOMALY].sum())} of {adata.n_obs} cells called anomalous ({summary}); wrote {args.out}")
    print(thr.explain(adata.uns[keys.UNS]["threshold"])[0], file=sys.stderr)
    shift = thr.shift_warning(
        adata.obs[keys.SCORE].to_numpy(), adata.obs[keys.BATCH].astype(str).to_numpy(), adata.uns[keys.UNS]["reference_scores"]
    )
    if shift:
        _warn(shift)
    if failed:
        print(f"acsleuth: partial run: {' and '.join(failed)} failed; {args.out} holds what finished", file=sys.stderr)
        return PARTIAL_EXIT
    return 0


def _load_model(args: argparse.Namespace) -> AnomalyDetector:
    """The saved model, after a warning naming any training option given with it (it keeps its own)."""
    ignored = [
        "--" + dest.replace("_", "-") for dest, default in args.training_defaults.items() if getattr(args, dest) != default
    ]
    if ignored:
        _warn(
            f"{', '.join(ignored)} only shape training, and --model scores with a model already trained, so "
            f"{'they are' if len(ignored) > 1 else 'it is'} ignored. Leave out --model to train with them."
        )
    return AnomalyDetector.load(args.model)


def _warn(message: str) -> None:
    print(f"acsleuth: warning: {message}", file=sys.stderr)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that could not be written, before any work is done."""
    if args.out.suffix.lower() != ".h5ad":
        raise InputError(f"--out must name an .h5ad file, not {args.out.name}.")
    outputs = [args.out]
    if args.table:
        table_suffix(args.table)
        outputs.append(args.table)
    for path in outputs:
        if path.is_dir():
            raise InputError(f"{path} is a folder; name a file to write.")
        _check_writable_folder(path.parent)
    if args.save_model:
        if args.save_model.exists() and not args.save_model.is_dir():
            raise InputError(f"--save-model {args.save_model} is a file; name a folder to save the model in.")
        _check_writable_folder(args.save_model)


def _check_writable_folder(folder: Path) -> None:
    """``folder`` exists as a writable folder, or can be created under one."""
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _can_create_files_in(existing):
        raise InputError(f"Cannot write into {folder}: {existing} is not a writable folder. Choose another output place.")


def _can_create_files_in(folder: Path) -> bool:
    """Tried, not inferred: permission bits miss read-only file systems, and root passes every permission check."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _write_outputs(adata, args: argparse.Namespace) -> None:
    write_h5ad(adata, args.out)
    if args.table:
        write_table(cell_table(adata), args.table)


def _later_stage(run, stage: str, name: str, work: Callable[[], None], out: Path) -> bool:
    """Run a stage after detection; on failure say so in one line, drop its half-written keys and return False.

    The detection (and any stage before this one) stays in the output; the
    failure is recorded under ``uns[keys.UNS][keys.FAILED_STAGES]`` and its
    traceback written beside the output for a bug report.
    """
    try:
        work()
        return True
    except Cancelled:
        raise
    except Exception as error:  # noqa: BLE001 - named to the user; the trace goes to a log file
        drop_stage_keys(run.adata, stage)
        cause = str(error) if isinstance(error, ACsleuthError) else f"{type(error).__name__}: {error}"
        run.adata.uns[keys.UNS].setdefault(keys.FAILED_STAGES, {})[stage] = cause
        log = out.with_name(out.name + ".error.log")
        with atomic_path(log) as tmp:
            tmp.write_text(traceback.format_exc())
        print(f"acsleuth: {name} failed ({cause}); earlier results kept; details in {log}", file=sys.stderr)
        return False


def _correct(run, args: argparse.Namespace) -> None:
    with _ProgressBar() as bar:
        correction = correct_detection_run(run, _correction_config(args), label_key=args.label_key, progress=bar.update)
    print(_describe_metrics(correction.metrics), file=sys.stderr)


def _subtype(run, args: argparse.Namespace) -> None:
    """Module IV on the run; too few anomalies skip it with a message instead of losing the run."""
    config = SubtypeConfig(n_subtypes=args.n_subtypes, resolution=args.subtype_resolution, seed=args.seed)
    try:
        with _ProgressBar() as bar:
            result = subtype_detection_run(
                run, config, reference_like_normal=not args.keep_reference_like, progress=bar.update
            )
    except EmptyDataError as error:
        print(f"acsleuth: subtypes skipped: {error}", file=sys.stderr)
        return
    kept, found = len(result.kept_subtypes), result.subtypes.k_chosen
    counted = f"{kept} anomaly subtypes" + ("" if kept == found else f" kept of {found} found")
    print(f"{counted} ({result.subtypes.k_reason})", file=sys.stderr)
    called_normal = int((~result.kept).sum()) if result.reference_like_normal else None
    resemblance = describe_resemblance(result.resemblance, called_normal=called_normal)
    if resemblance:
        print(resemblance + (" (CLI: --keep-reference-like)" if called_normal else ""), file=sys.stderr)


def _n_subtypes(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the number of subtypes cannot be negative")
    return value


def _correction_config(args: argparse.Namespace) -> CorrectionConfig:
    config = CorrectionConfig.seeded(args.seed, args.device, method=args.correction_method.replace("-", "_"))
    if args.correction_epochs is None:
        return config
    return dataclasses.replace(
        config,
        kin=dataclasses.replace(config.kin, epochs=args.correction_epochs),
        style=dataclasses.replace(config.style, epochs=args.correction_epochs),
    )


def _describe_metrics(metrics: dict) -> str:
    """One line of the expression-space metrics before → after, then any biology the correction lost."""
    expression = metrics["expression"]
    parts = [
        f"{label} {expression['before'][key]:.3f} → {expression['after'][key]:.3f}"
        for key, label in METRIC_NAMES.items()
        if key in expression["after"]
    ]
    lost = biology_lost(metrics)
    warning = f"\nwarning: biology was lost in correction: {'; '.join(lost)}" if lost else ""
    return "batch correction: " + ", ".join(parts) + warning


def _demo(args: argparse.Namespace) -> int:
    data = load_demo(with_progenitors=args.with_progenitors)
    args.out.mkdir(parents=True, exist_ok=True)
    write_h5ad(data.reference, args.out / "reference.h5ad")
    for name, target in data.targets.items():
        write_h5ad(target, args.out / f"{name}.h5ad")
    print(f"wrote reference.h5ad and {', '.join(f'{n}.h5ad' for n in data.targets)} to {args.out}")
    return 0


def _hvg(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise ACsleuthError(f"--hvg must be a number of genes or 'all', not {text!r}") from None


class _ProgressBar:
    """A tqdm bar per training stage on a terminal; silent otherwise."""

    def __init__(self) -> None:
        self._bar = None
        self._stage = None
        self._enabled = sys.stderr.isatty()

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, event: ProgressEvent) -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

        if event.stage != self._stage:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=event.n_epochs, desc=event.stage, unit="epoch", file=sys.stderr)
            self._stage = event.stage
        self._bar.update(event.epoch - self._bar.n)
        postfix = {k: f"{v:.3g}" for k, v in event.losses.items()}
        if event.cells_per_second:
            postfix["cells/s"] = f"{event.cells_per_second:,.0f}"
        self._bar.set_postfix(postfix)


if __name__ == "__main__":
    sys.exit(main())
