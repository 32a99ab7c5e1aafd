"""A 3-node NATS cluster with MQTT, run from the shipped ``configs/nats/cluster-node.conf``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .conftest import REPO
from .mqtt_helpers import free_port

NATS = shutil.which("nats-server") or "/usr/sbin/nats-server"
CONFIG = REPO / "configs" / "nats" / "cluster-node.conf"


class NatsNode:
    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.mqtt_port = free_port()
        self.cluster_port = free_port()
        self.client_port = free_port()
        self.log = workdir / f"nats-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self, peers: list[NatsNode]) -> None:
        routes = [f"nats-route://127.0.0.1:{p.cluster_port}" for p in peers]
        env = {
            **os.environ,
            "NODE": self.name,
            "CLIENT_LISTEN": f"127.0.0.1:{self.client_port}",
            "CLUSTER_LISTEN": f"127.0.0.1:{self.cluster_port}",
            "MQTT_LISTEN": f"127.0.0.1:{self.mqtt_port}",
            "STORE": str(self.workdir / f"jetstream-{self.name}"),
            "ROUTE_1": routes[0],
            "ROUTE_2": routes[1],
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [NATS, "-c", str(CONFIG)], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def serves_mqtt(port: int, timeout: float = 20) -> bool:
    """True once a QoS 1 subscription on ``port`` is granted: JetStream is up cluster-wide."""
    granted = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{port}", protocol=mqtt.MQTTv311
    )
    client.on_connect = lambda c, *_: c.subscribe("edgefleet/v1/probe", qos=1)
    client.on_subscribe = lambda *_: granted.set()
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except OSError:
        return False
    client.loop_start()
    try:
        return granted.wait(timeout)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()


class NatsCluster:
    """Three nodes routed to each other; ``start`` returns once every node serves MQTT."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [NatsNode(workdir, f"n{i}") for i in range(3)]

    def start(self, timeout: float = 90) -> NatsCluster:
        for node in self.nodes:
            node.start([p for p in self.nodes if p is not node])
        deadline = time.monotonic() + timeout
        waiting = list(self.nodes)
        while waiting and time.monotonic() < deadline:
            if serves_mqtt(waiting[0].mqtt_port, timeout=min(20, deadline - time.monotonic())):
                waiting.pop(0)
            else:
                time.sleep(0.5)
        if waiting:
            self.stop()
            raise AssertionError(f"NATS nodes {[n.name for n in waiting]} never served MQTT")
        return self

    def by_port(self, port: int) -> NatsNode:
        return next(n for n in self.nodes if n.mqtt_port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
