"""Rolling per-stage latency statistics and counters, cheap enough to update per frame."""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from typing import Any

import numpy as np

from edgefleet.protocol import HISTOGRAM_STAGES, LATENCY_BUCKETS_MS

STAGES = ("capture_wait", "preprocess", "inference", "postprocess", "total")
FPS_WINDOW_S = 10.0  # fps is measured over this much of the recent past


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


class Histogram:
    """Fixed-bucket counts since start: unlike percentiles, these add up across devices."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket; the last one is +Inf
        self.sum = 0.0

    def add(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> dict[str, Any]:
        return {"counts": list(itertools.accumulate(self._counts)), "sum_ms": round(self.sum, 3)}


class LoopStats:
    """What the loop measures: per-stage latency (ms), fps and counters."""

    def __init__(self, window: int = 1024) -> None:
        self._lock = threading.Lock()
        self.window = window
        self.stages = {name: Rolling(window) for name in STAGES}
        self.histograms = {name: Histogram() for name in HISTOGRAM_STAGES}
        self.inferences = 0
        self.errors = 0
        self.vetoed = 0
        self.sink_errors = 0
        self.reprepared = 0  # frames prepared again after a swap changed the input
        self._times = Rolling(window)
        self._first_frame: float | None = None
        self.started = time.monotonic()

    def record(self, timings_ms: dict[str, float]) -> None:
        with self._lock:
            for name, value in timings_ms.items():
                stage = self.stages.get(name)
                if stage is not None:
                    stage.add(value)
                histogram = self.histograms.get(name)
                if histogram is not None:
                    histogram.add(value)
            self.inferences += 1
            now = time.monotonic()
            if self._first_frame is None:
                self._first_frame = now
            self._times.add(now)

    def fps(self, now: float | None = None) -> float:
        """Frames per second over the last FPS_WINDOW_S (over the frames so far when the loop
        is younger): a stall shows as a drop at once and is forgotten one window after it
        ended, however long the stall was."""
        now = time.monotonic() if now is None else now
        count = min(self._times._n, self._times._buf.size)
        if count == 0 or self._first_frame is None:
            return 0.0
        ring = self._times._buf[:count]
        recent = int(np.count_nonzero(ring > now - FPS_WINDOW_S))
        if now - self._first_frame >= FPS_WINDOW_S:
            return recent / FPS_WINDOW_S
        newest = float(ring[(self._times._n - 1) % ring.size])
        span = newest - self._first_frame
        return (recent - 1) / span if recent >= 2 and span > 0 else 0.0

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
                "latency_window": min(self.inferences, self.window),
                "latency_hist": {k: h.cumulative() for k, h in self.histograms.items()},
                "uptime_s": round(time.monotonic() - self.started, 1),
            }
