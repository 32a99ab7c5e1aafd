"""The failover watcher: a stuck invoke counts as a failure, lost delegates are re-probed.

Invoke *errors* reach ``Serving.on_invoke_error`` from the loop thread directly, so the
switch happens before the next frame. What the loop cannot see itself is an ``invoke()`` that
never returns (a wedged driver): this thread notices the infer thread has not turned for
``invoke_timeout_s``, fails the delegate over and has the loop serve from a fresh thread.
It also re-probes lost delegates with exponential backoff and reloads runner-ups after a
rollout changed the model, all off the loop.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from edgefleet.delegation.serving import Serving


class Paused(Protocol):
    paused: bool


class Watched(Protocol):
    """What the watcher needs from the loop."""

    last_beat: float

    @property
    def settings(self) -> Paused: ...

    def replace_infer_thread(self) -> None: ...


class FailoverWatch:
    def __init__(self, serving: Serving, loop: Watched, invoke_timeout_s: float = 5.0) -> None:
        self.serving = serving
        self.loop = loop
        self.invoke_timeout_s = invoke_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delegate-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _check_stuck(self) -> None:
        loop = self.loop
        stalled = time.monotonic() - loop.last_beat
        if loop.settings.paused or stalled < self.invoke_timeout_s:
            return
        # invoke() has not returned: count it as the delegate failing, serve from the
        # runner-up on a fresh thread, and leave the stuck one behind.
        self.serving.on_invoke_error(
            TimeoutError(f"invoke() did not return within {self.invoke_timeout_s} s")
        )
        loop.replace_infer_thread()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._check_stuck()
            for index in self.serving.due_probes():
                self.serving.probe(index)
            self.serving.load_pending()
