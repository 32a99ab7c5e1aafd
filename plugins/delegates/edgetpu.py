"""Google Coral EdgeTPU through ``libedgetpu`` (USB and PCIe), without pycoral.

``load_delegate('libedgetpu.so.1', {'device': 'usb:0'})`` is all pycoral's
``make_interpreter`` does. Devices are found in sysfs: USB accelerators show vendor:product
``1a6e:089a`` before their firmware is loaded and ``18d1:9302`` after; PCIe/M.2 modules appear
as ``/dev/apex_N`` (gasket/apex driver). pycoral's ``list_edge_tpus()`` is used only if the
real pycoral (from Coral's apt repository) happens to be importable. Only models compiled for
the EdgeTPU (containing the ``edgetpu-custom-op``) are accepted.
"""

from __future__ import annotations

import ctypes.util
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgefleet.inference.delegate import Availability, Delegate, Interpreter
from edgefleet.inference.litert import get_runtime
from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry

USB_IDS = {("1a6e", "089a"): "usb (firmware not yet loaded)", ("18d1", "9302"): "usb"}
EDGETPU_OP = b"edgetpu-custom-op"
LIBRARY = "libedgetpu.so.1"


class EdgeTpuConfig(PluginConfig):
    """``delegate: {type: edgetpu, device: usb}``."""

    type: Literal["edgetpu"] = "edgetpu"
    device: str = Field(
        default="auto",
        pattern=r"^(auto|usb|pci)(:\d+)?$",
        description="auto, usb, usb:N, pci or pci:N",
    )
    library: str = Field(default=LIBRARY, description="libedgetpu shared library")
    options: dict[str, str] = Field(default_factory=dict, description="extra delegate options")


@dataclass(frozen=True)
class TpuDevice:
    kind: str  # usb or pci
    index: int
    path: str
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def discover(sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> list[TpuDevice]:
    """EdgeTPUs on this machine: USB ones from sysfs, PCIe ones from /dev/apex_N."""
    found: list[TpuDevice] = []
    usb = sys_root / "bus" / "usb" / "devices"
    index = 0
    for entry in sorted(usb.glob("*")) if usb.is_dir() else []:
        key = (_read(entry / "idVendor"), _read(entry / "idProduct"))
        if key in USB_IDS:
            found.append(TpuDevice("usb", index, str(entry), USB_IDS[key]))
            index += 1
    for apex in sorted(dev_root.glob("apex_*")):
        match = re.fullmatch(r"apex_(\d+)", apex.name)
        if match:
            found.append(TpuDevice("pci", int(match.group(1)), str(apex)))
    return found


def pycoral_devices() -> list[dict[str, str]] | None:
    """pycoral's own listing, only where the real pycoral is installed."""
    try:
        edgetpu = importlib.import_module("pycoral.utils.edgetpu")
    except ImportError:
        return None
    try:
        devices: list[dict[str, str]] = edgetpu.list_edge_tpus()
    except (RuntimeError, OSError):
        return None
    return devices


def find_library(name: str) -> str | None:
    if "/" in name:
        return name if Path(name).exists() else None
    short = name.removeprefix("lib").split(".so")[0]
    return ctypes.util.find_library(short)


def is_edgetpu_model(path: Path) -> bool:
    with path.open("rb") as fh:
        return EDGETPU_OP in fh.read()


class EdgeTpuDelegate(Delegate):
    kind = "edgetpu"

    def __init__(
        self, config: EdgeTpuConfig, sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")
    ) -> None:
        self.config = config
        self.sys_root = sys_root
        self.dev_root = dev_root

    def chosen_device(self) -> tuple[TpuDevice | None, str]:
        devices = discover(self.sys_root, self.dev_root)
        if not devices:
            return None, "no EdgeTPU found (no USB 1a6e:089a/18d1:9302, no /dev/apex_N)"
        wanted = self.config.device
        for device in devices:
            if wanted == "auto" or wanted in (device.kind, device.name):
                if device.kind == "pci" and not os.access(device.path, os.R_OK | os.W_OK):
                    return None, f"permission denied on {device.path} (add the user to 'apex')"
                return device, ""
        have = ", ".join(d.name for d in devices)
        return None, f"no EdgeTPU matches {wanted!r} (found: {have})"

    def availability(self, model_path: Path | None = None) -> Availability:
        if find_library(self.config.library) is None:
            return Availability(False, f"{self.config.library} not found (install libedgetpu1-std)")
        device, reason = self.chosen_device()
        if device is None:
            return Availability(False, reason)
        if model_path is not None:
            try:
                if not is_edgetpu_model(model_path):
                    return Availability(False, "model is not compiled for the EdgeTPU")
            except OSError as exc:
                return Availability(False, f"cannot read model: {exc.strerror}")
        return Availability(True)

    def make_interpreter(self, model_path: Path) -> Interpreter:
        device, reason = self.chosen_device()
        if device is None:
            raise RuntimeError(reason)
        runtime = get_runtime("auto")
        options = {
            "device": device.name if self.config.device == "auto" else self.config.device,
            **self.config.options,
        }
        try:
            delegate = runtime.load_delegate(self.config.library, options)
        except (ValueError, RuntimeError, OSError, AttributeError) as exc:
            # AttributeError: ctypes on a library without the delegate's entry points.
            raise RuntimeError(delegate_failure(self.config.library, runtime, exc)) from None
        return runtime.new_interpreter(
            model_path=str(model_path), experimental_delegates=[delegate]
        )

    def describe(self) -> dict[str, Any]:
        device, _ = self.chosen_device()
        out: dict[str, Any] = {"type": "edgetpu", "device": device.name if device else None}
        temps = coral_temperature(self.sys_root)
        if temps:
            out["temp_c"] = temps
        return out


def delegate_failure(library: str, runtime: Any, exc: BaseException) -> str:
    """One line for a libedgetpu that will not load: the runtime says so in several."""
    said = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = "; ".join(said[1:] or said)[:300] or type(exc).__name__
    return (
        f"{library} did not load as a delegate of {runtime.name} {runtime.version} ({detail}): "
        "libedgetpu and the runtime must match (Coral's libedgetpu1-std 16.0 for tflite-runtime "
        "2.5-2.14; see docs/delegates.md, Coral USB on Bookworm)"
    )


def coral_temperature(sys_root: Path = Path("/sys")) -> dict[str, float]:
    temps = {}
    for apex in sorted((sys_root / "class" / "apex").glob("apex_*")):
        raw = _read(apex / "temp")
        if raw.isdigit():
            temps[apex.name] = int(raw) / 1000.0
    return temps


@hookimpl
def edgefleet_register_delegates(registry: Registry[Delegate]) -> None:
    registry.add("edgetpu", EdgeTpuConfig, EdgeTpuDelegate, "Coral EdgeTPU (USB/PCIe)")
