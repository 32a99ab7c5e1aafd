"""The device's MQTT connection: presence, durable outbox, commands in.

Three threads, none of which ever blocks the classification loop:

* ``mqtt-net``: owns paho. It connects (a fresh client per connection, so no state from a
  dead session leaks into the next), runs the network loop, publishes what the outbox
  thread handed it and maps message ids to spool rows; PUBACKs are handled on this same
  thread, so an ack can never race the bookkeeping of its publish. Reconnects use
  exponential backoff with jitter. A refused CONNACK is never "connected"; bad credentials
  or not-authorised are logged once and retried slowly (no reconnect storm).
* ``mqtt-out``: moves queued messages into the SQLite spool, hands spooled messages to the
  network thread while the link is up (a bounded in-flight window), deletes on
  acknowledgement, requeues what was in flight when the link dropped, emits metrics.
* ``mqtt-cmd``: runs command handlers. paho's callbacks only hand messages over.

Subscriptions are made in ``on_connect``; the birth message goes out only after the broker
acknowledged them, so a device never says "online" while deaf to commands.
"""

from __future__ import annotations

import collections
import contextlib
import json
import queue
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.errors import UserError
from edgefleet.mqtt.spool import Spool, Spooled
from edgefleet.mqtt.topicfilter import TopicFilter
from edgefleet.protocol import Ack, Topics

log = structlog.get_logger(__name__)

AUTH_FAILURES = {134, 135, 140}  # bad user name or password, not authorised, bad auth method
PUBLISH_REFUSED_LOG_EVERY = 100
SUB_RETRY_MIN_S = 1.0  # a refused subscription is asked for again after this, doubling
SUB_RETRY_MAX_S = 60.0
# The network thread sleeps in select() at most this long when nothing happens (paho's
# keepalive is checked on each turn); work from other threads wakes it at once.
NET_IDLE_S = 0.5
# Queued messages reach the spool in one transaction at least this often (group commit):
# the window of results a SIGKILL can lose.
SPOOL_EVERY_S = 0.02


@dataclass
class LinkSettings:
    """Everything the link needs, decoupled from the config model that produced it."""

    url: str
    device: str
    groups: list[str]
    prefix: str
    boot_id: str
    spool_path: Path
    protocol: str = "5"
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    keepalive_s: int = 30
    qos: int = 1
    ack_mode: str = "broker"
    spool_max_bytes: int = 64 * 1024 * 1024
    spool_max_age_s: float = 7 * 24 * 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    auth_retry_s: float = 300.0
    max_inflight: int = 200
    resend_after_s: float = 30.0
    max_command_bytes: int = 64 * 1024
    urls: list[str] | None = None  # a cluster's brokers; ``url`` alone when None


@dataclass
class _Send:
    """A publish handed from another thread to the network thread."""

    row: int | None  # spool row id; None for status and replies
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None


@dataclass
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


class _Encodable(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def _as_json(value: object) -> dict[str, Any]:
    """Objects queued as they are (results) are encoded here, on the outbox thread."""
    # getattr, not isinstance against the Protocol: this runs for every result, and a
    # runtime Protocol check costs twice the encoding itself.
    if callable(getattr(value, "to_dict", None)):
        return cast(_Encodable, value).to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


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


def _wake_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking sockets: write one end to end a select() on the other."""
    pair = socket.socketpair()
    for end in pair:
        end.setblocking(False)
    return pair


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


def _command_filters(topics: Topics, groups: list[str]) -> list[TopicFilter]:
    """The device's own command topic and its groups' (fixed for the link's life)."""
    return [TopicFilter(t) for t in (topics.commands, *map(topics.group_commands, groups))]


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
        self.topics = Topics(settings.prefix, settings.device)
        self.birth = birth
        self.on_command = on_command
        # (topic filter, handler) pairs; handlers run on paho's thread and only hand over.
        self._routes: list[tuple[TopicFilter, Callable[[Incoming], None]]] = []
        self._command_filters = _command_filters(self.topics, settings.groups)
        self._static: list[str] = []
        self.metrics = metrics
        self.metrics_interval_s = metrics_interval_s
        self.tick = tick
        # Retained (topic, payload) pairs published right after each birth (HA discovery).
        self.announce = announce
        self.drained = True
        self.online_since = 0.0
        self._sends: collections.deque[_Send] = collections.deque()
        self._dynamic: set[str] = set()
        self._sub_requests: collections.deque[tuple[str, bool]] = collections.deque()
        # Brokers of one cluster: start at a random one (a fleet spreads over the nodes),
        # move to the next on failure, stay where it works.
        self.brokers = [parse_url(url) for url in settings.urls or [settings.url]]
        self._broker = random.randrange(len(self.brokers))  # noqa: S311 - load spreading
        self._failed_in_a_row = 0
        self.host, self.port, self.tls = self.brokers[self._broker]
        self.spool = Spool(
            settings.spool_path,
            settings.boot_id,
            settings.spool_max_bytes,
            settings.spool_max_age_s,
        )
        self._outq: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._collector_acks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._commands: queue.Queue[Incoming] = queue.Queue(maxsize=64)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._mids: dict[int, int] = {}
        self._sub_mid: int | None = None
        # Every SUBSCRIBE in flight (mid -> topics), and those a broker refused, tried again
        # on this connection after a doubling delay: a clustered broker (NATS) refuses
        # subscriptions while it elects leaders after losing a node.
        self._subs_in_flight: dict[int, list[str]] = {}
        self._sub_retry: set[str] = set()
        self._sub_retry_mids: set[int] = set()
        self._sub_retry_at = 0.0
        self._sub_retry_delay = SUB_RETRY_MIN_S
        self._closing = threading.Event()
        self._closed = threading.Event()
        # Written to when another thread queues work for the network thread (a send, a
        # subscription, the stop): its select() returns at once instead of polling.
        self._net_wake: tuple[socket.socket, socket.socket] | None = None  # made by start()
        self.online = threading.Event()
        self._epoch = 0
        self._seen_epoch = 0
        self.state = "disconnected"
        self.last_error = ""
        self.auth_failed = False
        self.connects = 0
        self.refused = 0
        self.commands_dropped = 0
        self.publish_refused = 0
        self.client: mqtt.Client | None = None
        self._threads: list[threading.Thread] = []

    # -- client ----------------------------------------------------------------------------
    @property
    def v5(self) -> bool:
        return self.s.protocol == "5"

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.s.device,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else True,
        )
        if self.s.username is not None:
            client.username_pw_set(self.s.username, self.s.password)
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.s.ca) if self.s.ca else None)
            if self.s.cert is not None:
                context.load_cert_chain(str(self.s.cert), str(self.s.key) if self.s.key else None)
            client.tls_set_context(context)
            if self.s.server_name:
                # SNI/verification name differs from the address dialled.
                client._tls_server_name = self.s.server_name  # type: ignore[attr-defined]
        client.max_inflight_messages_set(self.s.max_inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _status_payload(self, state: str) -> bytes:
        body = {
            "state": state,
            "device": self.s.device,
            "boot_id": self.s.boot_id,
            "ts": time.time(),
        }
        if state == "online":
            body.update(self.birth())
        return json.dumps(body, separators=(",", ":")).encode()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._net_wake = _wake_pair()
        for name, target in (
            ("mqtt-net", self._run_net),
            ("mqtt-out", self._run_out),
            ("mqtt-cmd", self._run_commands),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self, budget_s: float = 1.5) -> None:
        """Say ``stopped``, push out what the spool holds within ``budget_s``, disconnect."""
        deadline = time.monotonic() + budget_s
        self._wake.set()
        time.sleep(0.05)  # let the outbox thread spool what was queued last
        while time.monotonic() < deadline - 0.3 and self.online.is_set():
            if not self._outq and self.spool_inflight() == 0 and self.drained:
                break
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.name == "mqtt-out":
                thread.join(max(0.1, deadline - time.monotonic()))
        self._closing.set()  # the network thread publishes "stopped" and disconnects
        self._wake_net()
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self.spool.close()

    # -- what the agent calls ------------------------------------------------------------
    def route(
        self, topic_filter: str, handler: Callable[[Incoming], None], subscribe: bool = True
    ) -> None:
        """Hand messages matching ``topic_filter`` to ``handler``; call before ``start``.

        ``subscribe`` also subscribes to the filter on every connect; without it, the
        subscriptions come from ``subscribe()`` at run time (a download's chunks). The
        handler runs on paho's network thread: it must only hand the message over.
        """
        self._routes.append((TopicFilter(topic_filter), handler))
        if subscribe:
            self._static.append(topic_filter)

    def republish_status(self) -> None:
        """Say ``online`` again with a fresh birth body (what serves changed)."""
        if self.online.is_set():
            self.publish_now(self.topics.status, self._status_payload("online"), qos=1, retain=True)

    def enqueue(self, kind: str, body: dict[str, Any]) -> None:
        """Queue a message for the spool; safe from any thread, never blocks."""
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
        """Publish outside the spool (replies, retained states); dropped when offline."""
        if self.online.is_set():
            self._sends.append(_Send(None, topic, payload, qos, retain, properties))
            self._wake_net()

    def subscribe(self, topic: str) -> None:
        """Add a subscription now and on every reconnect (model chunks)."""
        self._dynamic.add(topic)
        self._sub_requests.append((topic, True))
        self._wake_net()

    def unsubscribe(self, topic: str) -> None:
        self._dynamic.discard(topic)
        self._sub_requests.append((topic, False))
        self._wake_net()

    def _wake_net(self) -> None:
        if self._net_wake is not None:  # not before start(): the thread reads its work then
            with contextlib.suppress(OSError):  # already woken (buffer full) or closed
                self._net_wake[1].send(b"\0")

    def spool_inflight(self) -> int:
        with self._lock:
            return len(self._mids) + sum(1 for x in self._sends if x.row is not None)

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "broker": f"{self.host}:{self.port}",
            "connects": self.connects,
            "refused": self.refused,
            "commands_dropped": self.commands_dropped,
            "publish_refused": self.publish_refused,
        }

    # -- paho callbacks (network thread: hand over, never work) ---------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason_code: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.refused += 1
            self.state = "refused"
            self.last_error = str(reason_code)
            self.auth_failed = reason_code.value in AUTH_FAILURES
            return
        self.connects += 1
        self.auth_failed = False
        self.state = "subscribing"
        topics = self._wanted_topics()
        self._sub_requests.clear()
        self._subs_in_flight.clear()
        self._sub_retry.clear()
        self._sub_retry_mids.clear()
        self._sub_retry_delay = SUB_RETRY_MIN_S
        self._sub_mid = self._subscribe(client, topics)

    def _subscribe(self, client: mqtt.Client, topics: list[str]) -> int | None:
        """One SUBSCRIBE for ``topics`` at QoS 1; its mid, remembered until the SUBACK."""
        subs: list[tuple[str, Any]]
        if self.v5:
            subs = [(t, SubscribeOptions(qos=1, noLocal=True)) for t in topics]
        else:
            subs = [(t, 1) for t in topics]
        result, mid = client.subscribe(subs)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        self._subs_in_flight[mid] = topics
        return mid

    def _wanted_topics(self) -> list[str]:
        """Every topic this link subscribes to on each connection, in a stable order."""
        topics = [self.topics.commands, self.topics.ack, *self._static]
        topics += [self.topics.group_commands(g) for g in self.s.groups]
        return topics + sorted(self._dynamic)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        topics = self._subs_in_flight.pop(mid, [])
        # strict=False: a broker that answers with fewer codes must not kill paho's thread.
        refused = [t for t, rc in zip(topics, reason_codes, strict=False) if rc.is_failure]
        if refused:
            again = set(refused).intersection(self._wanted_topics())
            log.error(
                "broker refused subscriptions",
                topics=refused,
                reasons=[str(rc) for rc in reason_codes if rc.is_failure],
                retry_in_s=self._sub_retry_delay if again else None,
            )
            if again:
                self._sub_retry |= again
                self._sub_retry_at = time.monotonic() + self._sub_retry_delay
                self._sub_retry_delay = min(SUB_RETRY_MAX_S, self._sub_retry_delay * 2)
        elif mid in self._sub_retry_mids:
            log.info("broker granted subscriptions on a retry", topics=topics)
            self._sub_retry_delay = SUB_RETRY_MIN_S
        self._sub_retry_mids.discard(mid)
        if mid != self._sub_mid:
            return
        client.publish(self.topics.status, self._status_payload("online"), qos=1, retain=True)
        for topic, payload in self.announce() if self.announce is not None else []:
            client.publish(topic, payload, qos=1, retain=True)
        self.state = "online"
        self._failed_in_a_row = 0
        self.online_since = time.time()
        self._epoch += 1
        self.online.set()
        self._wake.set()
        log.info("mqtt online", broker=f"{self.host}:{self.port}", protocol=self.s.protocol)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason_code: ReasonCode,
        _props: Properties | None,
    ) -> None:
        was_online = self.online.is_set()
        self.online.clear()
        if self.state != "refused":
            self.state = "disconnected"
        if was_online and not self._closing.is_set():
            log.warning("mqtt link down", reason=str(reason_code))

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._lock:
            row = self._mids.pop(mid, None)
            full = len(self._mids) + 1 >= self.s.max_inflight
        if row is None:
            return  # status, replies: not spooled
        if reason_code.is_failure:
            # The broker will never take this one (ACL, quota): drop it rather than loop.
            self.publish_refused += 1
            if self.publish_refused % PUBLISH_REFUSED_LOG_EVERY == 1:
                log.error("broker refused a publish", reason=str(reason_code))
        self._acks.put(row)
        if full:
            # A send waits for this room: now. Otherwise the outbox's next tick takes the
            # acknowledgement; a wake-up per message costs an invoke on a 2-core board.
            self._wake.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic  # paho decodes it on every access
        props = getattr(msg, "properties", None)
        incoming = Incoming(
            topic=topic,
            payload=bytes(msg.payload),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation=getattr(props, "CorrelationData", None) if props else None,
        )
        if topic == self.topics.ack:
            self._take_ack(incoming.payload)
            return
        parts = topic.split("/")  # once per message, for every filter below
        if any(f.matches_levels(parts) for f in self._command_filters):
            self._take_command(incoming)
            return
        for topic_filter, handler in self._routes:
            if topic_filter.matches_levels(parts):
                try:
                    handler(incoming)
                except Exception:  # a handler's bug must not kill paho's thread
                    log.exception("message handler failed", topic=topic)

    def _take_command(self, incoming: Incoming) -> None:
        try:
            self._commands.put_nowait(incoming)
        except queue.Full:
            self.commands_dropped += 1

    def _take_ack(self, payload: bytes) -> None:
        self._collector_acks.put(payload)  # parsed on the outbox thread
        self._wake.set()

    # -- network thread --------------------------------------------------------------------
    def _run_net(self) -> None:
        delay = self.s.reconnect_min_s
        while not self._stop.is_set() and not self._closing.is_set():
            self.host, self.port, self.tls = self.brokers[self._broker]
            client = self._make_client()
            client.will_set(self.topics.status, self._status_payload("offline"), qos=1, retain=True)
            with self._lock:
                self._mids.clear()
                self._sends.clear()
            self.client = client
            try:
                self.state = "connecting"
                clean: Any = True if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
                client.connect(
                    self.host, self.port, keepalive=self.s.keepalive_s, clean_start=clean
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.state, self.last_error = "unreachable", str(exc)
                delay = self._next_broker(delay, f"broker unreachable: {exc}")
                continue
            no_delay(client)
            was_online = self._serve(client)
            self.online.clear()
            if self._closing.is_set():
                break
            if self.auth_failed:
                log.error(
                    "broker refused the credentials; retrying slowly",
                    reason=self.last_error,
                    retry_in=self.s.auth_retry_s,
                )
                self._stop.wait(self.s.auth_retry_s)
                continue
            if was_online:
                delay = self.s.reconnect_min_s  # a working link dropped: start over quickly
            delay = self._next_broker(delay, self.last_error or "connection lost")
        if self._net_wake is not None:
            for end in self._net_wake:
                end.close()
        self._closed.set()

    def _serve(self, client: mqtt.Client) -> bool:
        """Run one connection until it drops or the link closes; True if it got online."""
        was_online = False
        while True:
            if self._closing.is_set():
                self._say_stopped(client)
                return was_online
            self._publish_sends(client)
            rc = self._turn(client)
            was_online = was_online or self.online.is_set()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self.state != "refused":  # keep the CONNACK's reason, it says more
                    self.last_error = f"network loop: {rc.name}"
                return was_online

    def _turn(self, client: mqtt.Client) -> MQTTErrorCode:
        """One turn of paho's external-loop API under our own select(): the broker's socket
        and the wake-up pair, so that work another thread queued goes out at once and an
        idle link sleeps up to NET_IDLE_S instead of polling every 10 ms."""
        sock, wake = client.socket(), self._net_wake
        if not isinstance(sock, socket.socket) or wake is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        # Bytes TLS has already decrypted do not make the socket readable: read them now.
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        writers = [sock] if client.want_write() else []
        try:
            readable, _, _ = select.select(
                [sock, wake[0]], writers, [], 0 if pending else NET_IDLE_S
            )
        except (OSError, ValueError):
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if wake[0] in readable:
            with contextlib.suppress(OSError):
                wake[0].recv(4096)
        if sock in readable or pending:
            rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        if client.want_write():  # also what paho's callbacks queued during the read
            rc = client.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return client.loop_misc()

    def _say_stopped(self, client: mqtt.Client) -> None:
        if not self.online.is_set():
            with contextlib.suppress(OSError, ValueError):
                client.disconnect()
            return
        self._publish_sends(client)
        info = client.publish(
            self.topics.status, self._status_payload("stopped"), qos=1, retain=True
        )
        end = time.monotonic() + 0.5
        while not info.is_published() and time.monotonic() < end:
            if client.loop(timeout=0.01) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        with contextlib.suppress(OSError, ValueError):
            client.loop(timeout=0.01)  # push the DISCONNECT out

    def _publish_sends(self, client: mqtt.Client) -> None:
        if not self.online.is_set():
            return
        while self._sub_requests:
            topic, wanted = self._sub_requests.popleft()
            if wanted:
                self._subscribe(client, [topic])
            else:
                self._sub_retry.discard(topic)
                client.unsubscribe(topic)
        if self._sub_retry and time.monotonic() >= self._sub_retry_at:
            again = sorted(self._sub_retry.intersection(self._wanted_topics()))
            self._sub_retry.clear()
            mid = self._subscribe(client, again) if again else None
            if mid is not None:
                self._sub_retry_mids.add(mid)
        while self._sends:
            item = self._sends.popleft()
            info = client.publish(
                item.topic,
                item.payload,
                qos=item.qos,
                retain=item.retain,
                properties=item.properties,
            )
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # connection going down; the outbox requeues spooled rows
            if item.row is not None:
                with self._lock:
                    self._mids[info.mid] = item.row

    def _next_broker(self, delay: float, reason: str) -> float:
        """After a failure: the next broker of the list at once, the backoff once all failed."""
        self._failed_in_a_row += 1
        if len(self.brokers) > 1:
            self._broker = (self._broker + 1) % len(self.brokers)
            if self._failed_in_a_row % len(self.brokers):
                host, port, _ = self.brokers[self._broker]
                log.info("mqtt trying the next broker", reason=reason, broker=f"{host}:{port}")
                self._stop.wait(random.uniform(0.05, 0.25))  # noqa: S311 - jitter
                return delay
        return self._wait_retry(delay, reason)

    def _wait_retry(self, delay: float, reason: str) -> float:
        # Full jitter: a fleet that lost its broker does not come back in lockstep.
        wait = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not crypto
        log.info("mqtt reconnect scheduled", reason=reason, retry_in=round(wait, 2))
        self._stop.wait(wait)
        return min(self.s.reconnect_max_s, delay * 2)

    # -- outbox thread ----------------------------------------------------------------------
    def _run_out(self) -> None:
        last_resend = time.monotonic()
        next_metrics = time.monotonic() + self.metrics_interval_s
        while True:
            self._wake.wait(SPOOL_EVERY_S)
            self._wake.clear()
            try:
                if self.metrics is not None and time.monotonic() >= next_metrics:
                    next_metrics += self.metrics_interval_s
                    self.enqueue("metrics", self.metrics())
                if self.tick is not None:
                    self.tick()
                self._store_queued()
                self._apply_acks()
                if self.online.is_set():
                    if self._seen_epoch != self._epoch:
                        # A new connection: whatever was sent and not acked goes again.
                        self._seen_epoch = self._epoch
                        self.spool.requeue_unacked()
                    resend_due = time.monotonic() - last_resend > self.s.resend_after_s
                    if self.s.ack_mode == "collector" and resend_due and self.drained:
                        # Sent, PUBACKed, never confirmed by a collector: the broker may
                        # have lost it (no persistence). Send it again.
                        last_resend = time.monotonic()
                        with self._lock:
                            busy = set(self._mids.values())
                        busy |= {x.row for x in list(self._sends) if x.row is not None}
                        self.spool.requeue_unacked(busy)
                    self._publish_window()
            except Exception:
                log.exception("outbox step failed")
                time.sleep(0.5)
            if self._stop.is_set():
                self._store_queued()
                return

    def _store_queued(self) -> None:
        items = []
        while self._outq:
            kind, body = self._outq.popleft()
            seq = self.spool.next_seq()
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
        self.spool.put_many(items)

    def _apply_acks(self) -> None:
        ids = []
        while True:
            try:
                ids.append(self._acks.get_nowait())
            except queue.Empty:
                break
        if self.s.ack_mode == "broker":
            self.spool.delete(ids)
        while True:
            try:
                payload = self._collector_acks.get_nowait()
            except queue.Empty:
                break
            if self.s.ack_mode != "collector":
                continue
            try:
                ack = Ack.model_validate_json(payload)
            except ValueError:
                log.warning("malformed ack ignored", size=len(payload))
                continue
            self.spool.ack_upto(ack.boot_id, ack.mseq)

    def _publish_window(self) -> None:
        room = self.s.max_inflight - self.spool_inflight()
        if room <= 0:
            return
        with self._lock:
            busy = set(self._mids.values())
        busy |= {x.row for x in list(self._sends) if x.row is not None}
        batch = self.spool.pending(room, busy)
        self.drained = len(batch) < room
        if not batch:
            return
        floors: dict[str, int] = {}
        for msg in batch:
            if msg.boot_id not in floors:
                floors[msg.boot_id] = self.spool.floor(msg.boot_id)
            payload = self._final_payload(msg, floors[msg.boot_id])
            self._sends.append(_Send(msg.id, msg.topic, payload, msg.qos, False, None))
        self.spool.mark_sent([msg.id for msg in batch])
        self._wake_net()

    def _final_payload(self, msg: Spooled, floor: int) -> bytes:
        extra = f',"floor":{floor}'
        # Replayed: from an earlier boot, sent before, or spooled while the link was down.
        backlog = msg.created < self.online_since
        if msg.attempts > 0 or msg.boot_id != self.s.boot_id or backlog:
            extra += ',"replayed":true'
        # Stored payloads are JSON objects: splice the publish-time fields in before "}".
        return msg.payload[:-1] + extra.encode() + b"}"

    # -- command thread ---------------------------------------------------------------------
    def _run_commands(self) -> None:
        while not self._stop.is_set():
            try:
                incoming = self._commands.get(timeout=0.2)
            except queue.Empty:
                continue
            if self.on_command is None:
                continue
            try:
                self.on_command(incoming)
            except Exception:
                log.exception("command handler failed", topic=incoming.topic)

    def reply_properties(self, correlation: bytes | None) -> Properties | None:
        if not self.v5 or correlation is None:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = correlation
        return props
