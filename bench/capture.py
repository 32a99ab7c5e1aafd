"""What data capture costs the loop (issue 31: at most 2% of its throughput); prints only.

    .venv/bin/python bench/capture.py [--seconds 3] [--rounds 8] [--threads 2]

The agent's pipeline on the factory lite0 int8 model and a synthetic 640x480 source, as fast
as it runs, measured side by side in interleaved rounds (``bench/pairs.py``):

  off      no capture sink;
  default  capture on with its default budgets (one kept frame per 10 s at most, 60 an
           hour) and a trigger that fires on every frame (``below_score: 1.0``): the cost of
           checking every result, plus the encodes the budgets let through;
  busy     every frame fires and nothing holds it back but the encoder itself
           (``min_interval_s: 0``, 36000 an hour): an upper bound, far past any real budget.

Kept frames go to a link that only counts them (the MQTT side is measured by
``bench/telemetry.py``). Then an hour of simulated frames at 10 fps through the default
budgets, on a simulated clock: what was kept, and the day's bytes against ``mib_per_day``.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

from pairs import Run, interleave, observed, ratio_text

from edgefleet.capture import Capture, CaptureSettings
from edgefleet.capture.rules import Budget, new_draw, triggers
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import load_classifier
from edgefleet.inference.labels import Label
from edgefleet.runtime.pipeline import Pipeline
from edgefleet.runtime.results import Result
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource


class CountingLink:
    def __init__(self) -> None:
        self.bytes = 0

    def enqueue(self, kind: str, body: dict[str, Any]) -> None:
        self.bytes += len(body["data"])

    def pending_bytes(self, kind: str) -> int:
        return 0


def variant(threads: int, settings: CaptureSettings | None) -> Callable[[float], Run]:
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))

    def run(seconds: float) -> Run:
        source = SyntheticSource(SyntheticConfig(fps=None, width=640, height=480, variants=16))
        holder: list[Pipeline] = []
        sinks = []
        capture = None
        if settings is not None:
            capture = Capture(settings, lambda: holder[0] if holder else None, CountingLink(), None)
            sinks.append(capture)
        pipeline = Pipeline(source, clf, sinks)
        holder.append(pipeline)
        for sink in sinks:
            sink.open({})
        pipeline.start()
        result = observed(lambda: pipeline.stats.inferences, seconds)
        pipeline.stop()
        if capture is not None:
            capture.close()
        return result

    return run


def an_hour(settings: CaptureSettings) -> None:
    """Frames at 10 fps for an hour on a simulated clock through the budgets alone."""
    now = [0.0]
    budget = Budget(settings, None, clock=lambda: now[0], day=lambda: "day")
    draw = new_draw(1)
    size = 14_000  # a 256x256 JPEG at quality 85 is 10-20 KB
    kept = 0
    for frame in range(36_000):
        now[0] = frame / 10
        result = Result(frame, "b", now[0], "m", 0, [Label("x", 0, 0.3), Label("y", 1, 0.2)],
                        {}, frame)  # fmt: skip
        if triggers(settings, result, draw) and budget.refusal() is None:
            budget.claim()
            if budget.fits_today(size):
                budget.spend(size)
                kept += 1
    print(
        f"an hour at 10 fps, every frame a trigger, default budgets: {kept} kept, "
        f"{budget.day_bytes / 2**20:.2f} MiB of {settings.mib_per_day:g} MiB a day"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    default = CaptureSettings(enabled=True, below_score=1.0)
    busy = CaptureSettings(enabled=True, below_score=1.0, min_interval_s=0.0, per_hour=36000)
    runs = {
        "off": variant(args.threads, None),
        "default": variant(args.threads, default),
        "busy": variant(args.threads, busy),
    }
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.rounds} rounds of "
          f"{args.seconds:g} s, {args.threads} threads")  # fmt: skip
    seconds = args.seconds
    timed: dict[str, Callable[[], Run]] = {
        name: functools.partial(run, seconds) for name, run in runs.items()
    }
    series = interleave(timed, args.rounds)
    for name, s in series.items():
        print(f"{name:8s} {s.rate:7.1f} frames/s  {s.cpu_ms:6.2f} ms CPU/frame")
    print(ratio_text("default/off", series["default"], series["off"]))
    print(ratio_text("busy/off", series["busy"], series["off"]))
    an_hour(default)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
