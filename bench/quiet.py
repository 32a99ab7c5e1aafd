"""What a preflight beside the serving loop costs its frames, with and without the loop's
quiet moments (a benchmark: prints only).

    .venv/bin/python bench/quiet.py [--rounds 8] [--threads 2] [--fps 20]

The loop classifies a 20 fps synthetic input (640x480) with the factory model. Beside it, a
second thread runs the rollout's real preflight (``edgefleet.rollout.preflight``: build an
interpreter, test-run it, time three invokes) every 0.4 s, as a rollout does once per
release. In interleaved rounds the preflight either waits for the loop's quiet moments (what
the agent does: ``Pipeline.quiet``) or runs whenever it comes. Building an interpreter holds
the GIL for milliseconds (the constructor and XNNPACK's weight packing) and its invokes take
cores the loop's invoke would use; a frame in flight meanwhile is late.

Printed per variant: capture -> result of the frames made while a preflight ran (median,
p90, largest) against the frames made away from any, and the preflight's own duration.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from contextlib import AbstractContextManager
from pathlib import Path

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import Classifier, inspect_model, load_checked
from edgefleet.inference.litert import yielding_to
from edgefleet.protocol import VariantSpec
from edgefleet.rollout.preflight import preflight
from edgefleet.rollout.release import describe_variant
from edgefleet.runtime.pipeline import Pipeline
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource

MODEL = factory_model_path()
PREFLIGHT_EVERY_S = 0.4
PREFLIGHTS_PER_ROUND = 6


class _Record(Sink):
    name = "record"

    def __init__(self) -> None:
        self.made: list[tuple[float, float]] = []  # (result made, monotonic; total ms)

    def emit(self, result: Result) -> None:
        self.made.append((time.monotonic(), result.timings_ms["total"]))


class _Loader:
    """``Serving``'s part in a preflight: load on the delegate, test-run when it is quiet."""

    def __init__(self, delegate: CpuDelegate, pipeline: Pipeline, gated: bool) -> None:
        self.delegate, self.pipeline, self.gated = delegate, pipeline, gated

    def load(self, path: Path) -> Classifier:
        with yielding_to(self.quiet if self.gated else None):
            return load_checked(path, self.delegate)

    def quiet(self) -> AbstractContextManager[None]:
        return self.pipeline.quiet() if self.gated else contextlib.nullcontext()


def _variant() -> VariantSpec:
    plan = inspect_model(MODEL).plan
    spec = {"height": plan.height, "width": plan.width, "dtype": str(plan.dtype)}
    return describe_variant("cpu", MODEL.read_bytes(), spec, 128 * 1024)


def one_round(
    sink: _Record, loader: _Loader, variant: VariantSpec
) -> tuple[list[float], list[float], list[float]]:
    """Frames during preflights, frames away from them (total ms), preflight durations (ms)."""
    busy: list[tuple[float, float]] = []
    first = len(sink.made)
    time.sleep(PREFLIGHT_EVERY_S)
    for _ in range(PREFLIGHTS_PER_ROUND):
        started = time.monotonic()
        preflight(loader, variant, MODEL)
        busy.append((started, time.monotonic()))
        time.sleep(PREFLIGHT_EVERY_S)
    during, away = [], []
    for made, total in sink.made[first:]:
        began = made - total / 1000  # when its frame was captured
        if any(began < end and start < made for start, end in busy):
            during.append(total)
        elif all(made < start - 0.1 or began > end + 0.1 for start, end in busy):
            away.append(total)
    return during, away, [(end - start) * 1000 for start, end in busy]


def _summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {statistics.median(ordered):5.1f}  p90 {p90:5.1f}  largest {ordered[-1]:5.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fps", type=float, default=20.0)
    args = parser.parse_args()
    delegate = CpuDelegate(CpuConfig(threads=args.threads))
    sink = _Record()
    source = SyntheticSource(SyntheticConfig(fps=args.fps, width=640, height=480))
    pipeline = Pipeline(source, load_checked(MODEL, delegate), [sink])
    variant = _variant()
    results: dict[bool, tuple[list[float], list[float], list[float]]] = {
        True: ([], [], []),
        False: ([], [], []),
    }
    pipeline.start()
    try:
        time.sleep(1.0)
        for index in range(args.rounds):
            for gated in (True, False) if index % 2 else (False, True):
                loader = _Loader(delegate, pipeline, gated)
                got = one_round(sink, loader, variant)
                for mine, new in zip(results[gated], got, strict=True):
                    mine.extend(new)
    finally:
        pipeline.stop()
    print(
        f"lite0 int8, {args.threads} XNNPACK threads, {args.fps:g} fps 640x480, "
        f"{args.rounds} interleaved rounds of {PREFLIGHTS_PER_ROUND} preflights; "
        "capture -> result, ms:"
    )
    for gated, label in ((False, "preflight whenever"), (True, "in quiet moments")):
        during, away, took = results[gated]
        print(f"  {label:18}  frames during a preflight ({len(during):3}): {_summary(during)}")
        print(f"  {'':18}  frames away from one     ({len(away):3}): {_summary(away)}")
        print(f"  {'':18}  the preflight itself: median {statistics.median(took):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
