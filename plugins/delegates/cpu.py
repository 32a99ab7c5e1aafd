"""The CPU delegate: the runtime's own CPU path (XNNPACK in LiteRT) with a thread count."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgefleet.errors import UserError
from edgefleet.inference.delegate import Availability, Delegate, Interpreter
from edgefleet.inference.litert import get_runtime
from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry

EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"


class CpuConfig(PluginConfig):
    """``delegate: {type: cpu}``."""

    type: Literal["cpu"] = "cpu"
    threads: int | None = Field(default=None, ge=1, le=64, description="null = all cores")
    runtime: Literal["auto", "litert", "tflite-runtime"] = "auto"
    xnnpack: bool = Field(default=True, description="use the runtime's XNNPACK CPU kernels")


class CpuDelegate(Delegate):
    kind = "cpu"

    def __init__(self, config: CpuConfig) -> None:
        self.config = config
        self.threads = config.threads or os.cpu_count() or 1

    def availability(self, model_path: Path | None = None) -> Availability:
        try:
            get_runtime(self.config.runtime)
        except UserError as exc:
            return Availability(False, str(exc))
        if model_path is not None:
            try:
                if EDGETPU_CUSTOM_OP in model_path.read_bytes():
                    return Availability(False, "model is compiled for the EdgeTPU")
            except OSError as exc:
                return Availability(False, f"cannot read model: {exc.strerror}")
        return Availability(True)

    def make_interpreter(self, model_path: Path) -> Interpreter:
        runtime = get_runtime(self.config.runtime)
        kwargs: dict[str, Any] = {"model_path": str(model_path), "num_threads": self.threads}
        if not self.config.xnnpack:
            resolver = runtime.module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            kwargs["experimental_op_resolver_type"] = resolver
        return runtime.new_interpreter(**kwargs)

    def describe(self) -> dict[str, Any]:
        runtime = get_runtime(self.config.runtime)
        return {
            "type": "cpu",
            "runtime": runtime.name,
            "runtime_version": runtime.version,
            "threads": self.threads,
            "xnnpack": self.config.xnnpack,
        }


@hookimpl
def edgefleet_register_delegates(registry: Registry[Delegate]) -> None:
    registry.add("cpu", CpuConfig, CpuDelegate, "runtime CPU kernels (XNNPACK), N threads")
