"""What hooks are handed, as the plugin room sees it: small protocols, not the agent's types.

The plugin room sits below the configuration and the composition (``config`` imports the
registries, ``app`` builds the agent), so it names what a hook receives by the little it
needs; the objects passed are ``edgefleet.config.agentconfig.AgentConfig`` and
``edgefleet.app.agent.Agent``, which have these members and more.
"""

from __future__ import annotations

from typing import Protocol

from edgefleet.plugin.registry import PluginConfig


class DeviceIdentity(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def groups(self) -> list[str]: ...


class AgentSettings(Protocol):
    """The validated configuration (``edgefleet_configure``, ``edgefleet_result_filters``)."""

    @property
    def device(self) -> DeviceIdentity: ...

    @property
    def source(self) -> PluginConfig: ...

    @property
    def sinks(self) -> list[PluginConfig]: ...


class RunningAgent(Protocol):
    """The running agent (``edgefleet_start``, ``edgefleet_stop``)."""

    @property
    def config(self) -> AgentSettings: ...

    @property
    def boot_id(self) -> str: ...

    def status_line(self) -> str: ...
