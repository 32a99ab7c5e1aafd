"""Home Assistant MQTT discovery: the device and its sensors appear in HA by themselves.

Opt-in (``fleet: {homeassistant: {enabled: true}}``). One retained *device-based* discovery
message (HA 2024.11 and newer) at ``{prefix}/device/edgefleet_{id}/config`` after every birth;
the sensors read the agent's own topics (no extra messages): last label and score from the
predictions, fps and latency from the metrics, the model version from the retained status,
which is also the availability (``online`` means available; ``offline`` and ``stopped`` not).
Figures from the metrics expire after three metrics intervals, so a frozen device shows
*unavailable*, never a stale "30 fps". Disabling it clears the retained config (an empty
payload) once, remembered in the state directory.

Every template reads a field through ``| default(...)``, never ``if x`` or ``x.y`` on a field
that may be absent: HA logs a warning each time a template touches an undefined value, and
``offline`` and ``stopped`` statuses carry no model, a board without sensors no temperature.
Home Assistant before 2024.11 does not read device-based discovery ("Integration device is
not supported") and shows nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgefleet import __version__
from edgefleet.protocol import Topics

MARKER = "homeassistant.json"  # in the state directory: which config topic we published
# The best label of a predictions message's last result, as ``t`` ({} when there is none).
LAST_TOP = (
    "{% set r = value_json.results | default([]) | last | default({}) %}"
    "{% set t = r.top | default([]) | first | default({}) %}"
)


class HomeAssistantConfig(BaseModel):
    """``fleet: {homeassistant: {enabled: true, prefix: homeassistant}}``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    prefix: str = Field(default="homeassistant", pattern=r"^[^#+/][^#+]*[^#+/]$|^[^#+/]$")


def object_id(device: str) -> str:
    """HA allows ``[a-zA-Z0-9_-]`` in a discovery topic's ids: other characters become ``_``."""
    return "edgefleet_" + re.sub(r"[^A-Za-z0-9_-]", "_", device)


def config_topic(prefix: str, device: str) -> str:
    return f"{prefix}/device/{object_id(device)}/config"


def _sensor(name: str, topic: str, template: str, **extra: Any) -> dict[str, Any]:
    return {"platform": "sensor", "name": name, "state_topic": topic,
            "value_template": template, **extra}  # fmt: skip


def discovery_payload(topics: Topics, metrics_interval_s: float) -> dict[str, Any]:
    """The device-based discovery message of one device."""
    oid = object_id(topics.device)
    expire = max(30, round(3 * metrics_interval_s))
    measured = {"state_class": "measurement", "expire_after": expire}
    sensors = {
        "label": _sensor(
            "Last label",
            topics.predictions,
            LAST_TOP + "{{ t.label | default(None) }}",
            icon="mdi:tag-search",
        ),
        "score": _sensor(
            "Last score",
            topics.predictions,
            LAST_TOP + "{{ (t.score | round(3)) if t.score is number else None }}",
            state_class="measurement",
        ),
        "fps": _sensor(
            "Frames per second",
            topics.metrics,
            "{{ value_json.fps | default(None) }}",
            unit_of_measurement="fps",
            **measured,
        ),
        "latency_p50": _sensor(
            "Latency p50",
            topics.metrics,
            "{{ ((value_json.latency_ms | default({})).total | default({})).p50 | default(None) }}",
            unit_of_measurement="ms",
            device_class="duration",
            **measured,
        ),
        "cpu_temperature": _sensor(
            "CPU temperature",
            topics.metrics,
            "{{ (value_json.health | default({})).cpu_temp_c | default(None) }}",
            unit_of_measurement="°C",
            device_class="temperature",
            **measured,
        ),
        "model_version": _sensor(
            "Model version",
            topics.status,
            "{{ (value_json.model | default({}, true)).version | default(None) }}",
            icon="mdi:brain",
            entity_category="diagnostic",
        ),
    }
    for key, sensor in sensors.items():
        sensor["unique_id"] = f"{oid}_{key}"
    return {
        "device": {
            "identifiers": [oid],
            "name": topics.device,
            "manufacturer": "edgefleet",
            "model": "edge vision agent",
            "sw_version": __version__,
        },
        "origin": {"name": "edgefleet", "sw_version": __version__},
        "availability": [
            {
                "topic": topics.status,
                "value_template": "{{ 'online' if (value_json.state | default('')) == 'online'"
                " else 'offline' }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "components": sensors,
        "qos": 1,
    }


class Discovery:
    """What to publish (retained) after each birth: the config, or its removal once."""

    def __init__(
        self,
        cfg: HomeAssistantConfig,
        topics: Topics,
        state_dir: Path,
        metrics_interval_s: float,
    ) -> None:
        self.cfg = cfg
        self.topics = topics
        self.marker = state_dir / MARKER
        self.metrics_interval_s = metrics_interval_s

    def messages(self) -> list[tuple[str, bytes]]:
        published = self._published()
        out: list[tuple[str, bytes]] = []
        if self.cfg.enabled:
            topic = config_topic(self.cfg.prefix, self.topics.device)
            if published and published != topic:
                out.append((published, b""))  # the prefix changed: remove the old one
            body = discovery_payload(self.topics, self.metrics_interval_s)
            out.append((topic, json.dumps(body, separators=(",", ":")).encode()))
            if published != topic:
                self._remember(topic)
        elif published:
            out.append((published, b""))
            self._remember(None)
        return out

    def _published(self) -> str | None:
        try:
            topic = json.loads(self.marker.read_text()).get("topic")
        except (OSError, ValueError, AttributeError):
            return None
        return topic if isinstance(topic, str) else None

    def _remember(self, topic: str | None) -> None:
        try:
            if topic is None:
                self.marker.unlink(missing_ok=True)
            else:
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.write_text(json.dumps({"topic": topic}))
        except OSError:
            pass  # at worst the removal is sent again, or not at all: never worth a crash
