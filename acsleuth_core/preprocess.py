"""Bring reference and targets into one log-normalised gene space.

Detect raw counts vs log-normalised values, normalise counts, match genes by
name, choose highly variable genes on the reference. Inputs are never
modified: every step returns new AnnData objects with CSR float32 ``X``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

from . import keys
from .errors import (
    DuplicateNamesError, EmptyDataError, GeneOverlapError, InputError, ValueKindError, memory_error_as_input,
)
from .io import as_csr32, cell_count, validate_matrix


INPUT_KIND_KEY = keys.INPUT_KIND
DECLARED_KINDS = ("auto", "counts", "log")
TARGET_SUM = 1e4
LOG_MAX = 50.0
KIND_SAMPLE_SIZE = 200_000
#: fewest genes reference and targets must share
MIN_SHARED_GENES = 200
MIN_NONZERO_SAMPLE = 1_000
#: fewest cells a target needs for its calls to be trusted (below, they are made with a warning)
MIN_TARGET_CELLS = 50
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}")
SCALED_FIX = (
    "ACsleuth needs raw counts or log-normalised expression; scaled data (e.g. after "
    "sc.pp.scale) cannot be used; pass adata.raw or the counts layer instead."
)


@dataclass(frozen=True)
class _ValueProfile:
    minimum: float
    maximum: float
    n_negative: int
    integer: bool


@dataclass(frozen=True)
class GeneMatchReport:
    """How many reference genes were kept, and how many each target lacked."""

    n_reference_genes: int
    n_kept: int
    dropped_per_target: dict[str, int]

    def summary(self) -> str:
        """One line for the user: "kept 2,950 of 3,000 reference genes; dropped 50 absent from target 's2'"."""
        if self.n_kept == self.n_reference_genes:
            return f"kept all {self.n_kept:,} reference genes"
        absent = ", ".join(
            f"{n:,} absent from target '{name}'" for name, n in self.dropped_per_target.items() if n
        )
        return f"kept {self.n_kept:,} of {self.n_reference_genes:,} reference genes; dropped {absent}"


@dataclass
class PreparedData:
    """Reference and targets in the same log-normalised, highly-variable gene space.

    ``target`` holds all targets stacked in order; ``batches`` gives each
    target cell's batch label; ``input_kinds`` maps "reference" and each
    target name to "counts" or "log".
    """

    genes: list[str]
    reference: ad.AnnData
    target: ad.AnnData
    batches: np.ndarray
    input_kinds: dict[str, str]
    gene_report: GeneMatchReport


def detect_value_kind(X, *, name: str = "data") -> str:
    """Return "counts" (non-negative whole numbers, 0/1 included) or "log" (non-negative, max <= 50).

    Raise ValueKindError for scaled data (negative values) or normalised
    but un-logged data (non-integers above 50), EmptyDataError if all zero.
    """
    profile = _profile(X)
    _reject_unusable(profile, name)
    kind = _seen_kind(profile)
    if kind == "unlogged":
        raise ValueKindError(
            f"'{name}' holds non-integer values up to {profile.maximum:,.1f}, too large for "
            "log-normalised expression: it looks normalised but not logged. Apply sc.pp.log1p or "
            "pass raw counts; if these are corrected counts (e.g. from SoupX), declare them as counts."
        )
    return kind


def input_warnings(reference: ad.AnnData, targets: Mapping[str, ad.AnnData]) -> list[str]:
    """Sentences about inputs that can be used but may mislead: cells without any expression, tiny targets.

    The CLI prints each as a warning line and the Data page shows each in a warning box.
    """
    messages = [_empty_cells_warning(adata.X, name) for name, adata in {"reference": reference, **targets}.items()]
    messages += [_few_cells_warning(name, t.n_obs) for name, t in targets.items() if t.n_obs < MIN_TARGET_CELLS]
    return [message for message in messages if message]


def normalise(adata: ad.AnnData, *, declared: str = "auto", name: str) -> ad.AnnData:
    """Return a new AnnData with log-normalised CSR float32 ``X``.

    Counts get ``normalize_total(1e4)`` + ``log1p``; log values are kept.
    ``declared`` is "auto", "counts" or "log"; the kind used is stored in
    ``uns["acsleuth_input_kind"]``. obs and var are copied; layers, obsm and
    the rest of uns are left behind.
    """
    kind = _input_kind(adata.X, declared, name)
    uns = _log_base(adata) if kind == "log" else {}
    out = ad.AnnData(as_csr32(adata.X), obs=adata.obs.copy(), var=adata.var.copy(), uns=uns)
    if kind == "counts":
        sc.pp.normalize_total(out, target_sum=TARGET_SUM)
        sc.pp.log1p(out)
    out.uns[INPUT_KIND_KEY] = kind
    return out


def shared_genes(
    reference: ad.AnnData, targets: Mapping[str, ad.AnnData], *, min_genes: int = MIN_SHARED_GENES
) -> tuple[list[str], GeneMatchReport]:
    """The genes every input has, in the reference's order, and a report; no data is copied.

    Raises :class:`GeneOverlapError` (with a naming hint) when fewer than ``min_genes`` are shared.
    """
    if not targets:
        raise InputError("No target data was given: add at least one target sample.")
    reference_genes = list(reference.var_names)
    target_genes = {name: set(target.var_names) for name, target in targets.items()}
    shared = set.intersection(*target_genes.values())
    genes = [gene for gene in reference_genes if gene in shared]
    report = GeneMatchReport(
        n_reference_genes=len(reference_genes),
        n_kept=len(genes),
        dropped_per_target={
            name: sum(gene not in present for gene in reference_genes)
            for name, present in target_genes.items()
        },
    )
    if len(genes) < min_genes:
        raise _overlap_error(reference_genes, targets, report, min_genes)
    return genes, report


def match_genes(
    reference: ad.AnnData, targets: Mapping[str, ad.AnnData], *, min_genes: int = MIN_SHARED_GENES
) -> tuple[ad.AnnData, dict[str, ad.AnnData], GeneMatchReport]:
    """Keep the genes every input has, in the reference's order; return subset copies and a report."""
    genes, report = shared_genes(reference, targets, min_genes=min_genes)
    subsets = {name: target[:, genes].copy() for name, target in targets.items()}
    return reference[:, genes].copy(), subsets, report


def select_hvgs(reference: ad.AnnData, n_top: int | str = 3000) -> list[str]:
    """Highly variable genes of the (log-normalised) reference, in the reference's order.

    Ranked by scanpy's ``flavor="seurat"`` normalised dispersion; "all", or
    ``n_top`` at least the number of genes, keeps every gene.
    """
    genes = list(reference.var_names)
    if n_top == "all":
        return genes
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
        raise InputError(
            f"The number of highly variable genes must be a whole number above 0 or 'all', not {n_top!r}."
        )
    if n_top >= len(genes):
        return genes
    lean = ad.AnnData(reference.X, var=pd.DataFrame(index=reference.var_names), uns=_log_base(reference))
    table = sc.pp.highly_variable_genes(lean, flavor="seurat", n_top_genes=int(n_top), inplace=False)
    dispersion = table["dispersions_norm"].fillna(-np.inf).to_numpy()
    chosen = np.zeros(len(genes), dtype=bool)
    chosen[np.argsort(-dispersion, kind="stable")[:n_top]] = True
    return [gene for gene, keep in zip(genes, chosen) if keep]


def prepare(
    reference: ad.AnnData,
    targets: Mapping[str, ad.AnnData] | ad.AnnData,
    *,
    batch_key: str | None = None,
    n_hvg: int | str = 3000,
    declared: str = "auto",
) -> PreparedData:
    """Validate, normalise, match genes and restrict to reference HVGs; inputs are left untouched.

    Each target is its own batch (label = its name) unless ``batch_key``
    names an obs column every target has. A single AnnData target is named
    "target".
    """
    with memory_error_as_input("prepare the reference and targets"):
        return _prepare(reference, targets, batch_key=batch_key, n_hvg=n_hvg, declared=declared)


def _prepare(
    reference: ad.AnnData,
    targets: Mapping[str, ad.AnnData] | ad.AnnData,
    *,
    batch_key: str | None,
    n_hvg: int | str,
    declared: str,
) -> PreparedData:
    targets = _target_dict(targets)
    _require_anndata(reference, "reference")
    validate_matrix(reference, name="reference")
    for name, target in targets.items():
        validate_matrix(target, name=name)
    _check_names_across_targets(targets)
    batches = _batch_labels(targets, batch_key)
    # rebinding the names lets each full-size intermediate be freed as soon as it is used
    reference = normalise(reference, declared=declared, name="reference")
    targets = {name: normalise(t, declared=declared, name=name) for name, t in targets.items()}
    reference, targets, report = match_genes(reference, targets)
    genes = select_hvgs(reference, n_hvg)
    kinds = {name: t.uns[INPUT_KIND_KEY] for name, t in targets.items()}
    return PreparedData(
        genes=genes,
        reference=reference[:, genes].copy(),
        target=_stack_targets(targets, genes),
        batches=batches,
        input_kinds={"reference": reference.uns[INPUT_KIND_KEY], **kinds},
        gene_report=report,
    )


def _log_base(adata: ad.AnnData) -> dict:
    """scanpy's record of the log base (``uns["log1p"]``), copied, for a new uns."""
    return {"log1p": copy.deepcopy(adata.uns["log1p"])} if "log1p" in adata.uns else {}


def _empty_cells_warning(X, name: str) -> str | None:
    """None when every cell has a value (or none has: that whole matrix is refused when prepared)."""
    values_per_cell = X.count_nonzero(axis=1) if sparse.issparse(X) else np.count_nonzero(X, axis=1)
    n_empty = int(np.count_nonzero(np.asarray(values_per_cell) == 0))
    if n_empty in (0, X.shape[0]):
        return None
    return (
        f"'{name}': {cell_count(n_empty)} of {X.shape[0]:,} have no expression at all (every gene 0), so "
        "they cannot be normalised and are scored as empty. Remove them unless they are meant to be "
        "there (e.g. sc.pp.filter_cells(adata, min_counts=1))."
    )


def _few_cells_warning(name: str, n_cells: int) -> str:
    return (
        f"Target '{name}' has only {cell_count(n_cells)}: too few to call anomalies reliably (the "
        f"threshold and the subtypes need at least {MIN_TARGET_CELLS:,}). Add cells, or read its calls as "
        "a rough guide."
    )


def _profile(X) -> _ValueProfile:
    values = X.data if sparse.issparse(X) else np.ravel(np.asarray(X), order="K")
    if values.size == 0:
        return _ValueProfile(0.0, 0.0, 0, True)
    integer = values.dtype.kind in "biu" or _all_integer(_nonzero_sample(values))
    return _ValueProfile(
        minimum=float(values.min()),
        maximum=float(values.max()),
        n_negative=int(np.count_nonzero(values < 0)),
        integer=integer,
    )


def _nonzero_sample(values: np.ndarray) -> np.ndarray:
    """Up to ~200k non-zero values, drawn with a fixed seed; all of them when few."""
    if values.size > KIND_SAMPLE_SIZE:
        rng = np.random.default_rng(0)
        sample = values[rng.integers(0, values.size, KIND_SAMPLE_SIZE)]
        sample = sample[sample != 0]
        if sample.size >= MIN_NONZERO_SAMPLE:
            return sample
    return values[values != 0]


def _all_integer(values: np.ndarray) -> bool:
    return bool(np.all(values == np.round(values)))


def _reject_unusable(profile: _ValueProfile, name: str) -> None:
    if profile.minimum == 0 and profile.maximum == 0:
        raise EmptyDataError(f"'{name}' holds only zeros: give the expression matrix itself.")
    if profile.n_negative:
        raise ValueKindError(
            f"'{name}' holds {profile.n_negative:,} negative values (lowest {profile.minimum:,.2f}), "
            f"so it looks scaled or z-scored. {SCALED_FIX}"
        )


def _seen_kind(profile: _ValueProfile) -> str:
    if profile.integer:
        return "counts"
    return "log" if profile.maximum <= LOG_MAX else "unlogged"


def _input_kind(X, declared: str, name: str) -> str:
    """The kind to treat ``X`` as, honouring a declaration the data do not contradict.

    Declared counts may be non-integer above 50 (corrected counts, or
    normalised un-logged values, which re-normalising handles); declared log
    may be 0/1 data, which cannot tell the two kinds apart.
    """
    if declared not in DECLARED_KINDS:
        raise InputError(f"The value kind must be one of {', '.join(DECLARED_KINDS)}, not {declared!r}.")
    if declared == "auto":
        return detect_value_kind(X, name=name)
    profile = _profile(X)
    _reject_unusable(profile, name)
    seen = _seen_kind(profile)
    if declared == "counts" and seen == "log":
        raise ValueKindError(
            f"'{name}' was declared as raw counts but holds non-integer values up to "
            f"{profile.maximum:,.2f}, which look log-normalised. Declare it as log (or auto), or "
            "pass the raw counts (e.g. adata.layers['counts'] or adata.raw)."
        )
    if declared == "log" and seen == "counts" and profile.maximum > 1:
        raise ValueKindError(
            f"'{name}' was declared as log-normalised but holds only whole numbers up to "
            f"{profile.maximum:,.0f}, which look like raw counts. Declare it as counts (or auto) so "
            "ACsleuth normalises it, or pass log-normalised values."
        )
    if declared == "log" and seen == "unlogged":
        raise ValueKindError(
            f"'{name}' was declared as log-normalised but holds values up to {profile.maximum:,.1f}, "
            "too large for log data. Apply sc.pp.log1p first, or declare it as counts."
        )
    return declared


def _overlap_error(
    reference_genes: list[str], targets: Mapping[str, ad.AnnData], report: GeneMatchReport, min_genes: int
) -> GeneOverlapError:
    if report.n_kept == report.n_reference_genes:
        return GeneOverlapError(
            f"The reference has only {report.n_reference_genes:,} genes, fewer than the "
            f"{min_genes:,} ACsleuth needs: give the full gene set, not a small panel."
        )
    worst = max(report.dropped_per_target, key=report.dropped_per_target.get)
    shared = report.n_reference_genes - report.dropped_per_target[worst]
    if shared >= min_genes:
        problem = f"The reference and all targets together share only {report.n_kept:,} gene names"
    else:
        problem = f"The reference and target '{worst}' share only {shared:,} gene names"
    hint = _naming_hint(reference_genes, list(targets[worst].var_names), worst, min_genes)
    return GeneOverlapError(f"{problem}, fewer than the {min_genes:,} ACsleuth needs. {hint}")


def _naming_hint(reference_genes: list[str], target_genes: list[str], target: str, min_genes: int) -> str:
    """Guess why names do not match: Ensembl IDs vs symbols, version suffixes, capitalisation."""
    ref_ensembl, target_ensembl = _uses_ensembl(reference_genes), _uses_ensembl(target_genes)
    if ref_ensembl != target_ensembl:
        ref_kind = "Ensembl IDs" if ref_ensembl else "gene symbols"
        target_kind = "Ensembl IDs" if target_ensembl else "gene symbols"
        return (
            f"The reference uses {ref_kind} (e.g. '{reference_genes[0]}') and target '{target}' "
            f"uses {target_kind} (e.g. '{target_genes[0]}'): convert one of them so both use the "
            "same kind of gene name (10x data carry both; the Ensembl IDs are in var['gene_ids'])."
        )
    if ref_ensembl:
        pair = _matching_pair(reference_genes, target_genes, _without_version, min_genes)
        if pair:
            return (
                f"The Ensembl IDs differ only in their version suffix (e.g. '{pair[0]}' vs "
                f"'{pair[1]}'): remove the '.N' versions from both."
            )
    pair = _matching_pair(reference_genes, target_genes, str.upper, min_genes)
    if pair:
        return (
            f"The gene names differ in capitalisation (e.g. '{pair[0]}' vs '{pair[1]}'): human "
            "symbols are upper case and mouse symbols capitalised. If the species differ, map "
            "genes to orthologues; otherwise make the capitalisation the same in both."
        )
    return "Check that both data sets come from the same species and use the same gene annotation."


def _uses_ensembl(genes: list[str]) -> bool:
    sample = genes[:1000]
    return sum(bool(ENSEMBL_ID.match(gene)) for gene in sample) > len(sample) / 2


def _without_version(gene: str) -> str:
    return gene.split(".")[0]


def _matching_pair(
    reference_genes: list[str], target_genes: list[str], key: Callable[[str], str], min_genes: int
) -> tuple[str, str] | None:
    """An example pair of differing names that ``key`` makes equal, if ``key`` would fix the overlap."""
    by_key = {key(gene): gene for gene in target_genes}
    matched = [(gene, by_key[key(gene)]) for gene in reference_genes if key(gene) in by_key]
    if len(matched) < min_genes:
        return None
    return next(((a, b) for a, b in matched if a != b), None)


def _target_dict(targets: Mapping[str, ad.AnnData] | ad.AnnData) -> dict[str, ad.AnnData]:
    targets = {"target": targets} if isinstance(targets, ad.AnnData) else dict(targets)
    if not targets:
        raise InputError("No target data was given: add at least one target sample.")
    if "reference" in targets:
        raise InputError("A target may not be named 'reference': give it another name.")
    for name, target in targets.items():
        _require_anndata(target, name)
    return targets


def _require_anndata(obj: object, name: str) -> None:
    if not isinstance(obj, ad.AnnData):
        raise InputError(
            f"'{name}' is a {type(obj).__name__}, not an AnnData: read files with "
            "acsleuth_core.io.read_cells."
        )


def _check_names_across_targets(targets: dict[str, ad.AnnData]) -> None:
    names = pd.Index(np.concatenate([t.obs_names.to_numpy() for t in targets.values()]))
    if names.is_unique:
        return
    repeated = names[names.duplicated()].unique()
    holders = [name for name, t in targets.items() if repeated[0] in t.obs_names]
    raise DuplicateNamesError(
        f"{len(repeated):,} cell names occur in more than one target (e.g. '{repeated[0]}' in "
        f"{' and '.join(repr(h) for h in holders)}); 10x barcodes often repeat between samples. "
        "Make the cell names unique, e.g. prefix each sample's names: "
        "adata.obs_names = 'sample1_' + adata.obs_names."
    )


def _batch_labels(targets: dict[str, ad.AnnData], batch_key: str | None) -> np.ndarray:
    if batch_key is None:
        labels = [np.full(t.n_obs, name, dtype=object) for name, t in targets.items()]
    else:
        labels = [_batch_column(t, name, batch_key) for name, t in targets.items()]
    return np.concatenate(labels).astype(str)


def _batch_column(target: ad.AnnData, name: str, batch_key: str) -> np.ndarray:
    if batch_key not in target.obs.columns:
        available = ", ".join(map(str, target.obs.columns)) or "none"
        raise InputError(
            f"Target '{name}' has no obs column '{batch_key}' (its columns: {available}). Choose "
            "a batch column every target has, or none to treat each target as one batch."
        )
    values = target.obs[batch_key]
    if values.isna().any():
        raise InputError(
            f"{int(values.isna().sum()):,} cells of target '{name}' have no value in the batch "
            f"column '{batch_key}': fill them in, or treat each target as one batch."
        )
    return values.astype(str).to_numpy()


def _stack_targets(targets: dict[str, ad.AnnData], genes: list[str]) -> ad.AnnData:
    X = sparse.vstack([t[:, genes].X for t in targets.values()], format="csr", dtype=np.float32)
    obs = pd.concat([t.obs for t in targets.values()])
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))
