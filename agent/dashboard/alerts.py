"""Alerts to a webhook: a device went offline or stale, a rollout failed, throttling, a label.

``edgefleet collect ... --alert-webhook URL [--alert-label person:0.6]``. Once a second the
alerter compares each device's row with the previous one and posts a JSON body for each
change worth a person's attention; labels are matched in every stored prediction. Alerts fire
on changes seen while the collector runs (a device already offline when it starts is not
news). Rate limits: one alert per device and kind per ``min_interval_s``, and at most
``max_per_minute`` in all (the rest are counted, and the count rides on the next alert), so a
broker outage that takes the whole fleet offline cannot flood the receiver. Posting happens on
its own thread from a bounded queue; a receiver that is down costs log lines, never the
collector.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from edgefleet.dashboard.rows import STALE
from edgefleet.dashboard.view import FleetView
from edgefleet.errors import UserError
from edgefleet.protocol import OFFLINE, ONLINE, Rollout

log = structlog.get_logger(__name__)

Post = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class LabelRule:
    """Alert when ``label`` is the top-1 at or above ``min_score``."""

    label: str
    min_score: float = 0.5

    @classmethod
    def parse(cls, text: str) -> LabelRule:
        """``LABEL`` or ``LABEL:SCORE`` (the label may itself contain colons)."""
        label, sep, score = text.rpartition(":")
        if sep:
            try:
                value = float(score)
            except ValueError:
                value = -1.0
            if label and 0.0 <= value <= 1.0:
                return cls(label, value)
            if label:
                raise ValueError(f"{text!r}: the score after ':' must be between 0 and 1")
        if not text.strip():
            raise ValueError("give a label, e.g. person or person:0.6")
        return cls(text.strip())


def webhook_poster(url: str, timeout_s: float = 5.0) -> Post:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--alert-webhook {url!r}: use http://host/path or https://...")

    def post(body: dict[str, Any]) -> None:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "edgefleet-collector"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            response.read()

    return post


class Alerter:
    """Watches the view; posts through ``post`` on its own thread."""

    def __init__(
        self,
        view: FleetView,
        post: Post,
        labels: list[LabelRule] | None = None,
        min_interval_s: float = 300.0,
        max_per_minute: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.post = post
        self.labels = {rule.label: rule.min_score for rule in labels or []}
        self.min_interval_s = min_interval_s
        self.max_per_minute = max_per_minute
        self.clock = clock
        self._previous: dict[str, dict[str, Any]] | None = None
        self._last: dict[tuple[str, str], float] = {}
        self._minute: list[float] = []
        self._lock = threading.Lock()  # the watch thread and the collector's store thread
        self.suppressed = 0
        self.sent = 0
        self.failed = 0
        self._outbox: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=1000)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, name="alerts-watch", daemon=True),
            threading.Thread(target=self._send, name="alerts-send", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(5)

    # -- what is news -----------------------------------------------------------------------
    def check(self) -> None:
        """Compare every device with the previous check; raise what changed."""
        rows = {row["device"]: row for row in self.view.rows()}
        previous, self._previous = self._previous, rows
        if previous is None:
            return  # the first look is the baseline
        for device, row in rows.items():
            before = previous.get(device)
            if before is None:
                continue
            self._compare(device, before, row)

    def _compare(self, device: str, before: dict[str, Any], row: dict[str, Any]) -> None:
        state, was = row["state"], before["state"]
        if state != was and state in (OFFLINE, STALE):
            self.raise_alert(f"device_{state}", device, f"{device} is {state} (was {was})", row)
        elif state == ONLINE and was in (OFFLINE, STALE):
            self.raise_alert("device_back", device, f"{device} is online again", row)
        rollout, old = row["rollout"] or {}, before["rollout"] or {}
        bad = (Rollout.FAILED, Rollout.ROLLED_BACK)
        if rollout.get("state") in bad and (rollout.get("state"), rollout.get("version")) != (
            old.get("state"),
            old.get("version"),
        ):
            self.raise_alert(
                f"rollout_{rollout['state']}",
                device,
                f"{device}: rollout of {rollout.get('name')} v{rollout.get('version')} "
                f"{rollout['state']}: {rollout.get('reason') or 'no reason given'}",
                row,
            )
        if row["throttled"] and not before["throttled"]:
            flags = ", ".join(row["throttled"])
            self.raise_alert("throttled", device, f"{device} is throttled: {flags}", row)
        if row.get("state_dir_full") and not before.get("state_dir_full"):
            self.raise_alert(
                "state_dir_full", device, f"{device}: its state directory is full", row
            )

    def on_stored(self, kind: str, device: str, body: dict[str, Any]) -> None:
        """The collector's echo: match watched labels in every stored prediction."""
        if kind != "predictions" or not self.labels:
            return
        for result in body.get("results") or []:
            top = (result.get("top") or [{}])[0] if isinstance(result, dict) else {}
            label, score = top.get("label"), top.get("score")
            floor = self.labels.get(label) if isinstance(label, str) else None
            if floor is not None and isinstance(score, (int, float)) and score >= floor:
                self.raise_alert(
                    "label_seen",
                    device,
                    f"{device} saw {label} ({score:.2f} >= {floor:.2f})",
                    {"label": label, "score": score, "ts": result.get("ts")},
                    key=f"label:{label}",
                )

    def raise_alert(
        self,
        kind: str,
        device: str,
        text: str,
        details: dict[str, Any],
        key: str | None = None,
    ) -> bool:
        """Queue one alert unless a rate limit holds it back; True when queued."""
        with self._lock:
            return self._queue(kind, device, text, details, key)

    def _queue(
        self, kind: str, device: str, text: str, details: dict[str, Any], key: str | None
    ) -> bool:
        now = self.clock()
        slot = (device, key or kind)
        if now - self._last.get(slot, float("-inf")) < self.min_interval_s:
            self.suppressed += 1
            return False
        self._minute = [t for t in self._minute if now - t < 60]
        if len(self._minute) >= self.max_per_minute:
            self.suppressed += 1
            return False
        self._last[slot] = now
        self._minute.append(now)
        body = {
            "alert": kind,
            "device": device,
            "text": text,
            "ts": time.time(),
            "details": details,
            "suppressed_before": self.suppressed,
        }
        try:
            self._outbox.put_nowait(body)
        except queue.Full:
            self.suppressed += 1
            return False
        return True

    # -- threads ----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.check()
            except Exception:  # one bad row never stops the alerts
                log.exception("alerts: check failed")

    def _send(self) -> None:
        while True:
            body = self._outbox.get()
            if body is None:
                return
            try:
                self.post(body)
                self.sent += 1
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self.failed += 1
                log.warning("alerts: webhook failed", alert=body["alert"], error=str(exc))
