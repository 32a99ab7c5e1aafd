"""Build the plugin manager and give the agent a typed facade over its hooks.

Built-in and third-party plugins are both entry points of the ``edgefleet.plugins`` group.
Each is loaded, registered and asked to register its types inside its own try/except: a
broken plugin is recorded (and shown by ``edgefleet plugins``) and the agent runs without it.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from edgefleet.errors import UserError
from edgefleet.plugin import hookspecs
from edgefleet.plugin.offers import SourceOffer
from edgefleet.plugin.ports import AgentSettings, RunningAgent
from edgefleet.plugin.registry import PluginConfig, Registries, Registry
from edgefleet.runtime.results import ResultFilter

log = structlog.get_logger(__name__)
BUILTIN_DIST = "edgefleet"


@dataclass
class PluginRecord:
    """One entry point and what became of it."""

    name: str
    origin: str  # "built-in" or "<distribution> <version>"
    target: str  # module path the entry point names
    status: str = "loaded"  # loaded, blocked, failed
    error: str = ""
    hooks: list[str] = field(default_factory=list)
    deprecated: list[str] = field(default_factory=list)  # what it imports that moved


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown"
    name = dist.metadata["Name"] or "unknown"
    return "built-in" if name == BUILTIN_DIST else f"{name} {dist.version}"


def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Plugins:
    """Typed facade over ``pm.hook``; the only way the agent calls hooks."""

    def __init__(self, pm: pluggy.PluginManager, records: list[PluginRecord]) -> None:
        self.pm = pm
        self.records = records
        self.unknown_blocked: list[str] = []  # plugins.block names nothing installed has
        self.registries = Registries(
            sources=Registry("source"), delegates=Registry("delegate"), sinks=Registry("sink")
        )
        self._register_types()

    def _record(self, name: str) -> PluginRecord | None:
        return next((r for r in self.records if r.name == name), None)

    def _fail(self, name: str, stage: str, exc: BaseException) -> None:
        record = self._record(name)
        message = f"{stage}: {_describe_exc(exc)}"
        log.error("plugin failed, continuing without it", plugin=name, error=message)
        if record is not None:
            record.status, record.error = "failed", message
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)

    def _each(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        caller = getattr(self.pm.hook, hook_name)
        # get_hookimpls() lists in registration (load) order; a pluggy call would run LIFO.
        return [(impl.plugin_name, impl.function) for impl in caller.get_hookimpls()]

    def _register_types(self) -> None:
        pairs: list[tuple[str, Registry[Any]]] = [
            ("edgefleet_register_sources", self.registries.sources),
            ("edgefleet_register_delegates", self.registries.delegates),
            ("edgefleet_register_sinks", self.registries.sinks),
        ]
        for hook_name, registry in pairs:
            for plugin_name, func in self._each(hook_name):
                registry.current_plugin = plugin_name
                try:
                    func(registry=registry)
                except Exception as exc:  # noqa: BLE001 - isolate third-party plugins
                    self._fail(plugin_name, hook_name, exc)

    def offer_sources(self) -> list[SourceOffer]:
        offers: list[SourceOffer] = []
        for plugin_name, func in self._each("edgefleet_offer_sources"):
            try:
                offers.extend(func() or [])
            except Exception as exc:  # noqa: BLE001 - one bad probe must not stop the others
                log.warning("source probe failed", plugin=plugin_name, error=_describe_exc(exc))
        return offers

    def choose_source(
        self, offers: list[SourceOffer], fallback: PluginConfig | None
    ) -> SourceOffer | None:
        chosen: SourceOffer | None = self.pm.hook.edgefleet_choose_source(
            offers=offers, fallback=fallback
        )
        return chosen

    def configure(self, config: AgentSettings) -> None:
        for plugin_name, func in self._each("edgefleet_configure"):
            try:
                func(config=config)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._fail(plugin_name, "edgefleet_configure", exc)

    def result_filters(self, config: AgentSettings) -> list[ResultFilter]:
        filters: list[ResultFilter] = []
        for plugin_name, func in self._each("edgefleet_result_filters"):
            try:
                made = func(config=config)
            except Exception as exc:  # noqa: BLE001
                self._fail(plugin_name, "edgefleet_result_filters", exc)
                continue
            if made is not None:
                filters.append(made)
        return filters

    def lifecycle(self, hook_name: str, agent: RunningAgent) -> None:
        """Call ``edgefleet_start`` or ``edgefleet_stop`` on every plugin, each isolated."""
        for plugin_name, func in self._each(hook_name):
            try:
                func(agent=agent)
            except Exception as exc:  # noqa: BLE001
                log.error(
                    "plugin hook failed",
                    plugin=plugin_name,
                    hook=hook_name,
                    error=_describe_exc(exc),
                )


def make_plugin_manager(
    block: Iterable[str] = (),
    extra: Sequence[tuple[str, object]] = (),
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> Plugins:
    """Load every entry point of the group (minus ``block``), plus ``extra`` plugin objects."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(block)
    records: list[PluginRecord] = []
    eps = list(
        importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
        if entry_points is None
        else entry_points
    )
    for ep in sorted(eps, key=lambda e: e.name):
        record = PluginRecord(name=ep.name, origin=_origin(ep), target=ep.value)
        records.append(record)
        if ep.name in blocked:
            record.status = "blocked"
            continue
        try:
            _register(pm, _load(ep, record), ep.name, record)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the agent
            record.status, record.error = "failed", f"load: {_describe_exc(exc)}"
            log.error("plugin failed to load", plugin=ep.name, error=record.error)
    unknown = sorted(blocked - {ep.name for ep in eps})
    if unknown:
        log.warning("plugins.block names no installed plugin", names=unknown)
    for name, obj in extra:
        record = PluginRecord(name=name, origin="in-process", target=repr(obj))
        records.append(record)
        try:
            _register(pm, obj, name, record)
        except Exception as exc:  # noqa: BLE001
            record.status, record.error = "failed", f"load: {_describe_exc(exc)}"
    plugins = Plugins(pm, records)
    plugins.unknown_blocked = unknown
    return plugins


def _load(ep: importlib.metadata.EntryPoint, record: PluginRecord) -> object:
    """Import an entry point, noting the deprecated API paths it uses (they still work)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        obj = ep.load()
    record.deprecated = sorted(
        {str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)}
        & _moved_messages()
    )
    if record.deprecated:
        log.warning("plugin uses deprecated imports", plugin=ep.name, imports=record.deprecated)
    return obj


def _moved_messages() -> set[str]:
    """The warnings the old API paths give (others, from a plugin's own imports, are its own)."""
    old = ("hookspecs", "registry", "sourceoffers", "sources", "sinks", "delegates", "results")
    return {
        f"edgefleet.{name} is deprecated: import from edgefleet.plugin (the stable plugin API)"
        for name in (*old, "frames")
    }


def _register(pm: pluggy.PluginManager, obj: object, name: str, record: PluginRecord) -> None:
    pm.register(obj, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        pm.unregister(obj)
        raise
    callers = pm.get_hookcallers(obj) or []
    record.hooks = sorted(c.name for c in callers if c.name.startswith("edgefleet"))
