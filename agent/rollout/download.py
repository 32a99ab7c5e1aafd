"""One release variant's download: chunks verified as they arrive, written where they go.

Every chunk is checked against its hash before it is written at its offset in one partial
file (no fsync per chunk: chunks are hashed again when a download resumes, and the whole
model is fsynced when it enters the store). A download interrupted by a kill, a stall or a
full disk keeps the verified chunks for the next attempt. A content-defined variant first
copies the chunks this device already holds in its other models (``rollout.chunks``), each
hashed again as it is read, and then asks the broker for the rest by hash. Errors writing are
the caller's to report (``disk_reason`` says them in an operator's words).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from edgefleet.protocol import FleetTopics, Manifest, VariantSpec
from edgefleet.rollout.chunks import LocalChunks, Span, held, read_chunk, spans
from edgefleet.rollout.release import PARTIAL

Taken = Literal["ignored", "kept", "complete", "bad"]


@dataclasses.dataclass
class Download:
    digest: str  # sha256 of the desired payload it serves
    manifest: Manifest
    variant: VariantSpec
    folder: Path
    topics: FleetTopics
    spans: list[Span]
    have: set[int]
    started: float
    last_chunk: float
    fd: int  # the partial file, every chunk written at its offset as it arrives
    resumed: int = 0  # chunks found in the partial file
    copied_bytes: int = 0  # from this device's own models
    fetched_bytes: int = 0  # from the broker
    by_hash: dict[str, list[Span]] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(
        cls,
        downloads: Path,
        digest: str,
        manifest: Manifest,
        variant: VariantSpec,
        topics: FleetTopics,
    ) -> Download:
        """Begin (or resume) ``variant``'s download; other partial downloads go. OSError
        when the state directory refuses it."""
        folder = downloads / variant.sha256
        clean(downloads, keep=folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / PARTIAL, os.O_RDWR | os.O_CREAT, 0o600)
        layout = spans(variant)
        have = held(fd, layout)  # kept from an interrupted download
        now = time.monotonic()
        by_hash: dict[str, list[Span]] = collections.defaultdict(list)
        for span in layout:
            by_hash[span.sha256].append(span)
        return cls(
            digest, manifest, variant, folder, topics, layout, have, now, now, fd,
            resumed=len(have), by_hash=dict(by_hash),
        )  # fmt: skip

    @property
    def shared(self) -> bool:
        """Chunks fetched by hash (content-defined), not by release and index."""
        return self.variant.cdc is not None

    @property
    def complete(self) -> bool:
        return len(self.have) == len(self.spans)

    def percent(self) -> float:
        return round(100.0 * len(self.have) / len(self.spans), 1)

    def copy_local(self, local: LocalChunks, files: Iterable[Path]) -> int:
        """Copy the missing chunks found in ``files``; returns the bytes copied. OSError if
        writing fails."""
        cdc = self.variant.cdc
        if cdc is None:
            return 0
        found = local.find([f for f in files if f.is_file()], cdc)
        copied = 0
        for span in self.spans:
            where = found.get(span.sha256)
            if span.index in self.have or where is None:
                continue
            data = read_chunk(where[0], where[1], where[2], span.sha256)
            if data is None:
                continue  # changed since it was cut: fetched instead
            os.pwrite(self.fd, data, span.offset)
            self.have.add(span.index)
            copied += span.length
        self.copied_bytes += copied
        return copied

    def wanted_topics(self) -> list[str]:
        """The topics still to subscribe: one per missing hash in file order (the order a
        publisher sends them), or the variant's filter."""
        if not self.shared:
            name, version, kind = self.manifest.name, self.manifest.version, self.variant.kind
            return [self.topics.chunks(name, version, kind)]
        missing = dict.fromkeys(s.sha256 for s in self.spans if s.index not in self.have)
        return [self.topics.shared_chunk(digest) for digest in missing]

    def owns(self, topic: str) -> bool:
        if self.shared:
            return FleetTopics.chunk_hash_of(topic) in self.by_hash
        name, version, kind = self.manifest.name, self.manifest.version, self.variant.kind
        return topic.startswith(self.topics.chunks(name, version, kind)[:-1])

    def take(self, topic: str, payload: bytes) -> tuple[Taken, list[int]]:
        """A chunk message: ignored (not one of ours, or had), kept, complete, or bad (its
        hash does not match: never written); with the chunks it fills. OSError if writing
        fails."""
        targets = self._targets(topic)
        if not targets:
            return "ignored", []
        if hashlib.sha256(payload).hexdigest() != targets[0].sha256:
            return "bad", [s.index for s in targets]
        for span in targets:
            if len(payload) != span.length:
                return "bad", [span.index]
            os.pwrite(self.fd, payload, span.offset)
            self.have.add(span.index)
        self.fetched_bytes += len(payload)
        self.last_chunk = time.monotonic()
        return ("complete" if self.complete else "kept"), [s.index for s in targets]

    def _targets(self, topic: str) -> list[Span]:
        """The missing chunks a chunk topic fills (a hash may occur more than once)."""
        if self.shared:
            digest = FleetTopics.chunk_hash_of(topic)
            found = self.by_hash.get(digest, []) if digest is not None else []
            return [s for s in found if s.index not in self.have]
        try:
            index = int(topic.rsplit("/", 1)[1])
        except ValueError:
            return []
        if not 0 <= index < len(self.spans) or index in self.have:
            return []
        return [self.spans[index]]

    def figures(self) -> dict[str, int]:
        """What this download cost on the wire and what it found on the device."""
        return {
            "size": self.variant.size,
            "fetched_bytes": self.fetched_bytes,
            "copied_bytes": self.copied_bytes,
            "resumed_chunks": self.resumed,
        }

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
