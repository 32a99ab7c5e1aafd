"""The loop: results carry seq and timings; drops counted; filters; sinks isolated; swap."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import Classifier, load_classifier
from edgefleet.inference.litert import get_runtime, yielding_to
from edgefleet.runtime.frames import Frame
from edgefleet.runtime.pipeline import QUIET_IDLE_S, QUIET_WAIT_S, LoopSettings, Pipeline
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource

from .mqtt_helpers import wait_for


class Collect(Sink):
    name = "collect"

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.done = threading.Event()
        self.want = 0

    def emit(self, result: Result) -> None:
        self.results.append(result)
        if len(self.results) >= self.want:
            self.done.set()


class Broken(Sink):
    name = "broken"

    def emit(self, result: Result) -> None:
        raise OSError("disk full")


def _run(pipeline: Pipeline, sink: Collect, count: int, limit: float = 20.0) -> None:
    sink.want = count
    pipeline.start()
    try:
        assert sink.done.wait(limit), f"only {len(sink.results)} results"
    finally:
        pipeline.stop()


def test_results_carry_seq_timings_and_model(classifier: Classifier) -> None:
    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=40, width=320, height=240))
    pipeline = Pipeline(source, classifier, [sink, Broken()], settings=LoopSettings(top_k=3))
    _run(pipeline, sink, 15)
    results = sink.results
    assert [r.seq for r in results] == list(range(1, len(results) + 1))
    assert len({r.boot_id for r in results}) == 1
    first = results[0]
    assert first.model == "efficientnet-lite0"
    assert len(first.top) == 3
    assert set(first.timings_ms) == {
        "capture_wait",
        "preprocess",
        "inference",
        "postprocess",
        "total",
    }
    assert first.timings_ms["inference"] > 0
    assert first.timings_ms["total"] >= first.timings_ms["inference"]
    assert all(0 <= t.score <= 1 for r in results for t in r.top)
    # The broken sink failed every time and never stopped the loop.
    assert pipeline.stats.sink_errors == len(results)
    snap = pipeline.stats.snapshot()
    assert snap["inferences"] >= 15
    assert set(snap["latency_ms"]["inference"]) == {"p50", "p90", "p99", "max"}
    assert snap["fps"] > 0


def test_drops_counted_when_model_is_slower_than_source(classifier: Classifier) -> None:
    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=1000, width=640, height=480))
    pipeline = Pipeline(source, classifier, [sink])
    _run(pipeline, sink, 20)
    assert pipeline.dropped > 0
    # Latest wins: the frames that were inferred are recent, not a backlog.
    assert max(r.timings_ms["total"] for r in sink.results[5:]) < 1000


def test_fps_cap(classifier: Classifier) -> None:
    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=None, width=64, height=64))
    pipeline = Pipeline(source, classifier, [sink], settings=LoopSettings(fps_cap=10))
    pipeline.start()
    time.sleep(1.05)
    pipeline.stop()
    assert 8 <= len(sink.results) <= 13


def test_filters_enrich_and_veto(classifier: Classifier) -> None:
    def enrich(result: Result) -> Result:
        result.extra["site"] = "lab"
        return result

    def veto_odd_frames(result: Result) -> Result | None:
        return result if result.frame % 2 == 0 else None

    def explode(result: Result) -> Result:
        raise RuntimeError("filter bug")

    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=30, width=64, height=64))
    pipeline = Pipeline(source, classifier, [sink], filters=[enrich, explode, veto_odd_frames])
    _run(pipeline, sink, 6)
    assert all(r.frame % 2 == 0 for r in sink.results)
    assert all(r.extra == {"site": "lab"} for r in sink.results)
    assert [r.seq for r in sink.results] == list(range(1, len(sink.results) + 1))
    assert pipeline.stats.vetoed > 0


def test_swap_between_frames(classifier: Classifier, cpu_delegate: CpuDelegate) -> None:
    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=50, width=64, height=64))
    pipeline = Pipeline(source, classifier, [sink])
    sink.want = 5
    pipeline.start()
    try:
        assert sink.done.wait(10)
        replacement = load_classifier(factory_model_path(), cpu_delegate)
        sink.done.clear()
        before = len(sink.results)
        pipeline.swap(replacement)
        sink.want = before + 5
        assert sink.done.wait(10)
    finally:
        pipeline.stop()
    assert pipeline.classifier is replacement
    seqs = [r.seq for r in sink.results]
    assert seqs == list(range(1, len(seqs) + 1))


def test_stop_is_prompt(classifier: Classifier) -> None:
    source = SyntheticSource(SyntheticConfig(fps=None, width=640, height=480))
    pipeline = Pipeline(source, classifier, [])
    pipeline.start()
    time.sleep(0.3)
    started = time.monotonic()
    pipeline.stop()
    assert time.monotonic() - started < 1.0
    assert not pipeline.alive()


def test_an_fps_cap_is_not_counted_as_latency(classifier: Classifier) -> None:
    """Under a cap the frame is fetched when it is due, so "total" is processing, not waiting."""
    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=50, width=320, height=240))
    pipeline = Pipeline(source, classifier, [sink], settings=LoopSettings(fps_cap=4))
    _run(pipeline, sink, 8)
    late = sink.results[3:]  # after the start-up burst the cap allows
    elapsed = late[-1].ts - late[0].ts
    assert elapsed > (len(late) - 1) / 4 * 0.9  # the cap held
    totals = sorted(r.timings_ms["total"] for r in late)
    # Before, a frame waited out the whole 250 ms interval in the slot; now it is prepared
    # when due: capture wait (< 20 ms at 50 fps) + preprocess + inference.
    assert totals[len(totals) // 2] < 150, totals


class _Fails(SyntheticSource):
    """A source whose get() raises what no plugin should: the thread must outlive it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(SyntheticConfig(fps=50, width=64, height=48))
        self.error = error
        self.calls = 0

    def get(self, timeout: float) -> Frame | None:
        self.calls += 1
        if self.calls == 3:
            raise self.error
        return super().get(timeout)


def test_the_loop_survives_a_bad_setting_and_a_bad_frame(classifier: Classifier) -> None:
    sink = Collect()
    source = _Fails(RuntimeError("camera driver bug"))
    pipeline = Pipeline(source, classifier, [sink], settings=LoopSettings())
    pipeline.start()
    try:
        wait = time.monotonic() + 20
        while len(sink.results) < 5 and time.monotonic() < wait:
            time.sleep(0.02)
        # A cap no command or config accepts, set behind their back: the wait fails.
        pipeline.settings.fps_cap = "1e-300"  # type: ignore[assignment]
        time.sleep(0.5)
        pipeline.settings.fps_cap = None
        before = len(sink.results)
        while len(sink.results) < before + 5 and time.monotonic() < wait:
            time.sleep(0.02)
        assert len(sink.results) >= before + 5
        assert pipeline.healthy(5.0)
    finally:
        pipeline.stop()


# The thread's death is the point: pytest would otherwise turn it into an error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_loop_thread_stops_the_watchdog(classifier: Classifier) -> None:
    """What escapes every guard ends the thread; then the loop is unhealthy (no pings)."""
    source = _Fails(SystemExit(3))
    pipeline = Pipeline(source, classifier, [Collect()], settings=LoopSettings())
    pipeline.start()
    try:
        deadline = time.monotonic() + 10
        while pipeline.healthy(5.0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pipeline.healthy(5.0)
    finally:
        pipeline.stop()


def test_a_frame_prepared_for_the_old_input_is_prepared_again(classifier: Classifier) -> None:
    """A swap to a model with another input (int8 -> float) costs no frame."""
    from edgefleet.runtime.frames import Frame
    from edgefleet.runtime.pipeline import _BufferPool, _Prepared

    from .conftest import REPO

    float_model = load_classifier(
        REPO / "models" / "efficientnet-lite0-fp32.tflite", CpuDelegate(CpuConfig(threads=1))
    )
    assert float_model.plan != classifier.plan
    sink = Collect()
    pipeline = Pipeline(SyntheticSource(SyntheticConfig(fps=None)), classifier, [sink])
    old = _BufferPool(classifier)
    buffer = old.acquire()
    image = np.full((48, 64, 3), 90, dtype=np.uint8)
    classifier.preprocessor(image, buffer)
    frame = Frame(image=image, index=7, captured=time.monotonic(), origin="t", capture_wait=0.0)
    pipeline.swap(float_model)
    pipeline._infer_one(_Prepared(buffer, old, frame, 0.0))
    assert [(r.frame, r.model) for r in sink.results] == [(7, float_model.info.name)]
    assert pipeline.stats.reprepared == 1


class _Busy:
    """A result filter (on the infer thread, inside each frame) that keeps the frame busy
    for ``seconds`` and records when, so a test can tell frames from the gaps between."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.windows: list[tuple[float, float]] = []

    def __call__(self, result: Result) -> Result:
        started = time.monotonic()
        time.sleep(self.seconds)
        self.windows.append((started, time.monotonic()))
        return result


def test_quiet_work_runs_between_frames(classifier: Classifier) -> None:
    """Work that would hold the GIL (building an interpreter) is entered in the loop's idle
    time and ends before the next frame: at 10 fps with half of each interval busy, work
    entered at random moments would land inside a frame about every second time."""
    busy = _Busy(0.05)
    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=10, width=64, height=64))
    pipeline = Pipeline(source, classifier, [sink], filters=[busy])
    pipeline.start()
    work: list[tuple[float, float]] = []
    try:
        wait_for(lambda: len(sink.results) >= 3, 20, "3 results")
        for attempt in range(12):
            time.sleep(0.013 * attempt % 0.1)  # moments spread over the frame interval
            with pipeline.quiet():
                entered = time.monotonic()
                time.sleep(0.01)
                work.append((entered, time.monotonic()))
        more = len(sink.results) + 2
        wait_for(lambda: len(sink.results) >= more, 20, "2 more results")
    finally:
        pipeline.stop()
    overlapping = [(w, f) for w in work for f in busy.windows if w[0] < f[1] and f[0] < w[1]]
    assert not overlapping, f"{len(overlapping)} of {len(work)} overlapped a frame"


def test_quiet_never_waits_on_the_infer_thread_itself(classifier: Classifier) -> None:
    """A failover reloads on the infer thread: waiting there for its own frame to end
    would stall the loop for QUIET_WAIT_S."""
    waited: list[float] = []

    def reload_inside(result: Result) -> Result:
        started = time.monotonic()
        with pipeline.quiet():
            waited.append(time.monotonic() - started)
        return result

    sink = Collect()
    source = SyntheticSource(SyntheticConfig(fps=20, width=64, height=64))
    pipeline = Pipeline(source, classifier, [sink], filters=[reload_inside])
    _run(pipeline, sink, 5)
    assert waited
    assert max(waited) < QUIET_WAIT_S / 5, waited


def test_quiet_does_not_wait_for_a_loop_that_turns_no_frames(classifier: Classifier) -> None:
    source = SyntheticSource(SyntheticConfig(fps=20, width=64, height=64))
    settings = LoopSettings(paused=True)
    pipeline = Pipeline(source, classifier, [], settings=settings)
    started = time.monotonic()
    with pipeline.quiet():  # not started
        pass
    pipeline.start()
    try:
        time.sleep(QUIET_IDLE_S + 0.2)
        with pipeline.quiet():  # paused
            pass
    finally:
        pipeline.stop()
    assert time.monotonic() - started < QUIET_IDLE_S + 0.2 + QUIET_WAIT_S / 2


def test_interpreters_are_built_inside_the_gate(
    cpu_delegate: CpuDelegate, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = get_runtime()
    real = runtime.module.Interpreter
    gate_open = threading.Event()
    built: list[bool] = []

    def interpreter(**kwargs: object) -> object:
        built.append(gate_open.is_set())
        return real(**kwargs)

    @contextlib.contextmanager
    def gate() -> Iterator[None]:
        gate_open.set()
        try:
            yield
        finally:
            gate_open.clear()

    monkeypatch.setattr(runtime.module, "Interpreter", interpreter)
    cpu_delegate.make_interpreter(factory_model_path())
    with yielding_to(gate):
        cpu_delegate.make_interpreter(factory_model_path())
        # Another thread's builds are its own: the gate belongs to this one.
        other = threading.Thread(target=cpu_delegate.make_interpreter, args=(factory_model_path(),))
        other.start()
        other.join()
    cpu_delegate.make_interpreter(factory_model_path())
    assert built == [False, True, False, False]
