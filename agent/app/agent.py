"""The agent: config and plugins in, a running classification loop out.

Start order: plugins configured -> delegate chosen and the model loaded on it -> one warm-up
inference (the agent is "ready" only after it) -> sinks opened -> source started -> loop
running -> ``edgefleet_start``. Stop order is the reverse, bounded so a SIGTERM ends within
2 s. What serves (model x delegate) is owned by ``edgefleet.delegation.serving.Serving``;
the fleet link and rollouts are composed around the agent by ``edgefleet.app.daemon``.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from edgefleet import __version__, logs
from edgefleet.config.agentconfig import AgentConfig, load_config
from edgefleet.delegation.failover import FailoverWatch
from edgefleet.delegation.policies import AutoPolicy
from edgefleet.delegation.selection import Choice, candidate_sections, choose, fixed_choice
from edgefleet.delegation.serving import FailoverSettings, ServedModel, Serving
from edgefleet.errors import UserError
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import Classifier, load_checked, read_model_info
from edgefleet.inference.delegate import Delegate
from edgefleet.inference.litert import available_runtimes
from edgefleet.plugin.manager import Plugins
from edgefleet.plugin.registry import PluginConfig
from edgefleet.rollout.store import ActiveModel, ModelStore
from edgefleet.runtime.pipeline import LoopSettings, Pipeline
from edgefleet.runtime.sinks import Sink
from edgefleet.runtime.sources import Source
from edgefleet.runtime.stats import LoopStats

log = structlog.get_logger(__name__)
STOP_BUDGET_S = 1.8


class Agent:
    """One device's classification loop and what serves it."""

    def __init__(
        self, config: AgentConfig, plugins: Plugins, extra_sinks: Sequence[Sink] = ()
    ) -> None:
        self.config = config
        self.plugins = plugins
        self.boot_id = uuid.uuid4().hex
        self.extra_sinks = list(extra_sinks)
        self.delegate_choice: dict[str, Any] = {}
        self.capability_report: dict[str, Any] = {}
        self.source_choice: dict[str, Any] = {}
        self.serving: Serving | None = None
        self.pipeline: Pipeline | None = None
        self.sinks: list[Sink] = []
        self._watch: FailoverWatch | None = None
        self._started = False
        # Called with the fresh config after a reload; each returns what it changed.
        self.on_reload: list[Callable[[AgentConfig], dict[str, Any]]] = []

    # -- what to serve ---------------------------------------------------------------------
    def initial_model(self) -> ServedModel:
        """The configured model, else the store's active one (rollouts), else the factory."""
        model = self.config.core.model
        if model.path is not None:
            return ServedModel(model.path, read_model_info(model.path, model.labels))
        record = ModelStore(self.config.core.state_dir).active()
        if record is not None:
            return self._stored(record)
        return self._factory()

    def _stored(self, record: ActiveModel) -> ServedModel:
        path = ModelStore(self.config.core.state_dir).path_for(record.sha256)
        info = read_model_info(path, self.config.core.model.labels)
        # A rolled-out model is known by its release name and version.
        return ServedModel(
            path, dataclasses.replace(info, name=record.name, version=record.version)
        )

    def _factory(self) -> ServedModel:
        path = factory_model_path()
        return ServedModel(path, read_model_info(path, self.config.core.model.labels))

    def _make_delegate(self) -> Delegate:
        section = self.config.delegate
        if not isinstance(section, PluginConfig):
            raise TypeError("a delegate policy is not a delegate")
        delegate: Delegate = self.plugins.registries.delegates.create(section)
        available = delegate.availability()
        if not available.ok:
            raise UserError(f"delegate {section.type}: {available.reason}")
        return delegate

    def _warm(self, model: ServedModel, delegate: Delegate) -> Classifier:
        # The first inference proves the model runs here; "ready" means exactly that.
        return load_checked(
            model.path,
            delegate,
            labels_file=self.config.core.model.labels,
            crop=self._crop,
            info=model.info,
        )

    @property
    def _crop(self) -> bool:
        return self.config.core.model.crop == "center"

    def choose_delegate(self, model: ServedModel) -> Choice:
        """Apply the delegate policy (or the fixed delegate) to ``model``."""
        policy = self.config.delegate
        if isinstance(policy, PluginConfig):
            delegate = self._make_delegate()
            choice = fixed_choice(policy, delegate, self._warm(model, delegate))
        else:
            registry = self.plugins.registries.delegates
            auto = policy if isinstance(policy, AutoPolicy) else None
            choice = choose(
                policy.type,
                candidate_sections(policy, self.config.candidates, registry),
                registry,
                model.path,
                model.info.sha256,
                budget_s=auto.budget_s if auto else 5.0,
                cache_dir=self.config.core.state_dir if auto and auto.cache else None,
                crop=self._crop,
                labels=self.config.core.model.labels,
            )
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

    def _choose_serving(self) -> tuple[Choice, ServedModel]:
        model = self.initial_model()
        try:
            return self.choose_delegate(model), model
        except UserError as exc:
            if model.path == factory_model_path() or self.config.core.model.path is not None:
                raise
            # A rolled-out model that no longer loads must not crash-loop the device.
            log.error(
                "rolled-out model unusable; starting on the factory model",
                error=str(exc),
                sha256=model.info.sha256,
            )
            model = self._factory()
            return self.choose_delegate(model), model

    def _make_serving(self) -> Serving:
        choice, model = self._choose_serving()
        policy = self.config.delegate
        failover = None
        if not isinstance(policy, PluginConfig) and policy.failover:
            failover = FailoverSettings(True, policy.reprobe_min_s, policy.reprobe_max_s)
        serving = Serving(choice, model, self._crop, self.emit_event, failover)
        serving.listeners.append(_bind_log_context)
        return serving

    # -- building blocks ---------------------------------------------------------------------
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
        for apply in self.on_reload:
            changed.update(apply(fresh))
        self.config = fresh
        log.info("settings reloaded", changed=changed)
        return {"changed": changed}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load, warm up and start the loop; raises UserError when the agent cannot start."""
        core = self.config.core
        logs.bind_global(device_id=core.device.id)
        self.plugins.configure(self.config)
        serving = self.serving = self._make_serving()
        _bind_log_context(serving)
        # Probed once here: the birth message is built on the MQTT network thread.
        self.capability_report = self.capabilities()
        classifier = serving.classifier
        source = self.make_source()
        self.sinks = self.make_sinks()
        settings = LoopSettings(
            top_k=core.model.top_k, threshold=core.model.threshold, fps_cap=core.loop.fps_cap
        )
        pipeline = self.pipeline = Pipeline(
            source=source,
            classifier=classifier,
            sinks=self.sinks,
            filters=self.plugins.result_filters(self.config),
            settings=settings,
            stats=LoopStats(core.loop.stats_window),
            boot_id=self.boot_id,
        )
        serving.attach(pipeline)
        pipeline.on_invoke_error = serving.on_invoke_error
        context = {
            "device_id": core.device.id,
            "boot_id": self.boot_id,
            "groups": list(core.device.groups),
            "state_dir": str(core.state_dir),
            "model": classifier.info.describe(),
            "agent_version": __version__,
        }
        for sink in self.sinks:
            sink.open(context)
        policy = self.config.delegate
        if serving.failover.enabled and not isinstance(policy, PluginConfig):
            self._watch = FailoverWatch(serving, pipeline, policy.invoke_timeout_s)
            self._watch.start()
        pipeline.start()
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

    def stop(self) -> None:
        """Stop the loop, tell the plugins, flush and close sinks; idempotent."""
        if not self._started:
            return
        self._started = False
        if self._watch is not None:
            self._watch.stop()
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


def _bind_log_context(serving: Serving) -> None:
    """Every log line names what serves now, not what served at start."""
    info = serving.model.info
    logs.bind_global(model=info.name, model_version=info.version)
