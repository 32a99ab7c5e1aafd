"""The cost of preparing one frame, by frame size (a benchmark: prints only).

    .venv/bin/python bench/preprocess.py [--rounds 6] [--seconds 1]

For the factory model's input (224x224 uint8, centre crop 0.875), per frame size, side by
side in interleaved rounds (``bench/pairs.py``), the CPU time of one frame on one thread:

  (3) the crop, the whole-factor box filter and OpenCV's bit-exact bilinear on three channels
      (how the agent resized before issue 33);
  (4) the agent's ``Preprocessor``: the same, with the bilinear step on four channels, where
      OpenCV has vector code for its bit-exact resize.

Both must give the same bytes; the benchmark checks that before it times anything.
"""

from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np
from pairs import interleave, timed

from edgefleet.inference.preprocess import RESIZE, InputPlan, Preprocessor

SIZES = ((640, 480), (1280, 720), (1920, 1080), (256, 256))


def _three_channels(pre: Preprocessor, frame: np.ndarray, out: np.ndarray) -> None:
    y0, y1, x0, x1 = pre.crop_box(frame.shape[0], frame.shape[1])
    region = pre._shrink(frame[y0:y1, x0:x1])  # the same box step as the agent's
    cv2.resize(region, (out.shape[2], out.shape[1]), dst=out[0], interpolation=RESIZE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.0, help="per variant and round")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    plan = InputPlan(224, 224, np.dtype(np.uint8), 127.0, 128.0, 1 / 128, 127, 0.875)
    pre = Preprocessor(plan)
    rng = np.random.default_rng(0)
    print(f"one thread, CPU time per frame, {args.rounds} interleaved rounds x {args.seconds:g} s")
    for width, height in SIZES:
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        three, four = pre.new_buffer(), pre.new_buffer()
        _three_channels(pre, frame, three)
        pre(frame, four)
        if not np.array_equal(three, four):
            print(f"{width}x{height}: the two routes differ", file=sys.stderr)
            return 1

        def old(f: np.ndarray = frame, o: np.ndarray = three) -> int:
            _three_channels(pre, f, o)
            return 1

        def new(f: np.ndarray = frame, o: np.ndarray = four) -> int:
            pre(f, o)
            return 1

        series = interleave(
            {"3": lambda: timed(old, args.seconds), "4": lambda: timed(new, args.seconds)},
            args.rounds,
        )
        before, after = series["3"], series["4"]
        ratios = [n.cpu_ms / o.cpu_ms for o, n in zip(before.runs, after.runs, strict=True)]
        print(
            f"{width}x{height}: three channels {before.cpu_ms * 1e3:6.0f} us, four "
            f"{after.cpu_ms * 1e3:6.0f} us, four/three {np.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f}); same bytes"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
