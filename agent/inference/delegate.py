"""The delegate interface: where and how a model runs (CPU/XNNPACK, GPU, EdgeTPU, ...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.inference.litert import Interpreter

__all__ = ["Availability", "Delegate", "Interpreter"]


@dataclass(frozen=True)
class Availability:
    """Whether a delegate can serve here, and why not when it cannot."""

    ok: bool
    reason: str = ""


class Delegate(ABC):
    """Made by a delegate plugin's factory from its validated config section."""

    kind: str = "cpu"  # cpu, gpu, edgetpu, external: what a model variant must be built for

    @abstractmethod
    def availability(self, model_path: Path | None = None) -> Availability:
        """Can this delegate run here (and this model, when given)? Never raises."""

    @abstractmethod
    def make_interpreter(self, model_path: Path) -> Interpreter:
        """A TFLite ``Interpreter`` for ``model_path`` with tensors allocated."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-able description for logs and status (name, runtime, threads, ...)."""
