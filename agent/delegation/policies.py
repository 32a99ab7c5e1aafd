"""Delegate policies, part of the core config: ``delegate: {type: auto}`` or ``{type: prefer}``.

A policy is no plugin: it chooses among delegate plugins. Its candidates are ordinary
delegate sections, each validated against its own plugin's model by the config loader, so
a policy's fields are known here and nowhere else. Any other ``delegate.type`` names one
delegate plugin, fixed.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sections_field: ClassVar[str]  # where the candidates sit in the file (for error locations)

    failover: bool = Field(default=True, description="switch to the runner-up on errors")
    reprobe_min_s: float = Field(default=5.0, gt=0, description="first re-probe of a lost one")
    reprobe_max_s: float = Field(default=300.0, gt=0, description="backoff cap for re-probes")
    invoke_timeout_s: float = Field(default=5.0, gt=0, description="a longer invoke = failure")

    @property
    def sections(self) -> list[dict[str, Any]]:
        """The raw candidate sections, in the policy's own order."""
        raise NotImplementedError


class AutoPolicy(_Policy):
    """Measure every candidate on the model; the fastest that works wins."""

    sections_field: ClassVar[str] = "candidates"
    type: Literal["auto"] = "auto"
    candidates: list[dict[str, Any]] = Field(
        default_factory=list,
        description="delegate sections to try; empty = every accelerator plugin plus CPU "
        "with each installed runtime at 1, half and all cores",
    )
    budget_s: float = Field(default=5.0, gt=0, le=120, description="total measuring time")
    cache: bool = Field(default=True, description="reuse the ranking for this model+hardware")

    @property
    def sections(self) -> list[dict[str, Any]]:
        return self.candidates


class PreferPolicy(_Policy):
    """The first candidate, in this order, that works."""

    sections_field: ClassVar[str] = "order"
    type: Literal["prefer"] = "prefer"
    order: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"type": "edgetpu"}, {"type": "gpu"}, {"type": "cpu"}]
    )

    @property
    def sections(self) -> list[dict[str, Any]]:
        return self.order


DelegatePolicy = AutoPolicy | PreferPolicy
POLICY_MODELS: dict[str, type[AutoPolicy] | type[PreferPolicy]] = {
    "auto": AutoPolicy,
    "prefer": PreferPolicy,
}
