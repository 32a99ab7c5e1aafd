"""What serves now: which model file on which delegate, and the loaded runner-ups.

``Serving`` is the one owner of that answer. Rollout activation and rollback, delegate
failover and the return of a lost delegate all go through it, and it alone swaps the
loop's classifier; so a rollout followed by a failover keeps serving the rolled-out model,
and a preflight loads the candidate on the delegate that serves at that moment.

Runner-ups hold a classifier for the serving model on their own delegate, so a failover is
a pointer swap before the next frame. After a rollout swaps the model, the runner-ups'
classifiers are stale; they are reloaded off the loop (``load_pending``, called by the
failover watcher), and a failover that comes before that loads on the spot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from edgefleet.delegation.selection import Choice, Measurement
from edgefleet.inference.classifier import Classifier, ModelInfo, load_checked
from edgefleet.inference.delegate import Delegate
from edgefleet.inference.litert import yielding_to

log = structlog.get_logger(__name__)


class Swappable(Protocol):
    """What serving needs from the loop: serve this classifier from the next frame on, and
    a moment between frames to build an interpreter in (it holds the GIL meanwhile)."""

    def swap(self, classifier: Classifier) -> None: ...

    def quiet(self) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class ServedModel:
    """A model file and how it is known (a release's name and version, or the file's)."""

    path: Path
    info: ModelInfo


@dataclass
class _Lost:
    next_probe: float
    delay: float
    reason: str


@dataclass
class _Candidate:
    row: Measurement
    delegate: Delegate
    classifier: Classifier | None  # for the serving model; None = to be loaded
    lost: _Lost | None = None


@dataclass(frozen=True)
class ServingState:
    """A snapshot ``activate`` returns so that a rollback can ``restore`` it."""

    model: ServedModel
    classifiers: tuple[Classifier | None, ...]


@dataclass(frozen=True)
class FailoverSettings:
    enabled: bool = False
    reprobe_min_s: float = 5.0
    reprobe_max_s: float = 300.0


class Serving:
    """The serving model x delegate, the ranked runner-ups, and every change to them."""

    def __init__(
        self,
        choice: Choice,
        model: ServedModel,
        crop: bool,
        events: Callable[[dict[str, Any]], None],
        failover: FailoverSettings | None = None,
    ) -> None:
        self._candidates = [_Candidate(row, d, c) for row, d, c in choice.ranked]
        self._model = model
        self._crop = crop
        self._events = events
        self.failover = failover or FailoverSettings()
        self._active = 0
        self._generation = 0  # bumped on every model change: late loads are discarded
        self._loop: Swappable | None = None
        self._lock = threading.RLock()
        self.listeners: list[Callable[[Serving], None]] = []
        self._relabel(model.info)

    # -- what serves ------------------------------------------------------------------------
    @property
    def classifier(self) -> Classifier:
        with self._lock:
            classifier = self._candidates[self._active].classifier
            if classifier is None:
                raise RuntimeError("serving candidate has no classifier")
            return classifier

    @property
    def delegate(self) -> Delegate:
        with self._lock:
            return self._candidates[self._active].delegate

    @property
    def model(self) -> ServedModel:
        with self._lock:
            return self._model

    def kinds(self) -> list[str]:
        """Delegate kinds this device can serve, the serving one first (release variants)."""
        with self._lock:
            order = [self._candidates[self._active]] + [
                c for i, c in enumerate(self._candidates) if i != self._active and not c.lost
            ]
            return list(dict.fromkeys(c.delegate.kind for c in order))

    def attach(self, loop: Swappable) -> None:
        self._loop = loop

    def quiet(self) -> AbstractContextManager[None]:
        """For one heavy step beside the loop (a build, a test inference): entered when the
        loop has least to do; at once when no loop is attached."""
        loop = self._loop
        return loop.quiet() if loop is not None else contextlib.nullcontext()

    # -- model changes (rollouts) -------------------------------------------------------------
    def load(self, path: Path) -> Classifier:
        """``path`` loaded and test-run on the delegate serving right now (preflight)."""
        return self._load(path, self.delegate)

    def load_beside(self, path: Path) -> Classifier:
        """``path`` loaded on this device's CPU delegate, beside the serving one: the cpu twin
        of an EdgeTPU candidate in a shadow phase. RuntimeError without a CPU delegate."""
        cpu = next((c.delegate for c in self._candidates if c.delegate.kind == "cpu"), None)
        if cpu is None:
            raise RuntimeError("no CPU delegate on this device to run the cpu variant on")
        return self._load(path, cpu)

    def activate(self, model: ServedModel, classifier: Classifier) -> ServingState:
        """Serve ``classifier`` (made by ``load``) for ``model``; returns what served before."""
        classifier.info = model.info
        with self._lock:
            previous = self.state()
            self._generation += 1
            for index, candidate in enumerate(self._candidates):
                # Runner-ups hold the old model: reloaded off the loop by load_pending().
                candidate.classifier = classifier if index == self._active else None
            self._model = model
            self._swap(classifier)
        self._changed()
        return previous

    def restore(self, state: ServingState) -> None:
        """Serve what ``state`` recorded (a rollback), on the best delegate not lost."""
        with self._lock:
            self._generation += 1
            self._model = state.model
            for candidate, classifier in zip(self._candidates, state.classifiers, strict=True):
                candidate.classifier = classifier
            self._active = self._best_available(self._active)
            self._swap(self._ensure_loaded(self._active))
        self._changed()

    def state(self) -> ServingState:
        with self._lock:
            return ServingState(self._model, tuple(c.classifier for c in self._candidates))

    # -- delegate changes (failover) ----------------------------------------------------------
    def on_invoke_error(self, exc: BaseException) -> None:
        """The serving delegate failed (loop thread): switch to the best one not lost."""
        if not self.failover.enabled:
            return
        with self._lock:
            failed = self._candidates[self._active]
            if failed.lost is None:
                failed.lost = self._lost(exc)
            target = next((i for i, c in enumerate(self._candidates) if c.lost is None), None)
            if target is None:
                return  # nothing left: keep trying the current one; errors are counted
            self._switch(target, "failover", str(exc))

    def due_probes(self) -> list[int]:
        now = time.monotonic()
        with self._lock:
            return [
                i for i, c in enumerate(self._candidates) if c.lost and c.lost.next_probe <= now
            ]

    def probe(self, index: int) -> None:
        """Re-probe a lost delegate (watcher thread); switch back when it ranks better."""
        with self._lock:
            candidate, generation = self._candidates[index], self._generation
            model = self._model
        available = candidate.delegate.availability(model.path)
        fresh: Classifier | None = None
        reason = available.reason
        if available.ok:
            try:
                fresh = self._load(model.path, candidate.delegate, model.info)
            except Exception as exc:  # noqa: BLE001 - any failure means "still lost"
                reason = str(exc)
        with self._lock:
            lost = candidate.lost
            if lost is None or (generation != self._generation and fresh is not None):
                return  # found again meanwhile, or loaded for a model that no longer serves
            if fresh is None:
                lost.delay = min(self.failover.reprobe_max_s, lost.delay * 2)
                lost.next_probe = time.monotonic() + lost.delay
                lost.reason = reason
                return
            candidate.classifier, candidate.lost = fresh, None
            log.info("delegate back", delegate=candidate.row.label)
            if index < self._active:
                self._switch(index, "restored", "available again and ranked faster")

    def load_pending(self) -> None:
        """Load the serving model on runner-ups that lack it (watcher thread, off the loop)."""
        with self._lock:
            pending = [
                i for i, c in enumerate(self._candidates) if c.classifier is None and not c.lost
            ]
            generation, model = self._generation, self._model
        for index in pending:
            candidate = self._candidates[index]
            try:
                fresh = self._load(model.path, candidate.delegate, model.info)
            except Exception as exc:  # noqa: BLE001 - a runner-up that fails is just lost
                with self._lock:
                    candidate.lost = self._lost(exc)
                continue
            with self._lock:
                if generation == self._generation and candidate.classifier is None:
                    candidate.classifier = fresh

    # -- internals ----------------------------------------------------------------------------
    def _lost(self, exc: BaseException) -> _Lost:
        """A candidate just failed: re-probe it after the shortest backoff."""
        delay = self.failover.reprobe_min_s
        return _Lost(time.monotonic() + delay, delay, str(exc))

    def _best_available(self, fallback: int) -> int:
        return next((i for i, c in enumerate(self._candidates) if c.lost is None), fallback)

    def _ensure_loaded(self, index: int) -> Classifier:
        candidate = self._candidates[index]
        if candidate.classifier is None:
            # Rare: a failover before the runner-up was reloaded for a new model.
            candidate.classifier = self._load(
                self._model.path, candidate.delegate, self._model.info
            )
        return candidate.classifier

    def _load(self, path: Path, delegate: Delegate, info: ModelInfo | None = None) -> Classifier:
        """``path`` loaded and test-run on ``delegate``, in the loop's quiet moments."""
        with yielding_to(self.quiet):
            return load_checked(path, delegate, crop=self._crop, info=info)

    def _swap(self, classifier: Classifier) -> None:
        if self._loop is not None:
            self._loop.swap(classifier)

    def _switch(self, index: int, event: str, reason: str) -> None:
        previous = self._candidates[self._active].row.label
        try:
            classifier = self._ensure_loaded(index)
        except Exception as exc:  # noqa: BLE001 - the target cannot serve either
            self._candidates[index].lost = self._lost(exc)
            return
        self._active = index
        self._swap(classifier)
        target = self._candidates[index].row.label
        body = {"event": event, "from": previous, "to": target, "reason": reason, "ts": time.time()}
        log.warning("delegate switched", kind=event, to=target, previous=previous, reason=reason)
        self._events(body)
        self._changed()

    def _relabel(self, info: ModelInfo) -> None:
        for candidate in self._candidates:
            if candidate.classifier is not None:
                candidate.classifier.info = dataclasses.replace(
                    candidate.classifier.info, name=info.name, version=info.version
                )

    def _changed(self) -> None:
        for listener in list(self.listeners):
            try:
                listener(self)
            except Exception as exc:  # noqa: BLE001 - a listener must not undo a swap
                log.warning("serving listener failed", error=str(exc))
