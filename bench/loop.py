"""Throughput of the agent's loop against a bare invoke() loop (a benchmark: prints only).

    .venv/bin/python bench/loop.py [--seconds 8] [--threads 2] [--rounds 2]

Same model (the factory lite0 int8) and thread count, measured side by side in one run,
alternating rounds so that machine noise hits all three alike:

  (a) bare ``interpreter.invoke()`` on a fixed tensor;
  (b) a naive serial loop in the style of pycoral's classify_image: take a 640x480 frame,
      resize, set the input, invoke, read and sort the output, print a line;
  (c) the agent's pipeline: ``synthetic`` source (640x480, unpaced) -> prepare thread ->
      infer -> ``jsonl`` sink.

Then ``edgefleet run`` in a subprocess: time to the first result and peak RSS (VmHWM).
Targets (issue 3): c/a >= 0.95, c > b, added latency p50 <= 0.5 ms, RSS <= 150 MB,
first result <= 2 s.
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
from pathlib import Path

import cv2
import numpy as np

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import load_classifier
from edgefleet.runtime.pipeline import Pipeline
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.sinks.jsonl import JsonlConfig, JsonlSink
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource


def bare(threads: int, seconds: float) -> float:
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    buf = clf.preprocessor.new_buffer()
    buf[...] = 127
    clf.set_input(buf)
    clf.interpreter.invoke()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        clf.interpreter.invoke()
        n += 1
    return n / (time.perf_counter() - start)


def naive(threads: int, seconds: float, frames: list[np.ndarray]) -> float:
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    interp = clf.interpreter
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    h, w = int(inp["shape"][1]), int(inp["shape"][2])
    labels = clf.info.labels or ()
    scale, zero = out["quantization"]
    with Path(os.devnull).open("w") as sink:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            frame = frames[n % len(frames)].copy()  # "capture"
            resized = cv2.resize(frame, (w, h))
            interp.set_tensor(inp["index"], resized[np.newaxis])
            interp.invoke()
            scores = (interp.get_tensor(out["index"])[0].astype(np.float32) - zero) * scale
            top = np.argsort(scores)[::-1][:5]
            sink.write(json.dumps([(labels[i], float(scores[i])) for i in top]) + "\n")
            n += 1
    return n / (time.perf_counter() - start)


class _Recorder(Sink):
    name = "recorder"

    def __init__(self) -> None:
        self.added: list[float] = []

    def emit(self, result: Result) -> None:
        t = result.timings_ms
        # What the agent adds on top of invoke() on the critical path of this frame.
        self.added.append(t["total"] - t["inference"])


def agent(
    threads: int, seconds: float, out: Path, fps: float | None = None
) -> tuple[float, list[float]]:
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    clf.classify(np.zeros((480, 640, 3), dtype=np.uint8))
    source = SyntheticSource(SyntheticConfig(fps=fps, width=640, height=480))
    recorder = _Recorder()
    jsonl = JsonlSink(JsonlConfig(path=out, max_bytes=50_000_000))
    pipeline = Pipeline(source, clf, [jsonl, recorder])
    pipeline.start()
    time.sleep(1.0)  # warm: threads up, first frames through
    n0, t0 = pipeline.stats.inferences, time.perf_counter()
    time.sleep(seconds)
    n1, t1 = pipeline.stats.inferences, time.perf_counter()
    pipeline.stop()
    jsonl.close()
    return (n1 - n0) / (t1 - t0), recorder.added[len(recorder.added) // 10 :]


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
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    source = SyntheticSource(SyntheticConfig(width=640, height=480))
    source.open()
    frames = [source.read()[0] for _ in range(8)]
    a_runs: list[float] = []
    b_runs: list[float] = []
    c_runs: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            a_runs.append(bare(args.threads, args.seconds))
            b_runs.append(naive(args.threads, args.seconds, frames))
            c, _ = agent(args.threads, args.seconds, Path(tmp) / "r.jsonl")
            c_runs.append(c)
        a, b, c = (float(np.median(x)) for x in (a_runs, b_runs, c_runs))
        # Latency with a source slower than the model (a camera's case): an unpaced source
        # makes every frame wait for the previous invoke, which is queueing, not overhead.
        _, added = agent(args.threads, args.seconds, Path(tmp) / "r.jsonl", fps=a / 2)
    first, rss = subprocess_run(args.threads)
    print(
        f"model: factory lite0 int8, threads={args.threads}, {args.rounds} rounds x "
        f"{args.seconds:.0f} s, {os.cpu_count()} cores"
    )
    print(f"(a) bare invoke()        {a:7.1f} /s   rounds {[round(x, 1) for x in a_runs]}")
    print(f"(b) naive serial loop    {b:7.1f} /s   rounds {[round(x, 1) for x in b_runs]}")
    print(f"(c) agent pipeline       {c:7.1f} /s   rounds {[round(x, 1) for x in c_runs]}")
    print(f"c/a = {c / a:.3f}   b/a = {b / a:.3f}   c/b = {c / b:.3f}")
    p50, p99 = np.percentile(added, (50, 99))
    print(
        f"added latency (end-to-end minus invoke, source at {a / 2:.0f} fps): "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (n={len(added)})"
    )
    print(f"edgefleet run: first result {first:.2f} s after start, peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
