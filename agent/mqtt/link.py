"""The device's MQTT link: presence, durable outbox, commands in.

Three threads, none of which ever blocks the classification loop:

* ``mqtt-net`` (``mqtt.connection``): owns paho, connects and reconnects, publishes what it
  is handed, takes PUBACKs and incoming messages.
* ``mqtt-out`` (here): moves queued messages into the outbox (``mqtt.outbox``: memory first,
  the SQLite spool for what waits), hands them to the network thread while the link is up (a
  bounded in-flight window), drops them on acknowledgement, requeues what was in flight when
  the link dropped, emits metrics.
* ``mqtt-cmd`` (here): runs command handlers. paho's callbacks only hand messages over.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.mqtt.brokers import next_broker, no_delay, parse_url, parse_urls
from edgefleet.mqtt.connection import Connection
from edgefleet.mqtt.handoff import Incoming, Send
from edgefleet.mqtt.outbox import DiskState, Outbox
from edgefleet.mqtt.settings import LinkSettings
from edgefleet.mqtt.spool import Spool, Spooled
from edgefleet.protocol import Ack

log = structlog.get_logger(__name__)

__all__ = [
    "Incoming",
    "LinkSettings",
    "MqttLink",
    "next_broker",
    "no_delay",
    "parse_url",
    "parse_urls",
]

# The outbox thread turns at least this often: queued messages reach the outbox (and, with
# ``flush_after_s: 0``, the spool, in one transaction: the window of results a SIGKILL can
# lose then).
OUTBOX_EVERY_S = 0.02


_NEVER = threading.Event()


def _pause(seconds: float) -> None:
    """time.sleep by a condition wait: libfaketime (the no-RTC tests' wall clock) breaks
    clock_nanosleep with an absolute monotonic deadline, which CPython's sleep uses."""
    _NEVER.wait(seconds)


class _Encodable(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def _as_json(value: object) -> dict[str, Any]:
    """Objects queued as they are (results) are encoded here, on the outbox thread."""
    # getattr, not isinstance against the Protocol: this runs for every result, and a
    # runtime Protocol check costs twice the encoding itself.
    if callable(getattr(value, "to_dict", None)):
        return cast(_Encodable, value).to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class MqttLink:
    """One device's connection to the broker; ``start`` once, ``stop`` once."""

    def __init__(
        self,
        settings: LinkSettings,
        birth: Callable[[], dict[str, Any]],
        on_command: Callable[[Incoming], None] | None = None,
        metrics: Callable[[], dict[str, Any]] | None = None,
        metrics_interval_s: float = 10.0,
        tick: Callable[[], None] | None = None,
        announce: Callable[[], list[tuple[str, bytes]]] | None = None,
    ) -> None:
        self.s = settings
        self.on_command = on_command
        self.metrics = metrics
        self.metrics_interval_s = metrics_interval_s
        self.tick = tick
        self.drained = True
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.net = Connection(settings, birth, announce, self._wake.set, self._stop)
        self.topics = self.net.topics
        # Told when the state directory stops (or starts again) taking writes.
        self.disk_listeners: list[Callable[[DiskState], None]] = []
        self.outbox = Outbox(
            Spool(settings.spool_path, settings.spool_max_bytes, settings.spool_max_age_s),
            settings.boot_id,
            settings.flush_after_s,
            settings.memory_max_bytes,
            on_disk_change=self._disk_changed,
        )
        self._outq: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        # Bytes the outbox holds per watched kind (samples), refreshed once a second.
        self._pending: dict[str, int] = {}
        self._seen_epoch = 0
        self._threads: list[threading.Thread] = []

    # -- what the network thread owns, as the rest of the agent reads it ---------------------
    @property
    def online(self) -> threading.Event:
        return self.net.online

    @property
    def state(self) -> str:
        return self.net.state

    @property
    def v5(self) -> bool:
        return self.net.v5

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.net.open_wake()
        for name, target in (
            ("mqtt-net", self.net.run),
            ("mqtt-out", self._run_out),
            ("mqtt-cmd", self._run_commands),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self, budget_s: float = 1.5) -> None:
        """Say ``stopped``, push out what the outbox holds within ``budget_s``, disconnect;
        what is still unacknowledged then is written to the spool."""
        deadline = time.monotonic() + budget_s
        self._wake.set()
        _pause(0.05)  # let the outbox thread take what was queued last
        while time.monotonic() < deadline - 0.3 and self.online.is_set():
            if not self._outq and self.net.inflight() == 0 and self.drained:
                break
            _pause(0.02)
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.name == "mqtt-out":
                thread.join(max(0.1, deadline - time.monotonic()))
        self.net.closing.set()  # the network thread publishes "stopped" and disconnects
        self.net.wake()
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self.outbox.close()

    # -- what the agent calls ------------------------------------------------------------
    def route(
        self, topic_filter: str, handler: Callable[[Incoming], None], subscribe: bool = True
    ) -> None:
        """Hand messages matching ``topic_filter`` to ``handler``; call before ``start``.

        ``subscribe`` also subscribes to the filter on every connect; without it, the
        subscriptions come from ``subscribe()`` at run time (a download's chunks). The
        handler runs on paho's network thread: it must only hand the message over.
        """
        self.net.route(topic_filter, handler, subscribe)

    def republish_status(self) -> None:
        """Say ``online`` again with a fresh birth body (what serves changed)."""
        self.net.republish_status()

    def enqueue(self, kind: str, body: dict[str, Any]) -> None:
        """Queue a message for the outbox; safe from any thread, never blocks."""
        self._outq.append((kind, body))
        if len(self._outq) >= 64:
            self._wake.set()

    def publish_now(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        properties: Properties | None = None,
        retain: bool = False,
    ) -> None:
        """Publish outside the outbox (replies, retained states); dropped when offline."""
        self.net.publish_now(topic, payload, qos, properties, retain)

    def pending_bytes(self, kind: str) -> int:
        """Bytes of ``kind`` the outbox holds unacknowledged, as of at most a second ago
        (what was queued since is the caller's to add); asking once makes the outbox thread
        keep the figure from then on."""
        return self._pending.setdefault(kind, 0)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and on every reconnect (model chunks)."""
        self.net.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        self.net.unsubscribe(topic)

    def stats(self) -> dict[str, Any]:
        return self.net.stats()

    def reply_properties(self, correlation: bytes | None) -> Properties | None:
        if not self.v5 or correlation is None:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = correlation
        return props

    def _disk_changed(self, disk: DiskState) -> None:
        """On the outbox thread: the state directory failed or works again."""
        event = "state_dir_ok" if disk.ok else "state_dir_full" if disk.full else "state_dir_error"
        body: dict[str, Any] = {"event": event, "ts": time.time()}
        if not disk.ok:
            body["error"] = disk.error
        self.enqueue("events", body)
        for listener in list(self.disk_listeners):
            try:
                listener(disk)
            except Exception:  # a listener's bug must not stop the outbox
                log.exception("disk listener failed")
        self.net.republish_status()

    # -- outbox thread ----------------------------------------------------------------------
    def _run_out(self) -> None:
        last_resend = time.monotonic()
        next_metrics = time.monotonic() + self.metrics_interval_s
        next_pending = time.monotonic()
        while True:
            self._wake.wait(OUTBOX_EVERY_S)
            self._wake.clear()
            try:
                if self.metrics is not None and time.monotonic() >= next_metrics:
                    next_metrics += self.metrics_interval_s
                    self.enqueue("metrics", self.metrics())
                if self.tick is not None:
                    self.tick()
                self._store_queued()
                self._apply_acks()
                if self._pending and time.monotonic() >= next_pending:
                    next_pending = time.monotonic() + 1.0
                    for kind in list(self._pending):
                        self._pending[kind] = self.outbox.bytes_of(self.topics.spooled(kind))
                if self.online.is_set():
                    if self._seen_epoch != self.net.epoch:
                        # A new connection: whatever was sent and not acked goes again.
                        self._seen_epoch = self.net.epoch
                        self.outbox.requeue_unacked()
                    resend_due = time.monotonic() - last_resend > self.s.resend_after_s
                    if self.s.ack_mode == "collector" and resend_due and self.drained:
                        # Sent, PUBACKed, never confirmed by a collector: the broker may
                        # have lost it (no persistence). Send it again.
                        last_resend = time.monotonic()
                        self.outbox.requeue_unacked(self.net.busy_rows())
                    self._publish_window()
                self.outbox.flush()
            except Exception:
                log.exception("outbox step failed")
                _pause(0.5)
            if self._stop.is_set():
                self._store_queued()
                return

    def _store_queued(self) -> None:
        items = []
        while self._outq:
            kind, body = self._outq.popleft()
            seq = self.outbox.next_seq()
            body = {**body, "device": self.s.device, "boot_id": self.s.boot_id, "mseq": seq}
            body.setdefault("ts", time.time())
            try:
                payload = json.dumps(
                    body, separators=(",", ":"), ensure_ascii=False, default=_as_json
                ).encode()
            except (TypeError, ValueError) as exc:
                # One message a plugin made unencodable costs that message, never the others
                # (its mseq stays unused: the floor tells the collector not to wait for it).
                log.error("message not encodable, dropped", kind=kind, error=str(exc))
                continue
            items.append((seq, self.topics.spooled(kind), payload, self.s.qos))
        self.outbox.put_many(items)

    def _apply_acks(self) -> None:
        ids = []
        while True:
            try:
                ids.append(self.net.acks.get_nowait())
            except queue.Empty:
                break
        if self.s.ack_mode == "broker":
            self.outbox.delete(ids)
        while True:
            try:
                payload = self.net.collector_acks.get_nowait()
            except queue.Empty:
                break
            if self.s.ack_mode != "collector":
                continue
            try:
                ack = Ack.model_validate_json(payload)
            except ValueError:
                log.warning("malformed ack ignored", size=len(payload))
                continue
            self.outbox.ack_upto(ack.boot_id, ack.mseq)

    def _publish_window(self) -> None:
        room = self.s.max_inflight - self.net.inflight()
        if room <= 0:
            return
        batch = self.outbox.take(room, self.net.busy_rows())
        self.drained = len(batch) < room
        if not batch:
            return
        floors: dict[str, int] = {}
        sends = []
        for msg in batch:
            if msg.boot_id not in floors:
                floors[msg.boot_id] = self.outbox.floor(msg.boot_id)
            payload = self._final_payload(msg, floors[msg.boot_id])
            sends.append(Send(msg.id, msg.topic, payload, msg.qos, False, None))
        self.net.send(*sends)

    def _final_payload(self, msg: Spooled, floor: int) -> bytes:
        extra = f',"floor":{floor}'
        # Replayed: from an earlier boot, sent before, or made while the link was down.
        backlog = msg.created < self.net.online_since
        if msg.attempts > 0 or msg.boot_id != self.s.boot_id or backlog:
            extra += ',"replayed":true'
        # Stored payloads are JSON objects: splice the publish-time fields in before "}".
        return msg.payload[:-1] + extra.encode() + b"}"

    # -- command thread ---------------------------------------------------------------------
    def _run_commands(self) -> None:
        while not self._stop.is_set():
            try:
                incoming = self.net.commands.get(timeout=0.2)
            except queue.Empty:
                continue
            if self.on_command is None:
                continue
            try:
                self.on_command(incoming)
            except Exception:
                log.exception("command handler failed", topic=incoming.topic)
