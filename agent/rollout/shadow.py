"""Shadow evaluation: a candidate model runs beside the active one before it may serve.

The rollout thread (never the loop) takes a sample at most every ``interval_s``: the newest
frame the loop classified and the active model's result for it. It runs the candidate on the
same frame and compares: top-1 agreement, top-5 overlap (by label), the difference of the
top-1 scores, both models' latency, errors. Frames are spaced in time because consecutive
frames are nearly the same picture: 300 samples one second apart say much more than 300
consecutive frames. The cost to the loop is one candidate invoke per interval, on the rollout
thread in the loop's idle time between two frames (``quiet``; ``bench/shadow.py`` measures
it).

Only labels and scores leave the device: no pixels (privacy is the default).
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from edgefleet.inference.classifier import Classifier
from edgefleet.protocol import ShadowSpec
from edgefleet.runtime.frames import Frame
from edgefleet.runtime.results import Result

# The newest frame the loop classified and the active model's result for that frame.
Sample = tuple[np.ndarray, Result]
Sampler = Callable[[], Sample | None]
# Told of a frame on which the candidate's top-1 differs: the frame, the active model's
# result, and (candidate name, version, its top labels). Data capture keeps such frames.
Disagreement = Callable[[np.ndarray, Result, tuple[str, int, list[Any]]], None]
KEPT_DISAGREEMENTS = 5
log = structlog.get_logger(__name__)


class ClassifiedFrames(Protocol):
    """What the loop keeps of its newest frame and result (``Pipeline``)."""

    last_frame: Frame | None
    last_result: Result | None


def loop_sampler(loop: ClassifiedFrames) -> Sampler:
    """Samples of the running loop: its newest frame with the active model's result for it."""

    def sample() -> Sample | None:
        frame, result = loop.last_frame, loop.last_result
        if frame is None or result is None or result.frame != frame.index:
            return None  # between the two: the result is of an older frame
        return frame.image, result

    return sample


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(values, q)), 3)


@dataclass
class Figures:
    """What the comparison found so far."""

    samples: int = 0
    agree: int = 0
    overlap: float = 0.0  # sum of per-sample top-5 overlaps (0..1)
    score_diff: float = 0.0  # sum of candidate top-1 score minus active top-1 score
    errors: int = 0
    candidate_ms: list[float] = field(default_factory=list)
    active_ms: list[float] = field(default_factory=list)
    disagreements: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=KEPT_DISAGREEMENTS)
    )

    @property
    def agreement(self) -> float | None:
        return self.agree / self.samples if self.samples else None

    def latency_ratio(self) -> float | None:
        if not self.candidate_ms or not self.active_ms:
            return None
        active = statistics.median(self.active_ms)
        return statistics.median(self.candidate_ms) / active if active > 0 else None

    def report(self) -> dict[str, Any]:
        n = self.samples
        ratio = self.latency_ratio()
        return {
            "samples": n,
            "agreement": round(self.agree / n, 4) if n else None,
            "top5_overlap": round(self.overlap / n, 4) if n else None,
            "mean_score_diff": round(self.score_diff / n, 4) if n else None,
            "candidate_ms": {"p50": _percentile(self.candidate_ms, 50),
                             "p99": _percentile(self.candidate_ms, 99)},
            "active_ms": {"p50": _percentile(self.active_ms, 50),
                          "p99": _percentile(self.active_ms, 99)},
            "latency_ratio": round(ratio, 3) if ratio is not None else None,
            "errors": self.errors,
            "disagreements": list(self.disagreements),
        }  # fmt: skip


class ShadowRun:
    """One shadow phase: sampling, comparing, and the verdict under the release's rules."""

    def __init__(
        self,
        spec: ShadowSpec,
        candidate: Classifier,
        sampler: Sampler,
        clock: Callable[[], float] = time.monotonic,
        quiet: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
        twin: str | None = None,
        on_disagree: Disagreement | None = None,
    ) -> None:
        self.spec = spec
        self.on_disagree = on_disagree
        # The kind of the variant run in the candidate's place (an EdgeTPU candidate's cpu
        # variant): its latency says nothing of the candidate's, so it is not judged.
        self.twin = twin
        self.candidate = candidate
        self.sampler = sampler
        self.clock = clock
        self.quiet = quiet  # the loop's idle moment, for each candidate invoke
        self.started = clock()
        self.figures = Figures()
        self._next = self.started
        self._last_frame: int | None = None
        self._buffer = candidate.preprocessor.new_buffer()

    def due(self) -> bool:
        return not self.finished() and self.clock() >= self._next

    def finished(self) -> bool:
        """Enough samples, or out of time."""
        return (
            self.figures.samples >= self.spec.samples
            or self.clock() - self.started >= self.spec.max_duration_s
        )

    def step(self) -> bool:
        """Take one sample if a new frame is there; True when one was compared."""
        sample = self.sampler()
        if sample is None:
            return False
        image, active = sample
        if active.frame == self._last_frame or not active.top:
            return False  # the loop has not classified a new frame since the last sample
        self._last_frame = active.frame
        self._next = self.clock() + self.spec.interval_s
        figures = self.figures
        try:
            with self.quiet():
                started = time.perf_counter()
                self.candidate.preprocessor(image, self._buffer)
                self.candidate.set_input(self._buffer)
                scores = self.candidate.invoke()
                elapsed_ms = (time.perf_counter() - started) * 1000
            top = self.candidate.top(scores, 5)
        except (ValueError, RuntimeError):
            figures.errors += 1
            return False
        if not top or not np.all(np.isfinite(scores)):
            figures.errors += 1
            return False
        if not self._compare(active, top, elapsed_ms) and self.on_disagree is not None:
            info = self.candidate.info
            try:
                self.on_disagree(image, active, (info.name, info.version, top))
            except Exception:  # a listener's fault never costs the phase
                log.exception("shadow disagreement listener failed")
        return True

    def _compare(self, active: Result, top: list[Any], elapsed_ms: float) -> bool:
        """Count one sample; True when both models agree on the top-1."""
        figures = self.figures
        figures.samples += 1
        mine = [label.label for label in top]
        theirs = [label.label for label in active.top]
        figures.overlap += len(set(mine) & set(theirs)) / max(len(theirs), 1)
        figures.score_diff += top[0].score - active.top[0].score
        figures.candidate_ms.append(elapsed_ms)
        inference = active.timings_ms.get("inference")
        if inference is not None:
            figures.active_ms.append(inference)
        if mine[0] == theirs[0]:
            figures.agree += 1
            return True
        figures.disagreements.append(
            {
                "frame": active.frame,
                "active": {"label": theirs[0], "score": round(active.top[0].score, 4)},
                "candidate": {"label": mine[0], "score": round(top[0].score, 4)},
            }
        )
        return False

    def verdict(self) -> list[str]:
        """Why the candidate must not serve; empty when the release's rules are met."""
        spec, figures = self.spec, self.figures
        problems = []
        if figures.samples < spec.samples:
            problems.append(
                f"{figures.samples} of {spec.samples} samples in {spec.max_duration_s:g} s"
            )
        agreement = figures.agreement
        if spec.min_agreement is not None and (agreement or 0.0) < spec.min_agreement:
            problems.append(f"agreement {agreement or 0.0:.3f} < {spec.min_agreement}")
        ratio = figures.latency_ratio()
        limit = spec.max_latency_ratio
        if limit is not None and ratio is not None and ratio > limit and self.twin is None:
            problems.append(f"latency ratio {ratio:.2f} > {limit}")
        if figures.errors > spec.max_errors:
            problems.append(f"{figures.errors} errors > {spec.max_errors}")
        return problems
