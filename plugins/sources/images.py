"""Still images from a folder or a glob, once or looping."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import structlog
from pydantic import Field

from edgefleet.errors import SourceError
from edgefleet.inference.images import DEFAULT_MAX_PIXELS, decode_image, list_images
from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.sources import EndOfStream, Source, ThreadedSource

log = structlog.get_logger(__name__)


class ImagesConfig(PluginConfig):
    """``source: {type: images, path: DIR_OR_GLOB}``."""

    type: Literal["images"] = "images"
    path: str = Field(description="a folder, a file, or a glob such as photos/*.jpg")
    loop: bool = True
    fps: float | None = Field(default=5.0, gt=0, description="null = as fast as consumed")
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="a file whose header claims more pixels is skipped (and counted), never "
        "decoded",
    )


class ImagesSource(ThreadedSource):
    """Each file once per pass, in order: none is dropped for a slow model (lossless)."""

    lossless = True

    def __init__(self, config: ImagesConfig) -> None:
        super().__init__("images", fps=config.fps)
        self.config = config
        self._files: list[Path] = []
        self._pos = 0
        self._good_in_pass = 0
        self.bad_files = 0

    def open(self) -> None:
        self._files = list_images(self.config.path)
        if not self._files:
            raise SourceError(f"no images match {self.config.path}")
        self._pos = 0
        self._good_in_pass = 0

    def read(self) -> tuple[np.ndarray, str]:
        while True:
            if self._pos >= len(self._files):
                if not self.config.loop:
                    raise EndOfStream
                if self._good_in_pass == 0:
                    raise SourceError(f"no readable images in {self.config.path}")
                self._pos, self._good_in_pass = 0, 0
            path = self._files[self._pos]
            self._pos += 1
            try:
                image = decode_image(path, self.config.max_pixels)
            except ValueError as exc:
                self.bad_files += 1
                self._status.errors += 1
                self._status.last_error = str(exc)
                log.warning("image skipped", error=str(exc))
                continue
            self._good_in_pass += 1
            return image, path.name


@hookimpl
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    registry.add("images", ImagesConfig, ImagesSource, "image files from a folder or glob")
