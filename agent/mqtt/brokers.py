"""Broker addresses: URLs, a cluster's list and which of them next, a socket setting."""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.errors import UserError

if TYPE_CHECKING:
    from edgefleet.mqtt.settings import LinkSettings

log = structlog.get_logger(__name__)


def no_delay(client: mqtt.Client) -> None:
    """Send each packet at once (TCP_NODELAY), as the broker side should too.

    paho leaves Nagle's algorithm on: a small packet (a SUBSCRIBE, an ack) written while an
    earlier one is unacknowledged waits for that ACK, which the peer may delay by up to 40
    ms. Measured here: a model download's SUBSCRIBE answered after 33 ms while the agent was
    reporting, after 1 ms with this set.
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):  # an SSLSocket is one too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise UserError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise UserError(f"broker URL {url!r} has no host")
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def parse_urls(text: str | list[str]) -> list[tuple[str, int, bool]]:
    """Brokers of one cluster, from a list or a comma-separated string; one TLS mode for all."""
    urls = [u.strip() for u in text.split(",")] if isinstance(text, str) else text
    brokers = [parse_url(url) for url in urls if url]
    if not brokers:
        raise UserError("no broker URL given")
    if len({tls for _, _, tls in brokers}) > 1:
        raise UserError("broker URLs: use mqtt:// for all of them or mqtts:// for all of them")
    return brokers


def next_broker(client: mqtt.Client, brokers: list[tuple[str, int, bool]], index: int) -> int:
    """Point paho's own reconnection at the next broker of the list; the new index."""
    if len(brokers) < 2:
        return index
    following = (index + 1) % len(brokers)
    host, port, _ = brokers[following]
    try:
        client.host, client.port = host, port
    except RuntimeError:  # still connected: paho keeps the current one
        return index
    return following


class Rotation:
    """Brokers of one cluster: start at a random one (a fleet spreads over the nodes), move
    to the next at once on failure, wait the backoff only once every broker failed in a
    row, stay where it works."""

    def __init__(self, urls: list[str], stop: threading.Event) -> None:
        self.brokers = [parse_url(url) for url in urls]
        self._index = random.randrange(len(self.brokers))  # noqa: S311 - load spreading
        self._failed_in_a_row = 0
        self._stop = stop

    def current(self) -> tuple[str, int, bool]:
        return self.brokers[self._index]

    def worked(self) -> None:
        self._failed_in_a_row = 0

    def failed(self, delay: float, max_delay: float, reason: str, quiet: bool = False) -> float:
        """After a failure: the next broker at once, or the backoff; the next delay.
        ``quiet``: the same reason as last time, logged at debug only (no line per retry)."""
        say = log.debug if quiet else log.info
        self._failed_in_a_row += 1
        if len(self.brokers) > 1:
            self._index = (self._index + 1) % len(self.brokers)
            if self._failed_in_a_row % len(self.brokers):
                host, port, _ = self.brokers[self._index]
                say("mqtt trying the next broker", reason=reason, broker=f"{host}:{port}")
                self._stop.wait(random.uniform(0.05, 0.25))  # noqa: S311 - jitter
                return delay
        # Full jitter: a fleet that lost its broker does not come back in lockstep.
        wait = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not crypto
        say("mqtt reconnect scheduled", reason=reason, retry_in=round(wait, 2))
        self._stop.wait(wait)
        return min(max_delay, delay * 2)


def device_client(s: LinkSettings, tls: bool) -> mqtt.Client:
    """A fresh paho client for one connection of a device (no state of a dead session)."""
    v5 = s.protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=s.device,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else True,
    )
    if s.username is not None:
        client.username_pw_set(s.username, s.password)
    if tls:
        context = ssl.create_default_context(cafile=str(s.ca) if s.ca else None)
        if s.cert is not None:
            context.load_cert_chain(str(s.cert), str(s.key) if s.key else None)
        client.tls_set_context(context)
        if s.server_name:
            # SNI/verification name differs from the address dialled.
            client._tls_server_name = s.server_name  # type: ignore[attr-defined]
    client.max_inflight_messages_set(s.max_inflight)
    client.max_queued_messages_set(0)  # the outbox queues, paho never does
    return client
