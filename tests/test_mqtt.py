"""The MQTT link against a real mosquitto that each test starts, stops and kills itself."""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.collector.collector import Collector, CollectorSettings
from edgefleet.mqtt.link import LinkSettings, MqttLink

from .mqtt_helpers import (
    AgentProcess,
    Broker,
    Subscriber,
    agent_config,
    free_port,
    running,
    wait_for,
)

PREFIX = "edgefleet/v1/devices/dev-1"


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker.port, ["edgefleet/v1/#"]).start()
    yield s
    s.stop()


def _contiguous(seqs: list[int]) -> bool:
    return sorted(set(seqs)) == list(range(1, max(seqs) + 1)) if seqs else False


def test_birth_stopped_and_last_will(tmp_path: Path, broker: Broker, sub: Subscriber) -> None:
    config = agent_config(tmp_path, broker.url)
    with running(config) as agent:
        wait_for(lambda: sub.on("/status"), 20, "birth")
        birth = sub.on("/status")[0]
        body = birth.json()
        assert body["state"] == "online"
        assert body["device"] == "dev-1"
        assert body["model"]["name"] == "efficientnet-lite0"
        assert len(body["model"]["sha256"]) == 64
        assert body["delegate"]["type"] == "cpu"
        assert body["source"]["type"] == "synthetic"
        assert body["groups"] == ["lab"]
        assert "litert" in body["capabilities"]["runtimes"]
        assert body["capabilities"]["delegates"]["cpu"]["available"] is True
        boot_id = body["boot_id"]
        assert agent.terminate() == 0
    wait_for(lambda: len(sub.on("/status")) >= 2, 5, "stopped")
    assert sub.on("/status")[-1].json()["state"] == "stopped"
    assert sub.on("/status")[-1].json()["boot_id"] == boot_id

    with running(config) as agent:
        wait_for(lambda: len(sub.on("/status")) >= 3, 20, "second birth")
        agent.kill()
        wait_for(lambda: sub.on("/status")[-1].json()["state"] == "offline", 10, "last will")
    # The retained status is what a dashboard that connects later sees.
    late = Subscriber(broker.port, [f"{PREFIX}/status"]).start()
    wait_for(lambda: late.on("/status"), 5, "retained status")
    assert late.on("/status")[0].retain
    assert late.on("/status")[0].json()["state"] == "offline"
    late.stop()


def test_predictions_contiguous_with_metrics(
    tmp_path: Path, broker: Broker, sub: Subscriber
) -> None:
    config = agent_config(tmp_path, broker.url, fps=40)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) >= 60, 30, "60 results")
        wait_for(lambda: sub.on("/metrics"), 10, "metrics")
        agent.terminate()
    seqs = sub.result_seqs()
    assert _contiguous(seqs)
    assert len(seqs) == len(set(seqs))
    first = sub.on("/predictions")[0].json()
    assert first["mseq"] >= 1
    assert first["floor"] <= first["mseq"]
    assert first["results"][0]["top"][0]["score"] <= 1
    metrics = sub.on("/metrics")[-1].json()
    assert metrics["inferences"] > 0
    assert set(metrics["latency_ms"]["inference"]) == {"p50", "p90", "p99", "max"}
    assert metrics["spool"]["dropped"] == 0
    assert "cpu_temp_c" not in metrics["health"] or metrics["health"]["cpu_temp_c"] > 0
    assert metrics["health"]["memory"]["total_bytes"] > 0


@pytest.mark.parametrize(
    ("policy", "check"),
    [
        ("mode: change", "change"),
        ("mode: interval\n      interval_ms: 500", "interval"),
        ("min_score: 0.99", "none"),
        ("batch_max: 10\n      batch_ms: 2000", "batch"),
    ],
)
def test_report_policies(
    tmp_path: Path, broker: Broker, sub: Subscriber, policy: str, check: str
) -> None:
    extra = f"    report:\n      {policy}\n"
    config = agent_config(tmp_path, broker.url, fps=30, mqtt_extra=extra)
    with running(config) as agent:
        wait_for(lambda: len(agent.truth()) >= 60, 30, "60 local results")
        time.sleep(0.5)
        agent.terminate()
    results = [r for m in sub.on("/predictions") for r in m.json()["results"]]
    truth = agent.truth()
    if check == "change":
        labels = [r["top"][0]["label"] for r in results]
        assert all(a != b for a, b in itertools.pairwise(labels))
        assert 0 < len(results) < len(truth)
    elif check == "interval":
        times = [r["ts"] for r in results]
        assert all(b - a >= 0.45 for a, b in itertools.pairwise(times))
        assert len(results) <= len(truth) / 8
    elif check == "none":
        assert results == []
    else:
        sizes = [len(m.json()["results"]) for m in sub.on("/predictions")]
        assert max(sizes) == 10
        assert _contiguous([r["seq"] for r in results])


def test_broker_outage_loses_nothing(tmp_path: Path) -> None:
    # The observer keeps a session on a broker that saves it when stopped: what the agent
    # sends before the observer is back (the agent may well reconnect first) waits for it,
    # and what the broker acknowledged and still queued for it at the stop is saved too.
    # Whatever is missing below is the agent's loss, not the observer's.
    broker = Broker(tmp_path, persistence=True).start()
    sub = Subscriber(broker.port, ["edgefleet/v1/#"], client_id="observer", session_s=600)
    sub.start()
    config = agent_config(tmp_path, broker.url, fps=30)
    try:
        with running(config) as agent:
            wait_for(lambda: len(sub.result_seqs()) >= 30, 30, "first results")
            broker.stop()
            time.sleep(10)
            broker.start()
            made = {r["seq"] for r in agent.truth()}  # before and during the outage
            with contextlib.suppress(AssertionError):
                wait_for(lambda: made <= set(sub.result_seqs()), 30, "the backlog")
            agent.terminate()
        seen = set(sub.result_seqs())
        assert len(made) > 30 + 100  # 10 s of results made during the outage
        assert made <= seen, f"missing: {sorted(made - seen)[:20]} of {len(made)}"
        assert any(m.json().get("replayed") for m in sub.on("/predictions"))
    finally:
        sub.stop()
        broker.stop()


def _collector(tmp_path: Path, broker: Broker) -> Collector:
    settings = CollectorSettings(
        broker=broker.url, db=f"sqlite:///{tmp_path / 'fleet.db'}", client_id="collector-test"
    )
    collector = Collector(settings)
    collector.start()
    assert collector.connected.wait(10)
    return collector


def _stored_seqs(tmp_path: Path) -> list[int]:
    db = sqlite3.connect(tmp_path / "fleet.db")
    try:
        return [r[0] for r in db.execute("SELECT seq FROM predictions ORDER BY seq")]
    finally:
        db.close()


def test_collector_mode_survives_broker_sigkill(tmp_path: Path, broker: Broker) -> None:
    config = agent_config(
        tmp_path, broker.url, fps=40, mqtt_extra="    ack_mode: collector\n    resend_after_s: 2\n"
    )
    collector = _collector(tmp_path, broker)
    with running(config) as agent:
        wait_for(lambda: len(_stored_seqs(tmp_path)) >= 40, 30, "stored results")
        broker.kill()  # no persistence: whatever it held is gone
        time.sleep(2)
        broker.start()
        assert collector.connected.wait(20)
        wait_for(lambda: len(agent.truth()) > 0, 5)
        time.sleep(4)
        agent.terminate()
    target = {r["seq"] for r in agent.truth()}
    wait_for(lambda: target <= set(_stored_seqs(tmp_path)), 15, "all results in the database")
    collector.stop()
    stored = _stored_seqs(tmp_path)
    assert len(stored) == len(set(stored))
    assert _contiguous(stored)


def _spool_rows(path: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(path)
    try:
        return list(db.execute("SELECT boot_id, seq FROM outbox"))
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []  # the file exists a moment before the agent has made its table
    finally:
        db.close()


def test_agent_sigkill_with_spooled_backlog(tmp_path: Path, broker: Broker) -> None:
    spool = tmp_path / "state" / "spool.sqlite"
    config = agent_config(
        tmp_path, broker.url, fps=None, jsonl=False, extra="loop: {fps_cap: 400}\n"
    )
    broker.stop()
    with running(config) as agent:
        wait_for(lambda: spool.exists() and len(_spool_rows(spool)) >= 1000, 60, "1000 spooled")
        agent.kill()
    backlog = _spool_rows(spool)
    assert len(backlog) >= 1000
    broker.start()
    sub = Subscriber(broker.port, ["edgefleet/v1/#"]).start()
    old_boot = backlog[0][0]
    with running(config) as agent2:
        # Drained: no row of the killed boot left, the broker acknowledged each (counting all
        # rows instead left the last ones to the stop's budget, short on a loaded machine).
        wait_for(
            lambda: all(boot != old_boot for boot, _ in _spool_rows(spool)), 60, "backlog drained"
        )
        agent2.terminate()
    spooled = sub.on("/predictions") + sub.on("/metrics")
    delivered = {(m.json()["boot_id"], m.json()["mseq"]) for m in spooled}
    missing = [row for row in backlog if row not in delivered]
    assert not missing, f"{len(missing)} spooled messages never delivered"
    replayed = [m.json() for m in sub.on("/predictions") if m.json()["boot_id"] == old_boot]
    assert all(m["replayed"] for m in replayed)
    sub.stop()


def test_spool_full_drops_oldest_and_says_so(tmp_path: Path, broker: Broker) -> None:
    spool = tmp_path / "state" / "spool.sqlite"
    extra = "    spool:\n      max_bytes: 65536\n"
    config = agent_config(
        tmp_path,
        broker.url,
        fps=None,
        jsonl=False,
        mqtt_extra=extra,
        extra="loop: {fps_cap: 300}\n",
    )
    broker.stop()
    with running(config) as agent:

        def dropped() -> int:
            db = sqlite3.connect(spool)
            try:
                row = db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
            except sqlite3.OperationalError as exc:
                # The agent creates the file, then its tables: read between the two (this
                # failed CI once as "no such table: meta"), nothing is dropped yet.
                if "no such table" not in str(exc):
                    raise
                return 0
            finally:
                db.close()
            return int(row[0]) if row else 0

        wait_for(lambda: spool.exists() and dropped() > 100, 60, "drops")
        size = sum(len(r[0]) for r in sqlite3.connect(spool).execute("SELECT payload FROM outbox"))
        assert size <= 65536
        broker.start()
        sub = Subscriber(broker.port, ["edgefleet/v1/#"]).start()
        wait_for(
            lambda: any(m.json()["spool"]["dropped"] > 0 for m in sub.on("/metrics")),
            20,
            "drop count published",
        )
        status = Path(f"/proc/{agent.proc.pid}/status").read_text()
        hwm_mb = (
            int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024
        )
        agent.terminate()
        sub.stop()
    assert hwm_mb < 300


def _command(
    port: int, name: str, payload: bytes, v5: bool = True, target: str = PREFIX
) -> dict[str, object]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    replies: list[mqtt.MQTTMessage] = []
    client.on_message = lambda _c, _u, msg: replies.append(msg)
    client.connect("127.0.0.1", port)
    client.loop_start()
    reply_topic = f"{PREFIX}/reply/#" if not v5 else "test/replies/1"
    client.subscribe(reply_topic, qos=1)
    time.sleep(0.2)
    props = None
    if v5:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "test/replies/1"
        props.CorrelationData = b"corr-42"
    client.publish(f"{target}/cmd/{name}", payload, qos=1, properties=props)
    try:
        wait_for(lambda: replies, 10, f"reply to {name}")
    finally:
        client.loop_stop()
        client.disconnect()
    msg = replies[0]
    if v5:
        assert msg.properties is not None
        assert msg.properties.CorrelationData == b"corr-42"  # type: ignore[attr-defined]
    body: dict[str, object] = json.loads(msg.payload)
    return body


def test_commands_and_malformed_commands(tmp_path: Path, broker: Broker, sub: Subscriber) -> None:
    config = agent_config(tmp_path, broker.url, fps=20)
    with running(config) as agent:
        wait_for(lambda: sub.on("/status") and len(sub.result_seqs()) > 5, 20, "running")
        ping = _command(broker.port, "ping", b"")
        assert ping["ok"] is True
        assert ping["command"] == "ping"

        assert _command(broker.port, "pause", b"{}")["ok"] is True
        time.sleep(0.5)
        paused_at = len(sub.result_seqs())
        time.sleep(1.0)
        assert len(sub.result_seqs()) <= paused_at + 1
        assert _command(broker.port, "resume", b"{}")["ok"] is True
        wait_for(lambda: len(sub.result_seqs()) > paused_at + 5, 10, "resumed")

        set_reply = _command(
            broker.port,
            "set",
            json.dumps({"top_k": 2, "report": {"mode": "every"}, "request_id": "r1"}).encode(),
        )
        assert set_reply["ok"] is True
        assert set_reply["request_id"] == "r1"
        time.sleep(0.5)
        assert len(sub.on("/predictions")[-1].json()["results"][0]["top"]) == 2

        snap = _command(broker.port, "snapshot", b'{"max_side": 64}')
        assert snap["ok"] is True
        result = snap["result"]
        assert isinstance(result, dict)
        assert result["width"] == 64
        assert len(str(result["jpeg_base64"])) > 100

        bad = {
            "ping": (b"not json {", "payload is not JSON"),
            "set": (b'{"top_k": "many"}', "top_k: Input should be a valid integer"),
            "pause": (b'{"force": true}', "force: Extra inputs are not permitted"),
            "selfdestruct": (b"{}", "unknown command 'selfdestruct'"),
            "resume": (b"[1, 2]", "payload must be a JSON object"),
        }
        for name, (payload, error) in bad.items():
            reply = _command(broker.port, name, payload)
            assert reply["ok"] is False
            assert error in str(reply["error"]), reply
        huge = _command(broker.port, "ping", b"{" + b" " * 70_000 + b"}")
        assert huge["ok"] is False
        assert "exceeds" in str(huge["error"])

        # v3.1.1 requester: the reply goes to devices/{id}/reply/{request_id}; group address.
        v3 = _command(
            broker.port,
            "ping",
            b'{"request_id": "abc"}',
            v5=False,
            target="edgefleet/v1/groups/lab",
        )
        assert v3["ok"] is True
        assert v3["request_id"] == "abc"

        before = len(sub.result_seqs())
        wait_for(lambda: len(sub.result_seqs()) > before + 10, 10, "still classifying")
        assert agent.proc.poll() is None
        agent.terminate()


def test_mqtt_311_mode(tmp_path: Path, broker: Broker, sub: Subscriber) -> None:
    config = agent_config(tmp_path, broker.url, fps=30, mqtt_extra='    protocol: "3.1.1"\n')
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) >= 30, 30, "results over 3.1.1")
        reply = _command(broker.port, "ping", b"{}", v5=False)
        assert reply["ok"] is True
        agent.terminate()
    assert _contiguous(sub.result_seqs())
    assert sub.on("/status")[-1].json()["state"] == "stopped"


def test_wrong_credentials_no_reconnect_storm(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run(
        ["mosquitto_passwd", "-b", str(passwd), "dev-1", "right"], check=True, capture_output=True
    )
    broker = Broker(tmp_path, extra=f"password_file {passwd}", anonymous=False).start()
    try:
        extra = "    username: dev-1\n    password: wrong\n    auth_retry_s: 30\n"
        config = agent_config(tmp_path, broker.url, fps=20, mqtt_extra=extra)
        with running(config) as agent:
            wait_for(lambda: len(agent.truth()) > 20, 30, "classifying without the broker")
            time.sleep(4)
            agent.terminate()
        # One probe by the test's own start-up check, one by the agent: no storm.
        assert broker.log_lines("New connection") == 2
        assert broker.log_lines("not authorised") == 1
        errors = [e for e in agent.logs() if "refused the credentials" in str(e.get("event"))]
        assert len(errors) == 1
        assert "Not authorized" in errors[0]["reason"]
    finally:
        broker.kill()


def test_agent_runs_without_any_broker(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "mqtt://127.0.0.1:1", fps=30)
    with running(config) as agent:
        wait_for(lambda: len(agent.truth()) > 30, 30, "classifying while unreachable")
        assert agent.terminate() == 0
    spool = tmp_path / "state" / "spool.sqlite"
    assert len(_spool_rows(spool)) > 10


def test_corrupt_spool_is_moved_aside(tmp_path: Path, broker: Broker, sub: Subscriber) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool.sqlite").write_bytes(b"this is not a database" * 100)
    config = agent_config(tmp_path, broker.url, fps=30)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 10, 30, "results with a fresh spool")
        agent.terminate()
    aside = list(state.glob("spool.sqlite.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not a database")
    assert any("moved aside" in str(e.get("event")) for e in AgentProcess.logs(agent))


def test_tls_with_client_certificate(tmp_path: Path) -> None:
    from .certs import CA

    ca = CA(tmp_path)
    server_cert, server_key = ca.issue("localhost", server=True)
    client_cert, client_key = ca.issue("dev-1")
    port = free_port()
    extra = (
        f"cafile {ca.cert_path}\ncertfile {server_cert}\nkeyfile {server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    broker = Broker(tmp_path, extra=extra, port=port)
    broker.start()
    observer_cert, observer_key = ca.issue("observer")
    observer = Subscriber(
        broker.port, ["edgefleet/v1/#"], tls=(ca.cert_path, observer_cert, observer_key)
    ).start()
    try:
        tls = (
            f"    tls:\n      ca: {ca.cert_path}\n      cert: {client_cert}\n"
            f"      key: {client_key}\n"
        )
        config = agent_config(tmp_path, f"mqtts://127.0.0.1:{port}", fps=20, mqtt_extra=tls)
        with running(config) as agent:
            wait_for(lambda: len(observer.result_seqs()) > 10, 30, "results over mTLS")
            agent.terminate()
        assert broker.log_lines("as dev-1") == 1
        assert observer.on("/status")[0].json()["state"] == "online"

        rogue = CA(tmp_path, name="rogue CA")
        rogue_cert, rogue_key = rogue.issue("dev-1")
        bad_tls = (
            f"    tls:\n      ca: {ca.cert_path}\n      cert: {rogue_cert}\n"
            f"      key: {rogue_key}\n"
        )
        before = broker.log_lines("New client connected")
        config = agent_config(tmp_path, f"mqtts://127.0.0.1:{port}", fps=20, mqtt_extra=bad_tls)
        with running(config) as agent:
            wait_for(lambda: len(agent.truth()) > 20, 30, "classifying while refused")
            agent.terminate()
        assert broker.log_lines("New client connected") == before
    finally:
        observer.stop()
        broker.kill()


class _FakePaho:
    """paho's client at its class boundary: records SUBSCRIBEs, publishes go nowhere."""

    def __init__(self) -> None:
        self.subscribed: list[list[str]] = []

    def subscribe(self, subs: list[tuple[str, object]]) -> tuple[MQTTErrorCode, int]:
        self.subscribed.append([topic for topic, _ in subs])
        return MQTTErrorCode.MQTT_ERR_SUCCESS, len(self.subscribed)

    def publish(self, *_args: object, **_kwargs: object) -> mqtt.MQTTMessageInfo:
        return mqtt.MQTTMessageInfo(0)


def test_a_refused_subscription_is_asked_for_again(tmp_path: Path) -> None:
    """A broker that refuses a subscription (a NATS cluster electing leaders after losing a
    node did, for two of the agent's topics) is asked again on the same connection, with a
    doubling delay, until it grants it; granted topics are not asked for again."""
    settings = LinkSettings(
        url="mqtt://127.0.0.1:1",
        device="dev-1",
        groups=["lab"],
        prefix="edgefleet/v1",
        boot_id="b",
        spool_path=tmp_path / "spool.db",
    )
    link = MqttLink(settings, birth=dict)
    paho = cast(mqtt.Client, fake := _FakePaho())
    ok, refused = (
        ReasonCode(PacketTypes.SUBACK, identifier=1),
        ReasonCode(PacketTypes.SUBACK, identifier=0x80),
    )
    link.net._on_connect(paho, None, None, ReasonCode(PacketTypes.CONNACK, identifier=0), None)
    first = fake.subscribed[-1]
    group = "edgefleet/v1/groups/lab/cmd/+"
    codes = [refused if topic == group else ok for topic in first]
    link.net._on_subscribe(paho, None, 1, codes, None)
    assert link.online.is_set()  # the rest works meanwhile
    link.net._publish_sends(paho)
    assert len(fake.subscribed) == 1  # not before the delay
    time.sleep(1.05)
    link.net._publish_sends(paho)
    assert fake.subscribed[-1] == [group]
    link.net._on_subscribe(paho, None, 2, [refused], None)  # refused again: 2 s now
    time.sleep(1.05)
    link.net._publish_sends(paho)
    assert len(fake.subscribed) == 2
    time.sleep(1.0)
    link.net._publish_sends(paho)
    assert fake.subscribed[-1] == [group]
    link.net._on_subscribe(paho, None, 3, [ok], None)
    time.sleep(1.05)
    link.net._publish_sends(paho)
    assert len(fake.subscribed) == 3  # granted: never asked again
    link.outbox.close()


def test_links_send_small_packets_at_once(tmp_path: Path, broker: Broker) -> None:
    """TCP_NODELAY on the device's and the collector's sockets: paho leaves Nagle's
    algorithm on, which held a download's SUBSCRIBE for 33 ms behind the reports."""
    import socket

    settings = LinkSettings(
        url=broker.url,
        device="dev-1",
        groups=[],
        prefix="edgefleet/v1",
        boot_id="b",
        spool_path=tmp_path / "spool.db",
    )
    link = MqttLink(settings, birth=dict)
    collector = Collector(CollectorSettings(broker=broker.url, db=f"sqlite:///{tmp_path}/c.db"))
    link.start()
    collector.start()
    try:
        assert link.online.wait(10)
        assert collector.connected.wait(10)
        for client in (link.net.client, collector.client):
            assert client is not None
            sock = client.socket()
            assert isinstance(sock, socket.socket)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        collector.stop()
        link.stop()
