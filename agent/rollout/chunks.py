"""How a release variant is cut into chunks, and the chunks a device already holds.

Two layouts. *Fixed*: every chunk ``chunk_size`` long (the first manifests; still accepted).
*Content-defined* (``VariantSpec.cdc``): FastCDC 2020 boundaries, each chunk retained once on
the broker under its sha256 and shared by every release that has it. A device cuts the models
it already has (the serving one, the one before, the factory model) with the release's sizes,
copies every chunk it finds there after hashing it again, and asks the broker only for the
rest: a retrained head costs the bytes that changed, not the whole file.

Chunking needs ``pyfastcdc`` (a wheel on x86-64 and arm64; 32-bit Pi OS has none, and the
agent there fetches every chunk, which is always correct, only slower).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import structlog

from edgefleet.protocol import Chunking, VariantSpec

log = structlog.get_logger(__name__)

ALGORITHM: Final = "fastcdc-2020"
# Sizes chosen on lite0 head retrains (docs/rollouts.md): smaller chunks share more with
# the model a device has, at a longer manifest (about 70 bytes a chunk).
CDC_MIN = 4 * 1024
CDC_AVG = 16 * 1024
CDC_MAX = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Span:
    """One chunk of a variant: where it lies in the file and what it hashes to."""

    index: int
    offset: int
    length: int
    sha256: str


def spans(variant: VariantSpec) -> list[Span]:
    """Every chunk of ``variant`` in file order (fixed or content-defined)."""
    if variant.cdc is None:
        size = variant.chunk_size
        return [
            Span(i, i * size, min(size, variant.size - i * size), digest)
            for i, digest in enumerate(variant.chunks)
        ]
    out, offset = [], 0
    for i, (digest, length) in enumerate(zip(variant.chunks, variant.cdc.lengths, strict=True)):
        out.append(Span(i, offset, length, digest))
        offset += length
    return out


def layout_error(variant: VariantSpec) -> str | None:
    """Why ``variant``'s chunk list cannot describe its file, or None."""
    if variant.cdc is None:
        expected = -(-variant.size // variant.chunk_size)
        if len(variant.chunks) != expected:
            return f"{len(variant.chunks)} chunk hashes for {expected} chunks"
        return None
    return _cdc_error(variant, variant.cdc)


def _cdc_error(variant: VariantSpec, cdc: Chunking) -> str | None:
    if len(cdc.lengths) != len(variant.chunks):
        return f"{len(variant.chunks)} chunk hashes for {len(cdc.lengths)} chunk lengths"
    if sum(cdc.lengths) != variant.size:
        return f"chunk lengths add up to {sum(cdc.lengths)}, not the size {variant.size}"
    if min(cdc.lengths) <= 0 or max(cdc.lengths) > variant.chunk_size:
        return f"a chunk length outside 1..{variant.chunk_size}"
    if not cdc.min_size <= cdc.avg_size <= cdc.max_size:
        return "chunk sizes are not min <= avg <= max"
    return None


def cut(data: bytes | memoryview, min_size: int, avg_size: int, max_size: int) -> list[int]:
    """The chunk lengths FastCDC 2020 gives ``data``; ImportError without ``pyfastcdc``."""
    from pyfastcdc import FastCDC  # optional: 32-bit Pi OS has no wheel

    chunker = FastCDC(avg_size, min_size=min_size, max_size=max_size)
    return [c.length for c in chunker.cut_buf(data)]


def content_defined(data: bytes) -> tuple[Chunking, list[str]]:
    """``data`` cut at content-defined boundaries: the manifest's chunking and chunk hashes."""
    lengths = cut(data, CDC_MIN, CDC_AVG, CDC_MAX)
    view = memoryview(data)
    hashes, offset = [], 0
    for length in lengths:
        hashes.append(hashlib.sha256(view[offset : offset + length]).hexdigest())
        offset += length
    chunking = Chunking(
        algorithm=ALGORITHM, min_size=CDC_MIN, avg_size=CDC_AVG, max_size=CDC_MAX, lengths=lengths
    )
    return chunking, hashes


def held(fd: int, chunks: Iterable[Span]) -> set[int]:
    """The chunks that the partial file ``fd`` already holds at their offsets, each checked
    against its hash (a hole or a torn write reads as a chunk still missing)."""
    return {
        span.index
        for span in chunks
        if hashlib.sha256(os.pread(fd, span.length, span.offset)).hexdigest() == span.sha256
    }


class LocalChunks:
    """The content-defined chunks of the models on this device, by hash.

    Each file is cut once per set of sizes and remembered by its identity (inode, size,
    mtime); the bytes are read and hashed again whenever a chunk is copied, so a file that
    changed or rotted on the card costs a download, never a wrong model.
    """

    def __init__(self) -> None:
        self._index: dict[tuple[Path, tuple[int, ...]], dict[str, tuple[int, int]]] = {}
        self.available = _have_chunker()

    def find(self, files: Iterable[Path], cdc: Chunking) -> dict[str, tuple[Path, int, int]]:
        """Every chunk hash found in ``files``: (file, offset, length)."""
        found: dict[str, tuple[Path, int, int]] = {}
        if not self.available:
            return found
        for path in files:
            for digest, (offset, length) in self._chunks_of(path, cdc).items():
                found.setdefault(digest, (path, offset, length))
        return found

    def _chunks_of(self, path: Path, cdc: Chunking) -> dict[str, tuple[int, int]]:
        try:
            stat = path.stat()
        except OSError:
            return {}
        key = (path, (stat.st_ino, stat.st_size, stat.st_mtime_ns, *_sizes(cdc)))
        cached = self._index.get(key)
        if cached is not None:
            return cached
        try:
            data = path.read_bytes()
        except OSError:
            return {}
        chunks: dict[str, tuple[int, int]] = {}
        offset = 0
        view = memoryview(data)
        for length in cut(view, cdc.min_size, cdc.avg_size, cdc.max_size):
            chunk = view[offset : offset + length]
            chunks.setdefault(hashlib.sha256(chunk).hexdigest(), (offset, length))
            offset += length
        # One entry per file: an older cut of the same path is stale.
        self._index = {k: v for k, v in self._index.items() if k[0] != path}
        self._index[key] = chunks
        return chunks


def read_chunk(path: Path, offset: int, length: int, sha256: str) -> bytes | None:
    """The chunk at ``offset`` in ``path`` if it is still there and still hashes right."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def _sizes(cdc: Chunking) -> tuple[int, int, int]:
    return cdc.min_size, cdc.avg_size, cdc.max_size


def _have_chunker() -> bool:
    """True with pyfastcdc's compiled chunker; its pure-Python fallback (at most 0.5% of
    the compiled speed, by its authors' figure) would hold the interpreter beside the loop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns on import
        try:
            import pyfastcdc  # optional: 32-bit Pi OS has no wheel
        except ImportError:
            compiled = False
        else:
            compiled = pyfastcdc.FastCDC.__module__.startswith("pyfastcdc.cy")
    if not compiled:
        log.info("no compiled pyfastcdc: rollouts fetch every chunk, none copied locally")
    return compiled
