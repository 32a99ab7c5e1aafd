"""A read-only fleet watcher: the fleet view fed straight from the broker (``edgefleet top``).

Subscribes (not shared) to every device's status, metrics, predictions and rollout state and
to the desired models; stores nothing and acknowledges nothing, so it can run beside the
collectors anywhere an operator has read access.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.dashboard.feed import feed
from edgefleet.dashboard.view import DEVICE_LEAVES, FleetView
from edgefleet.mqtt.brokers import next_broker, parse_urls
from edgefleet.protocol import DEFAULT_PREFIX, FleetTopics

log = structlog.get_logger(__name__)


class FleetWatcher:
    """One MQTT connection feeding a fleet view."""

    def __init__(
        self,
        url: str,
        view: FleetView,
        prefix: str = DEFAULT_PREFIX,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
    ) -> None:
        self.view = view
        self.prefix = prefix
        self.brokers = parse_urls(url)
        self._broker = random.randrange(len(self.brokers))  # noqa: S311 - load spreading
        self.host, self.port, tls = self.brokers[self._broker]
        self.refused: str | None = None
        # Set once every broker of the list failed to connect (refused, unreachable): a
        # command says so at once instead of waiting out its timeout.
        self.unreachable: str | None = None
        self._failed: set[tuple[str, int]] = set()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-watch-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=str(ca) if ca else None)
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_connect_fail = lambda client, _u: self._connect_failed(client)
        self.client.on_disconnect = lambda client, *_: self._rotate(client)

    def _connect_failed(self, client: mqtt.Client) -> None:
        self._failed.add((self.brokers[self._broker][0], self.brokers[self._broker][1]))
        if len(self._failed) >= len(self.brokers) and self.unreachable is None:
            self.unreachable = (
                "no broker accepts a connection ("
                + ", ".join(f"{host}:{port}" for host, port in sorted(self._failed))
                + ")"
            )
        self._rotate(client)

    def _rotate(self, client: mqtt.Client) -> None:
        if self.refused is None:
            self._broker = next_broker(client, self.brokers, self._broker)

    def topics(self) -> list[str]:
        fleet = FleetTopics(self.prefix)
        return [fleet.every_device(leaf) for leaf in (*DEVICE_LEAVES, "model/desired")] + [
            fleet.every_group("model/desired")
        ]

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            self.refused = str(rc)
            client.disconnect()  # never retry refused credentials
            return
        client.subscribe([(topic, 0) for topic in self.topics()])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            feed(self.view, msg.topic, bytes(msg.payload))
        except Exception:  # noqa: BLE001 - one bad message never stops the view
            log.warning("watch: message skipped", topic=msg.topic)

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.is_connected() or self.refused or self.unreachable:
                return self.client.is_connected()
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
