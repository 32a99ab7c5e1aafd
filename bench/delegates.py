"""Delegate selection and failover figures (a benchmark: prints only).

    .venv/bin/python bench/delegates.py

1. per thread count, invoke times as ``auto`` measures them (the pipeline's prepare work
   beside each invoke) against a bare ``invoke()`` loop on the same interpreter, alternating
   rounds: what the prepare stage costs the invoke at that thread count;
2. time for ``auto`` to decide among the default candidates of this machine (target <= 5 s);
3. frames lost when the serving delegate starts failing (target <= 1): a delegate that wraps
   the real CPU one and raises on demand, with the CPU runner-up taking over.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from edgefleet.app.daemon import Daemon
from edgefleet.config.agentconfig import load_config
from edgefleet.delegation.policies import AutoPolicy
from edgefleet.delegation.selection import _time_invokes, candidate_sections, choose
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import load_classifier, sha256_file
from edgefleet.inference.delegate import Availability
from edgefleet.plugin import hookimpl
from edgefleet.plugin.manager import make_plugin_manager
from edgefleet.plugin.registry import Registry
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate

MODEL = factory_model_path()
BROKEN = threading.Event()


def measuring_overhead(threads: int = 2, rounds: int = 5) -> tuple[float, float]:
    """Median invoke time in a bare loop and as auto measures it (the prepare stage's work
    beside each invoke), alternating rounds."""
    clf = load_classifier(MODEL, CpuDelegate(CpuConfig(threads=threads)))
    measured, bare = [], []
    for _ in range(rounds):
        measured.append(statistics.median(_time_invokes(clf, 1.0, max_runs=300)))
        times = []
        for _ in range(300):
            started = time.perf_counter()
            clf.interpreter.invoke()
            times.append((time.perf_counter() - started) * 1e3)
        bare.append(statistics.median(times))
    return statistics.median(bare), statistics.median(measured)


class FlakyConfig(CpuConfig):
    type: Literal["flaky"] = "flaky"  # type: ignore[assignment]


class _Flaky:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def invoke(self) -> None:
        if BROKEN.is_set():
            raise RuntimeError("device vanished")
        self._inner.invoke()


class FlakyDelegate(CpuDelegate):
    def availability(self, model_path: Path | None = None) -> Availability:
        return Availability(not BROKEN.is_set(), "unplugged" if BROKEN.is_set() else "")

    def make_interpreter(self, model_path: Path) -> Any:
        return _Flaky(super().make_interpreter(model_path))


class FlakyPlugin:
    @hookimpl
    def edgefleet_register_delegates(self, registry: Registry[Any]) -> None:
        registry.add("flaky", FlakyConfig, FlakyDelegate)


class Frames(Sink):
    name = "frames"

    def __init__(self) -> None:
        self.frames: list[int] = []

    def emit(self, result: Result) -> None:
        self.frames.append(result.frame)


def failover_loss(tmp: Path) -> tuple[int, int]:
    plugins = make_plugin_manager(extra=[("flaky", FlakyPlugin())])
    text = (
        "delegate:\n  type: prefer\n  reprobe_min_s: 60\n  order:\n"
        "    - {type: flaky, threads: 1}\n    - {type: cpu, threads: 1}\n"
        "source: {type: synthetic, fps: 30, width: 64, height: 48}\n"
        f"sinks: []\nstate_dir: '{tmp}'\n"
    )
    config = load_config(None, plugins.registries, environ={}, text=text)
    sink = Frames()
    daemon = Daemon(config, plugins, extra_sinks=[sink])
    runner = threading.Thread(target=daemon.run, kwargs={"duration": 6, "install_signals": False})
    runner.start()
    time.sleep(2.5)
    before = len(sink.frames)
    BROKEN.set()
    runner.join(15)
    BROKEN.clear()
    after = sink.frames[before - 1 :]
    lost = sum(b - a - 1 for a, b in itertools.pairwise(after) if b > a + 1)
    return lost, len(sink.frames) - before


def main() -> int:
    for threads in sorted({1, max(1, (os.cpu_count() or 2) - 1), os.cpu_count() or 1}):
        bare, measured = measuring_overhead(threads)
        print(
            f"threads={threads}: invoke median in a bare loop {bare:.3f} ms, as auto measures "
            f"it (a 640x480 frame prepared beside each invoke) {measured:.3f} ms, "
            f"ratio bare/measured {bare / measured:.3f}"
        )
    registry = make_plugin_manager().registries.delegates
    config = load_config(
        None, make_plugin_manager().registries, environ={}, text="delegate: {type: auto}\n"
    )
    if not isinstance(config.delegate, AutoPolicy):
        raise TypeError("expected the auto policy")
    sections = candidate_sections(config.delegate, config.candidates, registry)
    choice = choose("auto", sections, registry, MODEL, sha256_file(MODEL), budget_s=5.0)
    print(
        f"auto decided in {choice.seconds:.2f} s among {len(sections)} candidates: "
        f"{choice.best[0].label} ({choice.best[0].median_ms} ms)"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        lost, served = failover_loss(Path(tmp))
    print(f"failover: {lost} frame(s) lost, {served} results after the delegate broke")
    return 0


if __name__ == "__main__":
    sys.exit(main())
