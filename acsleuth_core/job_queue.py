"""A first-come, first-served queue in front of a fixed number of slots (e.g. concurrent trainings).

A job takes a ticket, waits until it is at the head of the queue and a slot
is free, holds the slot while it works and gives it back at the end. While it
waits, :meth:`SlotQueue.place` tells the page its place in the queue.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from .errors import Cancelled, InputError
from .progress import CancelToken

MAX_TRAININGS_ENV = "ACSLEUTH_MAX_TRAININGS"
#: how often a waiting job looks at its cancel token (seconds)
_CANCEL_CHECK = 0.2


def max_trainings() -> int:
    """``$ACSLEUTH_MAX_TRAININGS`` (trainings that may run at once in one server process), default 1."""
    text = os.environ.get(MAX_TRAININGS_ENV, "").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"{MAX_TRAININGS_ENV} must be a whole number of at least 1, not {text!r}.")
    return int(text)


class SlotQueue:
    """At most ``slots`` holders at once; the others wait in the order they arrived."""

    def __init__(self, slots: int):
        self.slots = slots
        self._holders = 0
        self._waiting: list[str] = []
        self._changed = threading.Condition()

    @contextmanager
    def slot(self, ticket: str, cancel: CancelToken) -> Iterator[None]:
        """Wait for a slot under ``ticket`` and hold it for the block; :class:`Cancelled` if cancelled while waiting."""
        with self._changed:
            self._waiting.append(ticket)
            while not (self._waiting[0] == ticket and self._holders < self.slots):
                if cancel.cancelled:
                    self._waiting.remove(ticket)
                    self._changed.notify_all()
                    raise Cancelled("Cancelled while waiting in the queue.")
                self._changed.wait(_CANCEL_CHECK)
            self._waiting.pop(0)
            self._holders += 1
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._holders -= 1
                self._changed.notify_all()

    def place(self, ticket: str) -> Optional[int]:
        """``ticket``'s place in the queue (1 = next to start), or None when it is not waiting."""
        with self._changed:
            return self._waiting.index(ticket) + 1 if ticket in self._waiting else None
