"""The protocol on a real clustered broker: three NATS nodes (MQTT 3.1.1 over JetStream).

The agent reports to whichever node it picked (node A), the collector reads on node B, the
rollout is published on node C. Node A is SIGKILLed while the agent reports and downloads:
the agent moves to a surviving node, the collector stores every result the agent made
(collector ack mode), the rollout completes from the replicated retained chunks, and the
last will fires on the node that holds the agent's connection when that connection is lost.
"""

from __future__ import annotations

import shutil
import sqlite3
from functools import partial
from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from edgefleet.collector.collector import Collector, CollectorSettings
from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import build_release
from edgefleet.rollout.release import chunk

from .mqtt_helpers import AgentProcess, Subscriber, agent_config, running, wait_for
from .nats_helpers import NATS, NatsCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(NATS).exists(), reason="nats-server is not installed"),
]


def _stored_seqs(db: Path) -> set[int]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT seq FROM predictions")}


def _online_ports(agent: AgentProcess) -> list[int]:
    events = [e for e in agent.logs() if e.get("event") == "mqtt online"]
    return [int(str(e["broker"]).rsplit(":", 1)[1]) for e in events]


def _states(sub: Subscriber, rollout_id: str) -> list[str]:
    bodies = [m.json() for m in sub.on("/rollout") if m.payload]
    return [str(b["state"]) for b in bodies if b.get("rollout_id") == rollout_id]


def _active(sub: Subscriber, rollout_id: str) -> bool:
    return "active" in _states(sub, rollout_id)


def _progress(agent: AgentProcess) -> float:
    """How far the agent's download has come, by its own log (100 once past downloading)."""
    progress = 0.0
    for event in agent.logs():
        if event.get("event") != "rollout" or event.get("name") != "moved":
            continue
        if event["state"] == "downloading":
            progress = float(event["progress"])
        elif event["state"] != "received":
            progress = 100.0
    return progress


def _publish_chunks(operator: Operator, pieces: list[bytes], indices: range) -> None:
    for index in indices:
        topic = f"edgefleet/v1/models/moved/2/cpu/{index}"
        operator.publish(topic, pieces[index]).wait_for_publish(30)


def _offline(sub: Subscriber) -> int:
    return sum(1 for m in sub.on("/status") if m.payload and m.json()["state"] == "offline")


def test_agent_collector_and_rollout_survive_the_loss_of_a_nats_node(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from edgefleet.factory import factory_model_path

    cluster = NatsCluster(tmp_path).start()
    urls = ", ".join(f"'{n.url}'" for n in cluster.nodes)
    pem = keys[1].read_text().replace("\\n", "\\\\n")
    config = agent_config(
        tmp_path,
        cluster.nodes[0].url,
        fps=20,
        mqtt_extra=(
            f"urls: [{urls}]\nprotocol: '3.1.1'\n"
            # After a node is lost, NATS takes 4-14 s to make each subscription's JetStream
            # consumer: a keepalive that short (paho gives up at twice it) churns sessions.
            "ack_mode: collector\nresend_after_s: 2\nkeepalive_s: 15\n"
        ),
        extra=f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 3\n',
    )
    db = tmp_path / "fleet.db"
    collector: Collector | None = None
    watcher: Subscriber | None = None
    try:
        with running(config) as agent:
            wait_for(lambda: _online_ports(agent), 60, "the agent online on some node")
            node_a = cluster.by_port(_online_ports(agent)[0])
            node_b, node_c = (n for n in cluster.nodes if n is not node_a)
            watcher = Subscriber(
                node_b.mqtt_port,
                ["edgefleet/v1/devices/+/status", "edgefleet/v1/devices/+/rollout"],
                protocol=MQTTProtocolVersion.MQTTv311,
            ).start()
            collector = Collector(
                CollectorSettings(
                    broker=node_b.url, db=f"sqlite:///{db}", protocol="3.1.1", share_group=None
                )
            )
            collector.start()
            assert collector.connected.wait(30)
            wait_for(lambda: len(_stored_seqs(db)) > 20, 60, "results stored through node B")

            manifest, blobs = build_release(
                {"cpu": factory_model_path()},
                "moved",
                2,
                keys[0],
                "release",
                3600,
                chunk_size=64 << 10,
            )
            pieces = chunk(blobs["cpu"], 64 << 10)
            half = len(pieces) // 2
            # Half the chunks and the desired release, on node C; the rest once node A is gone,
            # so that node A dies while the agent is downloading.
            with Operator(node_c.url) as operator:
                _publish_chunks(operator, pieces, range(half))
                operator.publish(
                    "edgefleet/v1/devices/dev-1/model/desired", manifest.model_dump_json().encode()
                ).wait_for_publish(30)
            wait_for(lambda: _progress(agent) > 0, 60, "the agent downloading")
            node_a.kill()  # the node dies with the agent's connection and what it held
            assert _progress(agent) < 100

            wait_for(lambda: set(_online_ports(agent)) - {node_a.mqtt_port}, 120, "agent moved")
            with Operator(node_c.url) as operator:
                _publish_chunks(operator, pieces, range(half, len(pieces)))
            wait_for(
                lambda: "active" in _states(watcher, manifest.rollout_id), 120, "release active"
            )
            made = {r["seq"] for r in agent.truth()}
            wait_for(lambda: made <= _stored_seqs(db), 90, "every result made, stored")

            # The last will: held by the surviving node that has the agent's connection.
            before = _offline(watcher)
            agent.kill()
            wait_for(lambda: _offline(watcher) > before, 60, "the last will")
    finally:
        if watcher is not None:
            watcher.stop()
        if collector is not None:
            collector.stop()
        cluster.stop()
        shutil.rmtree(tmp_path / "state", ignore_errors=True)


def test_a_content_defined_release_and_its_delta_reach_a_device_on_a_nats_cluster(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Chunks fetched by hash on NATS: one subscription per chunk (QoS 0; at QoS 1 NATS makes
    a JetStream consumer for each and the download stalled), then a retrain that shares all
    but its head and labels."""
    from edgefleet.operator.releases import publish_release

    from .test_delta import FP32, _relabelled

    cluster = NatsCluster(tmp_path).start()
    pem = keys[1].read_text().replace("\n", "\\n")
    config = agent_config(
        tmp_path,
        cluster.nodes[0].url,
        fps=10,
        mqtt_extra="protocol: '3.1.1'\nkeepalive_s: 15\n",
        extra=f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 3\n',
    )
    watcher: Subscriber | None = None
    try:
        watcher = Subscriber(
            cluster.nodes[1].mqtt_port,
            ["edgefleet/v1/devices/+/rollout"],
            protocol=MQTTProtocolVersion.MQTTv311,
        ).start()
        relabelled = _relabelled(FP32, tmp_path / "relabelled.tflite")
        with running(config) as agent:
            wait_for(lambda: _online_ports(agent), 60, "the agent online")
            for version, model in ((1, FP32), (2, relabelled)):
                manifest, blobs = build_release(
                    {"cpu": model}, "cdc", version, keys[0], "release", 3600
                )
                assert manifest.variants[0].cdc is not None
                with Operator(cluster.nodes[2].url) as operator:
                    publish_release(operator, manifest, blobs, ["device:dev-1"])
                wait_for(partial(_active, watcher, manifest.rollout_id), 120, f"v{version} active")
            final = [m.json() for m in watcher.on("/rollout") if m.payload][-1]
            assert final["version"] == 2
            assert final["fetched_bytes"] < 0.01 * final["size"]
            agent.terminate()
    finally:
        if watcher is not None:
            watcher.stop()
        cluster.stop()
        shutil.rmtree(tmp_path / "state", ignore_errors=True)
