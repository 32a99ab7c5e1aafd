"""Several brokers: the agent moves to the next node of a cluster when its broker dies, and a
site broker bridged to a central one carries everything across a central restart.

Two independent mosquittos stand in for two nodes (they share nothing, which is the harder
case: nothing the dead node held is anywhere else). In collector ack mode the device keeps
every message until the collector, here on the surviving node, has stored it.
"""

from __future__ import annotations

import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from edgefleet.collector.collector import Collector, CollectorSettings
from edgefleet.collector.store import Store
from edgefleet.errors import UserError
from edgefleet.mqtt.link import parse_urls

from .conftest import REPO, cli_command
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for


def _stored_seqs(db: Path) -> set[int]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT seq FROM predictions")}


def test_the_agent_moves_to_the_next_broker_and_loses_nothing(tmp_path: Path) -> None:
    node_a, node_b = Broker(tmp_path), Broker(tmp_path)
    node_a.start()  # node B is down at first: a start there fails over to A
    config = agent_config(
        tmp_path,
        node_a.url,
        fps=20,
        mqtt_extra=(
            f"urls: ['{node_a.url}', '{node_b.url}']\n"
            "ack_mode: collector\nresend_after_s: 1\nkeepalive_s: 5\n"
        ),
    )
    watcher_a = Subscriber(node_a.port, ["edgefleet/v1/devices/+/status"]).start()
    db = tmp_path / "fleet.db"
    collector: Collector | None = None
    try:
        with running(config) as agent:
            wait_for(
                lambda: any(m.json()["state"] == "online" for m in watcher_a.on("/status")),
                30,
                "online on node A",
            )
            wait_for(lambda: len(agent.truth()) > 20, 20, "results made on node A")
            node_b.start()
            collector = Collector(
                CollectorSettings(broker=node_b.url, db=f"sqlite:///{db}", client_id="c-b")
            )
            collector.start()
            assert collector.connected.wait(10)
            node_a.kill()  # the node dies with what it held
            wait_for(lambda: len(_stored_seqs(db)) > 0, 30, "the collector on B gets data")
            made = {r["seq"] for r in agent.truth()}
            wait_for(lambda: made <= _stored_seqs(db), 30, "every result made before, stored on B")
            links = [e for e in agent.logs() if e.get("event") == "mqtt online"]
            assert {e.get("broker") for e in links} == {
                f"127.0.0.1:{node_a.port}",
                f"127.0.0.1:{node_b.port}",
            }
            assert agent.terminate() == 0
    finally:
        watcher_a.stop()
        if collector is not None:
            collector.stop()
        node_b.kill()
        node_a.kill()


def test_broker_lists_are_checked() -> None:
    assert parse_urls("mqtt://a:1, mqtt://b") == [("a", 1, False), ("b", 1883, False)]
    assert parse_urls(["mqtts://a"]) == [("a", 8883, True)]
    with pytest.raises(UserError, match="mqtt:// for all of them"):
        parse_urls("mqtt://a,mqtts://b")
    with pytest.raises(UserError, match="no broker URL"):
        parse_urls(" , ")
    with pytest.raises(UserError, match="scheme must be"):
        parse_urls("mqtt://a,http://b")


def _bridge(central: Broker) -> str:
    """The shipped site-bridge config's bridge settings and topics, pointed at ``central``."""
    shipped = (REPO / "configs" / "mosquitto" / "bridge-site.conf").read_text().splitlines()
    keep = ("topic ", "cleansession", "try_private", "notifications", "bridge_protocol_version")
    lines = [line for line in shipped if line.startswith(keep)]
    return "\n".join(
        [
            "connection central",
            f"address 127.0.0.1:{central.port}",
            "remote_clientid site-test-bridge",
            "local_clientid site-test-bridge-local",
            "restart_timeout 1 2",
            *lines,
        ]
    )


def test_site_broker_bridged_to_a_central_one_that_restarts(tmp_path: Path) -> None:
    central = Broker(tmp_path).start()
    site = Broker(tmp_path, extra=_bridge(central)).start()
    config = agent_config(
        tmp_path,
        site.url,
        fps=20,
        mqtt_extra="ack_mode: collector\nresend_after_s: 2\n",
    )
    db = tmp_path / "fleet.db"
    collector = Collector(CollectorSettings(broker=central.url, db=f"sqlite:///{db}"))
    collector.start()
    acks = Subscriber(site.port, ["edgefleet/v1/devices/+/ack"]).start()
    try:
        assert collector.connected.wait(10)
        with running(config) as agent:
            wait_for(lambda: len(_stored_seqs(db)) > 20, 30, "results through the bridge")
            central.stop()  # the central broker goes away (no persistence: it forgets all)
            wait_for(lambda: len(agent.truth()) > len(_stored_seqs(db)) + 20, 20, "a backlog")
            central.start()
            made = {r["seq"] for r in agent.truth()}
            wait_for(lambda: made <= _stored_seqs(db), 60, "everything made, stored centrally")
            # the collector's acknowledgements come back down the bridge to the device
            stored = len(acks.on("/ack"))
            wait_for(lambda: len(acks.on("/ack")) > stored, 10, "acks on the site broker")
            assert agent.terminate() == 0
    finally:
        acks.stop()
        collector.stop()
        site.kill()
        central.kill()


PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def test_two_collectors_one_killed_mid_stream_lose_nothing_and_store_once(
    tmp_path: Path, broker: Broker
) -> None:
    try:
        Store(PG_URL).close()
    except UserError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    device = f"dev-{uuid.uuid4().hex[:8]}"  # the database is shared between runs
    config = agent_config(
        tmp_path,
        broker.url,
        device=device,
        fps=30,
        mqtt_extra="ack_mode: collector\nresend_after_s: 2\n",
    )
    logs = [(tmp_path / f"collector-{i}.log").open("wb") for i in range(2)]
    collectors = [
        subprocess.Popen(
            cli_command("collect", "--broker", broker.url, "--db", PG_URL),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    store = Store(PG_URL)

    def stored() -> tuple[int, int]:
        cur = store.cursor()
        cur.execute(
            "SELECT count(*), count(DISTINCT (boot_id, seq)) FROM predictions WHERE device = %s",
            (device,),
        )
        total, distinct = cur.fetchone()
        store.commit()
        return int(total), int(distinct)

    try:
        with running(config) as agent:
            wait_for(lambda: stored()[0] > 50, 30, "both collectors storing")
            collectors[0].kill()  # SIGKILL: what it had received and not committed is gone
            collectors[0].wait(10)
            before = len(agent.truth())
            wait_for(lambda: len(agent.truth()) > before + 60, 20, "reporting goes on")
            made = len({r["seq"] for r in agent.truth()})
            wait_for(lambda: stored()[1] >= made, 60, "every result stored by the survivor")
            assert agent.terminate() == 0
        total, distinct = stored()
        assert total == distinct  # nothing stored twice
    finally:
        for proc in collectors:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        for log in logs:
            log.close()
        store.close()


def test_the_rollout_state_is_announced_again_after_the_broker_lost_it(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    from edgefleet.factory import factory_model_path
    from edgefleet.operator.releases import Broker as Operator
    from edgefleet.operator.releases import build_release, publish_release

    pem = keys[1].read_text().replace("\\n", "\\\\n")
    config = agent_config(
        tmp_path,
        broker.url,
        fps=10,
        extra=f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 3\n',
    )
    topic = "edgefleet/v1/devices/dev-1/rollout"
    with running(config) as agent:
        sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
        wait_for(lambda: sub.on("/status"), 30, "online")
        manifest, blobs = build_release(
            {"cpu": factory_model_path()}, "again", 1, keys[0], "release", 3600
        )
        with Operator(broker.url) as operator:
            publish_release(operator, manifest, blobs, ["device:dev-1"])
        wait_for(
            lambda: any(m.payload and m.json()["state"] == "active" for m in sub.on(topic)),
            60,
            "active",
        )
        sub.stop()
        broker.restart()  # no persistence: every retained message is gone
        late = Subscriber(broker.port, [topic]).start()
        wait_for(lambda: late.on(topic), 30, "the rollout state, published again")
        late.stop()
        later = Subscriber(broker.port, [topic]).start()  # what a dashboard starting now gets
        wait_for(lambda: later.on(topic), 10, "the rollout state, retained")
        state = later.on(topic)[-1]
        later.stop()
        assert state.retain
        assert state.json()["state"] == "active"
        assert state.json()["rollout_id"] == manifest.rollout_id
        assert agent.terminate() == 0
