"""Several users, one server: what the app lets a browser see and reach (issue 19, server part)."""

from pathlib import Path

import pytest
import streamlit as st
from streamlit import config
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def app(tmp_path, monkeypatch):
    """Open a page of the app (through the entry page) with a run folder of its own."""
    monkeypatch.setenv("ACSLEUTH_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("ACSLEUTH_DATA_ROOTS", raising=False)
    monkeypatch.chdir(ROOT)
    st.cache_resource.clear()

    def open_page(name: str) -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        at.switch_page(name)
        return at.run()

    yield open_page
    st.cache_resource.clear()


@pytest.fixture
def network_server():
    """The server listening on every network address, as ``--server.address 0.0.0.0`` makes it."""
    before = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    yield
    config.set_option("server.address", before)


def test_server_paths_are_off_on_a_network_server_until_folders_are_allowed(app, network_server):
    at = app("pages/1_Data.py")
    assert not at.exception
    assert any("ACSLEUTH_DATA_ROOTS" in info.value for info in at.info)
    assert at.text_input[0].disabled and at.text_area[0].disabled
    assert [b for b in at.button if b.label == "Read files from the server"][0].disabled


def test_allowed_folders_turn_server_paths_on_on_a_network_server(app, network_server, tmp_path, monkeypatch):
    monkeypatch.setenv("ACSLEUTH_DATA_ROOTS", str(tmp_path))
    at = app("pages/1_Data.py")
    assert not any("ACSLEUTH_DATA_ROOTS" in info.value for info in at.info)
    assert not at.text_input[0].disabled
