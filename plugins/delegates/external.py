"""Any TFLite external delegate ``.so`` with options: hardware we do not know yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgefleet.inference.delegate import Availability, Delegate, Interpreter
from edgefleet.inference.litert import get_runtime
from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry


class ExternalConfig(PluginConfig):
    """``delegate: {type: external, library: /opt/npu/libvx_delegate.so, options: {...}}``."""

    type: Literal["external"] = "external"
    library: Path
    options: dict[str, str] = Field(default_factory=dict)
    kind: str = Field(default="external", description="the model variant it needs")


class ExternalDelegate(Delegate):
    def __init__(self, config: ExternalConfig) -> None:
        self.config = config
        self.kind = config.kind

    def availability(self, model_path: Path | None = None) -> Availability:
        if not self.config.library.exists():
            return Availability(False, f"library not found: {self.config.library}")
        try:
            get_runtime("auto").load_delegate(str(self.config.library), self.config.options)
        except (ValueError, RuntimeError, OSError) as exc:
            return Availability(False, f"cannot load {self.config.library.name}: {exc}")
        return Availability(True)

    def make_interpreter(self, model_path: Path) -> Interpreter:
        runtime = get_runtime("auto")
        delegate = runtime.load_delegate(str(self.config.library), self.config.options)
        return runtime.new_interpreter(
            model_path=str(model_path), experimental_delegates=[delegate]
        )

    def describe(self) -> dict[str, Any]:
        return {"type": "external", "library": str(self.config.library), "kind": self.kind}


@hookimpl
def edgefleet_register_delegates(registry: Registry[Delegate]) -> None:
    registry.add("external", ExternalConfig, ExternalDelegate, "any delegate .so with options")
