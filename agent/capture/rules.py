"""Which results keep their frame (the triggers), and the budgets that bound how many.

The triggers run on the loop's infer thread for every result: a few comparisons, no
allocation beyond the list of names that fired. The budgets count kept samples per hour
(a sliding window on the monotonic clock, which a jump of the wall clock cannot move) and
encoded bytes per UTC day; the day's bytes survive a restart through one small file,
written at most every ten minutes (and at a graceful stop): rewritten per sample it cost an
SD card 16.9 MiB an hour at one sample a second, once a minute still 1.9 MiB
(``bench/wear.py --capture 3600``: a rename is a journal commit of a few blocks); a crash
forgets at most ten minutes of the day's figure (at most 10 samples at the default 60 an hour).
"""

from __future__ import annotations

import collections
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from edgefleet.capture.settings import CaptureSettings
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.runtime.results import Result

log = structlog.get_logger(__name__)
HOUR_S = 3600.0
SAVE_EVERY_S = 600.0


def triggers(settings: CaptureSettings, result: Result, draw: Callable[[], float]) -> list[str]:
    """The triggers this result fires (empty: the frame is not kept)."""
    top = result.top
    if not top:
        return []
    fired = []
    first = top[0].score
    if settings.below_score is not None and first < settings.below_score:
        fired.append("low_score")
    margin = settings.margin_below
    if margin is not None and len(top) > 1 and first - top[1].score < margin:
        fired.append("small_margin")
    if settings.watch and top[0].label in settings.watch:
        fired.append("watched")
    if settings.random_one_in is not None and draw() * settings.random_one_in < 1.0:
        fired.append("random")
    return fired


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


@dataclass
class Budget:
    """Kept samples per hour, bytes per day, and the spacing between two kept frames."""

    settings: CaptureSettings
    path: Path | None  # where the day's bytes are kept across restarts; None: memory only
    clock: Callable[[], float] = time.monotonic
    day: Callable[[], str] = _today
    _kept: collections.deque[float] = field(default_factory=collections.deque)
    _last: float | None = None
    _day: str = ""
    _day_bytes: int = 0
    _saved_at: float | None = None
    _unsaved: bool = False

    def __post_init__(self) -> None:
        self._day = self.day()
        if self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
                if saved.get("day") == self._day:
                    self._day_bytes = int(saved.get("bytes", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                log.warning("capture budget unreadable: the day starts at 0", path=str(self.path))

    def refusal(self, spaced: bool = True) -> str | None:
        """Why no sample may be kept now (None: one may). ``spaced=False``: the caller
        spaces its frames itself (a shadow phase samples every ``interval_s``)."""
        now = self.clock()
        while self._kept and self._kept[0] <= now - HOUR_S:
            self._kept.popleft()
        if spaced and self._last is not None and now - self._last < self.settings.min_interval_s:
            return "spacing"
        if len(self._kept) >= self.settings.per_hour:
            return "per_hour"
        self._roll_day()
        if self._day_bytes >= self.settings.bytes_per_day:
            return "per_day"
        return None

    def fits_today(self, size: int) -> bool:
        self._roll_day()
        return self._day_bytes + size <= self.settings.bytes_per_day

    def claim(self) -> None:
        """A frame was taken for encoding: it counts against the spacing and the hour."""
        now = self.clock()
        self._last = now
        self._kept.append(now)

    def spend(self, size: int) -> None:
        """An encoded sample of ``size`` bytes was queued."""
        self._roll_day()
        self._day_bytes += size
        self._unsaved = True
        now = self.clock()
        if self._saved_at is None or now - self._saved_at >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        """Write the day's bytes now (when they changed since the last write)."""
        if self.path is None or not self._unsaved:
            return
        self._saved_at = self.clock()
        body = json.dumps({"day": self._day, "bytes": self._day_bytes}).encode()
        try:
            atomic_write_bytes(self.path, body, durable=False)
            self._unsaved = False
        except OSError as exc:  # a full disk costs the figure's persistence, not the sample
            log.warning("capture budget not saved", error=str(exc))

    @property
    def day_bytes(self) -> int:
        return self._day_bytes

    def _roll_day(self) -> None:
        today = self.day()
        if today != self._day:
            self._day, self._day_bytes = today, 0


def new_draw(seed: int | None = None) -> Callable[[], float]:
    """The random trigger's draw (a seed only for tests)."""
    return random.Random(seed).random  # noqa: S311 - sampling, not security
