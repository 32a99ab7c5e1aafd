"""Side-by-side measurement on a noisy machine: interleaved rounds, paired ratios, CPU per frame.

A shared 2-core machine changes speed by 10-20% from one second to the next (other tenants,
frequency). Measuring (a) for six seconds and then (b) for six compares two different
machines. Here every round measures each variant once, back to back, in a new order each
round; a ratio is taken *within* each round and the median of those ratios is reported with
its spread. Each run also records the process's CPU time per frame (all threads), which other
tenants barely move: it says how much work a variant does per frame, wall clock or not.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Run:
    rate: float  # frames per second, wall clock
    cpu_ms: float  # process CPU time per frame (all threads)


@dataclass
class Series:
    runs: list[Run] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    @property
    def cpu_ms(self) -> float:
        return statistics.median(r.cpu_ms for r in self.runs)


def timed(step: Callable[[], int], seconds: float) -> Run:
    """Call ``step`` (which returns frames done) until ``seconds`` pass."""
    frames = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        frames += step()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return Run(frames / wall, cpu * 1000 / max(frames, 1))


def observed(frames_done: Callable[[], int], seconds: float, warm_s: float = 0.5) -> Run:
    """A loop running on other threads: after ``warm_s``, its rate and CPU over ``seconds``."""
    time.sleep(warm_s)  # threads up, first frames through
    n0, cpu0, t0 = frames_done(), time.process_time(), time.perf_counter()
    time.sleep(seconds)
    n1, cpu1, t1 = frames_done(), time.process_time(), time.perf_counter()
    frames = max(n1 - n0, 1)
    return Run(frames / (t1 - t0), (cpu1 - cpu0) * 1000 / frames)


def interleave(variants: dict[str, Callable[[], Run]], rounds: int) -> dict[str, Series]:
    """Each round runs every variant once, in a rotating order."""
    names = list(variants)
    out = {name: Series() for name in names}
    orders = itertools.cycle(itertools.permutations(names))
    for _ in range(rounds):
        for name in next(orders):
            out[name].runs.append(variants[name]())
    return out


def ratio(top: Series, bottom: Series) -> tuple[float, float, float]:
    """Median of the per-round ratios, and their lowest and highest."""
    values = [t.rate / b.rate for t, b in zip(top.runs, bottom.runs, strict=True)]
    return statistics.median(values), min(values), max(values)


def ratio_text(name: str, top: Series, bottom: Series) -> str:
    mid, low, high = ratio(top, bottom)
    return f"{name} = {mid:.3f} (rounds {low:.3f}-{high:.3f})"
