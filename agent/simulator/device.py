"""One virtual device on the real protocol: birth and will, spooled reports with acks, commands,
rollouts with real chunk downloads (for load tests of brokers and collectors)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from edgefleet import __version__, protocol
from edgefleet.mqtt.brokers import no_delay
from edgefleet.protocol import FleetTopics, Manifest, Rollout, Topics

if TYPE_CHECKING:
    import random

    from paho.mqtt.client import SocketLike  # a typing-only Protocol in paho

LABELS = ("tabby", "Egyptian cat", "golden retriever", "espresso", "sports car")
MAX_UNACKED = 1000  # per device, like a bounded spool: the oldest go first
STEPS = (
    Rollout.RECEIVED,
    Rollout.DOWNLOADING,
    Rollout.VERIFYING,
    Rollout.PREFLIGHT,
    Rollout.ACTIVATING,
    Rollout.ACTIVE,
)


@dataclass(frozen=True)
class SimSettings:
    devices: int
    brokers: list[tuple[str, int, bool]]
    prefix: str = protocol.DEFAULT_PREFIX
    id_prefix: str = "sim-"
    groups: tuple[str, ...] = ("sim",)
    rate: float = 0.2  # prediction messages per second per device
    results_per_message: int = 1
    metrics_interval_s: float = 60.0
    download_share: float = 0.0
    fail_share: float = 0.0
    rollout_step_s: float = 1.0
    connect_rate: float = 500.0  # new connections per second
    mqtt5: bool = True
    keepalive: int = 60
    seed: int = 0
    username: str | None = None
    password: str | None = None
    ca: str | None = None  # CA bundle for mqtts:// brokers
    ack_from_s: float = 0.0  # ack latencies count from this long after the start (warm-up)


@dataclass
class Stats:
    """Counters of the whole simulated fleet (read by the reporter, written by the loop)."""

    published: Counter[str] = field(default_factory=Counter)
    acked: int = 0
    ack_latency_ms: list[float] = field(default_factory=list)
    connects: int = 0
    disconnects: int = 0
    refused: int = 0
    commands: int = 0
    rollouts: Counter[str] = field(default_factory=Counter)
    chunk_errors: int = 0
    downloaded: int = 0  # releases fetched and checked in full

    def ack_percentiles(self) -> dict[str, float]:
        if not self.ack_latency_ms:
            return {}
        ordered = sorted(self.ack_latency_ms)
        marks = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
        out = {k: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for k, q in marks.items()}
        return {**out, "max": ordered[-1]}


class Host(Protocol):
    """What a device needs of the simulator that drives it (`fleet.Simulator`)."""

    s: SimSettings
    rng: random.Random
    stats: Stats
    latencies_from: float

    def socket_opened(self, client: mqtt.Client, _u: Any, sock: SocketLike) -> None: ...
    def socket_closed(self, _c: mqtt.Client, _u: Any, sock: SocketLike) -> None: ...
    def want_write(self, client: mqtt.Client, _u: Any, sock: SocketLike) -> None: ...
    def done_writing(self, client: mqtt.Client, _u: Any, sock: SocketLike) -> None: ...
    def later(self, delay: float, device: Device, what: int) -> None: ...
    def lost(self, device: Device) -> None: ...
    def flush(self, info: mqtt.MQTTMessageInfo, limit: float = 2.0) -> None: ...


class Device:
    """One virtual device: its connection, its numbering, its rollout."""

    def __init__(self, sim: Host, index: int, downloads: bool, fails: bool) -> None:
        s = sim.s
        self.sim = sim
        self.id = f"{s.id_prefix}{index:05d}"
        self.topics = Topics(s.prefix, self.id)
        self.broker = index % len(s.brokers)
        self.boot_id = uuid.uuid4().hex[:16]
        self.started = time.time()
        self.mseq = 0
        self.acked = 0
        self.seq = 0
        self.unacked: dict[int, tuple[str, bytes, float]] = {}
        self.downloads = downloads
        self.fails = fails
        self.model: dict[str, Any] = {
            "name": "efficientnet-lite0",
            "version": 0,
            "sha256": "0" * 64,
        }
        self.rollout: Manifest | None = None
        self.own_release = False  # the rollout came from the device's own desired topic
        self.chunks: dict[int, bytes] = {}
        self.connected = False
        self.retry_at = 0.0
        self.backoff = 0.5
        self.client = self._client()

    # -- connection ----------------------------------------------------------------------
    def _client(self) -> mqtt.Client:
        s = self.sim.s
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.id,
            protocol=mqtt.MQTTv5 if s.mqtt5 else mqtt.MQTTv311,
        )
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.brokers[0][2]:
            client.tls_set(ca_certs=s.ca)
        will = self._status("offline")
        client.will_set(self.topics.status, will, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self.sim.socket_opened
        client.on_socket_close = self.sim.socket_closed
        client.on_socket_register_write = self.sim.want_write
        client.on_socket_unregister_write = self.sim.done_writing
        return client

    def connect(self) -> bool:
        """Open the connection (its CONNACK arrives through the loop); False: try later, on
        the next broker of the list, after a randomised backoff doubling to 10 s."""
        host, port, _ = self.sim.s.brokers[self.broker]
        try:
            if self.client.socket() is None:
                self.client.connect(host, port, keepalive=self.sim.s.keepalive)
                no_delay(self.client)  # as the agent does
        except (OSError, ValueError):
            self.broker = (self.broker + 1) % len(self.sim.s.brokers)
            self.retry_at = time.monotonic() + self.backoff * self.sim.rng.uniform(0.5, 1.5)
            self.backoff = min(10.0, self.backoff * 2)
            return False
        return True

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.sim.stats.refused += 1
            return
        self.connected = True
        self.backoff = 0.5
        self.sim.stats.connects += 1
        subscriptions = [self.topics.commands, self.topics.desired, self.topics.ack]
        for group in self.sim.s.groups:
            subscriptions += [self.topics.group_commands(group), self.topics.group_desired(group)]
        client.subscribe([(topic, 1) for topic in subscriptions])
        client.publish(self.topics.status, self._status("online"), qos=1, retain=True)
        for mseq in sorted(self.unacked):  # what the collector has not confirmed, again
            topic, payload, _ = self.unacked[mseq]
            client.publish(topic, payload, qos=1)
        if self.rollout is not None and self.downloads and not self._downloaded():
            self._subscribe_chunks()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        if self.connected:
            self.sim.stats.disconnects += 1
        self.connected = False
        self.sim.lost(self)

    # -- what a device sends -------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        body = {
            "state": state,
            "device": self.id,
            "boot_id": self.boot_id,
            "ts": time.time(),
            "agent_version": __version__,
            "model": self.model,
            "delegate": {"type": "cpu", "threads": 1},
            "source": {"type": "synthetic"},
            "groups": list(self.sim.s.groups),
            "simulated": True,
        }
        return _dumps(body)

    def _spooled(self, kind: str, body: dict[str, Any]) -> None:
        self.mseq += 1
        if len(self.unacked) >= MAX_UNACKED:
            del self.unacked[min(self.unacked)]
        floor = min(self.unacked, default=self.mseq)
        now = time.time()
        body.update(device=self.id, boot_id=self.boot_id, mseq=self.mseq, floor=floor, ts=now)
        topic = self.topics.spooled(kind)
        payload = _dumps(body)
        self.unacked[self.mseq] = (topic, payload, time.monotonic())
        self.sim.stats.published[kind] += 1
        if self.connected:
            self.client.publish(topic, payload, qos=1)

    def predictions(self) -> None:
        rng = self.sim.rng
        results = []
        for _ in range(self.sim.s.results_per_message):
            self.seq += 1
            index = rng.randrange(len(LABELS))
            results.append(
                {
                    "seq": self.seq,
                    "boot_id": self.boot_id,
                    "ts": time.time(),
                    "model": self.model["name"],
                    "model_version": self.model["version"],
                    "top": [
                        {
                            "label": LABELS[index],
                            "index": index,
                            "score": round(rng.uniform(0.3, 0.99), 4),
                        }
                    ],
                    "timings_ms": {
                        "inference": round(rng.uniform(4, 9), 3),
                        "total": round(rng.uniform(6, 14), 3),
                    },
                    "frame": self.seq,
                }
            )
        self._spooled("predictions", {"results": results})

    def metrics(self) -> None:
        rng = self.sim.rng
        inference = rng.uniform(4, 9)
        self._spooled(
            "metrics",
            {
                "interval_s": self.sim.s.metrics_interval_s,
                "fps": round(self.sim.s.rate * self.sim.s.results_per_message, 3),
                "inferences": self.seq,
                "dropped_frames": 0,
                "latency_ms": {
                    "inference": {
                        "p50": inference,
                        "p90": inference * 1.2,
                        "p99": inference * 1.5,
                        "max": inference * 2,
                    },
                },
                "spool": {"depth": len(self.unacked), "bytes": 0, "dropped": 0},
                "health": {"cpu_temp_c": round(rng.uniform(45, 70), 1)},
            },
        )

    # -- what a device receives ----------------------------------------------------------
    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        payload = bytes(msg.payload)
        try:
            if topic == self.topics.ack:
                self._on_ack(payload)
            elif "/cmd/" in topic:
                self._on_command(client, msg)
            elif topic.endswith("/model/desired"):
                self._on_desired(topic, payload)
            elif "/models/" in topic:
                self._on_chunk(topic, payload)
        except (ValueError, KeyError, TypeError, ValidationError):
            pass  # a malformed message is skipped, as the agent does; the next one counts

    def _on_ack(self, payload: bytes) -> None:
        ack = protocol.Ack.model_validate_json(payload)
        if ack.boot_id != self.boot_id or ack.mseq <= self.acked:
            return
        now = time.monotonic()
        counted = now >= self.sim.latencies_from
        for mseq in [m for m in self.unacked if m <= ack.mseq]:
            _, _, sent = self.unacked.pop(mseq)
            self.sim.stats.acked += 1
            if counted:
                self.sim.stats.ack_latency_ms.append((now - sent) * 1000)
        self.acked = ack.mseq

    def _on_command(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        name = Topics.command_name(msg.topic) or ""
        args = json.loads(msg.payload or b"{}")
        request_id = str(args.get("request_id") or uuid.uuid4().hex[:12])
        reply: dict[str, Any] = {"command": name, "device": self.id, "ok": name == "ping"}
        if name == "ping":
            reply["result"] = {"uptime_s": round(time.time() - self.started, 1), "simulated": True}
        else:
            reply["error"] = f"simulated devices answer ping only, not {name!r}"
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props else None
        reply_props = None
        if response:
            topic = response
            correlation = getattr(props, "CorrelationData", None)
            if correlation is not None:
                reply_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                reply_props.CorrelationData = correlation
        else:
            reply["request_id"] = request_id
            topic = self.topics.reply(request_id)
        self.sim.stats.commands += 1
        client.publish(topic, _dumps(reply), qos=1, properties=reply_props)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        manifest = Manifest.model_validate_json(payload)
        device_level = topic == self.topics.desired
        if self.rollout is not None and manifest.rollout_id == self.rollout.rollout_id:
            return
        if not device_level and self.rollout is not None and self.own_release:
            return  # a device's own desired release outranks its groups'
        self.own_release = device_level
        self.rollout = manifest
        self.chunks = {}
        self._state(Rollout.RECEIVED)
        if self.downloads:
            self._state(Rollout.DOWNLOADING, progress=0.0)
            self._subscribe_chunks()
        else:
            self.sim.later(self.sim.s.rollout_step_s, self, 1)

    def _variant(self) -> protocol.VariantSpec | None:
        return self.rollout.variant_for(["cpu"]) if self.rollout else None

    def _chunk_topics(self) -> list[str]:
        """A fixed-size release's chunk filter, or one topic per content-defined chunk still
        missing (a simulated device holds no models to copy chunks from)."""
        variant = self._variant()
        if self.rollout is None or variant is None:
            return []
        topics = FleetTopics(self.sim.s.prefix)
        if variant.cdc is None:
            return [topics.chunks(self.rollout.name, self.rollout.version, variant.kind)]
        have = {variant.chunks[i] for i in self.chunks}
        return sorted({topics.shared_chunk(h) for h in variant.chunks if h not in have})

    def _subscribe_chunks(self) -> None:
        topics = self._chunk_topics()
        if topics:
            self.client.subscribe([(t, 1) for t in topics])

    def _downloaded(self) -> bool:
        variant = self._variant()
        return variant is not None and len(self.chunks) == len(variant.chunks)

    def _chunk_indices(self, topic: str, variant: protocol.VariantSpec) -> list[int]:
        if variant.cdc is None:
            return [int(topic.rsplit("/", 1)[1])]
        digest = FleetTopics.chunk_hash_of(topic)
        return [i for i, h in enumerate(variant.chunks) if h == digest]

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        variant = self._variant()
        if self.rollout is None or variant is None or self._downloaded():
            return
        indices = self._chunk_indices(topic, variant)
        if not indices:
            return
        if hashlib.sha256(payload).hexdigest() != variant.chunks[indices[0]]:
            self.sim.stats.chunk_errors += 1
            return
        for index in indices:
            self.chunks[index] = payload
        if self._downloaded():
            if variant.cdc is None:
                self.client.unsubscribe(self._chunk_topics())
            else:
                self.client.unsubscribe(
                    sorted(set(map(FleetTopics(self.sim.s.prefix).shared_chunk, variant.chunks)))
                )
            whole = b"".join(self.chunks[i] for i in range(len(variant.chunks)))
            self._state(Rollout.VERIFYING)
            if hashlib.sha256(whole).hexdigest() != variant.sha256:
                self._state(Rollout.FAILED, reason="model sha256 mismatch")
                return
            self.chunks = {}
            self.sim.stats.downloaded += 1
            self.sim.later(self.sim.s.rollout_step_s, self, STEPS.index(Rollout.PREFLIGHT))

    def step(self, position: int) -> None:
        """The rollout's next simulated state (after RECEIVED, or after a real download)."""
        if self.rollout is None:
            return
        state = STEPS[position]
        if self.fails and state == Rollout.PREFLIGHT:
            self._state(Rollout.FAILED, reason="simulated preflight failure")
            return
        self._state(state)
        if state == Rollout.ACTIVE:
            variant = self._variant()
            self.model = {
                "name": self.rollout.name,
                "version": self.rollout.version,
                "sha256": variant.sha256 if variant else "0" * 64,
            }
            if self.connected:
                self.client.publish(self.topics.status, self._status("online"), 1, True)
            return
        self.sim.later(self.sim.s.rollout_step_s, self, position + 1)

    def _state(self, state: str, reason: str | None = None, progress: float | None = None) -> None:
        manifest = self.rollout
        if manifest is None:
            return
        body = {
            "state": state,
            "device": self.id,
            "ts": time.time(),
            "rollout_id": manifest.rollout_id,
            "name": manifest.name,
            "version": manifest.version,
            "reason": reason,
            "progress": progress,
        }
        self.sim.stats.rollouts[state] += 1
        if self.connected:
            self.client.publish(self.topics.rollout, _dumps(body), qos=1, retain=True)

    def stop(self) -> None:
        """A graceful stop: the retained status says ``stopped``, the will is not sent."""
        if self.connected:
            info = self.client.publish(self.topics.status, self._status("stopped"), 1, True)
            self.sim.flush(info)
            self.client.disconnect()


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
