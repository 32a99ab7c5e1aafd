"""The topics a link subscribes to on every connection, and refused ones asked for again.

The network thread subscribes to everything in ``on_connect`` (one SUBSCRIBE) and says
``online`` only once that SUBACK came. Subscriptions added at run time (a download's chunks)
are queued by any thread and made by the network thread. A broker may refuse single
subscriptions (NATS does, SUBACK 0x80, while it elects leaders after losing a node): those
are asked for again on the same connection after 1 s, doubling up to 60 s, until granted.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Protocol

import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.protocol import Topics

log = structlog.get_logger(__name__)

SUB_RETRY_MIN_S = 1.0  # a refused subscription is asked for again after this, doubling
SUB_RETRY_MAX_S = 60.0
BATCH = 100  # topics per SUBSCRIBE or UNSUBSCRIBE made at run time


class Subscriber(Protocol):
    """The part of a paho client this module uses."""

    def subscribe(self, topic: Any) -> tuple[MQTTErrorCode, int | None]: ...

    def unsubscribe(self, topic: str | list[str]) -> tuple[MQTTErrorCode, int | None]: ...


class Subscriptions:
    """Owned by the network thread; ``want``/``unwant`` may be called from any thread."""

    def __init__(self, topics: Topics, groups: list[str], v5: bool) -> None:
        self.topics = topics
        self.groups = groups
        self.v5 = v5
        self._static: list[str] = []
        self._dynamic: dict[str, int] = {}  # topic -> QoS
        # (topic, subscribe or not, QoS): made by the network thread in this order.
        self._requests: collections.deque[tuple[str, bool, int]] = collections.deque()
        self._first_mid: int | None = None
        # Every SUBSCRIBE in flight (mid -> topics), and those a broker refused.
        self._in_flight: dict[int, list[str]] = {}
        self._retry: set[str] = set()
        self._retry_mids: set[int] = set()
        self._retry_at = 0.0
        self._retry_delay = SUB_RETRY_MIN_S

    def add_static(self, topic: str) -> None:
        """Subscribe to ``topic`` on every connection (before the link starts)."""
        self._static.append(topic)

    def want(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and on every reconnect (model chunks)."""
        self._dynamic[topic] = qos
        self._requests.append((topic, True, qos))

    def unwant(self, topic: str) -> None:
        self._dynamic.pop(topic, None)
        self._requests.append((topic, False, 1))

    def wanted(self) -> list[str]:
        """Every topic subscribed to on each connection, in a stable order."""
        topics = [self.topics.commands, self.topics.ack, *self._static]
        topics += [self.topics.group_commands(g) for g in self.groups]
        return topics + sorted(self._dynamic)

    def on_connect(self, client: Subscriber) -> None:
        """A new connection: one SUBSCRIBE for everything; its SUBACK means online."""
        self._requests.clear()
        self._in_flight.clear()
        self._retry.clear()
        self._retry_mids.clear()
        self._retry_delay = SUB_RETRY_MIN_S
        self._first_mid = self._subscribe(client, self.wanted())

    def _subscribe(
        self, client: Subscriber, topics: list[str], qos: dict[str, int] | None = None
    ) -> int | None:
        """One SUBSCRIBE for ``topics`` (QoS 1 unless one was asked for at 0); its mid,
        remembered until the SUBACK."""
        subs: list[tuple[str, Any]]
        levels = [(qos or self._dynamic).get(t, 1) for t in topics]
        if self.v5:
            subs = [
                (t, SubscribeOptions(qos=q, noLocal=True))
                for t, q in zip(topics, levels, strict=True)
            ]
        else:
            subs = list(zip(topics, levels, strict=True))
        result, mid = client.subscribe(subs)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        self._in_flight[mid] = topics
        return mid

    def pump(self, client: Subscriber) -> None:
        """Online: make the queued (un)subscriptions and the retries that are due."""
        while self._requests:
            # A download by hash asks for hundreds of topics at once: runs of the same kind
            # go in one packet each (up to BATCH topics), in the order they were asked for.
            wanted = self._requests[0][1]
            batch: dict[str, int] = {}  # topic -> QoS, as asked for
            while self._requests and self._requests[0][1] == wanted and len(batch) < BATCH:
                topic, _, qos = self._requests.popleft()
                batch[topic] = qos
            if wanted:
                self._subscribe(client, list(batch), batch)
            else:
                self._retry.difference_update(batch)
                client.unsubscribe(list(batch))
        if self._retry and time.monotonic() >= self._retry_at:
            again = sorted(self._retry.intersection(self.wanted()))
            self._retry.clear()
            mid = self._subscribe(client, again) if again else None
            if mid is not None:
                self._retry_mids.add(mid)

    def on_suback(self, mid: int, reason_codes: list[ReasonCode]) -> bool:
        """Note a SUBACK; True when it answers the connection's first SUBSCRIBE."""
        topics = self._in_flight.pop(mid, [])
        # strict=False: a broker that answers with fewer codes must not kill paho's thread.
        refused = [t for t, rc in zip(topics, reason_codes, strict=False) if rc.is_failure]
        if refused:
            again = set(refused).intersection(self.wanted())
            log.error(
                "broker refused subscriptions",
                topics=refused,
                reasons=[str(rc) for rc in reason_codes if rc.is_failure],
                retry_in_s=self._retry_delay if again else None,
            )
            if again:
                self._retry |= again
                self._retry_at = time.monotonic() + self._retry_delay
                self._retry_delay = min(SUB_RETRY_MAX_S, self._retry_delay * 2)
        elif mid in self._retry_mids:
            log.info("broker granted subscriptions on a retry", topics=topics)
            self._retry_delay = SUB_RETRY_MIN_S
        self._retry_mids.discard(mid)
        return mid == self._first_mid
