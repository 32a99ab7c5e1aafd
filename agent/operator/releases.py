"""Fleet-side rollout tools: keys, publishing a signed release, watching its progress.

``edgefleet keys generate``, ``edgefleet rollout publish|status|clear``. Chunks are published
retained, so devices pull them whenever they are ready, without a server process.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.errors import UserError
from edgefleet.inference.classifier import inspect_model
from edgefleet.inference.modelfile import is_tflite
from edgefleet.mqtt.brokers import no_delay, parse_urls
from edgefleet.protocol import (
    DEFAULT_PREFIX,
    Decision,
    FleetTopics,
    Manifest,
    ShadowSpec,
    VariantSpec,
    loads,
)
from edgefleet.rollout.release import (
    DEFAULT_CHUNK,
    describe_variant,
    load_private_key,
    pieces,
    sign,
)

SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: a login with the same client id
COLLECT_STEP_S = 0.02  # how often a collect looks whether the broker went quiet
RELEASES_WAIT_S = 1.5  # the longest a look for the retained release indexes takes
# Which shared chunks the broker holds, at publish: done once it sent nothing for this long
# after the SUBACK (its retained messages come in one burst; a late one costs a resend).
SHARED_LOOKUP_QUIET_S = 0.3


class Broker:
    """A short-lived operator connection that waits for every publish to be acknowledged."""

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
    ) -> None:
        brokers = parse_urls(url)
        random.shuffle(brokers)  # several brokers of one cluster: any that answers
        self.messages: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._heard_at = 0.0  # monotonic time of the last message or SUBACK
        self._subacked: set[int] = set()
        self.username = username
        # Set when the broker closed this session because another client logged in with the
        # same identity (the shipped broker makes the user name the client id).
        self.taken_over = threading.Event()
        failures = []
        for host, port, tls in brokers:
            # MQTT 5 first; a broker that only speaks 3.1.1 (NATS) refuses it: then 3.1.1.
            for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
                self.client = self._client(username, password, ca if tls else None, tls, protocol)
                refused = self._connect(host, port)
                if refused is None:
                    return
                failures.append(f"{host}:{port}: {refused}")
                if "protocol version" not in refused.lower():
                    break
        raise UserError(f"cannot use the broker: {'; '.join(failures)}")

    def _client(
        self,
        username: str | None,
        password: str | None,
        ca: Path | None,
        tls: bool,
        protocol: MQTTProtocolVersion,
    ) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            # On the shipped broker the id becomes the operator's name; elsewhere a random one.
            client_id=f"edgefleet-operator-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        if username:
            client.username_pw_set(username, password)
        if tls:
            client.tls_set(ca_certs=str(ca) if ca else None)
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self, host: str, port: int) -> str | None:
        """Connect and wait for the broker's answer: None when accepted, else why not."""
        answer: list[str] = []
        done = threading.Event()

        def on_connect(_c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
            answer.append("" if not rc.is_failure else str(rc))
            done.set()

        def on_disconnect(client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
            done.set()
            if rc.value == SESSION_TAKEN_OVER:
                self.taken_over.set()
                client.disconnect()  # no reconnection: it would take the other one's place

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            return str(exc)
        no_delay(self.client)
        self.client.loop_start()
        if not done.wait(10):
            answer.append("no answer within 10 s")
        if answer and not answer[0]:
            return None
        self.client.loop_stop()
        with contextlib.suppress(OSError):
            self.client.disconnect()
        return answer[0] if answer else "closed the connection (unsupported protocol version?)"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages[msg.topic] = bytes(msg.payload)
            self._heard_at = time.monotonic()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            self._subacked.add(mid)
            self._heard_at = time.monotonic()

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def collect(self, topic: str, seconds: float, quiet_s: float | None = None) -> dict[str, bytes]:
        """Retained messages under ``topic`` (a filter), gathered for ``seconds``.

        With ``quiet_s``: done sooner, once the broker acknowledged the subscription and sent
        nothing for that long. Retained messages come in one burst after the SUBACK, but MQTT
        never says the burst is over, so only a lookup whose miss costs bytes, not safety,
        may end early (which shared chunks are on the broker: one missed is sent again).
        """
        _, mid = self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + seconds
        while (now := time.monotonic()) < deadline:
            if quiet_s is not None:
                with self._lock:
                    if mid in self._subacked and now - self._heard_at >= quiet_s:
                        break
            time.sleep(min(COLLECT_STEP_S, deadline - now))
        self.check()
        self.client.unsubscribe(topic)
        with self._lock:
            return {
                name: payload
                for name, payload in self.messages.items()
                if mqtt.topic_matches_sub(topic, name)
            }

    def snapshot(self) -> dict[str, bytes]:
        self.check()
        with self._lock:
            return dict(self.messages)

    def check(self) -> None:
        """UserError once another client with this identity took the session over."""
        if self.taken_over.is_set():
            raise UserError(
                f"another client logged in as {self.username or 'this client'} and the broker "
                "closed this session: one command at a time per identity (enrol one operator "
                "per person or automation)"
            )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _input_spec(path: Path) -> tuple[dict[str, Any], int]:
    classifier = inspect_model(path)
    plan = classifier.plan
    return (
        {"height": plan.height, "width": plan.width, "dtype": str(plan.dtype)},
        classifier.num_classes,
    )


def build_release(
    models: dict[str, Path],
    name: str,
    version: int,
    key_path: Path,
    key_id: str,
    expires_in_s: float,
    chunk_size: int | None = None,
    min_agent_version: str = "0.1.0",
    rollback: bool = False,
    expected_top1: str | None = None,
    shadow: ShadowSpec | None = None,
) -> tuple[Manifest, dict[str, bytes]]:
    """Sign a manifest for the given variant files; also returns each variant's bytes.

    Content-defined chunks (shared between releases: a retrained head costs the bytes that
    changed) unless ``chunk_size`` asks for fixed chunks, which agents before them need."""
    variants: list[VariantSpec] = []
    blobs: dict[str, bytes] = {}
    # An EdgeTPU model cannot be loaded without the TPU: it takes the input and classes of
    # the release's cpu variant (the network it was compiled from), which devices check.
    ordered = sorted(models.items(), key=lambda item: item[0] == "edgetpu")
    specs: dict[str, tuple[dict[str, Any], int | None]] = {}
    for kind, path in ordered:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        if not is_tflite(data[:8]):
            raise UserError(f"{path} is not a TFLite model")
        if kind != "edgetpu":
            specs[kind] = _input_spec(path)
        elif "cpu" not in specs:
            raise UserError("an edgetpu variant needs the cpu variant it was compiled from")
        spec, classes = specs.get(kind) or specs["cpu"]
        variants.append(
            describe_variant(
                kind,
                data,
                spec,
                chunk_size or DEFAULT_CHUNK,
                labels=classes,
                expected_top1=expected_top1,
                content_defined=chunk_size is None,
            )
        )
        blobs[kind] = data
    now = time.time()
    # The same release always has the same id, so a re-run of a wave rollout continues.
    identity = "|".join([name, str(version), *(v.sha256 for v in variants)])
    if shadow is not None:  # other rules make another release
        identity += "|" + shadow.model_dump_json()
    manifest = Manifest(
        rollout_id=hashlib.sha256(identity.encode()).hexdigest()[:16],
        name=name,
        version=version,
        created=now,
        expires=now + expires_in_s,
        min_agent_version=min_agent_version,
        rollback=rollback,
        variants=variants,
        shadow=shadow,
        key_id=key_id,
    )
    return sign(manifest, load_private_key(key_path)), blobs


def publish_decision(
    broker: Broker,
    rollout_id: str,
    action: Literal["promote", "reject"],
    targets: list[str],
    key_path: Path,
    key_id: str,
    prefix: str = DEFAULT_PREFIX,
) -> Decision:
    """Sign and publish (retained) an operator's verdict on a manual shadow phase."""
    decision = sign(
        Decision(rollout_id=rollout_id, action=action, created=time.time(), key_id=key_id),
        load_private_key(key_path),
    )
    topics = FleetTopics(prefix)
    try:
        names = [topics.decision(target) for target in targets]
    except ValueError as exc:
        raise UserError(f"--target: {exc}") from None
    body = decision.wire()
    for topic in names:
        broker.publish(topic, body).wait_for_publish(30)
    return decision


def desired_topic(prefix: str, target: str) -> str:
    kind, _, name = target.partition(":")
    if kind not in ("device", "group") or not name:
        raise UserError(f"target {target!r}: use device:ID or group:NAME")
    return FleetTopics(prefix).desired(target)


def check_unpublished(
    broker: Broker, manifest: Manifest, prefix: str = DEFAULT_PREFIX, seconds: float = 1.0
) -> None:
    """Refuse to publish a name and version again with other content: versions are immutable.

    Devices key what they downloaded, verified and refused by release; the same name and
    version meaning two different models would leave a fleet split without anyone noticing.
    """
    topic = FleetTopics(prefix).release(manifest.name, manifest.version)
    payload = broker.collect(topic, seconds).get(topic)
    if not payload:
        return
    try:
        published = loads(payload)
    except ValueError:
        return  # not ours to judge: the publish overwrites it
    if isinstance(published, dict) and published.get("rollout_id") != manifest.rollout_id:
        raise UserError(
            f"{manifest.name} v{manifest.version} is already published with other content "
            f"(release {published.get('rollout_id')}); publish it as a new version"
        )


def publish_release(
    broker: Broker,
    manifest: Manifest,
    blobs: dict[str, bytes],
    targets: list[str],
    prefix: str = DEFAULT_PREFIX,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Chunks first (retained), the release index, then each target's desired manifest.

    A content-defined chunk is published once under its hash: those that a release already
    on the broker lists are there (``rollout clear`` keeps a chunk while any release uses it).
    """
    infos = []
    topics = FleetTopics(prefix)
    there: set[str] = set()
    if any(variant.cdc is not None for variant in manifest.variants):
        # Fixed chunks have their release's own topics: nothing on the broker to reuse.
        there = shared_chunks_in(published_releases(broker, prefix, SHARED_LOOKUP_QUIET_S))
    for variant in manifest.variants:
        for index, (digest, piece) in enumerate(pieces(variant, blobs[variant.kind])):
            if variant.cdc is None:
                topic = topics.chunk(manifest.name, manifest.version, variant.kind, index)
            elif digest in there:
                continue
            else:
                there.add(digest)
                topic = topics.shared_chunk(digest)
            infos.append(broker.publish(topic, piece))
    for done, info in enumerate(infos, 1):
        info.wait_for_publish(30)
        if progress is not None:
            progress(done, len(infos))
    body = manifest.wire()
    broker.publish(topics.release(manifest.name, manifest.version), body).wait_for_publish(30)
    for target in targets:
        broker.publish(desired_topic(prefix, target), body).wait_for_publish(30)


def rollout_states(
    broker: Broker, prefix: str = DEFAULT_PREFIX, seconds: float = 1.5
) -> dict[str, dict[str, Any]]:
    return json_by_device(broker, FleetTopics(prefix).every_device("rollout"), seconds)


def json_by_device(broker: Broker, topic_filter: str, seconds: float) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for topic, payload in broker.collect(topic_filter, seconds).items():
        if not payload:
            continue
        try:
            body = loads(payload)
        except ValueError:
            continue
        if isinstance(body, dict):
            found[FleetTopics.device_of(topic)] = body
    return found


def clear_release(
    broker: Broker, name: str, version: int, prefix: str = DEFAULT_PREFIX
) -> tuple[int, int]:
    """Remove a release's retained chunks and index, and every desired state naming it.

    Returns (chunks cleared, desired states cleared). A desired manifest left pointing at
    deleted chunks would hold its devices in ``downloading`` until they stall.
    """
    topics = FleetTopics(prefix)
    desired = {
        **broker.collect(topics.every_device("model/desired"), 1.0),
        **broker.collect(topics.every_group("model/desired"), 1.0),
    }
    stale = []
    for topic, payload in desired.items():
        try:
            body = loads(payload) if payload else None
        except ValueError:
            continue
        if isinstance(body, dict) and (body.get("name"), body.get("version")) == (name, version):
            stale.append(topic)
    chunks = list(broker.collect(topics.release_chunks(name, version), 2.0))
    releases = published_releases(broker, prefix)
    mine = releases.pop(topics.release(name, version), None)
    if mine is not None:  # its shared chunks that no other release on the broker lists
        unused = shared_chunks_in({"": mine}) - shared_chunks_in(releases)
        chunks += [topics.shared_chunk(digest) for digest in sorted(unused)]
    clear = [*stale, *chunks, topics.release(name, version)]
    infos = [broker.publish(topic, b"") for topic in clear]
    for info in infos:
        info.wait_for_publish(30)
    return len(chunks), len(stale)


def published_releases(
    broker: Broker, prefix: str = DEFAULT_PREFIX, quiet_s: float | None = None
) -> dict[str, Manifest]:
    """Every release index retained on the broker, by topic (unreadable ones left out).

    ``quiet_s`` (see ``Broker.collect``) only where a release missed costs bytes: never for
    ``clear_release``, which would delete the chunks a missed release still uses.
    """
    found = {}
    topic_filter = FleetTopics(prefix).every_release()
    for topic, payload in broker.collect(topic_filter, RELEASES_WAIT_S, quiet_s).items():
        with contextlib.suppress(ValueError):  # ValidationError is a ValueError
            found[topic] = Manifest.model_validate(loads(payload))
    return found


def shared_chunks_in(releases: dict[str, Manifest]) -> set[str]:
    """The hashes of the content-defined chunks these releases use."""
    return {
        digest
        for manifest in releases.values()
        for variant in manifest.variants
        if variant.cdc is not None
        for digest in variant.chunks
    }
