"""Decoding files the agent did not make: bombs refused by their header, every kind of photo."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgefleet.inference.images import decode_bytes, decode_image, header_size
from edgefleet_plugins.sources.images import ImagesConfig, ImagesSource

Image = pytest.importorskip("PIL.Image")  # Pillow writes the odd kinds OpenCV cannot


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(path: Path, side: int = 16000) -> Path:
    """A valid grey PNG of side x side pixels, all black: a few hundred kB on disk."""
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunks = _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small real JPEG whose frame header claims ``width`` x ``height``."""
    ok, encoded = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


# A forked child's peak RSS starts from its parent's (pytest's, hundreds of MB): a small
# Python in between runs the command and reports the peak of its own child.
MEASURE = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(code)"
)


def _classify(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``edgefleet classify``; its result and its own peak RSS in MB."""
    with tempfile.NamedTemporaryFile("r") as peak:
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, peak.name, sys.executable, "-m", "edgefleet",
             "classify", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        return proc, int(peak.read() or 0) / 1024


def test_a_png_bomb_is_refused_from_its_header_in_one_line(tmp_path: Path) -> None:
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    proc, peak_mb = _classify(str(bomb))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {bomb}: 16000x16000 pixels is more than the limit of 50 megapixels"]
    assert peak_mb < 400  # 1.6 GB when it was decoded


def test_a_jpeg_header_claiming_65000_squared_is_one_line(tmp_path: Path) -> None:
    liar = jpeg_claiming(tmp_path / "liar.jpg", 65000, 65000)
    proc, _ = _classify(str(liar))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {liar}: 65000x65000 pixels is more than the limit of 50 megapixels"
    )
    # Within a raised budget OpenCV itself refuses it: still one line, never a traceback.
    proc, _ = _classify(str(liar), "--max-pixels", str(65000 * 65000))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {liar}: not a decodable image")


def test_the_budget_is_the_user_s(tmp_path: Path) -> None:
    photo = tmp_path / "wide.png"
    cv2.imwrite(str(photo), np.zeros((100, 300, 3), np.uint8))
    assert decode_image(photo, max_pixels=30_000).shape == (100, 300, 3)
    with pytest.raises(ValueError, match=r"300x100 pixels is more than the limit of 0.029999"):
        decode_image(photo, max_pixels=29_999)
    proc, _ = _classify(str(photo), "--max-pixels", "0")
    assert proc.returncode == 2
    assert "must be at least 1" in proc.stderr


def _pil_bytes(image: object, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)  # type: ignore[attr-defined]
    return out.getvalue()


def test_every_kind_of_photo_gives_rgb_or_a_clear_reason() -> None:
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :20] = (200, 40, 10)  # left half orange, right half black
    photo = Image.fromarray(rgb)
    # grey: three equal channels
    grey = decode_bytes(_pil_bytes(photo.convert("L"), "PNG"), "grey.png")
    assert grey.shape == (30, 40, 3)
    assert np.array_equal(grey[..., 0], grey[..., 2])
    # alpha: dropped, the colour kept
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    assert np.array_equal(decode_bytes(_pil_bytes(rgba, "PNG"), "alpha.png"), rgb)
    # 16-bit: scaled to 8 bits, and counted twice against the budget
    deep = np.full((30, 40), 40000, np.uint16)
    ok, encoded = cv2.imencode(".png", deep)
    assert ok
    data = encoded.tobytes()
    assert header_size(data) == (40, 30, 2400)
    assert int(decode_bytes(data, "deep.png")[0, 0, 0]) == 40000 >> 8
    # CMYK JPEG (print shops, scanners): RGB again, close to what went in
    cmyk = decode_bytes(_pil_bytes(photo.convert("CMYK"), "JPEG", quality=95), "cmyk.jpg")
    assert cmyk.shape == (30, 40, 3)
    assert np.abs(cmyk[15, 5].astype(int) - (200, 40, 10)).max() < 30
    # palette GIF and a BMP
    assert decode_bytes(_pil_bytes(photo.convert("P"), "GIF"), "p.gif").shape == (30, 40, 3)
    assert decode_bytes(_pil_bytes(photo, "BMP"), "p.bmp").shape == (30, 40, 3)
    # EXIF orientation 6 (the camera was turned): shown upright, as a viewer shows it
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = decode_bytes(_pil_bytes(photo, "JPEG", exif=exif.tobytes()), "turned.jpg")
    assert turned.shape == (40, 30, 3)
    assert turned[2, 15, 0] > 150  # the orange half is on top now
    # refusals, each with its reason
    png = _pil_bytes(photo, "PNG")
    with pytest.raises(ValueError, match="empty file"):
        decode_bytes(b"", "empty.png")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_bytes(png[: len(png) // 2], "cut.png")
    with pytest.raises(ValueError, match=r"not a decodable image \(text\)"):
        decode_bytes(b"shopping list\n", "notes.jpg")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_bytes(png[:8] + b"\x00" * 200, "broken.png")


def test_the_images_source_skips_a_bomb_counts_it_and_goes_on(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((20, 20, 3), 90, np.uint8))
    png_bomb(tmp_path / "b.png", side=9000)  # 81 MP
    cv2.imwrite(str(tmp_path / "c.jpg"), np.full((20, 20, 3), 160, np.uint8))
    source = ImagesSource(ImagesConfig(path=str(tmp_path), loop=False, fps=None))
    source.start()
    seen: list[str] = []
    deadline = time.monotonic() + 20
    while not source.ended and time.monotonic() < deadline:
        frame = source.get(0.1)
        if frame is not None:
            seen.append(frame.origin)
    source.stop()
    assert seen == ["a.jpg", "c.jpg"]
    assert source.bad_files == 1
    assert "9000x9000 pixels is more than the limit" in source.status().last_error
