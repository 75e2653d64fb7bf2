"""The Streamlit pages, driven headless with streamlit.testing.AppTest."""

import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from acsleuth_core import keys, resemblance
from acsleuth_core import threshold as thr
from acsleuth_core.pipeline import call_anomalies
from acsleuth_core.runs import RunStore
from pages.ui.frame import demo_data
from pages.ui.metrics import change_delta

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    """Each test gets its own run folder; cached stores and job registries are rebuilt."""
    monkeypatch.setenv("ACSLEUTH_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(ROOT)
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


#: every session of these tests is one browser: the same owner token, as its cookie would give
OWNER = "test-browser-owner-token-0123456789abcdef"


def page(name: str) -> AppTest:
    """An app test that opens ``name`` (a path relative to the repository) through the entry page, in the same browser."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["owner"] = OWNER
    if name != "app.py":
        at.switch_page(name)
    return at


def test_home_page_lists_no_runs_on_a_fresh_machine():
    at = page("app.py").run()
    assert not at.exception
    assert any("No runs yet" in info.value for info in at.info)


def test_demo_loads_and_is_summarised():
    at = page("pages/1_Data.py").run()
    at.button[0].click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["data set"]) == ["reference", "sample_A", "sample_B"]
    assert set(table["values"]) == {"raw counts (will be log-normalised)"}
    assert any("765" in md.value for md in at.markdown)
    at.run()  # the sidebar is drawn before the page body: the next run shows the loaded data
    steps = " ".join(md.value for md in at.sidebar.markdown).replace("**", "")
    assert "Data · done" in steps and "Detect · ready" in steps and "Correct · needs a finished detection run" in steps


def test_a_bad_server_path_shows_its_error_in_the_page():
    at = page("pages/1_Data.py").run()
    at.text_input[0].input("/no/such/reference.h5ad")
    at.text_area[0].input("/no/such/target.h5ad").run()
    read = [b for b in at.button if b.label == "Read files from the server"][0]
    read.click().run()
    assert not at.exception
    assert at.error and "Cannot read '/no/such/reference.h5ad'" in at.error[0].value


def _train_demo(at: AppTest) -> AppTest:
    at.session_state["data"] = demo_data()
    at.run()
    at.number_input(key="epochs").set_value(25)
    [b for b in at.button if b.label == "Train and score"][0].click().run()
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(1)
        at.run()
        if at.get("plotly_chart"):
            return at
    raise AssertionError("training did not finish in time")


def test_training_runs_in_the_background_and_shows_the_histogram():
    at = _train_demo(page("pages/2_Detect.py"))
    assert not at.exception
    counts = at.dataframe[0].value
    assert set(counts["sample"]) == {"sample_A", "sample_B"}
    result = RunStore().get(at.session_state["run_id"]).load_result()
    assert counts["called anomalous"].sum() == result.obs[keys.ANOMALY].sum()
    assert counts["cells"].sum() == result.n_obs
    assert len(at.get("plotly_chart")) >= 1
    how_called = " ".join(c.value for c in [*at.caption, *at.warning])
    assert thr.explain(result.uns[keys.UNS]["threshold"])[0] in how_called


def test_threshold_change_updates_the_counts():
    at = _train_demo(page("pages/2_Detect.py"))
    before = at.dataframe[0].value["called anomalous"].sum()
    at.radio[0].set_value("fraction")
    at.number_input(key="threshold_fraction").set_value(0.5)
    [b for b in at.button if b.label == "Apply threshold"][0].click().run()
    after = at.dataframe[0].value["called anomalous"].sum()
    n_cells = at.dataframe[0].value["cells"].sum()
    assert after == pytest.approx(0.5 * n_cells, abs=2)
    assert after != before
    assert "(your expected anomaly fraction)" in " ".join(c.value for c in at.caption)
    reopened = page("pages/2_Detect.py")
    reopened.session_state["run_id"] = at.session_state["run_id"]
    reopened.run()
    assert reopened.radio[0].value == "fraction", "the saved rule is shown again, not reset"
    assert reopened.dataframe[0].value["called anomalous"].sum() == after


def test_export_page_offers_every_download_after_a_run():
    at = _train_demo(page("pages/2_Detect.py"))
    run_id = at.session_state["run_id"]
    export = page("pages/5_Export.py")
    export.session_state["run_id"] = run_id
    export.run()
    assert not export.exception
    table = export.dataframe[0].value
    assert {"cell", keys.SCORE, keys.ANOMALY, keys.BATCH} <= set(table.columns)
    labels = [el.proto.label for el in export.get("download_button")]
    assert labels == ["Cell table (CSV)", "Cell table (Parquet)", "Annotated AnnData (.h5ad)", "Trained model (.zip)"]
    assert any("expression of the reference cells" in caption.value for caption in export.caption)


def _correct(run_id: str, *, label_key: str = "none") -> AppTest:
    """Open the Correct page on a finished run and correct it with few epochs; return the page once it shows results."""
    at = page("pages/3_Correct.py")
    at.session_state["run_id"] = run_id
    at.run()
    at.number_input(key="correction_epochs").set_value(5)
    at.selectbox(key="correction_labels").set_value(label_key)
    [b for b in at.button if b.label == "Correct batches"][0].click().run()
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(1)
        at.run()
        if at.metric or at.warning:
            return at
    raise AssertionError("correction did not finish in time")


def test_correct_page_asks_for_a_detection_run_first():
    at = page("pages/3_Correct.py").run()
    assert not at.exception
    assert any("finish a detection run first" in info.value for info in at.info)
    assert not [b for b in at.button if b.label == "Correct batches"]


def test_correction_runs_in_the_background_and_shows_metrics_and_maps():
    run_id = _train_demo(page("pages/2_Detect.py")).session_state["run_id"]
    at = _correct(run_id, label_key="cell_type")
    assert not at.exception
    assert not at.warning, [w.value for w in at.warning]
    labels = [m.label for m in at.metric]
    assert labels == [
        "Batch mixing (kNN entropy)", "iLISI", "kNN label purity (cell_type)", "Label silhouette (ASW) (cell_type)",
        "Reference transfer (cell_type)",
    ]
    assert any("Biology kept" in s.value for s in at.success)
    for metric in at.metric:
        assert 0.0 <= float(metric.value) <= 1.0
        assert "before" in metric.proto.delta
    charts = at.get("plotly_chart")
    assert len(charts) == 3, "kin pairs, before/after by sample, training curves"
    at.slider(key="kin_pairs_drawn").set_value(20).run()
    at.selectbox(key="umap_colour").set_value("cell_type").run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 4, "a second before/after figure coloured by cell type"
    assert "Correct · done" in " ".join(md.value for md in at.sidebar.markdown).replace("**", "").replace("✓ ", "")


def test_a_threshold_change_after_correction_is_flagged_and_a_failed_correction_is_explained():
    run_id = _train_demo(page("pages/2_Detect.py")).session_state["run_id"]
    _correct(run_id)
    detect = page("pages/2_Detect.py")
    detect.session_state["run_id"] = run_id
    detect.run()
    detect.radio[0].set_value("fraction")
    detect.number_input(key="threshold_fraction").set_value(0.999)
    [b for b in detect.button if b.label == "Apply threshold"][0].click().run()
    assert not detect.exception

    at = _correct(run_id)
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert any("threshold changed" in w for w in warnings), warnings
    assert any("correction failed" in w and "called normal" in w for w in warnings), "too few normal cells is explained"
    assert at.metric, "the earlier correction's results stay on the page"


def test_a_refresh_reopens_the_run_named_in_the_url():
    at = _train_demo(page("pages/2_Detect.py"))
    run_id = at.session_state["run_id"]
    fresh = page("pages/2_Detect.py")
    fresh.query_params["run"] = run_id
    fresh.run()
    assert not fresh.exception
    assert fresh.get("plotly_chart"), "a new session with ?run=<id> should show the finished run"


def test_a_bad_upload_shows_its_error_in_the_page():
    at = page("pages/1_Data.py").run()
    at.file_uploader(key="reference_upload").set_value(("reference.csv", b"cell,g1,g2\nc1,1,2\nc2,nan,3\n", "text/csv"))
    at.file_uploader(key="target_upload").set_value([("target.xlsx", b"not a table", "application/octet-stream")])
    at.run()
    [b for b in at.button if b.label == "Read uploaded files"][0].click().run()
    assert not at.exception
    assert at.error, "a bad upload must be explained in the page"
    message = at.error[0].value
    assert "reference.csv" in message and ("NaN" in message or "missing" in message.lower())


def test_batches_can_come_from_an_obs_column():
    at = page("pages/1_Data.py").run()
    at.button[0].click().run()
    batches = at.selectbox[1]
    assert batches.options[0] == "each target file is one sample"
    assert "cell_type" in batches.options
    assert list(at.dataframe[1].value["batch"]) == ["sample_A", "sample_B"]
    batches.set_value("cell_type").run()
    assert at.session_state["data"].batch_key == "cell_type"
    assert at.dataframe[1].value["cells"].sum() == 393


def _find_subtypes(run_id: str, *, k: int = 2) -> AppTest:
    """Open the Subtypes page on a run, find ``k`` subtypes; return the page once it shows them (or a warning)."""
    at = page("pages/4_Subtypes.py")
    at.session_state["run_id"] = run_id
    at.run()
    at.radio(key="subtype_mode").set_value("fixed")
    at.number_input(key="subtype_k").set_value(k)
    [b for b in at.button if b.label == "Find subtypes"][0].click().run()
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(1)
        at.run()
        if at.get("plotly_chart") or at.warning or at.subheader:  # a headline alone: every cell called normal
            return at
    raise AssertionError("subtyping did not finish in time")


def _call_a_fifth(run_id: str) -> None:
    """A short-trained demo model may call nothing: call the top 20 % so there are anomalies to split."""
    store = RunStore()
    run = store.get(run_id)
    adata = run.load_result()
    call_anomalies(adata, "fraction", 0.2)
    store.save_result(run, adata)


def test_subtypes_page_asks_for_a_detection_run_first():
    at = page("pages/4_Subtypes.py").run()
    assert not at.exception
    assert any("finish a detection run first" in info.value for info in at.info)


def test_subtypes_are_found_in_the_background_and_explored_without_retraining():
    run_id = _train_demo(page("pages/2_Detect.py")).session_state["run_id"]
    _call_a_fifth(run_id)
    at = _find_subtypes(run_id, k=2)
    assert not at.exception
    assert not at.warning, [w.value for w in at.warning]
    assert any(h.value.startswith("2 subtypes of") for h in at.subheader)
    assert "k = 2 was given" in " ".join(c.value for c in at.caption)
    assert any("Correct batches first" in info.value for info in at.info), "uncorrected samples: suggest correcting"
    charts = at.get("plotly_chart")
    assert len(charts) == 4, "map, sizes per sample, marker dot plot vs anomalies and vs reference"
    resemblance, markers = at.dataframe[0].value, at.dataframe[1].value
    assert list(resemblance.subtype) == ["1", "2"] and "mixing" in resemblance.columns
    assert "How much each subtype resembles the reference" in [e.label for e in at.expander]
    assert list(markers.columns) == ["subtype", "gene", "score", "logfoldchange", "pval_adj"]
    assert set(markers["subtype"]) == {"1", "2"}

    at.radio(key="subtype_colour_mode").set_value("a gene").run()
    at.selectbox(key="subtype_colour_gene").set_value(at.selectbox(key="subtype_colour_gene").options[3]).run()
    assert not at.exception
    at.radio(key="subtype_colour_mode").set_value("a cell annotation").run()
    at.selectbox(key="subtype_colour_column").set_value("cell_type").run()
    assert not at.exception

    result = RunStore().get(run_id).load_result()
    anomalous = result.obs[keys.ANOMALY].to_numpy(bool)
    assert result.obs[keys.SUBTYPE][anomalous].notna().all() and result.obs[keys.SUBTYPE][~anomalous].isna().all()
    assert "Subtypes · done" in " ".join(md.value for md in at.sidebar.markdown).replace("**", "").replace("✓ ", "")

    again = _find_subtypes(run_id, k=3)
    assert any(h.value.startswith("3 subtypes of") for h in again.subheader)

    # a run saved before the resemblance check existed still opens
    store = RunStore()
    older = store.get(run_id).load_result()
    for entry in ("reference_resemblance", "called_normal"):
        older.uns[keys.UNS][keys.SUBTYPES].pop(entry, None)
    older.uns[keys.UNS][keys.SUBTYPES]["params"].pop("reference_like_normal", None)
    del older.obs[keys.SUBTYPE_LIKE_REFERENCE]
    store.save_result(store.get(run_id), older)
    reopened = page("pages/4_Subtypes.py")
    reopened.session_state["run_id"] = run_id
    reopened.run()
    assert not reopened.exception
    assert any(h.value == f"3 subtypes of {int(older.obs[keys.ANOMALY].sum())} anomalous cells" for h in reopened.subheader)
    assert "How much each subtype resembles the reference" not in [e.label for e in reopened.expander]

    one = _find_subtypes(run_id, k=1)
    assert not one.exception and any(h.value.startswith("1 subtype of") for h in one.subheader)
    assert any("One subtype only" in info.value for info in one.info)


def test_cells_of_subtypes_like_the_reference_are_called_normal_and_the_pages_say_so(monkeypatch):
    monkeypatch.setattr(resemblance, "RESEMBLANCE_LEVEL", 0.0)  # every subtype counts as like the reference
    run_id = _train_demo(page("pages/2_Detect.py")).session_state["run_id"]
    _call_a_fifth(run_id)
    n_past_threshold = int(RunStore().get(run_id).load_result().obs[keys.ANOMALY].sum())
    at = _find_subtypes(run_id, k=2)
    assert not at.exception
    assert [h.value for h in at.subheader] == [
        f"0 subtypes of 0 anomalous cells ({n_past_threshold:,} cells like the reference called normal)"
    ]
    assert any("so all their cells are called normal" in info.value for info in at.info)
    assert any("Every cell past the threshold resembled the reference" in info.value for info in at.info)
    result = RunStore().get(run_id).load_result()
    assert not result.obs[keys.ANOMALY].any() and result.obs[keys.SUBTYPE_LIKE_REFERENCE].sum() == n_past_threshold
    detect = page("pages/2_Detect.py")
    detect.session_state["run_id"] = run_id
    detect.run()
    assert not detect.exception
    assert any(f"Of them, {n_past_threshold:,} are called normal after all" in c.value for c in detect.caption)


def test_the_demo_with_two_anomaly_types_keeps_the_progenitors():
    at = page("pages/1_Data.py").run()
    [b for b in at.button if b.label == "Load demo data with two anomaly types"][0].click().run()
    assert not at.exception
    data = at.session_state["data"]
    assert "CD34+" in data.source
    types = {t for target in data.targets.values() for t in target.obs["cell_type"]}
    assert {"CD34+", "CD19+ B"} <= types



def test_a_metric_change_that_rounds_to_zero_is_grey_and_unsigned():
    assert change_delta(0.5, 0.4996) == ("+0.000 (before 0.500)", "off")
    assert change_delta(0.5, 0.42) == ("-0.080 (before 0.500)", "normal")
    assert change_delta(0.5, 0.6) == ("+0.100 (before 0.500)", "normal")
