"""Who may see a run: an owner token per browser, or everyone in a shared runs folder.

The app has no login. Each browser gets a random owner token (kept in a
cookie by the app); a run records its owner's token, and a browser lists,
opens and changes only the runs of its own token. ``ACSLEUTH_SHARED_RUNS=1``
makes the runs folder shared: every browser sees every run (a lab server
whose users trust each other).
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Optional

SHARED_RUNS_ENV = "ACSLEUTH_SHARED_RUNS"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")


def new_owner_token() -> str:
    """A fresh random owner token (256 bits, URL- and cookie-safe)."""
    return secrets.token_urlsafe(32)


def valid_owner_token(token: Optional[str]) -> bool:
    """Whether ``token`` has the form of an owner token (anything else, e.g. a forged cookie, is ignored)."""
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


def shared_runs() -> bool:
    """Whether ``$ACSLEUTH_SHARED_RUNS`` makes every run visible to every browser (``1``, ``true`` or ``yes``)."""
    return os.environ.get(SHARED_RUNS_ENV, "").strip().lower() in ("1", "true", "yes")
