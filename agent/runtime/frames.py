"""Frames and the one-slot handoff between pipeline stages (the latest frame wins)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(slots=True)
class Frame:
    """One RGB image from a source."""

    image: np.ndarray  # HxWx3 uint8, RGB
    index: int  # per-source frame counter
    captured: float  # time.monotonic() when the source had it
    origin: str = ""  # file name, URL or device that produced it
    capture_wait: float = 0.0  # seconds the consumer waited for it


@dataclass
class SlotStats:
    put: int = 0
    taken: int = 0
    dropped: int = 0


class LatestSlot(Generic[T]):
    """A single-item mailbox: ``put`` replaces an untaken item and counts it dropped.

    This is what keeps a slow model from building a backlog: the producer never blocks,
    the consumer always gets the newest item.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._closed = False
        self.stats = SlotStats()

    def put(self, item: T) -> T | None:
        """Store ``item``; return the item it displaced (already counted as dropped)."""
        with self._cond:
            displaced = self._item
            if displaced is not None:
                self.stats.dropped += 1
            self._item = item
            self.stats.put += 1
            self._cond.notify()
            return displaced

    def take(self, timeout: float) -> T | None:
        """The newest item, waiting up to ``timeout`` seconds; None on timeout or close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._item is None and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            item, self._item = self._item, None
            if item is not None:
                self.stats.taken += 1
                self._cond.notify_all()
            return item

    def wait_empty(self, timeout: float) -> bool:
        """Wait until the consumer took the item (or the slot closed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._item is not None and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
