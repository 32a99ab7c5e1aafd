"""The fleet-side collector: stores what devices report, and acknowledges it.

``edgefleet collect --broker mqtt://host --db sqlite:///fleet.db`` (or ``postgresql://...``).
Messages are stored idempotently (a result by boot id + seq, a message by boot id + mseq),
so re-sent messages are harmless. After each commit the collector publishes, per device boot,
the highest *contiguous* mseq it has stored to ``{prefix}/devices/{id}/ack``: devices in
``collector`` ack mode delete their spool only up to there, so a broker that dies without
persistence loses nothing. Each message's ``floor`` tells the collector below which mseq the
device holds nothing more (acked or dropped), so gaps the device can never fill do not stall
the acks.

With MQTT 5, predictions/metrics are read through a shared subscription (``$share/GROUP/...``)
so several collectors can split the load; status is read by each (retained messages are not
delivered to shared subscriptions).
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.collector.samples import SampleIntake, SampleSettings
from edgefleet.collector.store import Cursor, Store, Stored, json_object, lenient_object, place
from edgefleet.dashboard.feed import feed
from edgefleet.dashboard.view import FleetView
from edgefleet.mqtt.brokers import next_broker, no_delay, parse_urls
from edgefleet.protocol import (
    DEFAULT_PREFIX,
    SPOOLED_KINDS,
    FleetTopics,
)

log = structlog.get_logger(__name__)
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: a login with the same client id
TAKEN_OVER_RETRY_S = 60
# (kind, device, body) of each stored message, for a live display
Echo = Callable[[str, str, dict[str, Any]], None]


@dataclass
class CollectorSettings:
    broker: str
    db: str = "sqlite:///edgefleet-collector.db"
    prefix: str = DEFAULT_PREFIX
    protocol: str = "5"
    share_group: str | None = "edgefleet-collectors"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    samples: SampleSettings = field(default_factory=SampleSettings)


class Collector:
    """Subscribes, stores in batches, acks after each commit."""

    def __init__(
        self,
        settings: CollectorSettings,
        echo: Echo | None = None,
        say: Callable[[str], None] | None = None,
        view: FleetView | None = None,
    ) -> None:
        self.s = settings
        self.echo = echo  # for live display
        self.view = view  # the dashboard's live state: fed what is stored, after commit
        self.say = say or (lambda _text: None)  # connection news for a person watching
        self._failures = 0
        # A comma list names brokers of one cluster: start at a random one, paho's own
        # reconnection moves to the next after a failure. Checked before the database opens.
        self.brokers = parse_urls(settings.broker)
        self.store = Store(settings.db)
        self.samples = SampleIntake(self.store, settings.samples)
        self._broker = random.randrange(len(self.brokers))  # noqa: S311 - load spreading
        self.host, self.port, self.tls = self.brokers[self._broker]
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=100_000)
        self._stop = threading.Event()
        self.stored = 0
        self.rejected = 0
        self.connected = threading.Event()
        self.client = self._make_client()
        self._worker = threading.Thread(target=self._run, name="collector-store", daemon=True)

    def _make_client(self) -> mqtt.Client:
        v5 = self.s.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.s.client_id or f"edgefleet-collector-{int(time.time() * 1000) % 10**9}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        if self.s.username is not None:
            client.username_pw_set(self.s.username, self.s.password)
        if self.tls:
            client.tls_set(
                ca_certs=str(self.s.ca) if self.s.ca else None,
                certfile=str(self.s.cert) if self.s.cert else None,
                keyfile=str(self.s.key) if self.s.key else None,
            )
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _rotate(self, client: mqtt.Client) -> None:
        if not self._stop.is_set():
            self._broker = next_broker(client, self.brokers, self._broker)
            self.host, self.port, _ = self.brokers[self._broker]

    def _on_connect_fail(self, client: mqtt.Client, _userdata: Any) -> None:
        # paho retries with its backoff (1 s doubling to 10 s); say so, less often over time.
        self._rotate(client)
        self._failures += 1
        if self._failures in (1, 2, 5) or self._failures % 30 == 0:
            self.say(
                f"collector: cannot reach {self.host}:{self.port} "
                f"({self._failures} attempts); retrying every 1-10 s"
            )

    def subscriptions(self) -> list[str]:
        topics = FleetTopics(self.s.prefix)
        shared = self.s.protocol == "5" and self.s.share_group
        data = [topics.every_device(leaf) for leaf in SPOOLED_KINDS]
        if shared:
            data = [f"$share/{self.s.share_group}/{topic}" for topic in data]
        watched = []
        if self.view is not None:
            # Read-only for the view (not stored): rollout states and desired models, retained.
            watched = [
                topics.every_device("rollout"),
                topics.every_device("model/desired"),
                topics.every_group("model/desired"),
            ]
        return [topics.every_device("status"), *data, *watched]

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            log.error("collector: broker refused connection", reason=str(rc))
            self.say(f"collector: {self.host}:{self.port} refused the connection: {rc}")
            return
        no_delay(client)  # acks go out at once, not behind Nagle's algorithm
        client.subscribe([(topic, 1) for topic in self.subscriptions()])
        self.connected.set()
        self._failures = 0
        log.info("collector connected", broker=f"{self.host}:{self.port}")
        self.say(f"collector: connected to {self.host}:{self.port}")

    def _on_disconnect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self.connected.clear()
        if self._stop.is_set():
            return
        if rc.value == SESSION_TAKEN_OVER:
            # Another collector logged in with this identity (the shipped broker makes the
            # user name the client id): coming straight back would only throw it out in turn.
            log.error(
                "another client logged in with this collector's identity and took its session; "
                "give each collector its own (edgefleet broker add-collector); retrying slowly",
                retry_in_s=TAKEN_OVER_RETRY_S,
            )
            client.reconnect_delay_set(TAKEN_OVER_RETRY_S, TAKEN_OVER_RETRY_S)
        else:
            log.warning("collector disconnected", reason=str(rc))
            client.reconnect_delay_set(1, 10)
        self._rotate(client)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.view is not None and self._watch(self.view, msg.topic, bytes(msg.payload)):
            return
        try:
            self._inbox.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self.rejected += 1  # not acked, so the devices keep it and send it again

    def _watch(self, view: FleetView, topic: str, payload: bytes) -> bool:
        """Rollout states and desired models go to the view only; False for what is stored."""
        if not topic.endswith(("/rollout", "/model/desired")):
            return False
        return feed(view, topic, payload)

    def start(self) -> None:
        self._worker.start()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self._stop.set()
        self._worker.join(5)
        self.client.disconnect()
        self.client.loop_stop()
        self.store.close()

    def _drain(self, limit: int = 500) -> list[tuple[str, bytes]]:
        items = []
        try:
            items.append(self._inbox.get(timeout=0.1))
            while len(items) < limit:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _run(self) -> None:
        while not self._stop.is_set() or not self._inbox.empty():
            batch = self._drain()
            if self.samples.prune_due():
                try:
                    self.samples.prune()
                except Exception:
                    log.exception("sample retention failed; tried again in a minute")
                    self.store.rollback()
            if batch:
                try:
                    self._store_batch(batch)
                except Exception:
                    log.exception("collector batch failed; not acked, devices will resend")
                    self.store.rollback()

    def _store_one(
        self, cur: Cursor, device: str, kind: str, payload: bytes, stored: list[Stored]
    ) -> tuple[str, str, int] | None:
        """Store one message; (device, boot_id, floor) when it counts toward an ack."""
        body = json_object(payload)
        if kind == "status":
            self.store.save_status(cur, device, body)
            stored.append((kind, device, body))
            return None
        boot_id, mseq, floor = place(body)
        if kind == "samples":
            # The piece's bytes live with the sample; the message row keeps its place only.
            if not self.store.has_message(cur, boot_id, mseq):
                self.samples.take(cur, device, body)
            body = {k: v for k, v in body.items() if k not in ("data", "meta")}
        self.store.save_message(cur, kind, device, body)
        stored.append((kind, device, body))
        # The newest floor is the highest: the device only ever lets go of old messages.
        return device, boot_id, floor

    def _reject(
        self, cur: Cursor, device: str, payload: bytes, exc: Exception
    ) -> tuple[str, str, int] | None:
        """Count a message that cannot be stored; keep its place when it names one.

        A message that still says which boot and mseq it is gets a ``rejected`` row, so the
        acknowledgement moves past it: a device resending it forever would stall every
        message behind it. One that does not say is only counted and logged.
        """
        self.rejected += 1
        log.warning("collector: message rejected", device=device, error=type(exc).__name__)
        try:
            boot_id, mseq, floor = place(lenient_object(payload))
        except Exception:  # noqa: BLE001 - nothing usable in it: counted, skipped
            return None
        cur.execute("SAVEPOINT rejected")
        try:
            self.store.save_rejected(cur, device, boot_id, mseq, f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001
            cur.execute("ROLLBACK TO SAVEPOINT rejected")
            cur.execute("RELEASE SAVEPOINT rejected")
            return None
        cur.execute("RELEASE SAVEPOINT rejected")
        return device, boot_id, floor

    def _store_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """Store a batch in one transaction, then acknowledge what it completed.

        Fast path: the whole batch as it is. When one message fails (malformed, hostile, too
        large for a column) the transaction is rolled back and the batch stored again with a
        savepoint per message, so that message is undone alone and every other one commits.
        """
        try:
            touched, stored = self._store_all(batch, isolate=False)
        except Exception:  # noqa: BLE001 - a bad message: again, one message at a time
            self.store.rollback()
            touched, stored = self._store_all(batch, isolate=True)
        acks = {
            key: self.store.advance(self.store.cursor(), key[0], key[1], floor)
            for key, floor in touched.items()
        }
        self.store.commit()
        self.stored += sum(kind != "status" for kind, _, _ in stored)
        for kind, device, body in stored:
            if self.view is not None:
                self.view.observe(kind, device, body)
            if self.echo is not None:
                self.echo(kind, device, body)
        for (device, boot_id), mseq in acks.items():
            self.client.publish(
                FleetTopics(self.s.prefix).device(device).ack,
                json.dumps({"boot_id": boot_id, "mseq": mseq}),
                qos=1,
            )

    def _store_all(
        self, batch: list[tuple[str, bytes]], isolate: bool
    ) -> tuple[dict[tuple[str, str], int], list[Stored]]:
        cur = self.store.cursor()
        touched: dict[tuple[str, str], int] = {}
        stored: list[Stored] = []
        for topic, payload in batch:
            parts = topic.split("/")
            if len(parts) < 3 or parts[-3] != "devices":
                continue
            device, kind = parts[-2], parts[-1]
            if not isolate:
                key = self._store_one(cur, device, kind, payload, stored)
            else:
                cur.execute("SAVEPOINT message")
                try:
                    key = self._store_one(cur, device, kind, payload, stored)
                except Exception as exc:  # noqa: BLE001 - one message never costs another
                    cur.execute("ROLLBACK TO SAVEPOINT message")
                    key = self._reject(cur, device, payload, exc)
                cur.execute("RELEASE SAVEPOINT message")
            if key is not None:
                touched[key[:2]] = max(touched.get(key[:2], 1), key[2])
        return touched, stored
