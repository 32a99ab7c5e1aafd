"""The TFLite runtime: ai-edge-litert where installed, else tflite-runtime.

Both expose the same ``Interpreter`` and ``load_delegate``; which one is present is a
property of the device (32-bit Pi OS only has tflite-runtime wheels).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet.errors import UserError

if TYPE_CHECKING:
    from edgefleet.delegation.delegate import Interpreter

# (import path, distribution) in order of preference.
RUNTIMES: tuple[tuple[str, str, str], ...] = (
    ("litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime"),
)


@dataclass(frozen=True)
class Runtime:
    """One importable TFLite runtime."""

    name: str
    version: str
    module: Any

    @property
    def interpreter_class(self) -> Callable[..., Interpreter]:
        made: Callable[..., Interpreter] = self.module.Interpreter
        return made

    def load_delegate(self, library: str, options: dict[str, str] | None = None) -> Any:
        return self.module.load_delegate(library, options or {})


def available_runtimes() -> list[Runtime]:
    """Every runtime that imports on this machine, preferred first."""
    found: list[Runtime] = []
    for name, module_path, dist in RUNTIMES:
        try:
            module = importlib.import_module(module_path)
        except ImportError:
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        found.append(Runtime(name=name, version=version, module=module))
    return found


def get_runtime(name: str = "auto") -> Runtime:
    """The named runtime, or the preferred available one for ``auto``."""
    runtimes = available_runtimes()
    if not runtimes:
        raise UserError("no TFLite runtime: install ai-edge-litert (or tflite-runtime on armv7)")
    if name == "auto":
        return runtimes[0]
    for runtime in runtimes:
        if runtime.name == name:
            return runtime
    have = ", ".join(r.name for r in runtimes)
    raise UserError(f"runtime {name!r} is not installed (available: {have})")
