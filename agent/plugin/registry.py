"""Registries that plugins fill from their registration hooks.

A registration hook receives a registry and adds a *type*: the name used in config
(``type: images``), the pydantic model that validates that config section, and a factory
that turns a validated section into the plain object the agent calls per frame.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic.config import JsonDict

if TYPE_CHECKING:
    from edgefleet.inference.delegate import Delegate
    from edgefleet.runtime.sinks import Sink
    from edgefleet.runtime.sources import Source

T = TypeVar("T")
C = TypeVar("C", bound="PluginConfig")


NESTED_SECTION = "edgefleet_section"


def nested_section(kind: str) -> JsonDict:
    """``json_schema_extra`` for a field that holds another plugin's section of ``kind``.

    ``Field(default=None, json_schema_extra=nested_section("source"))``: the config loader
    validates such a field with the plugin its ``type`` names, errors keeping file:line.
    """
    return {NESTED_SECTION: kind}


class PluginConfig(BaseModel):
    """Base of every plugin-owned config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    type: str


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One registered type."""

    type: str
    config_model: builtins.type[PluginConfig]
    factory: Callable[[Any], T]
    plugin: str
    summary: str
    # Whether the type can work on this machine, and why not: (ok, reason). Never raises.
    probe: Callable[[], tuple[bool, str]] | None = None


class Registry(Generic[T]):
    """Types of one kind (sources, delegates or sinks), keyed by their config ``type``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Registration[T]] = {}
        self.current_plugin = "?"

    def add(
        self,
        type_name: str,
        config_model: type[C],
        factory: Callable[[C], T],
        summary: str = "",
        probe: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        """Register ``type_name``; a second registration of the same name is refused.

        ``probe`` says whether the type can work here (``edgefleet plugins`` shows it).
        """
        if type_name in self._entries:
            owner = self._entries[type_name].plugin
            raise ValueError(f"{self.kind} type {type_name!r} already registered by {owner}")
        field = config_model.model_fields.get("type")
        if field is None:
            raise TypeError(f"{config_model.__name__} has no 'type' field")
        self._entries[type_name] = Registration(
            type=type_name,
            config_model=config_model,
            factory=factory,
            plugin=self.current_plugin,
            summary=summary,
            probe=probe,
        )

    def get(self, type_name: str) -> Registration[T] | None:
        return self._entries.get(type_name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Registration[T]]:
        return [self._entries[name] for name in self.names()]

    def create(self, config: PluginConfig) -> T:
        entry = self._entries.get(config.type)
        if entry is None:
            raise KeyError(config.type)
        return entry.factory(config)


@dataclass
class Registries:
    """The three registries, filled by the plugin manager; config validation reads them."""

    sources: Registry[Source]
    delegates: Registry[Delegate]
    sinks: Registry[Sink]
