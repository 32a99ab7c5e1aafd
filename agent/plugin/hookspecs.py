"""Every hook an edgefleet plugin can implement.

Hooks fire at registration and lifecycle points only. Per-frame work never goes through a
hook: hooks hand back plain objects (sources, delegates, sinks, result filters) and the loop
calls those directly.

A plugin is a module (or object) with functions named like the specs below, decorated with
``edgefleet.plugin.hookimpl``, exposed through the ``edgefleet.plugins`` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from edgefleet.inference.delegate import Delegate
    from edgefleet.plugin.offers import SourceOffer
    from edgefleet.plugin.ports import AgentSettings, RunningAgent
    from edgefleet.plugin.registry import PluginConfig, Registry
    from edgefleet.runtime.results import ResultFilter
    from edgefleet.runtime.sinks import Sink
    from edgefleet.runtime.sources import Source

PROJECT = "edgefleet"
ENTRY_POINT_GROUP = "edgefleet.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    """Add source types (``registry.add(type, ConfigModel, factory)``).

    Fires once, when the plugin manager is built, before any config is validated.
    The factory receives the validated config section and returns an
    ``edgefleet.runtime.sources.Source``. Returns nothing.
    """


@hookspec
def edgefleet_register_delegates(registry: Registry[Delegate]) -> None:
    """Add delegate types; the factory returns an ``edgefleet.inference.delegate.Delegate``.

    Fires once, when the plugin manager is built. Returns nothing.
    """


@hookspec
def edgefleet_register_sinks(registry: Registry[Sink]) -> None:
    """Add result sink types; the factory returns an ``edgefleet.runtime.sinks.Sink``.

    Fires once, when the plugin manager is built. Returns nothing.
    """


@hookspec
def edgefleet_offer_sources() -> list[SourceOffer] | None:
    """Say which inputs this plugin could serve on this device, and how well.

    Fires when the config asks for ``source: {type: auto}``, before the source starts.
    Returns a list of ``SourceOffer`` (each a ready config section plus a score and a
    reason), or None. Must be quick and must not open devices for long.
    """


@hookspec(firstresult=True)
def edgefleet_choose_source(
    offers: list[SourceOffer], fallback: PluginConfig | None
) -> SourceOffer | None:
    """Choose the source for ``type: auto`` among all offers (firstresult).

    Fires right after ``edgefleet_offer_sources``. The built-in implementation is
    ``trylast``: the best score wins, else the configured fallback. Returns the chosen offer,
    or None to defer to the next implementation.
    """


@hookspec
def edgefleet_configure(config: AgentSettings) -> None:
    """The validated configuration, before anything starts. Returns nothing.

    Raise ``edgefleet.errors.UserError`` to refuse a configuration with a clear message.
    """


@hookspec
def edgefleet_result_filters(config: AgentSettings) -> ResultFilter | None:
    """Offer a filter that may enrich or veto each result before it leaves the device.

    Fires once when the loop starts. Returns a callable ``filter(result) -> result | None``
    (None vetoes the result) or None for no filter. Filters run in plugin order, per result.
    """


@hookspec
def edgefleet_start(agent: RunningAgent) -> None:
    """The agent is running: model loaded, first inference done, loop started.

    Receives the ``edgefleet.app.agent.Agent`` (its ``serving`` says what serves, its
    ``pipeline`` the loop). Returns nothing. Start background work here.
    """


@hookspec
def edgefleet_stop(agent: RunningAgent) -> None:
    """The agent is stopping (SIGTERM, SIGINT, end of input). Returns nothing.

    Fires after the loop stopped and before sinks are closed; stop background work here.
    """
