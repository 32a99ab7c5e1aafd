"""An RTSP (or any FFmpeg-readable) stream through OpenCV's FFmpeg backend."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
from pydantic import Field

from edgefleet.errors import SourceError
from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.sources import OpenCvSource, Source


class RtspConfig(PluginConfig):
    """``source: {type: rtsp, url: rtsp://...}``."""

    type: Literal["rtsp"] = "rtsp"
    url: str = Field(pattern=r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://")
    transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = Field(default=10.0, gt=0, le=120)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


class RtspSource(OpenCvSource):
    def __init__(self, config: RtspConfig) -> None:
        super().__init__("rtsp", fps=None)
        self.config = config

    def open(self) -> None:
        import cv2  # deferred: commands that never touch a frame start faster

        timeout_ms = int(self.config.open_timeout_s * 1000)
        # OpenCV reads FFmpeg options from this variable when the capture opens.
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{self.config.transport}"
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            timeout_ms,
        ]
        cap = cv2.VideoCapture(self.config.url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open stream {_redact(self.config.url)}")
        self._cap = cap

    def read(self) -> tuple[np.ndarray, str]:
        url = _redact(self.config.url)
        return self.read_rgb(f"stream {url} lost"), url


@hookimpl
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    registry.add("rtsp", RtspConfig, RtspSource, "RTSP/network stream via FFmpeg")
