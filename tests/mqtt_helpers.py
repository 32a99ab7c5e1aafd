"""A real mosquitto the tests own (free loopback port; stop, kill, restart, reconfigure),
a recording subscriber, and an agent subprocess runner."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))


def debian_mosquitto_conf() -> str:
    """/etc/mosquitto/mosquitto.conf as Debian's mosquitto package ships it (this machine's
    copy may be edited): fetched with apt once, cached by the package's version."""
    import pytest

    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "mosquitto"],
        capture_output=True, text=True, check=False,
    ).stdout.strip() or "unknown"  # fmt: skip
    cached = CACHE / f"debian-mosquitto-{version}.conf"
    if cached.exists():
        return cached.read_text()
    work = CACHE / f"debian-mosquitto-{version}.download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        got = subprocess.run(
            ["apt-get", "download", f"mosquitto={version}"] if version != "unknown"
            else ["apt-get", "download", "mosquitto"],
            cwd=work, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        debs = sorted(work.glob("mosquitto_*.deb"))
        if got.returncode != 0 or not debs:
            pytest.skip(f"Debian's mosquitto package cannot be fetched: {got.stderr.strip()}")
        tar = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(debs[0])], capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            member = archive.extractfile("./etc/mosquitto/mosquitto.conf")
            assert member is not None
            text = member.read().decode()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert "include_dir /etc/mosquitto/conf.d" in text, text
    cached.write_text(text)
    return text


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A test that stops its broker
    must get the port back when it starts it again; from the ephemeral range, any outgoing
    connection meanwhile (the agent's own reconnects included) may be handed it (CI saw
    "Address already in use" on a restart)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}")


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return max(11_000, int(text.split()[0]))
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default start


def wait_for(predicate: Callable[[], object], timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Broker:
    """One mosquitto process on a free port; ``extra`` lines go into its config.

    With ``persistence`` it saves its sessions and their queued messages when it stops (as a
    SIGTERM'd mosquitto does) and loads them when it starts again.
    """

    def __init__(
        self,
        workdir: Path,
        extra: str = "",
        anonymous: bool = True,
        port: int | None = None,
        persistence: bool = False,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.anonymous = anonymous
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"mosquitto-{self.port}.log"

    def config_text(self) -> str:
        return (
            # As root, mosquitto would switch to its own user and could not read the test's
            # private temp dir (password files, certificates, its log).
            "user root\n"
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            + (
                f"persistence true\npersistence_location {self.workdir}/\n"
                f"persistence_file mosquitto-{self.port}.db\n"
                if self.persistence
                else "persistence false\n"
            )
            + f"log_dest file {self.log}\n"
            "log_type all\n"
            "max_queued_messages 100000\n"
            "set_tcp_nodelay true\n"  # as the shipped configs (configs/mosquitto)
            f"{self.extra}\n"
        )

    def start(self) -> Broker:
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log_lines(self, needle: str) -> int:
        return sum(needle in line for line in self.log.read_text(errors="replace").splitlines())


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any = None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """Records every message on ``topics``; reconnects (with its subscriptions) by itself."""

    port: int
    topics: list[str]
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    messages: list[Received] = field(default_factory=list)
    client_id: str = ""
    tls: tuple[Path, Path, Path] | None = None  # CA, client certificate, key
    # A session the broker keeps (MQTT 5, needs a client_id): what is published for it while
    # it is away is queued and delivered when it comes back, however late that is.
    session_s: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.ready = threading.Event()
        v5 = self.protocol == MQTTProtocolVersion.MQTTv5
        assert not self.session_s or (self.client_id and v5), "a kept session: MQTT 5, an id"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self.protocol
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        if self.tls is not None:
            ca, cert, key = self.tls
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(
                Received(
                    msg.topic,
                    bytes(msg.payload),
                    bool(msg.retain),
                    getattr(msg, "properties", None),
                )
            )

    def start(self) -> Subscriber:
        if self.session_s:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_s
            self.client.connect(
                "127.0.0.1", self.port, keepalive=10, clean_start=False, properties=props
            )
        else:
            self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        assert self.ready.wait(10), "subscriber got no SUBACK"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, suffix: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def result_seqs(self, boot_id: str | None = None) -> list[int]:
        return [
            result["seq"]
            for msg in self.on("/predictions")
            for result in msg.json()["results"]
            if boot_id is None or result["boot_id"] == boot_id
        ]


def agent_config(
    tmp: Path,
    broker_url: str,
    device: str = "dev-1",
    fps: float | None = 30,
    mqtt_extra: str = "",
    extra: str = "",
    jsonl: bool = True,
) -> Path:
    """A config for `edgefleet run`: synthetic frames, a fleet link, a jsonl ground truth.

    ``mqtt_extra`` holds more keys of the ``fleet:`` section (any indentation).
    """
    fps_text = "null" if fps is None else str(fps)
    fleet = (
        f"fleet:\n  url: {broker_url}\n  reconnect_min_s: 0.2\n"
        f"  reconnect_max_s: 1.0\n  metrics_interval_s: 1\n"
        + textwrap.indent(textwrap.dedent(mqtt_extra), "  ")
    )
    sinks = "sinks: []\n"
    if jsonl:
        sinks = (
            f"sinks:\n  - type: jsonl\n    path: {tmp / 'truth.jsonl'}\n    flush_interval_s: 0\n"
        )
    config = tmp / "agent.yaml"
    config.write_text(
        f"device: {{id: {device}, groups: [lab]}}\n"
        f"source: {{type: synthetic, fps: {fps_text}, width: 160, height: 120}}\n"
        "delegate: {type: cpu, threads: 1}\n"
        f"state_dir: {tmp / 'state'}\n"
        "logging: {format: json}\n"
        f"{sinks}{fleet}{extra}"
    )
    return config


class AgentProcess:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = config.parent / f"agent-{time.monotonic_ns()}.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=self._fh,
            env={**os.environ, **(env or {})},
        )

    def terminate(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._fh.close()
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._fh.close()

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def truth(self) -> list[dict[str, Any]]:
        path = self.config.parent / "truth.jsonl"
        if not path.exists():
            return []
        # The sink may be mid-line (its buffer flushed part of one): complete lines only.
        lines = path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]


@contextlib.contextmanager
def running(config: Path, env: dict[str, str] | None = None) -> Iterator[AgentProcess]:
    agent = AgentProcess(config, env)
    try:
        yield agent
    finally:
        if agent.proc.poll() is None:
            agent.kill()
