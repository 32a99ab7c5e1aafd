"""What a shadow phase costs the loop (a benchmark: prints only).

    .venv/bin/python bench/shadow.py [--seconds 6] [--rounds 6] [--interval 2]

The agent's pipeline (factory lite0 int8, synthetic 640x480 frames, unpaced, 2 threads) is
measured with and without a shadow phase running beside it, in interleaved rounds
(bench/pairs.py). The shadow phase is the device's own: ``ShadowRun`` on a thread that checks
twice a second whether a sample is due (as the rollout thread does), sampling the loop's
newest frame and result, with the float lite0 as the candidate (about three times the int8's
work per invoke) or the int8 model itself.
Target (issue 17): loop fps with shadow / without >= 0.97 at one sample per 2 s.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from pairs import Run, interleave, observed, ratio_text

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import load_classifier
from edgefleet.protocol import ShadowSpec
from edgefleet.rollout.shadow import ShadowRun, loop_sampler
from edgefleet.runtime.pipeline import Pipeline
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource

FP32 = Path(__file__).resolve().parents[1] / "models" / "efficientnet-lite0-fp32.tflite"


def loop(seconds: float, candidate: Path | None, interval: float, threads: int) -> Run:
    delegate = CpuDelegate(CpuConfig(threads=threads))
    clf = load_classifier(factory_model_path(), delegate)
    pipeline = Pipeline(SyntheticSource(SyntheticConfig(fps=None)), clf, [])
    stop = threading.Event()
    runs: list[ShadowRun] = []
    if candidate is not None:
        spec = ShadowSpec(samples=100_000, interval_s=interval, max_duration_s=3600)
        runs.append(ShadowRun(spec, load_classifier(candidate, delegate), loop_sampler(pipeline)))

        def shadow() -> None:
            while not stop.wait(0.5):
                if runs[0].due():
                    runs[0].step()

        threading.Thread(target=shadow, daemon=True).start()
    pipeline.start()
    run = observed(lambda: pipeline.stats.inferences, seconds)
    stop.set()
    pipeline.stop()
    if runs:
        figures = runs[0].figures
        print(f"    shadow round: {figures.samples} samples, agreement {figures.agreement}",
              flush=True)  # fmt: skip
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--interval", type=float, default=2.0, help="s between samples")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    candidates = {"without": None, "int8 shadow": factory_model_path(), "fp32 shadow": FP32}

    def variant(path: Path | None) -> Callable[[], Run]:
        return lambda: loop(args.seconds, path, args.interval, args.threads)

    series = interleave({name: variant(path) for name, path in candidates.items()}, args.rounds)
    base = series["without"]
    print(
        f"loop fps, synthetic 640x480, threads={args.threads}, one sample per "
        f"{args.interval:g} s, {args.rounds} interleaved rounds x {args.seconds:g} s"
    )
    for name, s in series.items():
        print(f"  {name:12} {s.rate:7.1f} /s  CPU {s.cpu_ms:5.2f} ms/frame")
    for name in ("int8 shadow", "fp32 shadow"):
        print("  " + ratio_text(f"{name} / without", series[name], base))
    print(f"  (median of rounds; rates {np.round([r.rate for r in base.runs], 1).tolist()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
