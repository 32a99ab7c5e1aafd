"""Delegate policies: ``delegate: {type: auto}`` and ``delegate: {type: prefer, order: [...]}``.

The agent resolves these through ``edgefleet.selection``; each candidate is an ordinary
delegate section, validated against its own plugin's model like any other.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edgefleet.delegates import Delegate
from edgefleet.errors import UserError
from edgefleet.hookspecs import hookimpl
from edgefleet.registry import PluginConfig, Registry


class AutoDelegateConfig(PluginConfig):
    """Measure every candidate on the model; the fastest that works wins."""

    type: Literal["auto"] = "auto"
    candidates: list[dict[str, Any]] = Field(
        default_factory=list,
        description="delegate sections to try; empty = every accelerator plugin plus CPU "
        "with each installed runtime at 1, half and all cores",
    )
    budget_s: float = Field(default=5.0, gt=0, le=120, description="total measuring time")
    cache: bool = Field(default=True, description="reuse the ranking for this model+hardware")
    failover: bool = True
    reprobe_min_s: float = Field(default=5.0, gt=0)
    reprobe_max_s: float = Field(default=300.0, gt=0)
    invoke_timeout_s: float = Field(default=5.0, gt=0, description="a longer invoke = failure")


class PreferDelegateConfig(PluginConfig):
    """The first candidate, in this order, that works."""

    type: Literal["prefer"] = "prefer"
    order: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"type": "edgetpu"}, {"type": "gpu"}, {"type": "cpu"}]
    )
    failover: bool = True
    reprobe_min_s: float = Field(default=5.0, gt=0)
    reprobe_max_s: float = Field(default=300.0, gt=0)
    invoke_timeout_s: float = Field(default=5.0, gt=0, description="a longer invoke = failure")


def _resolved_by_agent(_config: PluginConfig) -> Delegate:
    raise UserError("delegate policies are resolved by the agent, not instantiated")


@hookimpl
def edgefleet_register_delegates(registry: Registry[Any]) -> None:
    registry.add("auto", AutoDelegateConfig, _resolved_by_agent, "fastest measured candidate")
    registry.add("prefer", PreferDelegateConfig, _resolved_by_agent, "first candidate that works")
