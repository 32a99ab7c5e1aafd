"""The MQTT protocol between devices and the fleet: topics and message shapes.

The pydantic models here are the reference for ``docs/protocol.md``: each message's JSON
schema comes from them, and a test validates the documentation's examples against them.
Devices add fields only in new minor versions; consumers must ignore unknown fields, so the
message models allow extra keys while the *command* models (input to the device) forbid them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PREFIX = "edgefleet/v1"


@dataclass(frozen=True)
class Topics:
    """Every topic one device uses."""

    prefix: str
    device: str

    def _dev(self, leaf: str) -> str:
        return f"{self.prefix}/devices/{self.device}/{leaf}"

    @property
    def status(self) -> str:
        return self._dev("status")

    @property
    def predictions(self) -> str:
        return self._dev("predictions")

    @property
    def metrics(self) -> str:
        return self._dev("metrics")

    @property
    def events(self) -> str:
        return self._dev("events")

    @property
    def ack(self) -> str:
        return self._dev("ack")

    @property
    def commands(self) -> str:
        return self._dev("cmd/+")

    def group_commands(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/cmd/+"

    def reply(self, request_id: str) -> str:
        return self._dev(f"reply/{request_id}")

    def command_name(self, topic: str) -> str | None:
        """The command in a ``.../cmd/NAME`` topic addressed to this device or its groups."""
        parts = topic.split("/")
        if len(parts) < 2 or parts[-2] != "cmd":
            return None
        return parts[-1]


class _Message(BaseModel):
    # Consumers ignore what they do not know: devices may be newer than the fleet tools.
    model_config = ConfigDict(extra="allow")


class ModelRef(_Message):
    name: str
    version: int
    sha256: str


class Status(_Message):
    """``devices/{id}/status`` (retained): birth, last will, graceful stop."""

    state: Literal["online", "offline", "stopped"]
    device: str
    boot_id: str
    ts: float
    agent_version: str | None = None
    model: ModelRef | None = None
    delegate: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    capabilities: dict[str, Any] | None = None
    groups: list[str] | None = None


class Spooled(_Message):
    """Fields every spooled message carries (predictions, metrics, events)."""

    device: str
    boot_id: str
    mseq: int = Field(ge=1, description="per-boot message number, contiguous")
    floor: int = Field(ge=1, description="lowest mseq of this boot the device still holds")
    ts: float
    replayed: bool = False


class TopLabel(_Message):
    label: str
    index: int
    score: float = Field(ge=0, le=1)


class ResultMessage(_Message):
    seq: int = Field(ge=1)
    boot_id: str
    ts: float
    model: str
    model_version: int
    top: list[TopLabel]
    timings_ms: dict[str, float]
    frame: int


class Predictions(Spooled):
    """``devices/{id}/predictions``: one or more results (batched by the report policy)."""

    results: list[ResultMessage]


class Metrics(Spooled):
    """``devices/{id}/metrics``: loop statistics and device health, every N seconds."""

    fps: float
    inferences: int
    dropped_frames: int
    latency_ms: dict[str, dict[str, float]]
    delegate: dict[str, Any] | None = None
    spool: dict[str, int]
    health: dict[str, Any]


class Reply(_Message):
    """A command's answer: to the v5 response topic, else ``devices/{id}/reply/{request_id}``."""

    ok: bool
    command: str
    device: str
    request_id: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class Ack(BaseModel):
    """``devices/{id}/ack`` from the collector: everything up to ``mseq`` is stored."""

    model_config = ConfigDict(extra="forbid")

    boot_id: str = Field(min_length=1, max_length=64)
    mseq: int = Field(ge=0)


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "Status": Status,
    "Predictions": Predictions,
    "Metrics": Metrics,
    "Reply": Reply,
    "Ack": Ack,
}
