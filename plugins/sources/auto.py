"""``source: {type: auto}``: take the best source this device offers.

Every source plugin may offer itself (``edgefleet_offer_sources``); this plugin's
``edgefleet_choose_source`` is the ``trylast`` default: the highest score wins (Pi camera,
then the first V4L2 camera), else the configured ``fallback`` section.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edgefleet.errors import UserError
from edgefleet.plugin import hookimpl
from edgefleet.plugin.offers import SourceOffer
from edgefleet.plugin.registry import PluginConfig, Registry, nested_section
from edgefleet.runtime.sources import Source

FALLBACK_SCORE = 10


class AutoConfig(PluginConfig):
    """``source: {type: auto, fallback: {type: images, path: ...}}``."""

    type: Literal["auto"] = "auto"
    fallback: dict[str, Any] | None = Field(
        default=None,
        description="section to use when no camera is found",
        json_schema_extra=nested_section("source"),
    )
    min_score: int = Field(default=50, description="offers below this lose to the fallback")


def _not_direct(_config: AutoConfig) -> Source:
    # The agent resolves 'auto' through the hooks before any factory runs.
    raise UserError("source type 'auto' is resolved by the agent, not instantiated")


@hookimpl
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    registry.add("auto", AutoConfig, _not_direct, "best available: Pi camera, V4L2, fallback")


@hookimpl(trylast=True)
def edgefleet_choose_source(
    offers: list[SourceOffer], fallback: PluginConfig | None
) -> SourceOffer | None:
    min_score = fallback.min_score if isinstance(fallback, AutoConfig) else 50
    best = max(offers, key=lambda o: o.score, default=None)
    if best is not None and best.score >= min_score:
        return best
    if isinstance(fallback, AutoConfig) and fallback.fallback is not None:
        reason = "no camera found; configured fallback"
        return SourceOffer(dict(fallback.fallback), FALLBACK_SCORE, reason)
    return best
