"""The link's network thread: one paho client per connection, its callbacks, its subscriptions.

``mqtt-net`` owns paho. It connects (a fresh client per connection, so no state from a dead
session leaks into the next), runs the network loop under its own ``select()``, publishes
what other threads handed it (``send``) and maps message ids to outbox rows; PUBACKs are
handled on this same thread, so an ack can never race the bookkeeping of its publish.
Reconnects use exponential backoff with jitter. A refused CONNACK is never "connected"; bad
credentials or not-authorised are logged once and retried slowly (no reconnect storm).

Subscriptions are made in ``on_connect``; the birth message goes out only after the broker
acknowledged them, so a device never says "online" while deaf to commands. paho's callbacks
only hand messages over: acks and collector acks to the outbox thread, commands to the
command thread, other routes to their handlers (which must only hand over too).
"""

from __future__ import annotations

import collections
import contextlib
import json
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.mqtt.brokers import Rotation, device_client, no_delay
from edgefleet.mqtt.handoff import Incoming, Send
from edgefleet.mqtt.liveness import same_reason, silence, unreachable_reason
from edgefleet.mqtt.settings import LinkSettings
from edgefleet.mqtt.subscriptions import Subscriptions
from edgefleet.mqtt.topicfilter import TopicFilter
from edgefleet.protocol import Topics

log = structlog.get_logger(__name__)

AUTH_FAILURES = {134, 135, 140}  # bad user name or password, not authorised, bad auth method
PUBLISH_REFUSED_LOG_EVERY = 100
# The network thread sleeps in select() at most this long when nothing happens (paho's
# keepalive is checked on each turn); work from other threads wakes it at once.
NET_IDLE_S = 0.5


def _wake_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking sockets: write one end to end a select() on the other."""
    pair = socket.socketpair()
    for end in pair:
        end.setblocking(False)
    return pair


def _command_filters(topics: Topics, groups: list[str]) -> list[TopicFilter]:
    """The device's own command topic and its groups' (fixed for the link's life)."""
    return [TopicFilter(t) for t in (topics.commands, *map(topics.group_commands, groups))]


class Connection:
    """One device's connection to the broker, run by the ``mqtt-net`` thread."""

    def __init__(
        self,
        settings: LinkSettings,
        birth: Callable[[], dict[str, Any]],
        announce: Callable[[], list[tuple[str, bytes]]] | None,
        wake_outbox: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        self.s = settings
        self.topics = Topics(settings.prefix, settings.device)
        self.birth = birth
        # Retained (topic, payload) pairs published right after each birth (HA discovery).
        self.announce = announce
        self._wake_outbox = wake_outbox
        self._stop = stop
        # (topic filter, handler) pairs; handlers run on paho's thread and only hand over.
        self._routes: list[tuple[TopicFilter, Callable[[Incoming], None]]] = []
        self._command_filters = _command_filters(self.topics, settings.groups)
        self.subscriptions = Subscriptions(self.topics, settings.groups, self.v5)
        self.rotation = Rotation(settings.urls or [settings.url], stop)
        self.host, self.port, self.tls = self.rotation.current()
        # Handed to other threads: PUBACKed outbox rows and collector acks (outbox thread),
        # commands (command thread).
        self.acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.collector_acks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.commands: queue.Queue[Incoming] = queue.Queue(maxsize=64)
        self._sends: collections.deque[Send] = collections.deque()
        self._lock = threading.Lock()
        self._mids: dict[int, int] = {}  # paho mid -> outbox row, under _lock
        self.closing = threading.Event()
        self.closed = threading.Event()
        # Written to when another thread queues work for the network thread (a send, a
        # subscription, the stop): its select() returns at once instead of polling.
        self._net_wake: tuple[socket.socket, socket.socket] | None = None  # made by start()
        self.online = threading.Event()
        self.epoch = 0  # one more for each connection that got online
        self.online_since = 0.0
        self.state = "disconnected"
        self.last_error = ""
        self.auth_failed = False
        self.connects = 0
        self.refused = 0
        self.commands_dropped = 0
        self.publish_refused = 0
        self.client: mqtt.Client | None = None
        self._heard_at = 0.0  # monotonic: the last time the broker's socket had bytes

    @property
    def v5(self) -> bool:
        return self.s.protocol == "5"

    def open_wake(self) -> None:
        """Before the network thread starts: the pair other threads wake it with."""
        self._net_wake = _wake_pair()

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
            self.subscriptions.add_static(topic_filter)

    def republish_status(self) -> None:
        """Say ``online`` again with a fresh birth body (what serves changed)."""
        if self.online.is_set():
            self.publish_now(self.topics.status, self._status_payload("online"), qos=1, retain=True)

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
            self.send(Send(None, topic, payload, qos, retain, properties))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and on every reconnect (model chunks)."""
        self.subscriptions.want(topic, qos)
        self.wake()

    def unsubscribe(self, topic: str) -> None:
        self.subscriptions.unwant(topic)
        self.wake()

    def wake(self) -> None:
        """End the network thread's select() now (any thread)."""
        if self._net_wake is not None:  # not before start(): the thread reads its work then
            with contextlib.suppress(OSError):  # already woken (buffer full) or closed
                self._net_wake[1].send(b"\0")

    def inflight(self) -> int:
        """Outbox rows handed over and not yet acknowledged by the broker."""
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

    def send(self, *items: Send) -> None:
        """Hand publishes to the network thread (any thread); one wake-up for all."""
        self._sends.extend(items)
        self.wake()

    def busy_rows(self) -> set[int]:
        """Outbox rows on the wire or about to be (any thread)."""
        with self._lock:
            busy = set(self._mids.values())
        return busy | {x.row for x in list(self._sends) if x.row is not None}

    # -- client ----------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = device_client(self.s, self.tls)
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
        self.subscriptions.on_connect(client)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        if not self.subscriptions.on_suback(mid, reason_codes):
            return
        client.publish(self.topics.status, self._status_payload("online"), qos=1, retain=True)
        for topic, payload in self.announce() if self.announce is not None else []:
            client.publish(topic, payload, qos=1, retain=True)
        self.state = "online"
        self.rotation.worked()
        self.online_since = time.time()
        self.epoch += 1
        self.online.set()
        self._wake_outbox()
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
        if was_online and not self.closing.is_set():
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
        self.acks.put(row)
        if full:
            # A send waits for this room: now. Otherwise the outbox's next tick takes the
            # acknowledgement; a wake-up per message costs an invoke on a 2-core board.
            self._wake_outbox()

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
            self.commands.put_nowait(incoming)
        except queue.Full:
            self.commands_dropped += 1

    def _take_ack(self, payload: bytes) -> None:
        self.collector_acks.put(payload)  # parsed on the outbox thread
        self._wake_outbox()

    # -- network thread --------------------------------------------------------------------
    def run(self) -> None:
        """The ``mqtt-net`` thread: connect, serve, reconnect, until the link closes."""
        delay = self.s.reconnect_min_s
        while not self._stop.is_set() and not self.closing.is_set():
            self.host, self.port, self.tls = self.rotation.current()
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
                reason = unreachable_reason(exc)
                quiet = same_reason(reason, self.last_error)  # said already: no line per retry
                self.state, self.last_error = "unreachable", reason
                if isinstance(exc, ssl.SSLCertVerificationError):
                    if not quiet:
                        log.error("broker refused by TLS", reason=reason)
                    quiet = True  # that line says it all
                delay = self.rotation.failed(delay, self.s.reconnect_max_s, reason, quiet)
                continue
            no_delay(client)
            was_online = self._serve(client)
            self.online.clear()
            if self.closing.is_set():
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
            delay = self.rotation.failed(
                delay, self.s.reconnect_max_s, self.last_error or "connection lost"
            )
        if self._net_wake is not None:
            for end in self._net_wake:
                end.close()
        self.closed.set()

    def _serve(self, client: mqtt.Client) -> bool:
        """Run one connection until it drops or the link closes; True if it got online."""
        was_online = False
        started = self._heard_at = time.monotonic()
        while True:
            if self.closing.is_set():
                self._say_stopped(client)
                return was_online
            self._publish_sends(client)
            rc = self._turn(client)
            was_online = was_online or self.online.is_set()
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                # Before paho's own keepalive check, which would drop the link later and
                # with a vaguer reason.
                if self._silent_too_long(client, started):
                    return was_online
                rc = client.loop_misc()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self.state != "refused":  # keep the CONNACK's reason, it says more
                    self.last_error = f"network loop: {rc.name}"
                return was_online

    def _silent_too_long(self, client: mqtt.Client, started: float) -> bool:
        """Give up a connection nobody answers: silent once online, or no CONNACK within a
        keepalive interval (behind a dead access point). A broker that answered the CONNECT
        and is slow to grant the subscriptions is busy, not gone (a clustered NATS makes a
        JetStream consumer per filter, 4-8 s after losing a node): giving up would start it
        over, so paho's keepalive alone applies until the SUBACK."""
        keepalive = float(self.s.keepalive_s)
        if self.online.is_set():
            why = silence(client, self._heard_at, keepalive)
        elif self.state == "subscribing":
            return False
        elif time.monotonic() - started > keepalive:
            why = f"the broker did not answer the connection within {keepalive:g} s"
        else:
            return False
        if why is None:
            return False
        self.last_error = why
        log.warning("mqtt link silent, reconnecting", reason=why)
        with contextlib.suppress(OSError, AttributeError):
            client._sock_close()  # paho 2.x: nothing to say to a broker that is not there
        return True

    def _turn(self, client: mqtt.Client) -> MQTTErrorCode:
        """One turn of paho's external-loop API under our own select() (reads and writes;
        ``loop_misc`` is the caller's): the broker's socket and the wake-up pair, so that
        work another thread queued goes out at once and an idle link sleeps up to
        NET_IDLE_S instead of polling every 10 ms."""
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
            self._heard_at = time.monotonic()  # bytes came (an end of stream is an error)
        if client.want_write():  # also what paho's callbacks queued during the read
            return client.loop_write()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

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
        self.subscriptions.pump(client)
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
