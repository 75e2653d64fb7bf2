"""ACsleuth Studio: the entry page. Run with ``streamlit run app.py``."""

import streamlit as st

from pages.ui.frame import current_run, frame, open_run, run_store

frame("Home")
st.title("ACsleuth Studio")
st.markdown(
    "Find **anomalous cells** in single-cell RNA-seq data by comparing target samples with a "
    "reference of normal cells. Work through the steps in the sidebar: **Data** → **Detect** → **Correct** → **Subtypes** → **Export**."
)
st.page_link("pages/1_Data.py", label="Start with your data, or the built-in demo", icon="📂")

st.subheader("Earlier runs")
runs = run_store().list()
if not runs:
    st.info("No runs yet. Finished runs are kept on disk and can be reopened here after a refresh or a restart.")
else:
    labels = {r.id: f"{r.info.get('name', r.id)} · {r.info.get('status')} · {r.info.get('created', '')}" for r in runs}
    chosen = st.selectbox("Reopen a run", list(labels), format_func=labels.get)
    if st.button("Open run"):
        open_run(chosen)
        st.switch_page("pages/2_Detect.py")
run = current_run()
if run is not None:
    st.success(f"Current run: {run.info.get('name', run.id)} ({run.info.get('status')})")
