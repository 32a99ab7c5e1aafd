"""The ``capture:`` section: which frames a device keeps for labelling, and how many."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CaptureSettings(BaseModel):
    """Off by default. A frame is kept when any enabled trigger fires, within the budgets."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    below_score: float | None = Field(
        default=0.5, ge=0.0, le=1.0, description="keep when the top-1 score is below this"
    )
    margin_below: float | None = Field(
        default=0.1, ge=0.0, le=1.0, description="keep when top-1 minus top-2 is below this"
    )
    watch: list[str] = Field(
        default_factory=list, max_length=1000, description="keep when top-1 is one of these"
    )
    shadow_disagrees: bool = Field(
        default=True, description="keep when a shadow candidate's top-1 differs"
    )
    random_one_in: int | None = Field(
        default=1000, ge=1, description="keep 1 frame in N at random (an unbiased sample)"
    )
    min_interval_s: float = Field(
        default=10.0, ge=0.0, le=86400.0, description="frames close in time are near copies"
    )
    per_hour: int = Field(default=60, ge=1, le=36000)
    mib_per_day: float = Field(default=20.0, gt=0.0, le=10240.0)
    queue_mib: float = Field(
        default=16.0, gt=0.0, le=4096.0, description="samples waiting for the collector"
    )
    full_frame: bool = Field(
        default=False, description="the whole frame, not the model's input crop and size"
    )
    jpeg_quality: int = Field(default=85, ge=30, le=100)

    @model_validator(mode="after")
    def _some_trigger(self) -> CaptureSettings:
        if self.enabled and not self.triggers_enabled():
            raise ValueError("capture is enabled but every trigger is off")
        return self

    def triggers_enabled(self) -> list[str]:
        on = []
        if self.below_score is not None:
            on.append("low_score")
        if self.margin_below is not None:
            on.append("small_margin")
        if self.watch:
            on.append("watched")
        if self.shadow_disagrees:
            on.append("shadow_disagrees")
        if self.random_one_in is not None:
            on.append("random")
        return on

    @property
    def bytes_per_day(self) -> int:
        return int(self.mib_per_day * 1024 * 1024)

    @property
    def queue_bytes(self) -> int:
        return int(self.queue_mib * 1024 * 1024)
