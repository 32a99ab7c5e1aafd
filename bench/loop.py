"""Throughput of the agent's loop against a bare invoke() loop (a benchmark: prints only).

    .venv/bin/python bench/loop.py [--seconds 2] [--threads 2] [--rounds 8] [--cores 0,1]

Same model (the factory lite0 int8) and thread count, measured side by side in one run in
interleaved rounds (``bench/pairs.py``: a ratio per round, the median reported with its
spread, and the process CPU time per frame, which other tenants of the machine barely move):

  (a) bare ``interpreter.invoke()`` on a fixed tensor: nothing else;
  (b) a naive serial loop in the style of pycoral's classify_image: take a frame (640x480) from
      a list of pre-made ones (copied, as a capture would), resize, set the input, invoke,
      read and sort the output, write a JSON line;
  (c) the agent's pipeline on the same pre-made frames, not copied: a replay source (a
      capture thread handing over the next frame when the last was taken) -> prepare thread
      (centre crop, 2x box filter where the frame allows, bilinear to 224x224, into a pooled
      buffer) -> infer -> ``jsonl`` sink. (b) resizes the whole frame with one bilinear
      pass, which reads fewer pixels and aliases more (no box filter).

Then the added latency with a source slower than the model (a camera's case); where each
thread's time goes per frame in (a) and (c) (``threadtime.py``: CPU, time spent waiting for a
core, blocking and preemptions, from the kernel's accounting); and ``edgefleet run`` in a
subprocess: time to the first result and peak RSS (VmHWM).
``--cores`` pins the whole benchmark to those CPUs (compare 1 and 2 cores).
Targets (issue 16): c/a >= 0.95, c/b >= 1.05, added latency p50 <= 0.5 ms and p99 <= 1.5 ms,
RSS <= 150 MB with OpenCV.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from pairs import Run, interleave, observed, ratio_text, timed
from threadtime import per_frame, snapshot

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import load_classifier
from edgefleet.runtime.pipeline import Pipeline
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink
from edgefleet.runtime.sources import ThreadedSource
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.sinks.jsonl import JsonlConfig, JsonlSink
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource


def bare(threads: int) -> tuple[Callable[[float], Run], Callable[[float], str]]:
    """(a): a timed run, and a profiled one (per-thread time per frame)."""
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    buf = clf.preprocessor.new_buffer()
    buf[...] = 127
    clf.set_input(buf)
    clf.interpreter.invoke()

    def step() -> int:
        clf.interpreter.invoke()
        return 1

    def profile(seconds: float) -> str:
        before, frames = snapshot(), 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            frames += step()
        return per_frame(before, snapshot(), frames)

    return (lambda seconds: timed(step, seconds)), profile


def naive(threads: int, frames: list[np.ndarray]) -> Callable[[float], Run]:
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    interp = clf.interpreter
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    h, w = int(inp["shape"][1]), int(inp["shape"][2])
    labels = clf.info.labels or ()
    scale, zero = out["quantization"]
    sink = Path(os.devnull).open("w")  # noqa: SIM115 - open for the benchmark's lifetime
    n = 0

    def step() -> int:
        nonlocal n
        frame = frames[n % len(frames)].copy()  # "capture"
        resized = cv2.resize(frame, (w, h))
        interp.set_tensor(inp["index"], resized[np.newaxis])
        interp.invoke()
        scores = (interp.get_tensor(out["index"])[0].astype(np.float32) - zero) * scale
        top = np.argsort(scores)[::-1][:5]
        sink.write(json.dumps([(labels[i], float(scores[i])) for i in top]) + "\n")
        n += 1
        return 1

    return lambda seconds: timed(step, seconds)


class _Replay(ThreadedSource):
    """(c)'s source: (b)'s pre-made frames, the next one when the last was taken (or paced)."""

    def __init__(self, frames: list[np.ndarray], fps: float | None) -> None:
        super().__init__("replay", fps=fps)
        self._frames = frames
        self._n = 0

    def open(self) -> None:
        pass  # made before the run: making 1080p frames would cost the measured seconds

    def read(self) -> tuple[np.ndarray, str]:
        frame = self._frames[self._n % len(self._frames)]
        self._n += 1
        return frame, f"replay:{(self._n - 1) % len(self._frames)}"


class _Recorder(Sink):
    name = "recorder"

    def __init__(self) -> None:
        self.added: list[float] = []

    def emit(self, result: Result) -> None:
        t = result.timings_ms
        # What the agent adds on top of invoke() on the critical path of this frame.
        self.added.append(t["total"] - t["inference"])


def agent(
    threads: int, out: Path, frames: list[np.ndarray]
) -> tuple[Callable[..., tuple[Run, list[float]]], Callable[[float], str]]:
    """(c): a timed run (with the added latency of each frame), and a profiled one."""
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    clf.classify(frames[0])

    def start(fps: float | None, sinks: list[Sink]) -> tuple[Pipeline, JsonlSink]:
        source = _Replay(frames, fps)
        jsonl = JsonlSink(JsonlConfig(path=out, max_bytes=50_000_000))
        pipeline = Pipeline(source, clf, [jsonl, *sinks])
        pipeline.start()
        return pipeline, jsonl

    def run(seconds: float, fps: float | None = None) -> tuple[Run, list[float]]:
        recorder = _Recorder()
        pipeline, jsonl = start(fps, [recorder])
        run = observed(lambda: pipeline.stats.inferences, seconds)
        pipeline.stop()
        jsonl.close()
        return run, recorder.added[len(recorder.added) // 10 :]

    def profile(seconds: float) -> str:
        pipeline, jsonl = start(None, [])
        time.sleep(0.5)
        before, done = snapshot(), pipeline.stats.inferences
        time.sleep(seconds)
        after, done = snapshot(), pipeline.stats.inferences - done
        pipeline.stop()
        jsonl.close()
        return per_frame(before, after, max(done, 1))

    return run, profile


def subprocess_run(threads: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        config = Path(tmp) / "agent.yaml"
        config.write_text(
            f"source: {{type: synthetic, fps: 30}}\ndelegate: {{type: cpu, threads: {threads}}}\n"
            f"sinks: [{{type: jsonl, path: '{out}', flush_interval_s: 0}}]\n"
            f"state_dir: '{tmp}'\n"
        )
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first = float("nan")
        while time.monotonic() - started < 30:
            if out.exists() and out.stat().st_size > 0:
                first = time.monotonic() - started
                break
            time.sleep(0.01)
        time.sleep(3)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm_kb = int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )
        proc.terminate()
        proc.wait(10)
        return first, hwm_kb / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--cores", help="pin to these CPUs, e.g. 0 or 0,1")
    parser.add_argument("--frame", default="640x480", help="source frame size WxH")
    args = parser.parse_args()
    if args.cores:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    cv2.setNumThreads(1)
    width, height = (int(x) for x in args.frame.split("x"))
    source = SyntheticSource(SyntheticConfig(width=width, height=height))
    source.open()
    frames = [source.read()[0] for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        run_c, profile_c = agent(args.threads, Path(tmp) / "r.jsonl", frames)
        (run_a, profile_a), run_b = bare(args.threads), naive(args.threads, frames)
        series = interleave(
            {
                "a": lambda: run_a(args.seconds),
                "b": lambda: run_b(args.seconds),
                "c": lambda: run_c(args.seconds)[0],
            },
            args.rounds,
        )
        a, b, c = series["a"], series["b"], series["c"]
        # Latency with a source slower than the model (a camera's case): an unpaced source
        # makes every frame wait for the previous invoke, which is queueing, not overhead.
        _, added = run_c(max(args.seconds, 4.0), fps=a.rate / 2)
        profiles = [profile_a(4.0), profile_c(4.0)]
    first, rss = subprocess_run(args.threads)
    cores = len(os.sched_getaffinity(0))
    print(
        f"model: factory lite0 int8, threads={args.threads}, {args.rounds} interleaved rounds x "
        f"{args.seconds:g} s, {cores} of {os.cpu_count()} cores, {args.frame} frames"
    )
    for name, s in (("(a) bare invoke()    ", a), ("(b) naive serial loop", b),
                    ("(c) agent pipeline   ", c)):  # fmt: skip
        print(
            f"{name} {s.rate:7.1f} /s  CPU {s.cpu_ms:5.2f} ms/frame   "
            f"rounds {[round(r.rate, 1) for r in s.runs]}"
        )
    print(
        "   ".join(ratio_text(n, x, y) for n, x, y in (("c/a", c, a), ("c/b", c, b), ("b/a", b, a)))
    )
    print(
        f"CPU per frame: c/a {c.cpu_ms / a.cpu_ms:.3f}, b/a {b.cpu_ms / a.cpu_ms:.3f} "
        "(work done per frame, whatever else runs on the machine)"
    )
    p50, p99 = np.percentile(added, (50, 99))
    print(
        f"added latency (end-to-end minus invoke, source at {a.rate / 2:.0f} fps): "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (n={len(added)})"
    )
    print("per frame, by thread (kernel accounting, 4 s each): (a) bare invoke()")
    print(profiles[0])
    print("(c) agent pipeline")
    print(profiles[1])
    print(f"edgefleet run: first result {first:.2f} s after start, peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
