"""Image files as model input: finding them and decoding them to RGB, with clear refusals."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
JPEG_START = b"\xff\xd8"


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
    import cv2  # deferred: commands that never touch a frame start faster

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    if not data:
        raise ValueError(f"{path}: empty file")
    if data.startswith(JPEG_START) and b"\xff\xd9" not in data[-64:]:
        # libjpeg decodes a cut-off JPEG into grey rows and only warns; refuse it instead.
        raise ValueError(f"{path}: truncated JPEG (no end-of-image marker)")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a decodable image ({_kind(data)})")
    rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb


def _kind(data: bytes) -> str:
    """A few words on what a file that would not decode seems to hold."""
    if data.startswith(JPEG_START):
        return "a damaged JPEG"
    try:
        text = data[:256].decode("utf-8")
    except UnicodeDecodeError:
        return f"{len(data)} bytes of an unknown format"
    return "text" if text.isprintable() or "\n" in text else "an unknown format"
