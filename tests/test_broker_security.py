"""The shipped mosquitto configuration, run for real: authentication and the ACL matrix.

Denials are proven by delivery: a second, authorised client must receive nothing (MQTT 3.1.1
acks look like success either way); with MQTT 5 the PUBACK/SUBACK must carry 0x87.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from .certs import CA
from .conftest import REPO, cli_command
from .mqtt_helpers import MOSQUITTO, free_port, wait_for

SHIPPED = REPO / "configs" / "mosquitto"
NOT_AUTHORIZED = 0x87


@dataclass
class Env:
    port: int
    ca: CA
    folder: Path
    passwords: dict[str, str]
    proc: subprocess.Popen[bytes]


def _adapt(config: str, folder: Path, port: int, server: tuple[Path, Path], ca: Path) -> str:
    """The shipped file with this test's port and paths; nothing else changes."""
    text = config.replace("listener 8883", f"listener {port} 127.0.0.1")
    text = text.replace("/etc/mosquitto/edgefleet/passwd", str(folder / "passwd"))
    text = text.replace("/etc/mosquitto/edgefleet/acl", str(folder / "acl"))
    text = text.replace("/etc/mosquitto/edgefleet/ca.crt", str(ca))
    text = text.replace("/etc/mosquitto/edgefleet/server.crt", str(server[0]))
    text = text.replace("/etc/mosquitto/edgefleet/server.key", str(server[1]))
    text = text.replace("/var/lib/mosquitto/", f"{folder}/")
    settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("/etc/mosquitto" in line for line in settings)
    return f"user root\nlog_dest file {folder / 'broker.log'}\n" + text


def _start(folder: Path, conf_name: str, ca: CA) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    server = ca.issue("localhost", server=True)
    conf = folder / conf_name
    conf.write_text(_adapt((SHIPPED / conf_name).read_text(), folder, port, server, ca.cert_path))
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    assert proc.poll() is None, (folder / "broker.log").read_text()
    return port, proc


def _add(folder: Path, device: str, groups: str = "", *extra: str) -> str:
    args = ["broker", "add-device", device, "--acl", str(folder / "acl")]
    if groups:
        args += ["--groups", groups]
    proc = subprocess.run(
        cli_command(*args, *extra), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Env]:
    (tmp_path / "acl").write_text((SHIPPED / "acl").read_text())
    passwords = {}
    for user, groups in (("dev-a", "lab"), ("dev-b", "")):
        out = _add(tmp_path, user, groups, "--passwd", str(tmp_path / "passwd"))
        passwords[user] = re.search(r"^password: (\S+)$", out, re.MULTILINE).group(1)  # type: ignore[union-attr]
    for role in ("operator", "collector"):
        passwords[role] = f"{role}-secret"
        subprocess.run(
            ["mosquitto_passwd", "-b", str(tmp_path / "passwd"), role, passwords[role]],
            check=True,
            capture_output=True,
        )
    ca = CA(tmp_path)
    port, proc = _start(tmp_path, "mosquitto.conf", ca)
    yield Env(port, ca, tmp_path, passwords, proc)
    proc.kill()
    proc.wait(5)


class Client:
    """A v5 client that records connect result, message deliveries and ack reason codes."""

    def __init__(
        self,
        env: Env,
        user: str | None,
        password: str | None = None,
        cert: tuple[Path, Path] | None = None,
        ca: Path | None = None,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=user or "anon", protocol=mqtt.MQTTv5
        )
        if user is not None and cert is None:
            self.client.username_pw_set(user, password)
        self.client.tls_set(
            ca_certs=str(ca or env.ca.cert_path),
            certfile=str(cert[0]) if cert else None,
            keyfile=str(cert[1]) if cert else None,
        )
        self.connack: Any = None
        self.got: list[str] = []
        self.puback: dict[int, int] = {}
        self.suback: dict[int, list[int]] = {}
        self.done = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.got.append(m.topic)
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.puback.__setitem__(mid, rc.value)
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.suback.__setitem__(
            mid, [rc.value for rc in rcs]
        )
        try:
            self.client.connect("127.0.0.1", env.port)
        except OSError:
            self.done.set()
            return
        self.client.loop_start()
        self.done.wait(5)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack = rc.value
        self.done.set()

    def publish(self, topic: str) -> int:
        info = self.client.publish(topic, b"{}", qos=1)
        wait_for(lambda: info.mid in self.puback, 5, f"PUBACK for {topic}")
        return self.puback[info.mid]

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        wait_for(lambda: mid in self.suback, 5, f"SUBACK for {topic}")
        return self.suback[mid]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_authentication(password_broker: Env) -> None:
    env = password_broker
    anon = Client(env, None)
    assert anon.connack != 0
    wrong = Client(env, "dev-a", "not-the-password")
    assert wrong.connack in (134, 135)  # bad user name or password / not authorised
    good = Client(env, "dev-a", env.passwords["dev-a"])
    assert good.connack == 0
    for client in (anon, wrong, good):
        client.close()


def test_acl_matrix(password_broker: Env) -> None:
    env = password_broker
    op = Client(env, "operator", env.passwords["operator"])
    assert op.subscribe("edgefleet/v1/#") == [1]
    dev_a = Client(env, "dev-a", env.passwords["dev-a"])
    dev_b = Client(env, "dev-b", env.passwords["dev-b"])

    denied = [
        "edgefleet/v1/devices/dev-b/predictions",  # another device's data
        "edgefleet/v1/devices/dev-b/status",
        "edgefleet/v1/devices/dev-a/model/desired",  # its own desired state: operator only
        "edgefleet/v1/models/lite0/1/cpu/0",  # model chunks: operator only
        "edgefleet/v1/devices/dev-b/cmd/ping",  # commanding others
        "edgefleet/v1/groups/lab/cmd/ping",
    ]
    for topic in denied:
        assert dev_a.publish(topic) == NOT_AUTHORIZED, topic
    assert dev_a.publish("edgefleet/v1/devices/dev-a/predictions") == 0
    wait_for(lambda: "edgefleet/v1/devices/dev-a/predictions" in op.got, 5, "allowed publish")
    time.sleep(0.3)
    assert op.got == ["edgefleet/v1/devices/dev-a/predictions"]

    # mosquitto 2.0 grants every SUBACK and enforces "read" when it delivers, so the
    # subscription denials are proven by what arrives (and by 0x87 where a broker sends it).
    for client, topic in (
        (dev_a, "edgefleet/v1/devices/dev-b/cmd/#"),
        (dev_b, "edgefleet/v1/groups/lab/cmd/#"),  # not dev-b's group
    ):
        assert client.subscribe(topic)[0] in (1, NOT_AUTHORIZED)
    assert dev_a.subscribe("edgefleet/v1/devices/dev-a/cmd/#") == [1]
    assert dev_a.subscribe("edgefleet/v1/groups/lab/cmd/#") == [1]  # its group (add-device)
    assert dev_a.subscribe("edgefleet/v1/models/#") == [1]
    op.publish("edgefleet/v1/devices/dev-b/cmd/ping")
    op.publish("edgefleet/v1/groups/lab/cmd/ping")
    op.publish("edgefleet/v1/devices/dev-a/cmd/ping")
    wait_for(lambda: len(dev_a.got) >= 2, 5, "dev-a's commands")
    time.sleep(0.3)
    assert sorted(dev_a.got) == [
        "edgefleet/v1/devices/dev-a/cmd/ping",
        "edgefleet/v1/groups/lab/cmd/ping",
    ]
    assert dev_b.got == []

    collector = Client(env, "collector", env.passwords["collector"])
    assert collector.subscribe("$share/c/edgefleet/v1/devices/+/predictions") == [1]
    assert collector.publish("edgefleet/v1/devices/dev-a/ack") < 0x80
    assert collector.publish("edgefleet/v1/devices/dev-a/cmd/ping") == NOT_AUTHORIZED
    for client in (op, dev_a, dev_b, collector):
        client.close()


def test_mtls_variant(tmp_path: Path) -> None:
    (tmp_path / "acl").write_text((SHIPPED / "acl").read_text())
    ca = CA(tmp_path)
    port, proc = _start(tmp_path, "mosquitto-mtls.conf", ca)
    env = Env(port, ca, tmp_path, {}, proc)
    try:
        _add(
            tmp_path,
            "dev-a",
            "lab",
            "--ca-cert",
            str(ca.cert_path),
            "--ca-key",
            str(ca.key_path),
            "--out",
            str(tmp_path / "certs"),
        )
        cert = (tmp_path / "certs" / "dev-a.crt", tmp_path / "certs" / "dev-a.key")
        good = Client(env, "dev-a", cert=cert)
        assert good.connack == 0
        # Identity comes from the certificate: %u = dev-a.
        assert good.publish("edgefleet/v1/devices/dev-a/metrics") < 0x80  # 0x10: no one listens
        assert good.publish("edgefleet/v1/devices/dev-b/metrics") == NOT_AUTHORIZED
        good.close()

        rogue = CA(tmp_path, name="rogue CA")
        forged = rogue.issue("dev-a")
        bad = Client(env, "dev-a", cert=forged)
        assert bad.connack != 0
        no_cert = Client(env, "dev-a", password="x")  # noqa: S106 - a wrong one on purpose
        assert no_cert.connack != 0
    finally:
        proc.kill()
        proc.wait(5)


def test_add_device_refuses_bad_input(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    cases = [
        (
            ["broker", "add-device", "bad id!", "--acl", str(acl), "--passwd", "p"],
            "invalid device id",
        ),
        (
            ["broker", "add-device", "operator", "--acl", str(acl), "--passwd", "p"],
            "reserved role name",
        ),
        (["broker", "add-device", "dev-x", "--acl", str(acl)], "give either --passwd"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            cli_command(*args), capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 2
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert sys.executable
