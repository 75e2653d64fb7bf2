"""Exports a spreadsheet cannot turn into formulas, private run folders, run ids that name exactly one run, no traces in the browser."""

import io

import pandas as pd
import pytest

from acsleuth_core.errors import InputError
from acsleuth_core.export import spreadsheet_safe, table_bytes, write_table
from acsleuth_core.runs import RunStore

HOSTILE = pd.DataFrame({
    "cell": ["=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "\tcmd", "plain", "a-b"],
    "acsleuth_score": [-1.5, 0.0, 2.0, -0.25, 1.0, 3.0, 4.0],
    "acsleuth_anomaly": [True, False, True, False, True, False, True],
})


def test_text_that_starts_like_a_formula_is_marked_as_text_and_numbers_stay_numbers():
    safe = spreadsheet_safe(HOSTILE)
    assert list(safe["cell"]) == ["'=HYPERLINK(\"http://x\")", "'+1", "'-2+3", "'@SUM(A1)", "'\tcmd", "plain", "a-b"]
    assert safe["acsleuth_score"].tolist() == HOSTILE["acsleuth_score"].tolist()
    assert safe["acsleuth_anomaly"].tolist() == HOSTILE["acsleuth_anomaly"].tolist()
    assert HOSTILE["cell"][0].startswith("="), "the caller's table is left as it was"


def test_a_column_name_that_starts_like_a_formula_is_marked_too():
    assert list(spreadsheet_safe(pd.DataFrame({"=cmd": ["x"]})).columns) == ["'=cmd"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".csv.gz"])
def test_written_tables_hold_no_formula(tmp_path, suffix):
    path = write_table(HOSTILE, tmp_path / f"cells{suffix}")
    back = pd.read_csv(path, sep="\t" if ".tsv" in suffix else ",", keep_default_na=False)
    assert not back["cell"].astype(str).str.match(r"[=+\-@]").any()
    assert back["acsleuth_score"].tolist() == HOSTILE["acsleuth_score"].tolist()


def test_downloaded_csv_holds_no_formula():
    text = table_bytes(HOSTILE, "csv", {"tool": "ACsleuth"}).decode()
    back = pd.read_csv(io.StringIO(text), comment="#")
    assert not back["cell"].astype(str).str.match(r"[=+\-@]").any()


def test_a_run_id_with_anything_after_it_is_refused(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("demo", {})
    assert store.get(run.id).id == run.id
    twin = tmp_path / (run.id + "\n")  # a folder whose name only starts like a run id
    twin.mkdir()
    (twin / "run.json").write_text((run.folder / "run.json").read_text())
    for bad in (run.id + "\n", run.id + "/..", "../" + run.id, run.id[:-1]):
        with pytest.raises(InputError):
            store.get(bad)
    assert [r.folder for r in store.list()] == [run.folder]


def test_runs_and_their_files_are_for_the_server_account_alone(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create("demo", {})
    assert (store.root.stat().st_mode & 0o777) == 0o700
    assert (run.folder.stat().st_mode & 0o777) == 0o700
    assert ((run.folder / "run.json").stat().st_mode & 0o777) == 0o600
    assert (write_table(HOSTILE, tmp_path / "cells.csv").stat().st_mode & 0o777) == 0o600


def test_the_browser_is_shown_messages_not_stack_traces():
    import tomllib
    from pathlib import Path

    settings = tomllib.loads((Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml").read_text())
    assert settings["client"]["showErrorDetails"] == "none"
    assert settings["server"]["address"] == "localhost"
