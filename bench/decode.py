"""Peak memory of `edgefleet classify` on images that are bombs and images that are big
(a benchmark: prints only).

    .venv/bin/python bench/decode.py

Each file is classified by a fresh `edgefleet classify` process; its peak RSS (the kernel's
maxrss of that process alone, measured by a small Python in between so that the parent's
memory is not inherited) and its exit status are printed:

  * a 0.25 MB PNG that claims 16000x16000 pixels (1.6 GB decoded): refused from its header;
  * a JPEG whose header claims 65000x65000;
  * a real 48-megapixel photo (8000x6000 JPEG), within the default 50-megapixel budget;
  * a 640x480 photo, for the baseline.

Target (issue 29): the bomb <= 400 MB peak, one line, exit 2.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np

MEASURE = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode; "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(code)"
)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int) -> Path:
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )
    return path


def jpeg_claiming(path: Path, side: int) -> Path:
    _, encoded = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    path.write_bytes(bytes(data))
    return path


def photo(path: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (height // 50, width // 50, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.resize(small, (width, height)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def peak(path: Path, work: Path) -> tuple[float, int]:
    out = work / "peak"
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(out), sys.executable, "-m", "edgefleet", "classify",
         str(path)],
        check=False,
    )  # fmt: skip
    return int(out.read_text()) / 1024, proc.returncode


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = [
            ("PNG bomb, 16000x16000 claimed", png_bomb(work / "bomb.png", 16000)),
            ("JPEG header claiming 65000x65000", jpeg_claiming(work / "liar.jpg", 65000)),
            ("48 MP photo (8000x6000 JPEG)", photo(work / "big.jpg", 8000, 6000)),
            ("640x480 photo", photo(work / "small.jpg", 640, 480)),
        ]
        print(f"{'input':<36} {'file':>9} {'peak RSS':>10}  exit")
        for name, path in cases:
            mb, code = peak(path, work)
            size = path.stat().st_size / 1e6
            print(f"{name:<36} {size:7.2f} MB {mb:7.0f} MB  {code}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
