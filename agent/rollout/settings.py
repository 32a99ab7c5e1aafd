"""The ``rollout:`` section (beside ``fleet:``): enables model rollouts on this device."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RolloutSettings(BaseModel):
    """Which release keys this device trusts and how it downloads and checks a release."""

    model_config = ConfigDict(extra="forbid")

    trusted_keys: dict[str, str] = Field(description="key id -> Ed25519 public key (PEM/base64)")
    max_model_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    stall_timeout_s: float = Field(default=60.0, gt=0)
    retry_min_s: float = Field(default=10.0, gt=0, description="first retry of a failed download")
    retry_max_s: float = Field(default=600.0, gt=0, description="backoff cap for retries")
    health_frames: int = Field(default=50, ge=1)
    health_timeout_s: float = Field(default=60.0, gt=0)
