"""A V4L2 camera (USB webcam, or the Pi camera through libcamera's V4L2 compatibility)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edgefleet.errors import SourceError
from edgefleet.plugin import hookimpl
from edgefleet.plugin.offers import SourceOffer
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.sources import OpenCvSource, Source


class CameraConfig(PluginConfig):
    """``source: {type: camera, device: 0}`` (an index or a /dev path)."""

    type: Literal["camera"] = "camera"
    device: int | str = Field(default=0, description="index N (= /dev/videoN) or a device path")
    width: int | None = Field(default=None, ge=16, le=8192)
    height: int | None = Field(default=None, ge=16, le=8192)
    fps: float | None = Field(default=None, gt=0, description="ask the camera for this rate")


def device_path(device: int | str) -> Path:
    return Path(f"/dev/video{device}") if isinstance(device, int) else Path(device)


class CameraSource(OpenCvSource):
    def __init__(self, config: CameraConfig) -> None:
        # The camera paces itself: no software pacing on top.
        super().__init__("camera", fps=None)
        self.config = config

    def open(self) -> None:
        import cv2  # deferred: commands that never touch a frame start faster

        path = device_path(self.config.device)
        # Checking first keeps OpenCV from printing its own warnings on every retry.
        if not path.exists():
            raise SourceError(f"camera {path} not present")
        cap = cv2.VideoCapture(str(path), cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open camera {path} (permission or busy?)")
        if self.config.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
        if self.config.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
        if self.config.fps:
            cap.set(cv2.CAP_PROP_FPS, self.config.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._cap = cap
        self._status.detail["device"] = str(path)

    def read(self) -> tuple[np.ndarray, str]:
        path = device_path(self.config.device)
        return self.read_rgb(f"camera {path} stopped delivering"), str(path)


@hookimpl
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    registry.add("camera", CameraConfig, CameraSource, "V4L2 camera via OpenCV", probe=_any_camera)


def _any_camera() -> tuple[bool, str]:
    found = sorted(str(p) for p in Path("/dev").glob("video*"))
    return (True, ", ".join(found)) if found else (False, "no /dev/video* device")


@hookimpl
def edgefleet_offer_sources() -> list[SourceOffer]:
    found = [str(p) for p in Path("/dev").glob("video*")]
    devices = sorted(found, key=lambda p: (len(p), p))
    if not devices:
        return []
    return [SourceOffer({"type": "camera", "device": devices[0]}, 80, f"V4L2 camera {devices[0]}")]
