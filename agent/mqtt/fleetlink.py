"""The fleet link: the device's MQTT connection with everything that rides on it.

Composed by the daemon from the ``fleet:`` section: the connection and its outbox
(``MqttLink``), the birth and metrics bodies, the command handler, and the results
``Reporter`` the agent feeds like any other sink. Rollouts register their own topic routes
on ``link``. What the link reads of the agent goes through the ``AgentView`` port.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from edgefleet import __version__
from edgefleet.mqtt.brokers import parse_url
from edgefleet.mqtt.commands import CommandHandler
from edgefleet.mqtt.homeassistant import Discovery
from edgefleet.mqtt.link import Incoming, LinkSettings, MqttLink
from edgefleet.mqtt.reporter import Reporter
from edgefleet.mqtt.settings import FleetConfig, TlsConfig
from edgefleet.protocol import LATENCY_BUCKETS_MS, Topics
from edgefleet.runtime import health
from edgefleet.runtime.pipeline import Pipeline

log = structlog.get_logger(__name__)


class AgentView(Protocol):
    """What the fleet link reads of the agent, and the one thing it may ask (reload)."""

    @property
    def pipeline(self) -> Pipeline | None: ...

    source_choice: dict[str, Any]
    delegate_choice: dict[str, Any]
    capability_report: dict[str, Any]

    def reload_settings(self) -> dict[str, Any]: ...


def link_settings(
    cfg: FleetConfig, device: str, groups: list[str], boot_id: str, state_dir: Path
) -> LinkSettings:
    tls = cfg.tls or TlsConfig()
    return LinkSettings(
        url=cfg.brokers()[0],
        urls=cfg.brokers(),
        device=device,
        groups=groups,
        prefix=cfg.prefix,
        boot_id=boot_id,
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
        flush_after_s=cfg.spool.flush_after_s,
        memory_max_bytes=cfg.spool.memory_max_bytes,
        reconnect_min_s=cfg.reconnect_min_s,
        reconnect_max_s=cfg.reconnect_max_s,
        auth_retry_s=cfg.auth_retry_s,
        max_inflight=cfg.max_inflight,
        resend_after_s=cfg.resend_after_s,
        max_command_bytes=cfg.max_command_bytes,
    )


class FleetLink:
    """Presence, reports, metrics and commands over one MQTT connection."""

    def __init__(
        self,
        cfg: FleetConfig,
        agent: AgentView,
        device: str,
        groups: list[str],
        boot_id: str,
        state_dir: Path,
    ) -> None:
        for url in cfg.brokers():
            parse_url(url)  # a bad URL fails at start, with its reason
        self.agent = agent
        self.groups = groups
        self.state_dir = state_dir
        settings = link_settings(cfg, device, groups, boot_id, state_dir)
        self.metrics_interval_s = cfg.metrics_interval_s
        self.link = MqttLink(
            settings,
            birth=self._birth,
            on_command=self._on_command,
            metrics=self._metrics,
            metrics_interval_s=cfg.metrics_interval_s,
            tick=self._tick,
            announce=self._announce,
        )
        # Retained messages published after every birth, by whoever rides on the link: Home
        # Assistant discovery, the rollout's last state (a state reached while the link was
        # down reaches the broker when it is back).
        self.announcers: list[Callable[[], list[tuple[str, bytes]]]] = [
            Discovery(
                cfg.homeassistant, Topics(cfg.prefix, device), state_dir, cfg.metrics_interval_s
            ).messages
        ]
        self.reporter = Reporter(self.link, cfg.report)
        # More parts of the metrics message, by key, from what rides on the link (rollouts'
        # shadow phase); a part that returns None is left out.
        self.extras: dict[str, Callable[[], dict[str, Any] | None]] = {}
        self.commands = CommandHandler(agent, self.reporter.report, cfg.max_command_bytes)

    def start(self) -> None:
        moved = self.link.outbox.spool.moved_aside
        if moved is not None:
            log.error("spool was damaged and moved aside", path=str(moved))
        self.link.start()

    def stop(self) -> None:
        self.reporter.flush()
        self.link.stop()

    def apply_config(self, fresh: FleetConfig | None) -> dict[str, Any]:
        """On reload: the report policy may change; the connection settings need a restart."""
        policy = fresh.report if fresh is not None else None
        if policy is None or policy == self.reporter.report.policy:
            return {}
        return {"report": self.reporter.report.update(policy.model_dump())}

    # -- bodies (network and outbox threads) ------------------------------------------------
    def _birth(self) -> dict[str, Any]:
        agent = self.agent
        body: dict[str, Any] = {"agent_version": __version__, "groups": list(self.groups)}
        pipeline = agent.pipeline
        if pipeline is not None:
            body["model"] = pipeline.classifier.info.describe()
            body["delegate"] = pipeline.classifier.delegate
        body["source"] = agent.source_choice
        body["delegate_choice"] = agent.delegate_choice
        body["capabilities"] = agent.capability_report
        disk = self.link.outbox.disk
        body["state_dir"] = {"writable": disk.ok, "full": disk.full}
        # Whether this device's times (every ts it sends) come from a set clock.
        body["clock"] = {"synced": health.clock_synced()}
        return body

    def _metrics(self) -> dict[str, Any]:
        pipeline = self.agent.pipeline
        body: dict[str, Any] = {
            "interval_s": self.metrics_interval_s,
            "fps": 0.0,
            "inferences": 0,
            "dropped_frames": 0,
            "latency_ms": {},
        }
        if pipeline is not None:
            snap = pipeline.stats.snapshot()
            body.update(
                fps=snap["fps"],
                inferences=snap["inferences"],
                dropped_frames=pipeline.dropped,
                reprepared=snap["reprepared"],
                latency_ms=snap["latency_ms"],
                latency_window=snap["latency_window"],
                latency_buckets_ms=list(LATENCY_BUCKETS_MS),
                latency_hist=snap["latency_hist"],
                errors=snap["errors"],
                paused=pipeline.settings.paused,
                delegate=pipeline.classifier.delegate,
            )
        body["spool"] = self.link.outbox.stats()
        body["state_dir"] = self.link.outbox.disk_state()
        body["link"] = self.link.stats()
        body["report"] = {"skipped": self.reporter.report.skipped}
        body["health"] = health.collect(self.state_dir)
        for key, part in self.extras.items():
            value = part()
            if value is not None:
                body[key] = value
        return body

    def _announce(self) -> list[tuple[str, bytes]]:
        return [message for announcer in self.announcers for message in announcer()]

    def _tick(self) -> None:
        self.reporter.tick()

    def _on_command(self, incoming: Incoming) -> None:
        link = self.link
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
