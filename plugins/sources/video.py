"""A video file through OpenCV, at its own frame rate, once or looping."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edgefleet.errors import SourceError
from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.sources import EndOfStream, OpenCvSource, Source


class VideoConfig(PluginConfig):
    """``source: {type: video, path: FILE}``."""

    type: Literal["video"] = "video"
    path: Path
    loop: bool = False
    fps: float | None = Field(default=None, gt=0, description="null = the file's own rate")
    realtime: bool = Field(default=True, description="false = as fast as consumed")


class VideoSource(OpenCvSource):
    def __init__(self, config: VideoConfig) -> None:
        super().__init__("video", fps=config.fps)
        self.config = config

    def open(self) -> None:
        import cv2  # deferred: commands that never touch a frame start faster

        path = self.config.path
        if not path.is_file():
            raise SourceError(f"video file not found: {path}")
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video {path}")
        self._cap = cap
        if self.config.realtime and self.config.fps is None:
            native = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            self._fps = native if 0 < native < 1000 else 30.0
        elif not self.config.realtime:
            self._fps = None
        self._status.detail["path"] = str(path)

    def read(self) -> tuple[np.ndarray, str]:
        import cv2  # deferred: commands that never touch a frame start faster

        try:
            rgb = self.read_rgb("end of video")
        except SourceError:
            if not self.config.loop:
                raise EndOfStream from None
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            rgb = self.read_rgb(f"cannot read frames from {self.config.path}")
        index = int(self._cap.get(cv2.CAP_PROP_POS_FRAMES))
        return rgb, f"{self.config.path.name}#{index}"


@hookimpl
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    registry.add("video", VideoConfig, VideoSource, "a video file (OpenCV)")
