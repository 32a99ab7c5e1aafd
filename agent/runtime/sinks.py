"""The result-sink interface. The loop calls ``emit`` per result, directly."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from edgefleet.runtime.results import Result


class Sink(ABC):
    """Where results go. ``emit`` runs on the loop thread: keep it short, never block long."""

    name: str = "sink"

    def open(self, context: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Called once before the first result with device/model context."""

    @abstractmethod
    def emit(self, result: Result) -> None:
        """Take one result."""

    def event(self, body: dict[str, Any]) -> None:  # noqa: B027 - optional
        """An agent event (delegate failover, ...); sinks that report them override this."""

    def alive(self) -> bool:
        """False when a background thread of this sink died (the watchdog stops pinging)."""
        return True

    def status_text(self) -> str:
        """A few words for the systemd STATUS line; empty for none."""
        return ""

    def flush(self) -> None:  # noqa: B027 - optional
        """Push out anything buffered."""

    def close(self) -> None:
        """Flush and release resources; idempotent."""
        self.flush()
