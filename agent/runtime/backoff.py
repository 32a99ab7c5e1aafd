"""Exponential backoff, shared by sources reopening a device and links reconnecting."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff for reopening sources and reconnecting."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    current: float = field(default=0.0, init=False)

    def next_delay(self) -> float:
        self.current = (
            self.initial if self.current == 0 else min(self.maximum, self.current * self.factor)
        )
        return self.current

    def reset(self) -> None:
        self.current = 0.0
