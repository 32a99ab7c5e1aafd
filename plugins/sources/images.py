"""Still images from a folder or a glob, once or looping."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import structlog
from pydantic import Field

from edgefleet.errors import SourceError
from edgefleet.hookspecs import hookimpl
from edgefleet.registry import PluginConfig, Registry
from edgefleet.sources import EndOfStream, ThreadedSource

log = structlog.get_logger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class ImagesConfig(PluginConfig):
    """``source: {type: images, path: DIR_OR_GLOB}``."""

    type: Literal["images"] = "images"
    path: str = Field(description="a folder, a file, or a glob such as photos/*.jpg")
    loop: bool = True
    fps: float | None = Field(default=5.0, gt=0, description="null = as fast as consumed")


def list_images(pattern: str) -> list[Path]:
    """Image files a folder, file or glob names, sorted."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        # A pattern may be absolute; Path.glob only takes relative ones.
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]  # noqa: PTH207
        found = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def decode_image(path: Path) -> np.ndarray:
    """RGB pixels of an image file; ValueError with the reason when it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    if path.suffix.lower() in {".jpg", ".jpeg"} and b"\xff\xd9" not in data[-64:]:
        # libjpeg decodes a cut-off JPEG into grey rows and only warns; refuse it instead.
        raise ValueError(f"{path}: truncated JPEG (no end-of-image marker)")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a decodable image")
    rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb


class ImagesSource(ThreadedSource):
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
                image = decode_image(path)
            except ValueError as exc:
                self.bad_files += 1
                self._status.errors += 1
                self._status.last_error = str(exc)
                log.warning("image skipped", error=str(exc))
                continue
            self._good_in_pass += 1
            return image, path.name


@hookimpl
def edgefleet_register_sources(registry: Registry[Any]) -> None:
    registry.add("images", ImagesConfig, ImagesSource, "image files from a folder or glob")
