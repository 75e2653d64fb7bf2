"""Turning browser uploads and typed server paths into AnnData, with errors shown in the page."""

from __future__ import annotations

import tempfile
from pathlib import Path

import anndata as ad
import streamlit as st

from acsleuth_core.io import check_server_path, data_roots, read_cells


def upload_limit_bytes() -> int:
    """The server's upload limit (``server.maxUploadSize``, in MB) in bytes."""
    return int(st.get_option("server.maxUploadSize")) * 1024 * 1024


def read_upload(upload) -> ad.AnnData:
    """Read one ``st.file_uploader`` file through the core reader (no unpickling)."""
    with tempfile.TemporaryDirectory(prefix="acsleuth-upload-") as folder:
        path = Path(folder) / Path(upload.name).name
        path.write_bytes(upload.getbuffer())
        return read_cells(path, max_bytes=upload_limit_bytes())


def server_data_roots() -> list[Path]:
    """The folders typed paths may lie in, for the address this server listens on (``server.address``)."""
    return data_roots(st.get_option("server.address"))


def read_server_path(text: str) -> ad.AnnData:
    """Read a file or 10x folder the user typed, after checking the path against :func:`server_data_roots`."""
    return read_cells(check_server_path(text, server_data_roots()))
