"""Rolling per-stage latency statistics and counters, cheap enough to update per frame."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

STAGES = ("capture_wait", "preprocess", "inference", "postprocess", "total")


class Rolling:
    """The last ``size`` samples of one quantity in a ring buffer."""

    def __init__(self, size: int) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0

    def add(self, value: float) -> None:
        self._buf[self._n % self._buf.size] = value
        self._n += 1

    def summary(self) -> dict[str, float]:
        count = min(self._n, self._buf.size)
        if count == 0:
            return {}
        data = self._buf[:count]
        p50, p90, p99 = np.percentile(data, (50, 90, 99))
        return {
            "p50": round(float(p50), 3),
            "p90": round(float(p90), 3),
            "p99": round(float(p99), 3),
            "max": round(float(data.max()), 3),
        }


class LoopStats:
    """What the loop measures: per-stage latency (ms), fps and counters."""

    def __init__(self, window: int = 1024) -> None:
        self._lock = threading.Lock()
        self.stages = {name: Rolling(window) for name in STAGES}
        self.inferences = 0
        self.errors = 0
        self.vetoed = 0
        self.sink_errors = 0
        self.reprepared = 0  # frames prepared again after a swap changed the input
        self._times = Rolling(window)
        self.started = time.monotonic()

    def record(self, timings_ms: dict[str, float]) -> None:
        with self._lock:
            for name, value in timings_ms.items():
                stage = self.stages.get(name)
                if stage is not None:
                    stage.add(value)
            self.inferences += 1
            self._times.add(time.monotonic())

    def fps(self) -> float:
        count = min(self._times._n, self._times._buf.size)
        if count < 2:
            return 0.0
        ring = self._times._buf
        newest = ring[(self._times._n - 1) % ring.size]
        oldest = ring[(self._times._n - count) % ring.size]
        span = newest - oldest
        return (count - 1) / span if span > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "fps": round(self.fps(), 2),
                "inferences": self.inferences,
                "errors": self.errors,
                "vetoed": self.vetoed,
                "sink_errors": self.sink_errors,
                "reprepared": self.reprepared,
                "latency_ms": {k: v.summary() for k, v in self.stages.items()},
                "uptime_s": round(time.monotonic() - self.started, 1),
            }
