"""This browser's owner token: the key to its runs, kept in a cookie so a refresh or a new tab finds them.

Streamlit reads cookies from the request that opened the session
(``st.context.cookies``) but cannot set one, so a one-line script stores the
token in the browser; every later session of that browser sends it back.
"""

from __future__ import annotations

import streamlit as st

from acsleuth_core.owners import new_owner_token, valid_owner_token

COOKIE = "acsleuth_owner"
#: a year, renewed whenever a session of the browser starts without the cookie
_COOKIE_SECONDS = 365 * 24 * 3600


def browser_owner() -> str:
    """The owner token of this session's browser: its cookie's, else a new one stored in a cookie."""
    owner = st.session_state.get("owner")
    if owner is None:
        cookie = st.context.cookies.get(COOKIE)
        owner = cookie if valid_owner_token(cookie) else new_owner_token()
        st.session_state["owner"] = owner
    if st.context.cookies.get(COOKIE) != owner:
        _store_in_browser(owner)
    return owner


def _store_in_browser(owner: str) -> None:
    """Set the cookie from a tiny script (the token holds only URL-safe characters, nothing to escape)."""
    with st.sidebar:
        st.html(
            f"<script>document.cookie = '{COOKIE}={owner}; path=/; max-age={_COOKIE_SECONDS}; SameSite=Strict';</script>",
            unsafe_allow_javascript=True,
        )
