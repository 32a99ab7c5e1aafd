"""The shipped mosquitto configuration, run for real: authentication and the ACL matrix.

Every broker here is a stock Debian mosquitto as docs/deploy.md sets it up: the package's
own /etc/mosquitto/mosquitto.conf (taken from Debian's .deb, as it ships) including
conf.d/, where the guide puts exactly one of the shipped drop-ins; the guide's files under
/etc/mosquitto/edgefleet/. Only ports and paths change (all under the test's folder), and
mosquitto runs as root so that it can read that folder.

Denials are proven by delivery: a second, authorised client must receive nothing (MQTT 3.1.1
acks look like success either way); with MQTT 5 the PUBACK/SUBACK must carry 0x87.
"""

from __future__ import annotations

import json
import re
import signal
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
from .mqtt_helpers import MOSQUITTO, debian_mosquitto_conf, free_port, wait_for

SHIPPED = REPO / "configs" / "mosquitto"
NOT_AUTHORIZED = 0x87


@dataclass
class Env:
    port: int  # the devices' listener
    fleet_port: int  # operators and collectors
    ca: CA
    folder: Path
    passwords: dict[str, str]
    proc: subprocess.Popen[bytes]


FILES = ("passwd", "passwd-fleet", "acl", "acl-fleet", "crl.pem")
LISTENERS = (8883, 8884)


def _adapt(
    config: str, folder: Path, ports: tuple[int, ...], server: tuple[Path, Path], ca: Path
) -> str:
    """A shipped or packaged file with this test's ports and paths; nothing else changes."""
    text = config
    for shipped, port in zip(LISTENERS, ports, strict=True):
        text = text.replace(f"listener {shipped}\n", f"listener {port} 127.0.0.1\n")
    for name in FILES:
        text = text.replace(f"/etc/mosquitto/edgefleet/{name}\n", f"{folder / name}\n")
    text = text.replace("/etc/mosquitto/edgefleet/ca.crt", str(ca))
    text = text.replace("/etc/mosquitto/edgefleet/server.crt", str(server[0]))
    text = text.replace("/etc/mosquitto/edgefleet/server.key", str(server[1]))
    text = text.replace("/var/lib/mosquitto/", f"{folder}/")
    text = text.replace("/run/mosquitto/mosquitto.pid", str(folder / "mosquitto.pid"))
    text = text.replace("/var/log/mosquitto/mosquitto.log", str(folder / "broker.log"))
    text = text.replace("/etc/mosquitto/conf.d", str(folder / "conf.d"))
    settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("/etc/mosquitto" in line or "/var/" in line for line in settings), text
    return text


def _start(
    folder: Path,
    conf_name: str,
    ca: CA | None,
    files: tuple[tuple[Path, Path], Path] | None = None,
) -> tuple[tuple[int, int], subprocess.Popen[bytes]]:
    """The packaged mosquitto.conf with the shipped drop-in ``conf_name`` in its conf.d;
    ``files``: (server cert and key, CA) to use."""
    ports = (free_port(), free_port())
    if files is None:
        assert ca is not None
        files = (ca.issue("localhost", server=True), ca.cert_path)
    (folder / "conf.d").mkdir(exist_ok=True)
    dropin = folder / "conf.d" / conf_name
    dropin.write_text(_adapt((SHIPPED / conf_name).read_text(), folder, ports, *files))
    main = folder / "mosquitto.conf"
    main.write_text("user root\n" + _adapt(debian_mosquitto_conf(), folder, ports, *files))
    stderr = folder / "broker.stderr"  # what mosquitto says before its log file is open
    with stderr.open("wb") as err:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(main)], stdout=err, stderr=err)
    try:
        wait_for(lambda: _listening(ports) or proc.poll() is not None, 10, "the broker")
    except AssertionError:
        proc.kill()
        proc.wait(5)
        raise
    if proc.poll() is not None:
        log = folder / "broker.log"
        said = stderr.read_text() + (log.read_text() if log.exists() else "")
        raise AssertionError(f"mosquitto exited: {said}")
    return ports, proc


def _listening(ports: tuple[int, ...]) -> bool:
    import socket

    for port in ports:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
    return True


def _cli(*args: str) -> str:
    proc = subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _add(folder: Path, device: str, groups: str = "", *extra: str) -> str:
    args = ["broker", "add-device", device, "--acl", str(folder / "acl")]
    if groups:
        args += ["--groups", groups]
    return _cli(*args, *extra)


def _password(out: str) -> str:
    found = re.search(r"^password: (\S+)$", out, re.MULTILINE)
    assert found, out
    return found.group(1)


def _add_service(folder: Path, role: str, name: str) -> str:
    """Enrol an operator or collector on the fleet-services listener; its password."""
    out = _cli(
        "broker", f"add-{role}", name,
        "--acl", str(folder / "acl-fleet"), "--passwd", str(folder / "passwd-fleet"),
    )  # fmt: skip
    return _password(out)


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Env]:
    for name in ("acl", "acl-fleet"):
        (tmp_path / name).write_text((SHIPPED / name).read_text())
    passwords = {}
    for user, groups in (("dev-a", "lab"), ("dev-b", "")):
        out = _add(tmp_path, user, groups, "--passwd", str(tmp_path / "passwd"))
        passwords[user] = _password(out)
    services = [("operator", "op-alice"), ("operator", "op-watcher")]
    services += [("collector", "collector-1"), ("collector", "collector-2")]
    for role, name in services:
        passwords[name] = _add_service(tmp_path, role, name)
    ca = CA(tmp_path)
    ports, proc = _start(tmp_path, "edgefleet.conf", ca)
    yield Env(*ports, ca, tmp_path, passwords, proc)
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
        port: int | None = None,
        client_id: str | None = None,
        will: str | None = None,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or user or "anon",
            protocol=mqtt.MQTTv5,
        )
        if will is not None:
            self.client.will_set(will, b"offline", qos=1, retain=True)
        self.disconnected = threading.Event()
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
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
            self.client.connect("127.0.0.1", port or env.port)
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
    op = Client(env, "op-alice", env.passwords["op-alice"], port=env.fleet_port)
    assert op.connack == 0
    assert op.subscribe("edgefleet/v1/#") == [1]
    dev_a = Client(env, "dev-a", env.passwords["dev-a"])
    dev_b = Client(env, "dev-b", env.passwords["dev-b"])

    denied = [
        "edgefleet/v1/devices/dev-b/predictions",  # another device's data
        "edgefleet/v1/devices/dev-b/samples",  # a frame sent in another device's name
        "edgefleet/v1/devices/dev-b/status",
        "edgefleet/v1/devices/dev-a/model/desired",  # its own desired state: operator only
        "edgefleet/v1/models/lite0/1/cpu/0",  # model chunks: operator only
        "edgefleet/v1/devices/dev-b/cmd/ping",  # commanding others
        "edgefleet/v1/groups/lab/cmd/ping",
    ]
    for topic in denied:
        assert dev_a.publish(topic) == NOT_AUTHORIZED, topic
    assert dev_a.publish("edgefleet/v1/devices/dev-a/predictions") == 0
    assert dev_a.publish("edgefleet/v1/devices/dev-a/samples") == 0
    wait_for(lambda: "edgefleet/v1/devices/dev-a/samples" in op.got, 5, "allowed publish")
    time.sleep(0.3)
    assert op.got == [
        "edgefleet/v1/devices/dev-a/predictions",
        "edgefleet/v1/devices/dev-a/samples",
    ]

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

    collector = Client(env, "collector-1", env.passwords["collector-1"], port=env.fleet_port)
    assert collector.subscribe("$share/c/edgefleet/v1/devices/+/predictions") == [1]
    assert collector.subscribe("$share/c/edgefleet/v1/devices/+/samples") == [1]
    assert dev_a.publish("edgefleet/v1/devices/dev-a/samples") == 0
    wait_for(lambda: "edgefleet/v1/devices/dev-a/samples" in collector.got, 5, "a sample read")
    assert collector.publish("edgefleet/v1/devices/dev-a/ack") < 0x80
    assert collector.publish("edgefleet/v1/devices/dev-a/cmd/ping") == NOT_AUTHORIZED
    for client in (op, dev_a, dev_b, collector):
        client.close()


def test_mtls_variant(tmp_path: Path) -> None:
    for name in ("acl", "acl-fleet"):
        (tmp_path / name).write_text((SHIPPED / name).read_text())
    (tmp_path / "passwd-fleet").touch()
    ca = CA(tmp_path)
    _cli(
        "broker", "crl", "--crl", str(tmp_path / "crl.pem"),
        "--ca-cert", str(ca.cert_path), "--ca-key", str(ca.key_path),
    )  # fmt: skip
    ports, proc = _start(tmp_path, "edgefleet-mtls.conf", ca)
    env = Env(*ports, ca, tmp_path, {}, proc)
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
        no_cert = Client(env, "dev-a", password="x")
        assert no_cert.connack != 0

        # Revoked: the CRL names its certificate; after a reload it cannot connect.
        _cli(
            "broker", "remove-device", "dev-a", "--acl", str(tmp_path / "acl"),
            "--crl", str(tmp_path / "crl.pem"), "--cert", str(cert[0]),
            "--ca-cert", str(ca.cert_path), "--ca-key", str(ca.key_path),
        )  # fmt: skip
        assert "user dev-a" not in (tmp_path / "acl").read_text()
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        revoked = Client(env, "dev-a", cert=cert)
        assert revoked.connack != 0
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
        (
            ["broker", "add-device", "op-cam", "--acl", str(acl), "--passwd", "p"],
            "device id 'op-cam' starts with 'op-', which is the services'",
        ),
        (
            ["broker", "add-device", "collector-9", "--acl", str(acl), "--passwd", "p"],
            "starts with 'collector-'",
        ),
        (
            ["broker", "add-collector", "ingest", "--acl", str(acl), "--passwd", "p"],
            "collector name 'ingest' must start with 'collector-'",
        ),
        (
            ["broker", "add-operator", "alice", "--acl", str(acl), "--passwd", "p"],
            "operator name 'alice' must start with 'op-'",
        ),
    ]
    for args, message in cases:
        proc = subprocess.run(
            cli_command(*args), capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 2
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert sys.executable


def test_a_device_cannot_take_over_another_ones_session(password_broker: Env) -> None:
    """dev-a with its own password but dev-b's client id: the broker makes it dev-a."""
    env = password_broker
    watch = Client(env, "op-watcher", env.passwords["op-watcher"], port=env.fleet_port)
    watch.subscribe("edgefleet/v1/devices/+/status")
    status = "edgefleet/v1/devices/dev-b/status"
    dev_b = Client(env, "dev-b", env.passwords["dev-b"], will=status)
    assert dev_b.connack == 0
    for _ in range(3):  # over and over, as an attacker would
        intruder = Client(env, "dev-a", env.passwords["dev-a"], client_id="dev-b")
        assert intruder.connack == 0  # it may connect, as itself
        assert intruder.publish("edgefleet/v1/devices/dev-a/metrics") < 0x80
        intruder.close()
    time.sleep(1.0)
    assert not dev_b.disconnected.is_set(), "dev-b lost its connection"
    assert status not in watch.got  # no last will: nobody saw dev-b go offline
    # A device's password does not work on the fleet-services listener.
    sneaky = Client(env, "dev-a", env.passwords["dev-a"], port=env.fleet_port, client_id="dev-b")
    assert sneaky.connack in (134, 135)
    sneaky.close()
    assert not dev_b.disconnected.is_set()
    for client in (watch, dev_b):
        client.close()


def test_no_identity_takes_another_s_client_id_on_any_listener(password_broker: Env) -> None:
    """Client ids are global across listeners: every role tries a device's id and each
    service's, over and over; the broker makes each of them itself, and no victim goes
    offline (before, a collector or operator could close dev-b's session and fire its
    retained will, on every try)."""
    env = password_broker
    status = "edgefleet/v1/devices/dev-b/status"
    watch = Client(env, "op-watcher", env.passwords["op-watcher"], port=env.fleet_port)
    watch.subscribe("edgefleet/v1/devices/+/status")
    dev_b = Client(env, "dev-b", env.passwords["dev-b"], will=status)
    collector = Client(env, "collector-1", env.passwords["collector-1"], port=env.fleet_port)
    assert (watch.connack, dev_b.connack, collector.connack) == (0, 0, 0)
    victims = ("dev-b", "collector-1", "op-watcher")
    attackers = (("dev-a", env.port), ("collector-2", env.fleet_port), ("op-alice", env.fleet_port))
    for _ in range(2):
        for user, port in attackers:
            for victim in victims:
                tried = Client(env, user, env.passwords[user], port=port, client_id=victim)
                assert tried.connack == 0, (user, victim)  # connected, as itself
                tried.close()
    time.sleep(1.0)
    for name, held in (("dev-b", dev_b), ("collector-1", collector), ("op-watcher", watch)):
        assert not held.disconnected.is_set(), f"{name} lost its session"
    assert status not in watch.got, "dev-b's last will fired"
    for client in (watch, dev_b, collector):
        client.close()


def test_two_collectors_still_share_the_load(password_broker: Env) -> None:
    from edgefleet.collector.collector import Collector, CollectorSettings

    env = password_broker
    collectors = [
        Collector(
            CollectorSettings(
                broker=f"mqtts://127.0.0.1:{env.fleet_port}",
                db=f"sqlite:///{env.folder / f'{name}.db'}",
                username=name,
                password=env.passwords[name],
                ca=env.ca.cert_path,
            )
        )
        for name in ("collector-1", "collector-2")
    ]
    for collector in collectors:
        collector.start()
    try:
        for collector in collectors:
            assert collector.connected.wait(10)
        time.sleep(0.5)
        dev_a = Client(env, "dev-a", env.passwords["dev-a"])
        for mseq in range(1, 41):
            body = {"boot_id": "b", "mseq": mseq, "floor": 1, "ts": 1.0, "fps": 1.0}
            info = dev_a.client.publish(
                "edgefleet/v1/devices/dev-a/metrics", json.dumps(body), qos=1
            )
            info.wait_for_publish(5)
        wait_for(lambda: sum(c.stored for c in collectors) == 40, 10, "40 stored")
        assert all(c.stored > 0 for c in collectors), [c.stored for c in collectors]
        dev_a.close()
    finally:
        for collector in collectors:
            collector.stop()


def test_a_removed_device_can_no_longer_connect(password_broker: Env) -> None:
    env = password_broker
    out = _cli(
        "broker", "remove-device", "dev-a", "--acl", str(env.folder / "acl"),
        "--passwd", str(env.folder / "passwd"),
    )  # fmt: skip
    assert "passwd: dev-a removed" in out
    assert "user dev-a" not in (env.folder / "acl").read_text()
    env.proc.send_signal(signal.SIGHUP)  # what `systemctl reload mosquitto` does
    time.sleep(0.5)
    gone = Client(env, "dev-a", env.passwords["dev-a"])
    assert gone.connack in (134, 135)
    still = Client(env, "dev-b", env.passwords["dev-b"])
    assert still.connack == 0
    for client in (gone, still):
        client.close()


def test_a_fleet_enrolled_from_zero_with_the_tool(tmp_path: Path) -> None:
    """docs/deploy.md's enrolment, step by step: init, services, a device, the agent on it."""
    from edgefleet.collector.collector import Collector, CollectorSettings

    from .mqtt_helpers import running

    fleet = tmp_path / "edgefleet"
    _cli("broker", "init", "--out", str(fleet), "--server-name", "localhost",
         "--server-name", "127.0.0.1")  # fmt: skip
    for name in ("acl", "acl-fleet"):
        (fleet / name).write_text((SHIPPED / name).read_text())
    services = {"op-alice": "operator", "collector-1": "collector"}
    secrets = {name: _add_service(fleet, role, name) for name, role in services.items()}
    device = _add(fleet, "pi-1", "kitchen", "--passwd", str(fleet / "passwd"))
    (tmp_path / "pi-1.secret").write_text(_password(device) + "\n")
    ca = fleet / "fleet-ca.crt"
    ports, proc = _start(
        fleet, "edgefleet.conf", None, ((fleet / "server.crt", fleet / "server.key"), ca)
    )
    collector = Collector(
        CollectorSettings(
            broker=f"mqtts://127.0.0.1:{ports[1]}",
            db=f"sqlite:///{tmp_path / 'fleet.db'}",
            username="collector-1",
            password=secrets["collector-1"],
            ca=ca,
        )
    )
    config = tmp_path / "agent.yaml"
    config.write_text(
        "device: {id: pi-1, groups: [kitchen]}\n"
        "source: {type: synthetic, fps: 10, width: 64, height: 48}\n"
        f"state_dir: {tmp_path / 'state'}\nsinks: []\nlogging: {{format: json}}\n"
        f"fleet:\n  url: mqtts://127.0.0.1:{ports[0]}\n  username: pi-1\n"
        f"  password: !file {tmp_path / 'pi-1.secret'}\n  tls: {{ca: {ca}}}\n"
        "  metrics_interval_s: 1\n"
    )
    try:
        collector.start()
        with running(config) as agent:
            wait_for(lambda: collector.stored > 0, 30, "the device's reports stored")
            (tmp_path / "alice.secret").write_text(secrets["op-alice"])
            status = _cli(
                "rollout", "status", "--broker", f"mqtts://127.0.0.1:{ports[1]}",
                "--ca", str(ca), "--username", "op-alice",
                "--password-file", str(tmp_path / "alice.secret"),
            )  # fmt: skip
            row = next(line for line in status.splitlines() if "pi-1" in line)
            assert "online" in row
            agent.terminate()
    finally:
        collector.stop()
        proc.kill()
        proc.wait(5)
