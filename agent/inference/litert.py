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
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np


class Interpreter(Protocol):
    """The part of a TFLite ``Interpreter`` (LiteRT or tflite-runtime) the agent uses; a
    delegate plugin's ``make_interpreter`` returns one."""

    def allocate_tensors(self) -> None: ...

    def invoke(self) -> None: ...

    def get_input_details(self) -> list[dict[str, Any]]: ...

    def get_output_details(self) -> list[dict[str, Any]]: ...

    def set_tensor(self, tensor_index: int, value: np.ndarray) -> None: ...

    def get_tensor(self, tensor_index: int) -> np.ndarray: ...


class InterpreterMaker(Protocol):
    """What a classifier is loaded with: a delegate, as inference sees it."""

    def make_interpreter(self, model_path: Path) -> Interpreter: ...

    def describe(self) -> dict[str, Any]: ...


# (import path, distribution) in order of preference.
RUNTIMES: tuple[tuple[str, str, str], ...] = (
    ("litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime"),
)

# Building an interpreter holds the GIL for milliseconds: the constructor reads the model and
# allocate_tensors lets XNNPACK pack its weights (lite0: 6-22 ms together on a 2-core
# development VM), and every other Python thread waits meanwhile, the serving loop's included;
# a test inference beside the loop takes cores it would use. A thread that does such work
# beside the loop (a rollout's preflight, a failover's reload) sets a gate: each build and
# test inference it makes waits for ``gate()``, the loop's quiet moment (``Pipeline.quiet``).
QuietGate = Callable[[], AbstractContextManager[None]]
_QUIET_GATE: ContextVar[QuietGate | None] = ContextVar("edgefleet_quiet_gate", default=None)


@contextlib.contextmanager
def yielding_to(gate: QuietGate | None) -> Iterator[None]:
    """Within the block, this thread's builds and test inferences wait for ``gate()``."""
    token = _QUIET_GATE.set(gate)
    try:
        yield
    finally:
        _QUIET_GATE.reset(token)


def quiet_moment() -> AbstractContextManager[None]:
    """This thread's gate (``yielding_to``) for one heavy step, or nothing to wait for."""
    gate = _QUIET_GATE.get()
    return gate() if gate is not None else contextlib.nullcontext()


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
        with native_info_dropped(), quiet_moment():
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
