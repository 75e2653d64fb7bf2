"""Export: the annotated cell table (CSV, Parquet), the annotated AnnData and the trained model."""

import shutil
import tempfile
from pathlib import Path

import streamlit as st

from acsleuth_core import keys
from acsleuth_core.export import cell_table, provenance, table_bytes
from acsleuth_core.runs import MODEL_DIR, RESULT_FILE
from pages.ui.frame import current_run, frame

frame("Export")
st.title("5 · Export")
run = current_run()
if run is None or not run.has_result:
    st.info("Nothing to export yet: finish a detection run first (Detect page), or reopen one from the home page.")
    st.stop()

adata = run.load_result()
table = cell_table(adata)
meta = provenance(adata)
threshold = adata.uns[keys.UNS]["threshold"]
st.markdown(
    f"Run **{run.info.get('name', run.id)}**: {len(table):,} cells, "
    f"**{int(table[keys.ANOMALY].sum()):,}** called anomalous "
    f"(score above {threshold['value']:.4g}, rule: {threshold['method'].replace('_', '-')})."
)
st.caption("Column names are the documented AnnData keys (see the README); every table starts with its provenance.")
st.dataframe(table.head(200), hide_index=True)
with st.expander("Provenance written into every table"):
    st.json(meta)

MODEL_CONTENTS = (
    "The trained model holds the expression of the reference cells it calibrates its call on (as well as "
    "its weights and gene list): share it only with people who may see the reference data."
)
left, middle, right, last = st.columns(4, gap="small")
left.download_button("Cell table (CSV)", table_bytes(table, "csv", meta), "acsleuth_cells.csv", "text/csv")
middle.download_button("Cell table (Parquet)", table_bytes(table, "parquet", meta), "acsleuth_cells.parquet")
right.download_button("Annotated AnnData (.h5ad)", (run.folder / RESULT_FILE).read_bytes(), "acsleuth_result.h5ad")
with tempfile.TemporaryDirectory() as folder:
    archive = shutil.make_archive(str(Path(folder) / "model"), "zip", run.folder / MODEL_DIR)
    last.download_button(
        "Trained model (.zip)", Path(archive).read_bytes(), "acsleuth_model.zip", help=MODEL_CONTENTS,
    )
st.caption(MODEL_CONTENTS)
