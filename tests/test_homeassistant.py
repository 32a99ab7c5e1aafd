"""Home Assistant MQTT discovery: the payload HA reads, its templates on the agent's messages."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.mqtt.homeassistant import config_topic, discovery_payload, object_id
from edgefleet.protocol import Topics

from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

sandbox = pytest.importorskip("jinja2.sandbox")  # what HA renders templates with

# The keys HA documents for device-based discovery (the device, origin and availability
# blocks) and for an MQTT sensor; anything else would be rejected or ignored by HA.
DEVICE_KEYS = {"device", "origin", "availability", "components", "qos", "state_topic"}
DEVICE_INFO = {"identifiers", "name", "manufacturer", "model", "sw_version", "connections",
               "configuration_url", "suggested_area", "hw_version", "via_device"}  # fmt: skip
ORIGIN = {"name", "sw_version", "support_url"}
AVAILABILITY = {"topic", "value_template", "payload_available", "payload_not_available"}
SENSOR = {"platform", "name", "state_topic", "value_template", "unique_id", "unit_of_measurement",
          "device_class", "state_class", "expire_after", "icon", "entity_category",
          "force_update", "json_attributes_topic", "suggested_display_precision"}  # fmt: skip
# device_class -> units HA accepts for it
UNITS = {"temperature": {"°C", "°F", "K"}, "duration": {"d", "h", "min", "s", "ms", "µs"}}


class _WarnedError(Exception):
    """A template touched an undefined value: HA logs a warning each time it does."""


def _undefined() -> type:
    import jinja2

    class LoggingUndefined(jinja2.Undefined):
        """As HA's: using an undefined value in text, a loop or a test is a warning."""

        def _warn(self) -> None:
            raise _WarnedError(self._undefined_message)

        def __str__(self) -> str:
            self._warn()
            return ""

        def __iter__(self) -> Any:
            self._warn()
            return iter(())

        def __bool__(self) -> bool:
            self._warn()
            return False

    return LoggingUndefined


def _render(template: str, message: dict[str, Any]) -> str:
    env = sandbox.ImmutableSandboxedEnvironment(undefined=_undefined())
    return str(env.from_string(template).render(value_json=message))


@pytest.mark.parametrize(
    "message",
    [
        {"state": "offline", "device": "d", "boot_id": "b", "ts": 1.0},
        {"state": "stopped", "device": "d", "boot_id": "b", "ts": 1.0},
        {"state": "online", "device": "d", "model": {"name": "m", "version": 3}},
        {"device": "d", "fps": 2.0, "health": {}, "latency_ms": {}},  # metrics on a bare board
        {"device": "d", "results": []},
        {"device": "d", "results": [{"top": []}]},  # a threshold left no label
        {"device": "d", "results": [{"top": [{"label": "cat", "score": 0.912345}]}]},
    ],
)
def test_every_template_reads_every_message_without_a_warning(message: dict[str, Any]) -> None:
    """HA logged "'dict object' has no attribute 'model'" on every offline/stopped status."""
    body = discovery_payload(Topics("edgefleet/v1", "d"), 10.0)
    templates = [s["value_template"] for s in body["components"].values()]
    templates += [a["value_template"] for a in body["availability"]]
    for template in templates:
        _render(template, message)  # raises _WarnedError where HA would warn
    label, score = (body["components"][k]["value_template"] for k in ("label", "score"))
    if message.get("results"):
        top = message["results"][-1]["top"]
        assert _render(label, message) == (top[0]["label"] if top else "None")
        assert _render(score, message) == ("0.912" if top else "None")
    version = body["components"]["model_version"]["value_template"]
    assert _render(version, message) == ("3" if "model" in message else "None")


def test_the_payload_uses_only_documented_keys() -> None:
    topics = Topics("edgefleet/v1", "pi.kitchen-01")
    body = discovery_payload(topics, 10.0)
    assert set(body) <= DEVICE_KEYS
    assert set(body["device"]) <= DEVICE_INFO
    assert set(body["origin"]) <= ORIGIN
    for block in body["availability"]:
        assert set(block) <= AVAILABILITY
    ids = set()
    for sensor in body["components"].values():
        assert set(sensor) <= SENSOR
        assert sensor["platform"] == "sensor"
        assert sensor["state_topic"].startswith("edgefleet/v1/devices/pi.kitchen-01/")
        if "device_class" in sensor and sensor["device_class"] in UNITS:
            assert sensor["unit_of_measurement"] in UNITS[sensor["device_class"]]
        ids.add(sensor["unique_id"])
    assert len(ids) == len(body["components"])
    # HA allows [a-zA-Z0-9_-] in the ids of a discovery topic
    assert object_id("pi.kitchen-01") == "edgefleet_pi_kitchen-01"
    assert config_topic("homeassistant", "pi.kitchen-01") == (
        "homeassistant/device/edgefleet_pi_kitchen-01/config"
    )
    assert body["components"]["fps"]["expire_after"] == 30  # 3 metrics intervals


def _latest(sub: Subscriber, topic: str) -> dict[str, Any]:
    found = [m for m in sub.messages if m.topic == topic and m.payload]
    body: dict[str, Any] = json.loads(found[-1].payload)
    return body


def test_discovery_appears_with_the_agent_and_its_templates_read_its_messages(
    tmp_path: Path, broker: Broker
) -> None:
    sub = Subscriber(broker.port, ["homeassistant/#", "edgefleet/v1/devices/#"]).start()
    config = agent_config(
        tmp_path, broker.url, device="cam-7", fps=10, mqtt_extra="homeassistant: {enabled: true}\n"
    )
    topic = "homeassistant/device/edgefleet_cam-7/config"
    with running(config) as agent:
        wait_for(lambda: sub.on(topic) and sub.on("/metrics"), 30, "discovery and metrics")
        wait_for(lambda: sub.on("/predictions"), 10, "predictions")
        discovery = sub.on(topic)[-1]
        body = json.loads(discovery.payload)
        for name, sensor in body["components"].items():
            value = _render(sensor["value_template"], _latest(sub, sensor["state_topic"]))
            if name == "label":
                assert value not in ("", "None")
            elif name == "model_version":
                assert value == "0"
            elif name == "cpu_temperature":
                assert value == "None" or float(value) > 0  # HA shows None as "unknown"
            else:
                assert float(value) >= 0, (name, value)
        availability = body["availability"][0]
        status = _latest(sub, availability["topic"])
        assert _render(availability["value_template"], status) == "online"
        assert agent.terminate() == 0
    wait_for(lambda: _latest(sub, "edgefleet/v1/devices/cam-7/status")["state"] == "stopped", 5)
    status = _latest(sub, "edgefleet/v1/devices/cam-7/status")
    assert _render(availability["value_template"], status) == "offline"
    sub.stop()
    # The config is retained: a new Home Assistant sees it too ...
    late = Subscriber(broker.port, [topic]).start()
    wait_for(lambda: late.on(topic), 5, "retained discovery")
    late.stop()
    # ... until the device runs with discovery disabled: it removes it (empty retained)
    config.write_text(config.read_text().replace("homeassistant: {enabled: true}", ""))
    watcher = Subscriber(broker.port, ["edgefleet/v1/devices/cam-7/status", topic]).start()
    with running(config) as agent:
        wait_for(lambda: any(m.payload == b"" for m in watcher.on(topic)), 30, "removal")
        assert agent.terminate() == 0
    watcher.stop()
    time.sleep(0.2)
    after = Subscriber(broker.port, [topic]).start()
    time.sleep(1.0)
    assert not [m for m in after.on(topic) if m.payload]
    after.stop()
    assert not (tmp_path / "state" / "homeassistant.json").exists()
