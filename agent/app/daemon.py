"""The daemon: the agent, the fleet link and rollouts composed, run under systemd.

Start: the agent (model loaded, first inference done, loop running), then the fleet link
(presence, reports, commands) with rollouts routed on it, then READY to systemd. Stop, on
SIGTERM/SIGINT or the end of the input: the loop first (results flushed into the outbox),
then rollouts, then the link (spool pushed out within the budget, ``stopped`` said).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from edgefleet.app.agent import Agent
from edgefleet.config.agentconfig import AgentConfig
from edgefleet.delegation.serving import Serving
from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.plugin.manager import Plugins
from edgefleet.protocol import Topics
from edgefleet.runtime.sdnotify import Notifier, Watchdog
from edgefleet.runtime.sinks import Sink

if TYPE_CHECKING:
    from edgefleet.capture import Capture
    from edgefleet.mqtt.fleetlink import FleetLink
    from edgefleet.rollout.manager import RolloutManager


log = structlog.get_logger(__name__)
RELOAD_RECORD = "reload.json"


def record_reload(state_dir: Path, count: int, outcome: dict[str, object]) -> None:
    """Say that reload number ``count`` of this process was handled, for ``edgefleet reload``."""
    body = {"pid": os.getpid(), "count": count, **outcome}
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(state_dir / RELOAD_RECORD, json.dumps(body).encode(), durable=False)
    except OSError as exc:
        log.warning("reload not recorded", error=str(exc))


class Daemon:
    """``edgefleet run``: one device's agent with its link to the fleet."""

    def __init__(
        self, config: AgentConfig, plugins: Plugins, extra_sinks: Sequence[Sink] = ()
    ) -> None:
        self.config = config
        self.agent = Agent(config, plugins, extra_sinks)
        self.fleet: FleetLink | None = None
        self.rollout: RolloutManager | None = None
        self.capture: Capture | None = None
        self.notifier = Notifier()
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self._reloads = 0

    def start(self) -> None:
        """Start the agent, then its fleet link and rollouts; raises UserError when it can't."""
        config, agent = self.config, self.agent
        core = config.core
        if config.fleet is not None:
            # Deferred: an agent without a fleet link never loads MQTT or the release crypto
            # (about 10 MB of a small board's memory).
            from edgefleet.mqtt.fleetlink import FleetLink

            self.fleet = FleetLink(
                config.fleet,
                agent,
                core.device.id,
                list(core.device.groups),
                agent.boot_id,
                core.state_dir,
            )
            agent.extra_sinks.append(self.fleet.reporter)
            fleet = self.fleet
            if core.capture.enabled:
                from edgefleet.capture import Capture

                self.capture = Capture(
                    core.capture, lambda: agent.pipeline, fleet.link, core.state_dir
                )
                agent.extra_sinks.append(self.capture)
                fleet.extras["capture"] = self.capture.figures
            agent.on_reload.append(lambda fresh: fleet.apply_config(fresh.fleet))
        agent.start()
        if self.fleet is None:
            return
        link = self.fleet.link
        serving, pipeline = agent.serving, agent.pipeline
        if serving is None or pipeline is None:
            raise RuntimeError("the agent started without serving or a loop")
        if config.rollout is not None:
            from edgefleet.rollout.manager import RolloutManager
            from edgefleet.rollout.shadow import loop_sampler

            self.rollout = RolloutManager(
                serving,
                pipeline.stats,
                link,
                config.rollout,
                core.state_dir,
                Topics(config.fleet.prefix if config.fleet else "", core.device.id),
                list(core.device.groups),
                sampler=loop_sampler(pipeline),
            )
            self.fleet.extras["shadow"] = self.rollout.shadow_figures
            if self.capture is not None:
                self.rollout.disagreement_listeners.append(self.capture.on_shadow_disagreement)
            self.fleet.announcers.append(self.rollout.announce)
            for topic in self.rollout.subscriptions:
                link.route(topic, self.rollout.on_message)
            link.route(self.rollout.chunk_filter, self.rollout.on_message, subscribe=False)
            self.rollout.start()
        # The retained status names what serves: say it again whenever that changes.
        serving.listeners.append(self._serving_changed)
        self.fleet.start()

    def _serving_changed(self, _serving: Serving) -> None:
        if self.fleet is not None:
            self.fleet.link.republish_status()

    def stop(self) -> None:
        self.agent.stop()
        if self.rollout is not None:
            self.rollout.stop()
        if self.fleet is not None:
            self.fleet.stop()

    def run(self, duration: float | None = None, install_signals: bool = True) -> int:
        """Start, serve until a signal, the end of the input or ``duration``; then stop."""
        if install_signals:
            self._install_signals()
        self.start()
        agent = self.agent
        # Ready means: model loaded, first inference done. Not: broker reachable.
        self.notifier.ready(agent.status_line())
        watchdog = Watchdog(self.notifier, agent.healthy, agent.status_line)
        watchdog.start()
        deadline = time.monotonic() + duration if duration else None
        pipeline = agent.pipeline
        if pipeline is None:
            raise RuntimeError("start() returned without a pipeline")
        try:
            while not self.stop_requested.is_set():
                if pipeline.finished.is_set():
                    log.info("input ended")
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self._reload()
                self.stop_requested.wait(0.2)
        finally:
            self.notifier.stopping()
            watchdog.stop()
            self.stop()
            self.notifier.close()
        return 0

    def _reload(self) -> None:
        self.notifier.reloading()
        outcome: dict[str, object] = {"ok": True}
        try:
            outcome["changed"] = self.agent.reload_settings()["changed"]
        except UserError as exc:
            # A broken file on reload must not stop a running agent: keep the old settings.
            log.error("reload refused, keeping the running settings", error=str(exc))
            outcome = {"ok": False, "error": str(exc)}
        self._reloads += 1
        record_reload(self.config.core.state_dir, self._reloads, outcome)
        self.notifier.ready(self.agent.status_line())

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: types.FrameType | None) -> None:
            log.info("signal received, stopping", signal=signal.Signals(signum).name)
            self.stop_requested.set()

        def hup(_signum: int, _frame: types.FrameType | None) -> None:
            self.reload_requested.set()  # handled by the main loop within 0.2 s

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, hup)
