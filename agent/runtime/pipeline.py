"""The classification loop: capture and preprocessing overlap inference.

Two threads besides the source's own capture thread:

* ``prepare`` takes the newest frame from the source, crops/resizes/converts it into a
  buffer from a small pool and puts it in a one-slot mailbox (latest wins, drops counted);
* ``infer`` copies the prepared buffer into the interpreter, returns the buffer to its pool,
  invokes (the runtime releases the GIL), reads top-k and hands the result to the filters
  and sinks.

So while frame N is inferred, frame N+1 is already being captured and prepared. The
classifier can be swapped between two frames (``swap``); a buffer prepared for the old
model is dropped, never fed to the new one. Work that holds the GIL for milliseconds beside
the loop (building the next model's interpreter) waits for the loop's idle time (``quiet``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from edgefleet.inference.classifier import Classifier
from edgefleet.runtime.frames import Frame, LatestSlot
from edgefleet.runtime.results import Result, ResultFilter
from edgefleet.runtime.sinks import Sink
from edgefleet.runtime.sources import Source
from edgefleet.runtime.stats import LoopStats

log = structlog.get_logger(__name__)
POOL_SIZE = 3  # one being written, one waiting in the slot, one being copied in
MAX_CAP_INTERVAL_S = 3600.0  # an fps cap below one frame an hour is treated as one an hour
CAP_WAIT_STEP_S = 0.25
# quiet(): the longest it waits for a frame to end; how long without a frame counts as a loop
# that serves nothing (paused, no input); what a first build is assumed to take.
QUIET_WAIT_S = 0.5
QUIET_IDLE_S = 1.0
QUIET_COST_S = 0.05
QUIET_MARGIN = 1.5  # work goes at once only if 1.5 times its last duration fits before a frame


class _BufferPool:
    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(POOL_SIZE):
            self._free.put(classifier.preprocessor.new_buffer())

    def acquire(self) -> np.ndarray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return self.classifier.preprocessor.new_buffer()

    def release(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


@dataclass(slots=True)
class _Prepared:
    buffer: np.ndarray
    pool: _BufferPool
    frame: Frame
    preprocess_s: float


@dataclass
class LoopSettings:
    """Knobs the loop reads per frame; may be changed at run time (remote ``set``)."""

    top_k: int = 5
    threshold: float = 0.0
    fps_cap: float | None = None
    paused: bool = False


class _Cadence:
    """When the infer thread works and when it idles, for ``Pipeline.quiet``."""

    def __init__(self) -> None:
        self.infer_ident: int | None = None
        self.cost = QUIET_COST_S  # what the last quiet work took
        self._busy = False
        self._last_start = self._last_end = 0.0
        self._interval = 0.0  # smoothed time from one frame's start to the next
        self._ended = 0
        self._turned = threading.Condition()

    def frame_started(self) -> None:
        now = time.monotonic()
        if self._last_start:
            self._interval += 0.2 * (min(now - self._last_start, 1.0) - self._interval)
        self._last_start = now
        self._busy = True

    def frame_ended(self) -> None:
        with self._turned:
            self._busy = False
            self._last_end = time.monotonic()
            self._ended += 1
            self._turned.notify_all()

    def wait_quiet(self) -> None:
        with self._turned:
            now = time.monotonic()
            if now - self._last_end > QUIET_IDLE_S:
                return  # no frame to protect
            next_frame = self._last_start + self._interval
            if not self._busy and now + QUIET_MARGIN * self.cost < next_frame:
                return  # done before the next frame is due, with room for the frame's jitter
            ended = self._ended
            self._turned.wait_for(lambda: self._ended != ended, QUIET_WAIT_S)


class Pipeline:
    """Runs source -> prepare -> infer -> filters -> sinks until stopped or the input ends."""

    def __init__(
        self,
        source: Source,
        classifier: Classifier,
        sinks: Sequence[Sink],
        filters: Sequence[ResultFilter] = (),
        settings: LoopSettings | None = None,
        stats: LoopStats | None = None,
        boot_id: str | None = None,
        on_result: Callable[[Result], None] | None = None,
    ) -> None:
        self.source = source
        self.sinks = list(sinks)
        self.filters = list(filters)
        self.settings = settings or LoopSettings()
        self.stats = stats or LoopStats()
        self.boot_id = boot_id or uuid.uuid4().hex
        self.on_result = on_result
        self.on_invoke_error: Callable[[BaseException], None] | None = None
        self._pool = _BufferPool(classifier)
        self._slot: LatestSlot[_Prepared] = LatestSlot()
        self._stop = threading.Event()
        self.finished = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self.last_beat = time.monotonic()  # the infer thread is not stuck (watchdog)
        self.last_frame: Frame | None = None
        self.last_result: Result | None = None
        self._errors_logged = 0
        self._generation = 0
        self._deliver_lock = threading.Lock()
        self._due = threading.Event()  # under an fps cap: the next frame may be prepared
        self._due.set()
        self._cadence = _Cadence()

    @property
    def classifier(self) -> Classifier:
        return self._pool.classifier

    @property
    def dropped(self) -> int:
        """Frames that never reached the model: displaced at the source or after preparing."""
        return self.source.status().dropped + self._slot.stats.dropped

    def swap(self, classifier: Classifier) -> None:
        """Serve ``classifier`` from the next frame on; the loop does not pause."""
        self._pool = _BufferPool(classifier)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Enter when the loop has least to do, for work that holds the GIL a while.

        At once when the next frame is not due before 1.5 times as long as the last such
        work took; else just after the infer thread finishes its frame (at most
        QUIET_WAIT_S later). At once from the infer thread itself, or while no frame ends.
        """
        cadence = self._cadence
        if threading.get_ident() != cadence.infer_ident and not self._stop.is_set():
            cadence.wait_quiet()
        started = time.monotonic()
        try:
            yield
        finally:
            cadence.cost = time.monotonic() - started

    def start(self) -> None:
        self.source.start()
        thread = threading.Thread(target=self._prepare_loop, name="prepare", daemon=True)
        thread.start()
        self._threads.append(thread)
        self._start_infer()

    def _start_infer(self) -> None:
        thread = threading.Thread(
            target=self._infer_loop,
            args=(self._generation,),
            name=f"infer-{self._generation}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def replace_infer_thread(self) -> None:
        """Abandon an infer thread stuck in invoke() and serve from a fresh one.

        The stuck thread exits by itself if its invoke ever returns (its generation is old).
        """
        self._generation += 1
        self._threads = [t for t in self._threads if not t.name.startswith("infer")]
        self.last_beat = time.monotonic()
        self._start_infer()

    def stop(self, timeout: float = 1.5) -> None:
        """Stop all threads; the frame in flight is finished or dropped."""
        self._stop.set()
        self._slot.close()
        self.source.stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.finished.set()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def healthy(self, within_s: float) -> bool:
        """Both loop threads alive and the infer thread turned within ``within_s``."""
        if self.finished.is_set() or not all(t.is_alive() for t in self._threads):
            return False
        return time.monotonic() - self.last_beat < within_s

    # -- prepare thread --------------------------------------------------------------
    def _prepare_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._prepare_one():
                    break
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one frame's bug
                self._count_error("prepare failed", exc)
        self._slot.close()

    def _prepare_one(self) -> bool:
        """Prepare one frame ahead, no more; False once the source has ended."""
        # Wait until the model took the last one, then fetch the freshest frame: preparing
        # frames the model will never see would only steal cores from invoke(). Under an fps
        # cap, also wait until the next frame is due, so it is fresh when it is inferred.
        if not self._slot.wait_empty(0.1):
            return True
        if self.settings.fps_cap and not self._due.wait(0.1):
            return True
        frame = self.source.get(timeout=0.1)
        if frame is None:
            return not self.source.ended
        pool = self._pool
        buffer = pool.acquire()
        started = time.perf_counter()
        try:
            pool.classifier.preprocessor(frame.image, buffer)
        except (ValueError, RuntimeError) as exc:
            pool.release(buffer)
            self._count_error("bad frame skipped", exc, origin=frame.origin)
            return True
        elapsed = time.perf_counter() - started
        self._due.clear()
        displaced = self._slot.put(_Prepared(buffer, pool, frame, elapsed))
        if displaced is not None:
            displaced.pool.release(displaced.buffer)
        return True

    # -- infer thread ----------------------------------------------------------------
    def _infer_loop(self, generation: int = 0) -> None:
        next_due = 0.0
        cadence = self._cadence
        cadence.infer_ident = threading.get_ident()
        while not self._stop.is_set() and generation == self._generation:
            self.last_beat = time.monotonic()
            item = self._slot.take(timeout=0.1)
            if item is None:
                if self._slot.closed:
                    break
                continue
            if self.settings.paused:
                item.pool.release(item.buffer)
                continue
            cadence.frame_started()
            try:
                self._infer_one(item)
            except Exception as exc:  # noqa: BLE001 - a bug in one frame must not end the loop
                self.stats.errors += 1
                self._count_error("frame failed", exc)
            cadence.frame_ended()
            try:
                next_due = self._wait_for_cap(next_due)
            except Exception as exc:  # noqa: BLE001 - nor may a bad setting
                self._count_error("fps cap wait failed", exc)
                self._due.set()
        self.finished.set()

    def _wait_for_cap(self, next_due: float) -> float:
        """Sleep until the next frame is due under the fps cap; then ask for a fresh one.

        The wait is cut into short steps: a cap changed meanwhile (``set``, reload) takes
        effect at once, and the loop keeps beating, so neither the watchdog nor the stuck-
        invoke detection mistakes a long interval for a hung loop.
        """
        cap = self.settings.fps_cap
        if cap:
            interval = min(1.0 / cap, MAX_CAP_INTERVAL_S)
            next_due = max(next_due + interval, time.monotonic() - interval)
            while not self._stop.is_set() and self.settings.fps_cap == cap:
                delay = next_due - time.monotonic()
                if delay <= 0:
                    break
                self._stop.wait(min(delay, CAP_WAIT_STEP_S))
                self.last_beat = time.monotonic()
        self._due.set()
        return next_due

    def _infer_one(self, item: _Prepared) -> None:
        classifier = self._pool.classifier
        if item.pool.classifier is not classifier and item.pool.classifier.plan != classifier.plan:
            # Prepared for the model that served before a swap, whose input differs: prepare
            # the same frame again for this one (a fraction of a millisecond) rather than
            # lose it, so a swap costs no frame.
            item.pool.release(item.buffer)
            self.stats.reprepared += 1
            item = self._reprepare(item.frame)
        t0 = time.perf_counter()
        try:
            classifier.set_input(item.buffer)
            item.pool.release(item.buffer)
            scores = classifier.invoke()
        except (ValueError, RuntimeError) as exc:
            self.stats.errors += 1
            self._count_error("inference failed", exc)
            if self.on_invoke_error is not None:
                try:
                    self.on_invoke_error(exc)
                except Exception as hook_exc:  # noqa: BLE001 - the loop must outlive its helpers
                    self._count_error("failover handler failed", hook_exc)
            return
        t1 = time.perf_counter()
        settings = self.settings
        top = classifier.top(scores, settings.top_k, settings.threshold)
        frame = item.frame
        info = classifier.info
        result = Result(
            seq=0,
            boot_id=self.boot_id,
            ts=time.time(),
            model=info.name,
            model_version=info.version,
            top=top,
            timings_ms={},
            frame=frame.index,
            origin=frame.origin,
        )
        t2 = time.perf_counter()
        result.timings_ms = {
            "capture_wait": frame.capture_wait * 1e3,
            "preprocess": item.preprocess_s * 1e3,
            "inference": (t1 - t0) * 1e3,
            "postprocess": (t2 - t1) * 1e3,
            "total": (time.monotonic() - frame.captured) * 1e3,
        }
        self.last_frame = frame
        self.stats.record(result.timings_ms)
        self._deliver(result)

    def _reprepare(self, frame: Frame) -> _Prepared:
        pool = self._pool
        buffer = pool.acquire()
        started = time.perf_counter()
        pool.classifier.preprocessor(frame.image, buffer)
        return _Prepared(buffer, pool, frame, time.perf_counter() - started)

    def _deliver(self, result: Result) -> None:
        passed = result
        for fltr in self.filters:
            try:
                filtered = fltr(passed)
            except Exception as exc:  # noqa: BLE001 - a plugin filter must not stop the loop
                self._count_error("result filter failed", exc)
                continue
            if filtered is None:
                self.stats.vetoed += 1
                return
            passed = filtered
        # seq counts delivered results only, so sinks see no gaps from vetoes.
        with self._deliver_lock:
            self._seq += 1
            passed.seq = self._seq
            self.last_result = passed
            self._emit(passed)

    def _emit(self, passed: Result) -> None:
        for sink in self.sinks:
            try:
                sink.emit(passed)
            except Exception as exc:  # noqa: BLE001 - one sink failing must not stop the others
                self.stats.sink_errors += 1
                self._count_error("sink failed", exc, sink=sink.name)
        if self.on_result is not None:
            self.on_result(passed)

    def _count_error(self, message: str, exc: BaseException, **fields: object) -> None:
        # Log the first few in full, then every 100th, so a broken camera cannot flood journald.
        self._errors_logged += 1
        if self._errors_logged <= 5 or self._errors_logged % 100 == 0:
            log.warning(
                message,
                error=f"{type(exc).__name__}: {exc}",
                occurrences=self._errors_logged,
                **fields,
            )
