"""Runtime failover between ranked delegates, and coming back when the better one returns.

The selection left a ranking with every working candidate already loaded. When ``invoke()``
raises (a Coral unplugged, a GPU driver reset), the loop swaps to the next candidate before
the next frame: no restart, at most the failing frame lost. The lost delegate is re-probed
in the background with exponential backoff; once it is available again and passes a test
inference, the loop switches back to it (it ranked better, so it is faster).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from edgefleet.classifier import Classifier
from edgefleet.pipeline import Pipeline
from edgefleet.selection import Choice, _load

log = structlog.get_logger(__name__)


@dataclass
class _Lost:
    next_probe: float
    delay: float
    reason: str


class Failover:
    """Owns which ranked candidate serves; called from the loop thread on invoke errors."""

    def __init__(
        self,
        choice: Choice,
        pipeline: Pipeline,
        model: Path,
        crop: bool,
        emit: Callable[[dict[str, Any]], None],
        reprobe_min_s: float = 5.0,
        reprobe_max_s: float = 300.0,
        invoke_timeout_s: float = 5.0,
    ) -> None:
        self.rows = [row for row, _, _ in choice.ranked]
        self.delegates = [delegate for _, delegate, _ in choice.ranked]
        self.classifiers = [classifier for _, _, classifier in choice.ranked]
        self.pipeline = pipeline
        self.model = model
        self.crop = crop
        self.emit = emit
        self.reprobe_min_s = reprobe_min_s
        self.reprobe_max_s = reprobe_max_s
        self.invoke_timeout_s = invoke_timeout_s
        self.active = 0
        self.lost: dict[int, _Lost] = {}
        self.switches = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delegate-reprobe", daemon=True)
        pipeline.on_invoke_error = self.on_error

    def label(self, index: int) -> str:
        return self.rows[index].label

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def on_error(self, exc: BaseException) -> None:
        """The serving delegate failed: switch to the best candidate not known lost."""
        with self._lock:
            failed = self.active
            if failed not in self.lost:
                self.lost[failed] = _Lost(
                    time.monotonic() + self.reprobe_min_s, self.reprobe_min_s, str(exc)
                )
            target = next((i for i in range(len(self.rows)) if i not in self.lost), None)
            if target is None:
                return  # nothing left: keep trying the current one; errors are counted
            self._switch(target, "failover", str(exc))

    def _switch(self, index: int, event: str, reason: str) -> None:
        previous = self.active
        self.active = index
        self.pipeline.swap(self.classifiers[index])
        self.switches += 1
        body = {
            "event": event,
            "from": self.label(previous),
            "to": self.label(index),
            "reason": reason,
            "ts": time.time(),
        }
        log.warning(
            "delegate switched", kind=event, to=body["to"], previous=body["from"], reason=reason
        )
        self.emit(body)

    def _check_stuck(self) -> None:
        pipeline = self.pipeline
        stalled = time.monotonic() - pipeline.last_beat
        if pipeline.settings.paused or stalled < self.invoke_timeout_s:
            return
        # invoke() has not returned: count it as the delegate failing, serve from the
        # runner-up on a fresh thread, and leave the stuck one behind.
        self.on_error(TimeoutError(f"invoke() did not return within {self.invoke_timeout_s} s"))
        pipeline.replace_infer_thread()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._check_stuck()
            with self._lock:
                due = [i for i, lost in self.lost.items() if lost.next_probe <= time.monotonic()]
            for index in sorted(due):
                self._probe(index)

    def _probe(self, index: int) -> None:
        row, delegate = self.rows[index], self.delegates[index]
        available = delegate.availability(self.model)
        fresh: Classifier | None = None
        reason = available.reason
        if available.ok:
            try:
                fresh = _load(delegate, self.model, self.crop, self.classifiers[index].info)
            except Exception as exc:  # noqa: BLE001 - any failure means "still lost"
                reason = str(exc)
        with self._lock:
            lost = self.lost.get(index)
            if lost is None:
                return
            if fresh is None:
                lost.delay = min(self.reprobe_max_s, lost.delay * 2)
                lost.next_probe = time.monotonic() + lost.delay
                lost.reason = reason
                return
            self.classifiers[index] = fresh
            del self.lost[index]
            log.info("delegate back", delegate=row.label)
            if index < self.active:
                self._switch(index, "restored", "available again and ranked faster")
