"""Progress reports and cooperative cancellation shared by every long-running step."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One report from a training loop: where it is and how it is doing."""

    stage: str
    epoch: int
    n_epochs: int
    losses: dict[str, float] = field(default_factory=dict)
    cells_per_second: float = 0.0

    @property
    def fraction(self) -> float:
        return self.epoch / max(self.n_epochs, 1)


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """A flag a user interface sets to ask running work to stop at its next check."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("The run was cancelled; nothing was saved from it.")


def check_cancel(token: Optional[CancelToken]) -> None:
    """Raise :class:`Cancelled` if ``token`` has been cancelled (no-op for ``None``)."""
    if token is not None:
        token.raise_if_cancelled()
