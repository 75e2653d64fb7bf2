"""Data: load a reference and targets (upload, server path or the demo), check them."""

import streamlit as st

from acsleuth_core.errors import ACsleuthError
from acsleuth_core.io import SERVER_PATHS_OFF, dataset_names
from acsleuth_core.summary import batch_sizes, describe_inputs, shared_obs_columns
from pages.ui.frame import LoadedData, demo_data, frame, loaded_data, set_loaded_data, show_error
from pages.ui.uploads import read_server_path, read_upload, server_data_roots, upload_limit_bytes

frame("Data")
st.title("1 · Data")
st.markdown(
    "ACsleuth needs a **reference** of normal cells and one or more **targets** to search for anomalies. "
    "Each target file is one sample (batch). Accepted: `.h5ad`, 10x `.h5`, `.csv`/`.tsv` (gzipped too); "
    "raw counts or log-normalised values."
)

left, right = st.columns(2)
if left.button("Load demo data", type="primary", help="Real PBMCs (scanpy's pbmc68k_reduced); B cells are the anomalies"):
    set_loaded_data(demo_data())
if right.button(
    "Load demo data with two anomaly types",
    help="The same PBMCs with the rare CD34+ progenitors kept and anomalous too: something to split on the Subtypes step",
):
    set_loaded_data(demo_data(with_progenitors=True))

upload_tab, path_tab = st.tabs(["Upload files", "Path on the server"])
with upload_tab:
    st.caption(f"Upload limit: {upload_limit_bytes() // 2**20:,} MB per file; use a server path for bigger files.")
    reference_file = st.file_uploader("Reference (normal cells)", key="reference_upload")
    target_files = st.file_uploader("Targets (one file per sample)", accept_multiple_files=True, key="target_upload")
    if st.button("Read uploaded files", disabled=not (reference_file and target_files)):
        try:
            reference = read_upload(reference_file)
            names = dataset_names([f.name for f in target_files])
            targets = {name: read_upload(f) for name, f in zip(names, target_files)}
            set_loaded_data(LoadedData(reference, targets, source="uploaded files"))
        except ACsleuthError as error:
            show_error(error)
with path_tab:
    paths_off = not server_data_roots()
    if paths_off:
        st.info(SERVER_PATHS_OFF)
    reference_path = st.text_input("Reference file or 10x folder", disabled=paths_off)
    target_paths = st.text_area("Target files or folders, one per line", disabled=paths_off)
    if st.button("Read files from the server", disabled=paths_off or not (reference_path and target_paths.strip())):
        try:
            reference = read_server_path(reference_path)
            lines = [line.strip() for line in target_paths.splitlines() if line.strip()]
            targets = {name: read_server_path(line) for name, line in zip(dataset_names(lines), lines)}
            set_loaded_data(LoadedData(reference, targets, source="files on the server"))
        except ACsleuthError as error:
            show_error(error)

data = loaded_data()
if data is None:
    st.info("No data loaded yet.")
    st.stop()

st.subheader(f"Loaded: {data.source}")
try:
    overview = describe_inputs(data.reference, data.targets)
except ACsleuthError as error:
    show_error(error)
    st.stop()
st.dataframe(overview.table, hide_index=True)
st.markdown(overview.gene_summary)
for message in overview.warnings:
    st.warning(message, icon="⚠️")
choices = [n for n in (1000, 2000, 3000, 5000) if n < overview.n_shared_genes] + ["all"]
hvg = st.selectbox(
    "Highly variable genes (chosen on the reference)",
    choices,
    index=choices.index(3000) if 3000 in choices else len(choices) - 1,
    help="The detector models these genes; 'all' keeps every shared gene.",
)
data.n_hvg = hvg
EACH_FILE = "each target file is one sample"
batch_choice = st.selectbox(
    "Batches",
    [EACH_FILE, *shared_obs_columns(data.targets)],
    help="Cells of one batch share technical effects. Pick an obs column if a file holds several samples.",
)
data.batch_key = None if batch_choice == EACH_FILE else batch_choice
st.dataframe(batch_sizes(data.targets, data.batch_key), hide_index=True)
st.page_link("pages/2_Detect.py", label="Next: train the detector", icon="➡️")
