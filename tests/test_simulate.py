"""The fleet simulator (``edgefleet simulate``) against a real mosquitto and collector: the
devices it plays are seen as devices by every fleet tool, and speak the protocol faithfully."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.factory import factory_model_path

from .conftest import cli_command
from .mqtt_helpers import Broker, Subscriber, wait_for


def _simulate(broker: Broker, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command("simulate", "--broker", broker.url, "--report-every", "1", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _statuses(sub: Subscriber) -> dict[str, str]:
    latest: dict[str, str] = {}
    for message in sub.on("/status"):
        if message.payload:
            body = message.json()
            latest[body["device"]] = body["state"]
    return latest


def test_simulated_devices_report_into_the_collector_nothing_lost(
    tmp_path: Path, broker: Broker
) -> None:
    db = tmp_path / "fleet.db"
    collector = subprocess.Popen(
        cli_command("collect", "--broker", broker.url, "--db", f"sqlite:///{db}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        sim = _simulate(
            broker, "--devices", "40", "--rate", "2", "--metrics-interval", "1", "--duration", "6"
        )
        out, err = sim.communicate(timeout=60)
        assert sim.returncode == 0, err
        summary = json.loads(out)
        sent = summary["published"]["predictions"] + summary["published"]["metrics"]
        assert summary["connects"] == 40
        assert summary["published"]["predictions"] >= 40 * 2 * 4  # 2/s each for most of 6 s
        # The collector acknowledged (nearly) everything, and stored exactly what was sent.
        assert summary["acked"] + summary["unacked"] == sent
        assert summary["unacked"] <= 40 * 3  # the last moment's messages, unconfirmed yet
        assert summary["ack_latency_ms"]["p99"] < 5000

        def stored() -> int:
            with sqlite3.connect(db) as conn:
                return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])

        wait_for(lambda: stored() == sent, 20, f"{sent} messages stored")
        with sqlite3.connect(db) as conn:
            devices = conn.execute("SELECT count(DISTINCT device) FROM messages").fetchone()[0]
            states = dict(conn.execute("SELECT state, count(*) FROM device_status GROUP BY state"))
            rows = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
        assert devices == 40
        assert states == {"stopped": 40}  # a graceful stop says so; the will stays unsent
        assert rows == summary["published"]["predictions"]  # one result per message
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(15)


def test_a_killed_simulator_leaves_every_last_will(broker: Broker) -> None:
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/+/status"]).start()
    sim = _simulate(broker, "--devices", "30", "--rate", "1")
    try:
        wait_for(
            lambda: list(_statuses(sub).values()).count("online") == 30, 30, "30 devices online"
        )
        sim.send_signal(signal.SIGKILL)
        sim.communicate(timeout=10)
        wait_for(lambda: list(_statuses(sub).values()).count("offline") == 30, 30, "30 last wills")
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.communicate(timeout=10)
        sub.stop()


def test_ping_and_a_group_rollout_with_real_downloads(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/+/status"]).start()
    sim = _simulate(
        broker,
        "--devices",
        "12",
        "--rate",
        "0.5",
        "--download-share",
        "0.5",
        "--rollout-step",
        "0.2",
        "--groups",
        "sim,lab",
        "--seed",
        "1",
    )
    try:
        wait_for(
            lambda: list(_statuses(sub).values()).count("online") == 12, 30, "12 devices online"
        )
        replies: list[dict[str, object]] = []
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.on_message = lambda _c, _u, msg: replies.append(json.loads(msg.payload))
        client.connect("127.0.0.1", broker.port)
        client.subscribe("edgefleet/v1/devices/sim-00003/reply/#", qos=1)
        client.loop_start()
        time.sleep(0.3)
        client.publish("edgefleet/v1/devices/sim-00003/cmd/ping", b'{"request_id":"r1"}', qos=1)
        wait_for(lambda: replies, 10, "a reply to ping")
        client.loop_stop()
        client.disconnect()
        assert replies[0]["ok"] is True
        assert replies[0]["request_id"] == "r1"
        assert replies[0]["device"] == "sim-00003"

        done = subprocess.run(
            cli_command(
                "rollout",
                "publish",
                str(factory_model_path()),
                "--name",
                "sim-model",
                "--version",
                "1",
                "--target",
                "group:lab",
                "--key",
                str(keys[0]),
                "--broker",
                broker.url,
                "--wait-timeout",
                "120",
            ),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "12/12 active" in done.stderr
    finally:
        sim.send_signal(signal.SIGTERM)
        out, err = sim.communicate(timeout=30)
        sub.stop()
    assert sim.returncode == 0, err
    summary = json.loads(out)
    assert summary["chunk_errors"] == 0
    assert summary["rollout_states"]["active"] == 12
    # Half of them really fetched and checked all 43 chunks of the 5.5 MB model.
    assert summary["downloaded"] == 6


def test_devices_move_to_the_next_broker_when_theirs_dies(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = Broker(tmp_path / "a").start()
    second = Broker(tmp_path / "b").start()
    urls = f"{first.url},{second.url}"
    watch = Subscriber(second.port, ["edgefleet/v1/devices/+/status"]).start()
    sim = subprocess.Popen(
        cli_command(
            "simulate", "--broker", urls, "--devices", "10", "--rate", "1", "--report-every", "1"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Spread over the list: half of them start on the second broker.
        wait_for(lambda: list(_statuses(watch).values()).count("online") == 5, 30, "5 on b")
        first.kill()
        wait_for(lambda: list(_statuses(watch).values()).count("online") == 10, 60, "all 10 on b")
    finally:
        sim.send_signal(signal.SIGTERM)
        out, err = sim.communicate(timeout=30)
        watch.stop()
        second.kill()
        first.kill()
    assert sim.returncode == 0, err
    summary = json.loads(out)
    assert summary["connects"] >= 15  # 10 at the start, 5 again after the move
    assert summary["disconnects"] >= 5
