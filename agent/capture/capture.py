"""The capture sink: kept frames are cropped, encoded and queued off the loop.

On the loop's infer thread ``emit`` only checks the triggers and the budgets and, for a frame
that is kept, hands a reference to the frame to the ``capture`` thread (at most two waiting:
a third is refused and counted, the loop never waits). That thread cuts the model's view of
the frame, encodes it as JPEG (OpenCV releases the GIL while it works), and queues it for the
fleet link as ``samples`` messages of at most ``SAMPLE_PIECE_BYTES`` each: the link's outbox
holds them in memory, spools them to disk only when unacknowledged ``flush_after_s`` after
they were made, and sends them across outages and restarts like results.

What is stored: by default the square the model looks at, scaled so that the model's own
centre crop of the stored image is its input (``input / crop_fraction`` on a side: 256 for a
224 model), so ``classify`` or ``models train`` of a sample sees what the device saw; with
``full_frame`` the whole frame.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import structlog

from edgefleet.capture.rules import Budget, new_draw, triggers
from edgefleet.capture.settings import CaptureSettings
from edgefleet.inference.classifier import Classifier
from edgefleet.inference.labels import Label, label_dicts
from edgefleet.inference.preprocess import Preprocessor
from edgefleet.protocol import MAX_SAMPLE_BYTES, SAMPLE_PIECE_BYTES
from edgefleet.runtime.frames import Frame
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink

log = structlog.get_logger(__name__)
KIND = "samples"
WAITING_MAX = 2  # kept frames waiting for the encoder; more are refused, never waited for
RECENT_S = 2.0  # what was queued this recently may not be in the link's figure yet


class SampleLink(Protocol):
    """What capture needs of the fleet link (``mqtt.link.MqttLink``)."""

    def enqueue(self, kind: str, body: dict[str, Any]) -> None: ...

    def pending_bytes(self, kind: str) -> int: ...


class CapturedLoop(Protocol):
    """What capture reads of the loop (``runtime.pipeline.Pipeline``)."""

    last_frame: Frame | None

    @property
    def classifier(self) -> Classifier: ...


@dataclass(frozen=True)
class _Kept:
    image: np.ndarray
    result: Result
    triggers: list[str]
    view: Preprocessor
    shadow: dict[str, Any] | None


def model_view(image: np.ndarray, view: Preprocessor) -> np.ndarray:
    """The part of ``image`` the model classifies, at the scale of its input."""
    plan = view.plan
    if plan.crop_fraction is None:
        size = (plan.width, plan.height)
        return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
    height, width = image.shape[:2]
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    region = image[y0 : y0 + side, x0 : x0 + side]
    target = max(plan.height, plan.width)
    scaled = min(side, max(1, round(target / plan.crop_fraction)))
    return np.asarray(cv2.resize(region, (scaled, scaled), interpolation=cv2.INTER_AREA))


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf)


class Capture(Sink):
    """A sink on the loop that keeps the frames the model is unsure about."""

    name = "capture"

    def __init__(
        self,
        settings: CaptureSettings,
        loop: Callable[[], CapturedLoop | None],
        link: SampleLink,
        state_dir: Path | None,
        draw: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.loop = loop
        self.link = link
        self.clock = clock
        self._draw = draw or new_draw()
        budget_file = state_dir / "capture-budget.json" if state_dir is not None else None
        self.budget = Budget(settings, budget_file, clock=clock)
        self._lock = threading.Lock()  # the budget: infer, rollout and capture threads
        self._waiting: collections.deque[_Kept] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._opened = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.kept = 0
        self.kept_bytes = 0
        self.by_trigger: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    # -- the sink, on the infer thread ------------------------------------------------------
    def open(self, context: dict[str, Any]) -> None:  # noqa: ARG002 - the Sink signature
        if not self._opened:
            self._opened = True
            self._thread.start()

    def emit(self, result: Result) -> None:
        fired = triggers(self.settings, result, self._draw)
        if not fired:
            return
        loop = self.loop()
        frame = loop.last_frame if loop is not None else None
        if frame is None or frame.index != result.frame:
            return  # the loop moved on: this result's frame is no longer the newest
        self._offer(frame.image, result, fired, None)

    def on_shadow_disagreement(
        self, image: np.ndarray, active: Result, candidate: tuple[str, int, list[Label]]
    ) -> None:
        """From a shadow phase (the rollout thread): the candidate's top-1 differs."""
        if not self.settings.shadow_disagrees:
            return
        name, version, top = candidate
        shadow = {"model": name, "version": version, "top": label_dicts(top[:5])}
        # The shadow phase spaces its samples itself: only the hour and day budgets apply.
        self._offer(image, active, ["shadow_disagrees"], shadow, spaced=False)

    def _offer(
        self,
        image: np.ndarray,
        result: Result,
        fired: list[str],
        shadow: dict[str, Any] | None,
        spaced: bool = True,
    ) -> None:
        with self._lock:
            refusal = self.budget.refusal(spaced)
            if refusal is None and len(self._waiting) >= WAITING_MAX:
                refusal = "busy"
            if refusal is not None:
                self.refused[refusal] += 1
                return
            loop = self.loop()
            if loop is None:
                return
            self.budget.claim()
            view = loop.classifier.preprocessor
            self._waiting.append(_Kept(image, result, fired, view, shadow))
        self._wake.set()

    # -- the capture thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._waiting:
                kept = self._waiting.popleft()
                try:
                    self._queue(kept)
                except Exception:  # one frame's failure never stops capture
                    self.errors += 1
                    log.exception("capture of a frame failed")
            if self._stop.is_set():
                return

    def _queue(self, kept: _Kept) -> None:
        settings = self.settings
        image = kept.image if settings.full_frame else model_view(kept.image, kept.view)
        data = encode_jpeg(image, settings.jpeg_quality)
        if len(data) > MAX_SAMPLE_BYTES:
            self.refused["too_large"] += 1
            return
        with self._lock:
            if not self.budget.fits_today(len(data)):
                self.refused["per_day"] += 1
                return
            wire = len(data) * 4 // 3 + 512
            if self._pending() + wire > settings.queue_bytes:
                self.refused["queue_full"] += 1
                return
            self.budget.spend(len(data))
            self._recent.append((self.clock(), wire))
        self._send(data, image.shape[1], image.shape[0], kept)
        self.kept += 1
        self.kept_bytes += len(data)
        self.by_trigger.update(kept.triggers)

    def _pending(self) -> int:
        now = self.clock()
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent.popleft()
        return self.link.pending_bytes(KIND) + sum(size for _, size in self._recent)

    def _send(self, data: bytes, width: int, height: int, kept: _Kept) -> None:
        result = kept.result
        meta = {
            "ts": round(result.ts, 3),
            "model": result.model,
            "model_version": result.model_version,
            "top": label_dicts(result.top[:5]),
            "triggers": kept.triggers,
            "shadow": kept.shadow,
            "encoding": "jpeg",
            "width": width,
            "height": height,
            "full_frame": self.settings.full_frame,
        }
        digest = hashlib.sha256(data).hexdigest()
        pieces = max(1, -(-len(data) // SAMPLE_PIECE_BYTES))
        for index in range(pieces):
            part = data[index * SAMPLE_PIECE_BYTES : (index + 1) * SAMPLE_PIECE_BYTES]
            body: dict[str, Any] = {
                "sample": digest,
                "piece": index,
                "pieces": pieces,
                "size": len(data),
                "data": base64.b64encode(part).decode("ascii"),
            }
            if index == 0:
                body["meta"] = meta
            self.link.enqueue(KIND, body)

    # -- figures and lifecycle ------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        """For metrics and status: what was kept, and why frames were not."""
        return {
            "kept": self.kept,
            "kept_bytes": self.kept_bytes,
            "day_bytes": self.budget.day_bytes,
            "by_trigger": dict(self.by_trigger),
            "refused": dict(self.refused),
            "errors": self.errors,
        }

    def alive(self) -> bool:
        return self._thread.is_alive() or self._stop.is_set() or not self._opened

    def close(self) -> None:
        """Encode and queue what waits, then stop the thread (the link is stopped after)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        with self._lock:
            self.budget.save()
        if self._opened:
            log.info("capture stopped", **self.figures())
