"""The cells exactly as the model saw them, kept with a run so later stages need no re-upload.

Batch correction and subtyping read the reference and the targets normalised
and restricted to the model's genes. A run folder stores them beside the
model, so these stages can run again after a browser refresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

from .export import write_h5ad
from .preprocess import PreparedData

REFERENCE_FILE = "reference.h5ad"
TARGET_FILE = "target.h5ad"


@dataclass
class ModelInputs:
    """Normalised reference and target cells on the model's genes (targets in the result's row order)."""

    reference: ad.AnnData
    target: ad.AnnData

    @classmethod
    def from_prepared(cls, prepared: PreparedData) -> "ModelInputs":
        return cls(prepared.reference, prepared.target)

    @property
    def genes(self) -> list[str]:
        return list(self.reference.var_names)

    def write(self, folder: str | Path) -> Path:
        """Write both AnnData files into ``folder`` (each atomically)."""
        folder = Path(folder)
        write_h5ad(_storable(self.reference), folder / REFERENCE_FILE)
        write_h5ad(_storable(self.target), folder / TARGET_FILE)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> "ModelInputs":
        folder = Path(folder)
        return cls(ad.read_h5ad(folder / REFERENCE_FILE), ad.read_h5ad(folder / TARGET_FILE))


def _storable(adata: ad.AnnData) -> ad.AnnData:
    """A copy whose ``X`` is float32 and whose obs columns of mixed objects are strings, so it writes to .h5ad."""
    out = adata.copy()
    out.X = out.X.astype(np.float32)
    for column in out.obs.columns:
        if out.obs[column].dtype == object:
            out.obs[column] = out.obs[column].astype(str)
    return out
