"""The TFLite runtime: ai-edge-litert where installed, else tflite-runtime.

Both expose the same ``Interpreter`` and ``load_delegate``; which one is present is a
property of the device (32-bit Pi OS only has tflite-runtime wheels).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
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

    def new_interpreter(self, **kwargs: Any) -> Interpreter:
        """An ``Interpreter(**kwargs)`` with tensors allocated, its INFO chatter dropped."""
        with native_info_dropped():
            interpreter = self.interpreter_class(**kwargs)
            interpreter.allocate_tensors()
        return interpreter

    def load_delegate(self, library: str, options: dict[str, str] | None = None) -> Any:
        return self.module.load_delegate(library, options or {})


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def native_info_dropped() -> Iterator[None]:
    """Drop the runtime's ``INFO:`` lines (one per interpreter) that its C++ logger writes.

    The runtime has no Python switch for its logger, so file descriptor 2 is pointed at a
    temporary file for the duration and everything but ``INFO:`` lines (warnings, errors,
    and whatever other threads wrote meanwhile) is written back to the real stderr after.
    """
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().splitlines(keepends=True)
                if not line.startswith(b"INFO: ")
            ]
            if kept:
                os.write(2, b"".join(kept))


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
