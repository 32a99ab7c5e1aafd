"""The agent: config and plugins in, a running classification loop out.

Start order: plugins configured -> model loaded with the delegate -> one warm-up inference
(the agent is "ready" only after it) -> sinks opened -> source started -> loop running ->
``edgefleet_start``. Stop order is the reverse, bounded so a SIGTERM ends within 2 s.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
import types
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from edgefleet import __version__, logs
from edgefleet.classifier import Classifier, load_classifier, sha256_file
from edgefleet.config import AgentConfig, load_config
from edgefleet.delegates import Delegate
from edgefleet.errors import ModelError, UserError
from edgefleet.factory import factory_model_path
from edgefleet.failover import Failover
from edgefleet.modelstore import ActiveModel, ModelStore
from edgefleet.pipeline import LoopSettings, Pipeline
from edgefleet.pluginmanager import Plugins
from edgefleet.registry import PluginConfig
from edgefleet.runtime import available_runtimes
from edgefleet.sdnotify import Notifier, Watchdog
from edgefleet.selection import POLICIES, Choice, candidate_sections, choose, fixed_choice
from edgefleet.sinks import Sink
from edgefleet.sources import Source
from edgefleet.stats import LoopStats

log = structlog.get_logger(__name__)
STOP_BUDGET_S = 1.8


class Agent:
    """One device's classification agent."""

    def __init__(
        self, config: AgentConfig, plugins: Plugins, extra_sinks: Sequence[Sink] = ()
    ) -> None:
        self.config = config
        self.plugins = plugins
        self.boot_id = uuid.uuid4().hex
        self.extra_sinks = list(extra_sinks)
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.notifier = Notifier()
        self.choice: Choice | None = None
        self.delegate_choice: dict[str, Any] = {}
        self.failover: Failover | None = None
        self.capability_report: dict[str, Any] = {}
        self._store_record: ActiveModel | Literal[False] | None = None
        self.pipeline: Pipeline | None = None
        self.source_choice: dict[str, Any] = {}
        self.sinks: list[Sink] = []
        self.delegate: Delegate | None = None
        self.ready_at: float | None = None
        self._started = False
        self.on_ready: list[Callable[[Agent], None]] = []

    # -- building blocks ---------------------------------------------------------------
    def model_path(self) -> Path:
        """The configured model, else the store's active one (rollouts), else the factory."""
        if self.config.core.model.path is not None:
            return self.config.core.model.path
        if self._store_record is None:
            self._store_record = ModelStore(self.config.core.state_dir).active() or False
        if self._store_record:
            return ModelStore(self.config.core.state_dir).path_for(self._store_record.sha256)
        return factory_model_path()

    def make_delegate(self) -> Delegate:
        delegate: Delegate = self.plugins.registries.delegates.create(self.config.delegate)
        available = delegate.availability()
        if not available.ok:
            raise UserError(f"delegate {self.config.delegate.type}: {available.reason}")
        return delegate

    def load_model(self, delegate: Delegate) -> Classifier:
        model = self.config.core.model
        classifier = load_classifier(
            self.model_path(), delegate, labels_file=model.labels, crop=model.crop == "center"
        )
        # The first inference proves the model runs here; "ready" means exactly that.
        h, w = classifier.input_shape
        scores = classifier.classify(np.full((h, w, 3), 127, dtype=np.uint8))
        if not np.all(np.isfinite(scores)):
            raise ModelError(f"{classifier.info.path}: warm-up inference gave non-finite output")
        return classifier

    def choose_delegate(self) -> Choice:
        """Apply the delegate policy (or the fixed delegate) and remember the table."""
        section = self.config.delegate
        model = self.config.core.model
        crop = model.crop == "center"
        if section.type in POLICIES:
            registry = self.plugins.registries.delegates
            cache_dir = self.config.core.state_dir if getattr(section, "cache", False) else None
            choice = choose(
                section.type,
                candidate_sections(section, registry),
                registry,
                self.model_path(),
                sha256_file(self.model_path()),
                budget_s=float(getattr(section, "budget_s", 5.0)),
                cache_dir=cache_dir,
                crop=crop,
                labels=model.labels,
            )
        else:
            delegate = self.make_delegate()
            choice = fixed_choice(section, delegate, self.load_model(delegate))
        self.choice = choice
        self.delegate_choice = {
            "policy": choice.policy,
            "chosen": choice.best[0].label,
            "seconds": round(choice.seconds, 2),
            "cached": choice.from_cache,
            "table": choice.summary(),
        }
        log.info(
            "delegate chosen",
            **{k: v for k, v in self.delegate_choice.items() if k != "table"},
            table=[(m["label"], m["median_ms"], m["reason"]) for m in choice.summary()],
        )
        return choice

    def emit_event(self, body: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.event(body)
            except Exception as exc:  # noqa: BLE001 - an event must never stop the agent
                log.warning("sink event failed", sink=sink.name, error=str(exc))

    def resolve_source_config(self) -> PluginConfig:
        section = self.config.source
        if section.type != "auto":
            self.source_choice = {"type": section.type, "reason": "configured"}
            return section
        offers = self.plugins.offer_sources()
        chosen = self.plugins.choose_source(offers, section)
        if chosen is None:
            raise UserError("source auto: no source available and no fallback configured")
        registry = self.plugins.registries.sources
        entry = registry.get(str(chosen.section.get("type")))
        if entry is None or entry.type == "auto":
            raise UserError(f"source auto: chosen type {chosen.section.get('type')!r} unknown")
        resolved = entry.config_model.model_validate(chosen.section)
        self.source_choice = {
            "type": resolved.type,
            "reason": chosen.reason,
            "score": chosen.score,
            "offers": [
                {"type": o.section.get("type"), "score": o.score, "reason": o.reason}
                for o in offers
            ],
        }
        log.info("source chosen", **self.source_choice)
        return resolved

    def make_source(self) -> Source:
        source: Source = self.plugins.registries.sources.create(self.resolve_source_config())
        return source

    def make_sinks(self) -> list[Sink]:
        sinks: list[Sink] = [self.plugins.registries.sinks.create(s) for s in self.config.sinks]
        return sinks + self.extra_sinks

    def capabilities(self) -> dict[str, Any]:
        """Runtimes present and each delegate type's availability (for the birth message)."""
        delegates: dict[str, Any] = {}
        for entry in self.plugins.registries.delegates.entries():
            try:
                delegate: Delegate = entry.factory(entry.config_model(type=entry.type))
                available = delegate.availability()
                delegates[entry.type] = {"available": available.ok, "reason": available.reason}
            except Exception as exc:  # noqa: BLE001 - a probe must never break the birth message
                delegates[entry.type] = {"available": False, "reason": str(exc)}
        return {"runtimes": [r.name for r in available_runtimes()], "delegates": delegates}

    def reload_settings(self) -> dict[str, Any]:
        """Re-read the config file and apply what can change without a restart."""
        path = Path(self.config.origin)
        if not path.is_file():
            raise UserError("the agent was not started from a config file")
        fresh = load_config(path, self.plugins.registries)
        pipeline = self.pipeline
        if pipeline is None:
            raise UserError("the loop is not running")
        model, loop = fresh.core.model, fresh.core.loop
        settings = pipeline.settings
        changed: dict[str, Any] = {}
        for name, value in (
            ("top_k", model.top_k),
            ("threshold", model.threshold),
            ("fps_cap", loop.fps_cap),
        ):
            if getattr(settings, name) != value:
                setattr(settings, name, value)
                changed[name] = value
        for sink, section in zip(self.sinks, fresh.sinks, strict=False):
            report = getattr(sink, "report", None)
            policy = getattr(section, "report", None)
            if report is not None and policy is not None and report.policy != policy:
                changed["report"] = report.update(policy.model_dump())
        self.config = fresh
        log.info("settings reloaded", changed=changed)
        return {"changed": changed}

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Load, warm up and start the loop; raises UserError when the agent cannot start."""
        core = self.config.core
        logs.bind_global(device_id=core.device.id)
        self.plugins.configure(self.config)
        try:
            choice = self.choose_delegate()
        except UserError as exc:
            if not self._store_record:
                raise
            # A rolled-out model that no longer loads must not crash-loop the device.
            log.error(
                "rolled-out model unusable; starting on the factory model",
                error=str(exc),
                sha256=self._store_record.sha256,
            )
            self._store_record = False
            choice = self.choose_delegate()
        _, self.delegate, classifier = choice.best
        # Probed once here: the birth message is built on the MQTT network thread.
        self.capability_report = self.capabilities()
        if self._store_record:
            # A rolled-out model is known by its release name and version.
            record = self._store_record
            for _, _, ranked in choice.ranked:
                ranked.info = dataclasses.replace(
                    ranked.info, name=record.name, version=record.version
                )
        logs.bind_global(model=classifier.info.name, model_version=classifier.info.version)
        source = self.make_source()
        self.sinks = self.make_sinks()
        settings = LoopSettings(
            top_k=core.model.top_k, threshold=core.model.threshold, fps_cap=core.loop.fps_cap
        )
        self.pipeline = Pipeline(
            source=source,
            classifier=classifier,
            sinks=self.sinks,
            filters=self.plugins.result_filters(self.config),
            settings=settings,
            stats=LoopStats(core.loop.stats_window),
            boot_id=self.boot_id,
        )
        context = {
            "device_id": core.device.id,
            "boot_id": self.boot_id,
            "groups": list(core.device.groups),
            "state_dir": str(core.state_dir),
            "model": classifier.info.describe(),
            "agent_version": __version__,
            "agent": self,
        }
        for sink in self.sinks:
            sink.open(context)
        section = self.config.delegate
        if (
            self.choice is not None
            and section.type in POLICIES
            and getattr(section, "failover", False)
        ):
            self.failover = Failover(
                self.choice,
                self.pipeline,
                self.model_path(),
                core.model.crop == "center",
                self.emit_event,
                reprobe_min_s=float(getattr(section, "reprobe_min_s", 5.0)),
                reprobe_max_s=float(getattr(section, "reprobe_max_s", 300.0)),
                invoke_timeout_s=float(getattr(section, "invoke_timeout_s", 5.0)),
            )
            self.failover.start()
        self.pipeline.start()
        self.ready_at = time.monotonic()
        self._started = True
        log.info(
            "agent running",
            agent_version=__version__,
            boot_id=self.boot_id,
            model_path=str(classifier.info.path),
            sha256=classifier.info.sha256[:16],
            delegate=classifier.delegate,
            source=self.source_choice.get("type"),
        )
        self.plugins.lifecycle("edgefleet_start", self)
        for callback in self.on_ready:
            callback(self)

    def stop(self) -> None:
        """Stop the loop, tell the plugins, flush and close sinks; idempotent."""
        if not self._started:
            return
        self._started = False
        if self.failover is not None:
            self.failover.stop()
        if self.pipeline is not None:
            self.pipeline.stop(timeout=STOP_BUDGET_S / 2)
        self.plugins.lifecycle("edgefleet_stop", self)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - close the others regardless
                log.warning("sink close failed", sink=sink.name, error=str(exc))
        log.info("agent stopped", results=self.pipeline.stats.inferences if self.pipeline else 0)

    def healthy(self, within_s: float) -> bool:
        """For the watchdog: the loop turns and every sink's threads live."""
        pipeline = self.pipeline
        if pipeline is None or not pipeline.healthy(within_s / 2):
            return False
        return all(sink.alive() for sink in self.sinks)

    def status_line(self) -> str:
        pipeline = self.pipeline
        if pipeline is None:
            return "starting"
        info, delegate = pipeline.classifier.info, pipeline.classifier.delegate
        parts = [
            f"model {info.name} v{info.version}",
            f"{delegate.get('type')}/{delegate.get('runtime')} x{delegate.get('threads')}",
            f"{pipeline.stats.fps():.1f} fps",
        ]
        if pipeline.settings.paused:
            parts.append("paused")
        parts += [text for sink in self.sinks if (text := sink.status_text())]
        return ", ".join(parts)

    def run(self, duration: float | None = None, install_signals: bool = True) -> int:
        """Start, serve until a signal, the end of the input or ``duration``; then stop."""
        if install_signals:
            self._install_signals()
        self.start()
        # Ready means: model loaded, first inference done. Not: broker reachable.
        self.notifier.ready(self.status_line())
        watchdog = Watchdog(self.notifier, self.healthy, self.status_line)
        watchdog.start()
        deadline = time.monotonic() + duration if duration else None
        pipeline = self.pipeline
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
        try:
            self.reload_settings()
        except UserError as exc:
            # A broken file on reload must not stop a running agent: keep the old settings.
            log.error("reload refused, keeping the running settings", error=str(exc))
        self.notifier.ready(self.status_line())

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: types.FrameType | None) -> None:
            log.info("signal received, stopping", signal=signal.Signals(signum).name)
            self.stop_requested.set()

        def hup(_signum: int, _frame: types.FrameType | None) -> None:
            self.reload_requested.set()  # handled by the main loop within 0.2 s

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, hup)
