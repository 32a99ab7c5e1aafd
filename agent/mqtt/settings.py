"""The ``fleet:`` section: how this device reaches the fleet over MQTT (see docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from edgefleet.mqtt.homeassistant import HomeAssistantConfig
from edgefleet.protocol import DEFAULT_PREFIX


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(_Strict):
    ca: Path | None = Field(default=None, description="CA bundle; null = system CAs")
    cert: Path | None = Field(default=None, description="client certificate (mTLS)")
    key: Path | None = None
    server_name: str | None = Field(default=None, description="name to verify, if not the host")


class SpoolConfig(_Strict):
    """The outbox: messages in memory first, on disk (SQLite) when they wait for their ack."""

    path: Path | None = Field(default=None, description="null = STATE_DIR/spool.sqlite")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    flush_after_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="a message still unacknowledged this long after it was made is written to "
        "disk; a power cut or SIGKILL loses at most that many seconds of unacknowledged "
        "messages. 0: every message on disk within 20 ms (most SD-card writes)",
    )
    memory_max_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=64 * 1024,
        le=1024 * 1024 * 1024,
        description="most bytes of messages held in memory; past it the oldest are written "
        "to disk at once, or, while the state directory refuses writes (disk full), dropped "
        "and counted",
    )


class ReportPolicy(_Strict):
    """Which results are sent and how they are grouped."""

    mode: Literal["every", "change", "interval"] = Field(
        default="every", description="every frame, on change of top-1, or at most every N ms"
    )
    interval_ms: int = Field(default=1000, ge=1, le=3_600_000)
    min_score: float = Field(default=0.0, ge=0, le=1, description="only top-1 at or above")
    batch_max: int = Field(default=32, ge=1, le=1000, description="most results per message")
    batch_ms: int = Field(
        default=0,
        ge=0,
        le=60_000,
        description="longest wait to fill a batch; 0: what came since the outbox's last "
        "turn (at most 20 ms)",
    )


class FleetConfig(_Strict):
    """``fleet: {url: mqtt://broker:1883, ...}``: presence, reports, commands, rollouts."""

    url: str = Field(default="mqtt://127.0.0.1:1883", pattern=r"^(mqtt|mqtts|tcp|ssl)://")
    urls: list[Annotated[str, StringConstraints(pattern=r"^(mqtt|mqtts|tcp|ssl)://")]] | None = (
        Field(
            default=None,
            min_length=1,
            max_length=32,
            description="several brokers of one cluster (instead of url): start at a random "
            "one, move to the next on failure, stay where it works",
        )
    )
    protocol: Literal["5", "3.1.1"] = "5"
    prefix: str = Field(default=DEFAULT_PREFIX, pattern=r"^[^#+]+[^/#+]$")
    username: str | None = None
    password: str | None = Field(default=None, description="use !credential NAME")
    tls: TlsConfig | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    qos: Literal[0, 1] = 1
    ack_mode: Literal["broker", "collector"] = "broker"
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    report: ReportPolicy = Field(default_factory=ReportPolicy)
    metrics_interval_s: float = Field(default=10.0, ge=0.2, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    auth_retry_s: float = Field(default=300.0, gt=0, le=86400)
    max_inflight: int = Field(default=200, ge=1, le=10000)
    resend_after_s: float = Field(default=30.0, gt=0)
    max_command_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)

    def brokers(self) -> list[str]:
        """The broker URLs to use: ``urls`` when given, else ``url``."""
        return list(self.urls) if self.urls else [self.url]

    homeassistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="MQTT discovery for Home Assistant"
    )


@dataclass
class LinkSettings:
    """Everything the link needs, decoupled from the config model that produced it."""

    url: str
    device: str
    groups: list[str]
    prefix: str
    boot_id: str
    spool_path: Path
    protocol: str = "5"
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    keepalive_s: int = 30
    qos: int = 1
    ack_mode: str = "broker"
    spool_max_bytes: int = 64 * 1024 * 1024
    spool_max_age_s: float = 7 * 24 * 3600
    flush_after_s: float = 5.0  # unacknowledged this long: written to the spool
    memory_max_bytes: int = 8 * 1024 * 1024  # held in memory at most (a disk that refuses)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    auth_retry_s: float = 300.0
    max_inflight: int = 200
    resend_after_s: float = 30.0
    max_command_bytes: int = 64 * 1024
    urls: list[str] | None = None  # a cluster's brokers; ``url`` alone when None
