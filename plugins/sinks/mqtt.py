"""Results, metrics, presence and commands over MQTT (``sinks: [{type: mqtt, ...}]``).

The sink decides per result whether it is reported (the report policy), batches what is
reported and hands it to the link, which spools it on disk before publishing. See
``docs/protocol.md`` for topics and messages and ``edgefleet.mqttlink`` for the connection.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet import __version__, health
from edgefleet.commands import CommandError, CommandHandler
from edgefleet.hookspecs import hookimpl
from edgefleet.mqttlink import Incoming, LinkSettings, MqttLink, parse_url
from edgefleet.protocol import DEFAULT_PREFIX
from edgefleet.registry import PluginConfig, Registry
from edgefleet.results import Result
from edgefleet.rollout import RolloutManager, RolloutSettings
from edgefleet.runtime import available_runtimes
from edgefleet.sinks import Sink

log = structlog.get_logger(__name__)


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
    batch_max: int = Field(default=1, ge=1, le=1000, description="results per message")
    batch_ms: int = Field(default=0, ge=0, le=60_000, description="max wait to fill a batch")


class MqttConfig(PluginConfig):
    """``sinks: [{type: mqtt, url: mqtt://broker:1883}]``."""

    type: Literal["mqtt"] = "mqtt"
    url: str = Field(default="mqtt://127.0.0.1:1883", pattern=r"^(mqtt|mqtts|tcp|ssl)://")
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
    rollout: RolloutSettings | None = Field(default=None, description="enable model rollouts")


class ReportState:
    """The policy plus its per-device state; changed at run time by the ``set`` command."""

    def __init__(self, policy: ReportPolicy) -> None:
        self.policy = policy
        self.lock = threading.Lock()
        self.batch: list[dict[str, Any]] = []
        self.batch_started = 0.0
        self.last_label: str | None = None
        self.last_sent = float("-inf")
        self.skipped = 0

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            merged = {**self.policy.model_dump(), **changes}
            try:
                self.policy = ReportPolicy.model_validate(merged)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                raise CommandError(f"report.{loc}: {first['msg']}") from None
            return self.policy.model_dump()

    def wanted(self, result: Result, now: float) -> bool:
        policy = self.policy
        top = result.top[0] if result.top else None
        if top is None or top.score < policy.min_score:
            return False
        if policy.mode == "change" and top.label == self.last_label:
            return False
        if policy.mode == "interval" and (now - self.last_sent) * 1000 < policy.interval_ms:
            return False
        self.last_label = top.label
        self.last_sent = now
        return True

    def add(self, result: Result, now: float) -> list[dict[str, Any]] | None:
        """Add a wanted result; the batch to send when it is complete."""
        if not self.batch:
            self.batch_started = now
        self.batch.append(result.to_dict())
        return self.take_if_due(now)

    def take_if_due(self, now: float) -> list[dict[str, Any]] | None:
        if not self.batch:
            return None
        policy = self.policy
        full = len(self.batch) >= policy.batch_max
        old = (now - self.batch_started) * 1000 >= policy.batch_ms
        if full or old:
            batch, self.batch = self.batch, []
            return batch
        return None


class MqttSink(Sink):
    name = "mqtt"

    def __init__(self, config: MqttConfig) -> None:
        parse_url(config.url)  # a bad URL fails at start, with its reason
        self.config = config
        self.report = ReportState(config.report)
        self.link: MqttLink | None = None
        self.agent: Any = None
        self.context: dict[str, Any] = {}
        self.commands: CommandHandler | None = None
        self.rollout: RolloutManager | None = None

    # -- wiring ---------------------------------------------------------------------------
    def open(self, context: dict[str, Any]) -> None:
        self.context = context
        self.agent = context.get("agent")
        cfg = self.config
        state_dir = Path(context.get("state_dir") or ".")
        tls = cfg.tls or TlsConfig()
        settings = LinkSettings(
            url=cfg.url,
            device=context["device_id"],
            groups=list(context.get("groups", [])),
            prefix=cfg.prefix,
            boot_id=context["boot_id"],
            spool_path=cfg.spool.path or state_dir / "spool.sqlite",
            protocol=cfg.protocol,
            username=cfg.username,
            password=cfg.password,
            ca=tls.ca,
            cert=tls.cert,
            key=tls.key,
            server_name=tls.server_name,
            keepalive_s=cfg.keepalive_s,
            qos=cfg.qos,
            ack_mode=cfg.ack_mode,
            spool_max_bytes=cfg.spool.max_bytes,
            spool_max_age_s=cfg.spool.max_age_s,
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
            auth_retry_s=cfg.auth_retry_s,
            max_inflight=cfg.max_inflight,
            resend_after_s=cfg.resend_after_s,
            max_command_bytes=cfg.max_command_bytes,
        )
        self.commands = CommandHandler(self.agent, self.report, cfg.max_command_bytes)
        self.link = MqttLink(
            settings,
            birth=self._birth,
            on_command=self._on_command,
            metrics=self._metrics,
            metrics_interval_s=cfg.metrics_interval_s,
            tick=self._tick,
        )
        if cfg.rollout is not None and self.agent is not None:
            self.rollout = RolloutManager(
                self.agent,
                self.link,
                cfg.rollout,
                state_dir,
                cfg.prefix,
                settings.device,
                settings.groups,
            )
            settings.extra_subscriptions.extend(self.rollout.subscriptions)
            self.link.on_message = self.rollout.on_message
            self.rollout.start()
        if self.link.spool.moved_aside is not None:
            log.error("spool was damaged and moved aside", path=str(self.link.spool.moved_aside))
        self.link.start()

    def _birth(self) -> dict[str, Any]:
        agent = self.agent
        body: dict[str, Any] = {
            "agent_version": __version__,
            "groups": list(self.context.get("groups", [])),
            "model": self.context.get("model"),
        }
        if agent is not None:
            pipeline = getattr(agent, "pipeline", None)
            if pipeline is not None:
                body["model"] = pipeline.classifier.info.describe()
                body["delegate"] = pipeline.classifier.delegate
            body["source"] = getattr(agent, "source_choice", None)
            body["delegate_choice"] = getattr(agent, "delegate_choice", None)
            report = getattr(agent, "capability_report", None)
            if report:
                body["capabilities"] = report
        body.setdefault("capabilities", {"runtimes": [r.name for r in available_runtimes()]})
        return body

    def _metrics(self) -> dict[str, Any]:
        link = self.link
        pipeline = getattr(self.agent, "pipeline", None)
        body: dict[str, Any] = {"fps": 0.0, "inferences": 0, "dropped_frames": 0, "latency_ms": {}}
        if pipeline is not None:
            snap = pipeline.stats.snapshot()
            body.update(
                fps=snap["fps"],
                inferences=snap["inferences"],
                dropped_frames=pipeline.dropped,
                latency_ms=snap["latency_ms"],
                errors=snap["errors"],
                paused=pipeline.settings.paused,
                delegate=pipeline.classifier.delegate,
            )
        if link is not None:
            spool = link.spool
            body["spool"] = {"depth": spool.depth(), "bytes": spool.bytes, "dropped": spool.dropped}
            body["link"] = link.stats()
        body["report"] = {"skipped": self.report.skipped}
        body["health"] = health.collect(Path(self.context.get("state_dir") or "."))
        return body

    def _on_command(self, incoming: Incoming) -> None:
        link = self.link
        if link is None or self.commands is None:
            return
        name = link.topics.command_name(incoming.topic)
        reply = self.commands.execute(name, incoming.payload)
        reply["device"] = link.s.device
        if incoming.response_topic:
            topic = incoming.response_topic
        else:
            reply["request_id"] = CommandHandler.request_id(reply)
            topic = link.topics.reply(reply["request_id"])
        payload = json.dumps(reply, separators=(",", ":")).encode()
        link.publish_now(
            topic, payload, qos=1, properties=link.reply_properties(incoming.correlation)
        )
        log.info("command", command=name, ok=reply["ok"], error=reply.get("error"))

    # -- per result (loop thread) ---------------------------------------------------------
    def emit(self, result: Result) -> None:
        now = time.monotonic()
        state = self.report
        with state.lock:
            if not state.wanted(result, now):
                state.skipped += 1
                batch = state.take_if_due(now)
            else:
                batch = state.add(result, now)
        self._send(batch)

    def event(self, body: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.enqueue("events", body)

    def alive(self) -> bool:
        """The link's threads are running (the watchdog asks)."""
        return self.link is None or self.link.alive()

    def status_text(self) -> str:
        return f"broker {self.link.state}" if self.link is not None else "broker off"

    def _send(self, batch: list[dict[str, Any]] | None) -> None:
        if batch and self.link is not None:
            self.link.enqueue("predictions", {"results": batch})

    def _tick(self) -> None:
        # Runs on the outbox thread: a batch waiting longer than batch_ms goes out.
        with self.report.lock:
            batch = self.report.take_if_due(time.monotonic())
        self._send(batch)

    def flush(self) -> None:
        with self.report.lock:
            batch, self.report.batch = self.report.batch, []
        self._send(batch)

    def close(self) -> None:
        self.flush()
        if self.rollout is not None:
            self.rollout.stop()
        if self.link is not None:
            self.link.stop()
            self.link = None


@hookimpl
def edgefleet_register_sinks(registry: Registry[Any]) -> None:
    registry.add("mqtt", MqttConfig, MqttSink, "MQTT: spooled results, metrics, commands")
