"""The frame-source interface and the threaded base class the built-in sources share.

A source runs its own capture thread and keeps only the newest frame. The pipeline calls
``get()`` directly per frame; no hook is involved. A source that fails (camera unplugged,
stream down) reports ``reconnecting`` and reopens with backoff; it never raises into the loop.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import structlog

from edgefleet.errors import SourceError
from edgefleet.runtime.backoff import Backoff
from edgefleet.runtime.frames import Frame, LatestSlot

log = structlog.get_logger(__name__)


@dataclass
class SourceStatus:
    """What a source reports about itself."""

    state: str = "created"  # created, opening, running, reconnecting, ended, stopped
    frames: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """What the pipeline needs from a source."""

    name: str = "source"

    @abstractmethod
    def start(self) -> None:
        """Begin capturing (non-blocking)."""

    @abstractmethod
    def get(self, timeout: float) -> Frame | None:
        """The newest frame not yet taken, or None after ``timeout``."""

    @abstractmethod
    def stop(self) -> None:
        """Stop capturing and release the device; idempotent."""

    @property
    @abstractmethod
    def ended(self) -> bool:
        """True once a finite source (files, a video without loop) has nothing more."""

    @abstractmethod
    def status(self) -> SourceStatus:
        """A snapshot of the source's state and counters."""


class EndOfStream(Exception):  # noqa: N818 - a signal, not an error
    """Raised by ``read()`` when a finite source has delivered everything."""


class ThreadedSource(Source):
    """Capture thread + latest-frame slot + reopen-with-backoff around open/read/close.

    Subclasses implement ``open``, ``read`` (one RGB frame, or EndOfStream) and ``close``.
    ``fps`` paces sources that could produce faster than real time (files, synthetic).
    A ``lossless`` source (files: every one is meant to be classified) puts its next frame
    only once the last was taken, so ``fps`` is its most and a slow consumer drops none;
    the others keep only the newest frame, as a camera must.
    """

    lossless = False

    def __init__(self, name: str, fps: float | None = None, backoff: Backoff | None = None) -> None:
        self.name = name
        self._fps = fps
        self._slot: LatestSlot[Frame] = LatestSlot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = backoff or Backoff()
        self._status = SourceStatus()
        self._ended = threading.Event()
        self._index = 0

    @abstractmethod
    def open(self) -> None:
        """Acquire the device/file; raise SourceError when it is not there."""

    @abstractmethod
    def read(self) -> tuple[np.ndarray, str]:
        """The next RGB frame and its origin; SourceError on failure, EndOfStream at the end."""

    def close(self) -> None:
        """Release what ``open`` acquired."""

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def get(self, timeout: float) -> Frame | None:
        started = time.monotonic()
        frame = self._slot.take(timeout)
        if frame is not None:
            frame.capture_wait = time.monotonic() - started
        return frame

    def stop(self) -> None:
        self._stop.set()
        self._slot.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        if self._status.state != "ended":
            self._status.state = "stopped"

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def status(self) -> SourceStatus:
        self._status.dropped = self._slot.stats.dropped
        return replace(self._status, detail=dict(self._status.detail))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._status.state = "opening"
            try:
                self.open()
            except SourceError as exc:
                self._failed(exc)
                continue
            self._backoff.reset()
            self._status.state = "running"
            try:
                self._capture()
            except EndOfStream:
                self._status.state = "ended"
                self._ended.set()
                self._slot.close()
                return
            except SourceError as exc:
                self._failed(exc)
            finally:
                self._safe_close()

    def _capture(self) -> None:
        period = 1.0 / self._fps if self._fps else 0.0
        next_due = time.monotonic()
        while not self._stop.is_set():
            image, origin = self.read()
            if self.lossless:
                while not self._slot.wait_empty(0.1):
                    if self._stop.is_set():
                        return
            now = time.monotonic()
            self._index += 1
            self._status.frames += 1
            self._slot.put(Frame(image=image, index=self._index, captured=now, origin=origin))
            if not period:
                # Unpaced (files, synthetic): make the next frame when this one is taken,
                # instead of spinning a core on frames nobody will see.
                while not self._slot.wait_empty(0.1):
                    if self._stop.is_set():
                        return
                continue
            if period:
                next_due = max(next_due + period, now - period)
                delay = next_due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return

    def _failed(self, exc: Exception) -> None:
        self._status.errors += 1
        self._status.last_error = str(exc)
        self._status.state = "reconnecting"
        delay = self._backoff.next_delay()
        log.warning("source failed, retrying", source=self.name, error=str(exc), retry_in=delay)
        self._stop.wait(delay)

    def _safe_close(self) -> None:
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - a failing close must not stop the retry loop
            log.warning("source close failed", source=self.name, error=str(exc))


class OpenCvSource(ThreadedSource):
    """Sources read through an OpenCV ``VideoCapture`` (cameras, streams, files)."""

    _cap: Any = None

    def read_rgb(self, lost: str) -> np.ndarray:
        """The next frame as RGB; SourceError(``lost``) when the capture has none."""
        import cv2  # deferred: commands that never touch a frame start faster

        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise SourceError(lost)
        rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return rgb

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
