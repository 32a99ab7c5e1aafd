"""One release variant's download: chunks verified as they arrive, written where they go.

Every chunk is checked against its hash before it is written at its offset in one partial
file (no fsync per chunk: chunks are hashed again when a download resumes, and the whole
model is fsynced when it enters the store). A download interrupted by a kill, a stall or a
full disk keeps the verified chunks for the next attempt. Errors writing are the caller's
to report (``disk_reason`` says them in an operator's words).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from edgefleet.protocol import Manifest, VariantSpec
from edgefleet.rollout.release import PARTIAL, chunks_on_disk

Taken = Literal["ignored", "kept", "complete", "bad"]


@dataclasses.dataclass
class Download:
    digest: str  # sha256 of the desired payload it serves
    manifest: Manifest
    variant: VariantSpec
    folder: Path
    topic: str
    have: set[int]
    started: float
    last_chunk: float
    fd: int  # the partial file, every chunk written at its offset as it arrives

    @classmethod
    def open(
        cls, downloads: Path, digest: str, manifest: Manifest, variant: VariantSpec, topic: str
    ) -> Download:
        """Begin (or resume) ``variant``'s download; other partial downloads go. OSError
        when the state directory refuses it."""
        folder = downloads / variant.sha256
        clean(downloads, keep=folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / PARTIAL, os.O_RDWR | os.O_CREAT, 0o600)
        have = chunks_on_disk(fd, variant)  # kept from an interrupted download
        now = time.monotonic()
        return cls(digest, manifest, variant, folder, topic, have, now, now, fd)

    @property
    def complete(self) -> bool:
        return len(self.have) == len(self.variant.chunks)

    def percent(self) -> float:
        return round(100.0 * len(self.have) / len(self.variant.chunks), 1)

    def take(self, topic: str, payload: bytes) -> tuple[Taken, int]:
        """A chunk message: ignored (not one of ours, or had), kept, complete, or bad (its
        hash does not match: never written); with its index. OSError if writing fails."""
        try:
            index = int(topic.rsplit("/", 1)[1])
        except ValueError:
            return "ignored", -1
        if not 0 <= index < len(self.variant.chunks) or index in self.have:
            return "ignored", index
        if hashlib.sha256(payload).hexdigest() != self.variant.chunks[index]:
            return "bad", index
        os.pwrite(self.fd, payload, index * self.variant.chunk_size)
        self.have.add(index)
        self.last_chunk = time.monotonic()
        return ("complete" if self.complete else "kept"), index

    def assembled(self) -> bytes:
        """The whole file, one byte more than the variant's size if it is longer."""
        return os.pread(self.fd, self.variant.size + 1, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def clean(downloads: Path, keep: Path | None = None) -> None:
    """Partial downloads other than ``keep`` (abandoned or failed releases) go."""
    if not downloads.is_dir():
        return
    for folder in downloads.iterdir():
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)


def disk_reason(exc: OSError) -> str:
    """Why a download stopped, for the rollout state an operator reads."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"state directory full ({exc.strerror}): the download resumes when space returns"
    return f"state directory refuses writes ({exc.strerror}): the download is tried again"
