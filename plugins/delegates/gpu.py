"""GPU: an external delegate library (TFLite GPU delegate, Mesa's Teflon) at a configured path.

Declines with the reason when the library is absent, cannot be loaded (e.g. no Vulkan/OpenCL
driver), or will not take the model. LiteRT's own GPU accelerator (``CompiledModel``) is
reported as a capability where the installed LiteRT exposes it; the agent's loop runs the
classic ``Interpreter`` API, so it is used through a delegate library.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgefleet.inference.delegate import Availability, Delegate, Interpreter
from edgefleet.inference.litert import get_runtime
from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry

DEFAULT_LIBRARIES = (
    "/usr/lib/libteflon.so",
    "/usr/lib/aarch64-linux-gnu/libteflon.so",
    "/usr/local/lib/libtensorflowlite_gpu_delegate.so",
)


class GpuConfig(PluginConfig):
    """``delegate: {type: gpu, library: /usr/lib/libteflon.so}``."""

    type: Literal["gpu"] = "gpu"
    library: Path | None = Field(default=None, description="null = look in the usual places")
    options: dict[str, str] = Field(default_factory=dict)


def litert_gpu_accelerator() -> bool:
    """Whether the installed LiteRT ships its CompiledModel GPU accelerator library."""
    spec = importlib.util.find_spec("ai_edge_litert")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(next(iter(spec.submodule_search_locations)))
    return any(folder.glob("libLiteRt*Gpu*.so")) or any(folder.glob("libLiteRtWebGpu*.so"))


class GpuDelegate(Delegate):
    kind = "gpu"

    def __init__(self, config: GpuConfig) -> None:
        self.config = config
        self._probe: Availability | None = None

    def library(self) -> Path | None:
        if self.config.library is not None:
            return self.config.library if self.config.library.exists() else None
        return next((Path(p) for p in DEFAULT_LIBRARIES if Path(p).exists()), None)

    def _load(self) -> Any:
        library = self.library()
        if library is None:
            wanted = self.config.library or " or ".join(DEFAULT_LIBRARIES)
            raise RuntimeError(f"GPU delegate library not found ({wanted})")
        return get_runtime("auto").load_delegate(str(library), self.config.options)

    def availability(self, model_path: Path | None = None) -> Availability:
        if self._probe is None:
            try:
                self._load()
                self._probe = Availability(True)
            except (RuntimeError, ValueError, OSError) as exc:
                # load_delegate raises ValueError when the library loads but finds no device.
                self._probe = Availability(False, str(exc).strip().splitlines()[0])
        return self._probe

    def make_interpreter(self, model_path: Path) -> Interpreter:
        runtime = get_runtime("auto")
        return runtime.new_interpreter(
            model_path=str(model_path), experimental_delegates=[self._load()]
        )

    def describe(self) -> dict[str, Any]:
        return {
            "type": "gpu",
            "library": str(self.library()),
            "litert_accelerator": litert_gpu_accelerator(),
        }


@hookimpl
def edgefleet_register_delegates(registry: Registry[Delegate]) -> None:
    registry.add("gpu", GpuConfig, GpuDelegate, "GPU delegate library (TFLite GPU, Teflon)")
