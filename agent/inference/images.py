"""Image files as model input: finding them and decoding them to RGB, with clear refusals.

Decoding is bounded: a file is read only up to ``MAX_FILE_BYTES``, and its width and height
are read from its header (``imagesize``, no decoding) and checked against a pixel budget
before OpenCV allocates anything, so a 0.8 MB PNG that claims 16000x16000 pixels (1.6 GB
decoded) or a JPEG header that claims 65000x65000 is one clear refusal, not the OOM killer or
a traceback. 16-bit PNGs count twice (OpenCV decodes them at 16 bits before converting).
What decodes: grey, alpha (dropped, as most training tools do), 16-bit (scaled to 8), CMYK
JPEGs, palette images; EXIF orientation is applied, as a photo viewer would.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path

import imagesize
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
JPEG_START = b"\xff\xd8"
PNG_START = b"\x89PNG\r\n\x1a\n"
# Enough for a 48-megapixel phone photo (8000x6000); decoded, 144 MB of RGB.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 256 * 1024 * 1024


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


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB pixels of an image file; ValueError with the reason when it cannot be used."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(
                f"{path}: {size / 1e6:.0f} MB is more than the {MAX_FILE_BYTES / 1e6:.0f} MB an "
                "image may be"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    return decode_bytes(data, str(path), max_pixels)


def decode_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB pixels of an encoded image (``name`` says whose in errors); ValueError if unusable."""
    import cv2  # deferred: commands that never touch a frame start faster

    if not data:
        raise ValueError(f"{name}: empty file")
    if data.startswith(JPEG_START) and b"\xff\xd9" not in data[-64:]:
        # libjpeg decodes a cut-off JPEG into grey rows and only warns; refuse it instead.
        raise ValueError(f"{name}: truncated JPEG (no end-of-image marker)")
    width, height, cost = header_size(data)
    if width <= 0 or height <= 0:
        raise ValueError(f"{name}: not a decodable image ({_kind(data)})")
    if cost > max_pixels:
        raise ValueError(
            f"{name}: {width}x{height} pixels is more than the limit of "
            f"{max_pixels / 1e6:g} megapixels"
        )
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "OpenCV error"
        raise ValueError(f"{name}: not a decodable image ({reason})") from None
    if bgr is None:
        raise ValueError(f"{name}: not a decodable image ({_kind(data)})")
    # In place, a band of rows at a time: OpenCV converts in place through a full copy,
    # which would hold a 48-megapixel photo (144 MB) twice.
    for top in range(0, bgr.shape[0], 256):
        band = bgr[top : top + 256]
        cv2.cvtColor(band, cv2.COLOR_BGR2RGB, dst=band)
    rgb: np.ndarray = bgr
    return rgb


def header_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, pixels the decode costs) from the header alone; (-1, -1, 0) unknown."""
    try:
        info = imagesize.get_info(io.BytesIO(data), dpi=False, colors=False, channels=False)
    except (ValueError, OSError, IndexError, KeyError, TypeError):
        return -1, -1, 0
    width, height = int(info.width), int(info.height)
    if width <= 0 or height <= 0:
        return -1, -1, 0
    deep = data.startswith(PNG_START) and len(data) > 24 and data[24] == 16
    return width, height, width * height * (2 if deep else 1)


def _kind(data: bytes) -> str:
    """A few words on what a file that would not decode seems to hold."""
    if data.startswith(JPEG_START):
        return "a damaged JPEG"
    try:
        text = data[:256].decode("utf-8")
    except UnicodeDecodeError:
        return f"{len(data)} bytes of an unknown format"
    return "text" if text.isprintable() or "\n" in text else "an unknown format"
