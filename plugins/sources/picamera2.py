"""The Raspberry Pi camera module through picamera2 (only where picamera2 is installed).

picamera2 comes from Raspberry Pi OS's apt repository (python3-picamera2); it is never a
dependency of this package. Where it cannot be imported this plugin offers nothing and a
config that asks for it fails with a clear message.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edgefleet.errors import SourceError, UserError
from edgefleet.plugin import hookimpl
from edgefleet.plugin.offers import SourceOffer
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.sources import Source, ThreadedSource


class Picamera2Config(PluginConfig):
    """``source: {type: picamera2}``."""

    type: Literal["picamera2"] = "picamera2"
    camera: int = Field(default=0, ge=0)
    width: int = Field(default=640, ge=16, le=8192)
    height: int = Field(default=480, ge=16, le=8192)


def picamera2_available() -> tuple[bool, str]:
    if importlib.util.find_spec("picamera2") is None:
        return False, "picamera2 is not installed (apt install python3-picamera2)"
    return True, ""


class Picamera2Source(ThreadedSource):
    def __init__(self, config: Picamera2Config) -> None:
        ok, reason = picamera2_available()
        if not ok:
            raise UserError(f"source picamera2: {reason}")
        super().__init__("picamera2", fps=None)
        self.config = config
        self._cam: Any = None

    def open(self) -> None:
        module = importlib.import_module("picamera2")
        try:
            cam = module.Picamera2(self.config.camera)
            size = (self.config.width, self.config.height)
            cam.configure(cam.create_video_configuration(main={"size": size, "format": "RGB888"}))
            cam.start()
        except (RuntimeError, IndexError, OSError) as exc:
            raise SourceError(f"Pi camera {self.config.camera}: {exc}") from None
        self._cam = cam

    def read(self) -> tuple[np.ndarray, str]:
        try:
            # picamera2's "RGB888" is BGR in memory; flip to RGB.
            frame = self._cam.capture_array("main")[:, :, 2::-1]
        except (RuntimeError, OSError) as exc:
            raise SourceError(f"Pi camera {self.config.camera} lost: {exc}") from None
        return np.ascontiguousarray(frame), f"picamera2:{self.config.camera}"

    def close(self) -> None:
        if self._cam is not None:
            try:
                self._cam.stop()
                self._cam.close()
            finally:
                self._cam = None


@hookimpl
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    registry.add(
        "picamera2",
        Picamera2Config,
        Picamera2Source,
        "Raspberry Pi camera module",
        probe=picamera2_available,
    )


@hookimpl
def edgefleet_offer_sources() -> list[SourceOffer]:
    ok, _ = picamera2_available()
    if not ok:
        return []
    try:
        cameras = importlib.import_module("picamera2").Picamera2.global_camera_info()
    except (RuntimeError, OSError, AttributeError):
        return []
    if not cameras:
        return []
    return [SourceOffer({"type": "picamera2", "camera": 0}, 100, "Pi camera module found")]
