"""Results over MQTT: one consumer of the loop's results, feeding the fleet link's outbox.

The report policy decides per result whether it is sent; wanted results are batched and
handed to the link, which spools them on disk before publishing. By default a message holds
the results the loop made since the outbox's last turn (at most 20 ms, up to ``batch_max``):
one per message at camera rates, a few at hundreds of frames per second, where a message
per result cost the loop a thread wake-up and a publish each. ``emit`` runs on the loop
thread and only appends to memory: the results stay objects until the link's outbox thread
encodes them with the rest of the message.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import ValidationError

from edgefleet.mqtt.commands import CommandError
from edgefleet.mqtt.link import MqttLink
from edgefleet.mqtt.settings import ReportPolicy
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink


class ReportState:
    """The policy plus its per-device state; changed at run time by the ``set`` command."""

    def __init__(self, policy: ReportPolicy) -> None:
        self.policy = policy
        self.lock = threading.Lock()
        self.batch: list[Result] = []
        self.batch_started = 0.0
        self.last_label: str | None = None
        self.last_sent = float("-inf")
        self.skipped = 0

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            merged = {**self.policy.model_dump(), **changes}
            try:
                self.policy = ReportPolicy.model_validate(merged)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                raise CommandError(f"report.{loc}: {first['msg']}") from None
            return self.policy.model_dump()

    def wanted(self, result: Result, now: float) -> bool:
        policy = self.policy
        top = result.top[0] if result.top else None
        if top is None or top.score < policy.min_score:
            return False
        if policy.mode == "change" and top.label == self.last_label:
            return False
        if policy.mode == "interval" and (now - self.last_sent) * 1000 < policy.interval_ms:
            return False
        self.last_label = top.label
        self.last_sent = now
        return True

    def add(self, result: Result, now: float) -> list[Result] | None:
        """Add a wanted result; the batch, once it holds ``batch_max``. A batch's age is
        judged on the outbox thread's turns (``take_if_due``, every 20 ms at most)."""
        if not self.batch:
            self.batch_started = now
        self.batch.append(result)
        if len(self.batch) >= self.policy.batch_max:
            batch, self.batch = self.batch, []
            return batch
        return None

    def take_if_due(self, now: float) -> list[Result] | None:
        if not self.batch:
            return None
        policy = self.policy
        full = len(self.batch) >= policy.batch_max
        old = (now - self.batch_started) * 1000 >= policy.batch_ms
        if full or old:
            batch, self.batch = self.batch, []
            return batch
        return None


class Reporter(Sink):
    """The sink the daemon adds when a ``fleet:`` section is configured."""

    name = "fleet"

    def __init__(self, link: MqttLink, policy: ReportPolicy) -> None:
        self.link = link
        self.report = ReportState(policy)

    def emit(self, result: Result) -> None:
        now = time.monotonic()
        state = self.report
        with state.lock:
            if not state.wanted(result, now):
                state.skipped += 1
                return
            batch = state.add(result, now)
        self._send(batch)

    def event(self, body: dict[str, Any]) -> None:
        self.link.enqueue("events", body)

    def alive(self) -> bool:
        """The link's threads are running (the watchdog asks)."""
        return self.link.alive()

    def status_text(self) -> str:
        return f"broker {self.link.state}"

    def _send(self, batch: list[Result] | None) -> None:
        if batch:
            self.link.enqueue("predictions", {"results": batch})

    def tick(self) -> None:
        """On the outbox thread, each turn: a batch older than batch_ms goes out (with the
        default batch_ms 0, whatever the loop made since the last turn, as one message)."""
        with self.report.lock:
            batch = self.report.take_if_due(time.monotonic())
        self._send(batch)

    def flush(self) -> None:
        with self.report.lock:
            batch, self.report.batch = self.report.batch, []
        self._send(batch)
