"""The ``fleet:`` section: how this device reaches the fleet over MQTT (see docs/protocol.md)."""

from __future__ import annotations

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
    path: Path | None = Field(default=None, description="null = STATE_DIR/spool.sqlite")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    max_age_s: float = Field(default=7 * 24 * 3600, gt=0)


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
