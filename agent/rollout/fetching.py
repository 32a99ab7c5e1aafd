"""The download in progress, from its first chunk to the verified file in the store.

One download at a time (``current``): begun with the chunks the device already holds (kept
from an interrupted attempt, or copied from its own models), fed the chunk messages it
subscribed to, ended when it is complete, superseded, stalled or refused. What happens next
(preflight, a shadow phase) is the caller's: ``stored`` is called with the file's path, and
``failed`` with each reason, whether it will be retried, and whether with backoff.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from edgefleet.factory import factory_model_path
from edgefleet.mqtt.link import Incoming
from edgefleet.protocol import FleetTopics, Manifest, Rollout, VariantSpec
from edgefleet.rollout.chunks import LocalChunks
from edgefleet.rollout.download import Download, disk_reason
from edgefleet.rollout.ports import LinkPort
from edgefleet.rollout.report import StateReport
from edgefleet.rollout.store import ModelStore

log = structlog.get_logger(__name__)

Failed = Callable[[Manifest, str, bool, bool], None]  # manifest, reason, retry, backoff
Stored = Callable[[Download, Path], None]

PROGRESS_EVERY = 8  # chunks between two retained progress reports
# Chunk topics subscribed at once: each subscription makes the broker queue its retained
# chunk for this device, and a stock mosquitto drops past 1000 queued messages (silently);
# 128 chunks of about 20 KB keep a device's share of the broker's memory near 2.5 MB.
WINDOW = 128


class Fetching:
    """Owns the download in progress and the chunk subscriptions it needs."""

    def __init__(
        self,
        link: LinkPort,
        report: StateReport,
        store: ModelStore,
        downloads: Path,
        topics: FleetTopics,
        failed: Failed,
        stored: Stored,
    ) -> None:
        self.link = link
        self.report = report
        self.store = store
        self.downloads = downloads
        self.topics = topics
        self.failed = failed
        self.stored = stored
        self.local = LocalChunks()
        self.current: Download | None = None
        self._asked: set[str] = set()  # the chunk topics subscribed for ``current``
        self._queue: list[str] = []  # those still to subscribe, last first

    def begin(self, digest: str, manifest: Manifest, variant: VariantSpec) -> None:
        """Start (or resume) ``variant``'s download; what this device holds is used first."""
        try:
            download = Download.open(self.downloads, digest, manifest, variant, self.topics)
            download.copy_local(self.local, self._local_models())
        except OSError as exc:
            self.failed(manifest, disk_reason(exc), True, False)
            return
        self.current = download
        if download.complete:
            self._finish()
            return
        self.report.publish(
            Rollout.DOWNLOADING,
            manifest,
            progress=download.percent(),
            resumed=download.resumed,
            **download.figures(),
        )
        self._queue = download.wanted_topics()[::-1]
        self._ask_more()

    def _ask_more(self) -> None:
        """Subscribe to missing chunks until ``WINDOW`` are asked for."""
        download = self.current
        # A shared chunk at QoS 0: it is retained, hashed when it comes, and asked for again
        # on every reconnect and retry; at QoS 1 NATS makes a JetStream consumer for each
        # subscription (measured on a 3-node cluster: 63 of 128 retained chunks in 120 s at
        # QoS 1, all 128 at once at QoS 0).
        qos = 0 if download is not None and download.shared else 1
        while self._queue and len(self._asked) < WINDOW:
            topic = self._queue.pop()
            self._asked.add(topic)
            self.link.subscribe(topic, qos)

    def owns(self, topic: str) -> bool:
        return self.current is not None and self.current.owns(topic)

    def take(self, incoming: Incoming) -> None:
        """A chunk message for the download in progress."""
        download = self.current
        if download is None:
            return
        try:
            taken, indices = download.take(incoming.topic, incoming.payload)
        except OSError as exc:
            # A full state directory: stop, keep the verified chunks, try again (at the
            # first retry delay, not a growing one) until space returns.
            self.abort(disk_reason(exc), retry=True, backoff=False)
            return
        if taken == "bad":
            # Never stored; fetched again on the retry (the publisher may have fixed it).
            self.abort(f"chunk {indices[0]} does not match its hash", retry=True)
            return
        if taken != "ignored" and download.shared:
            self.link.unsubscribe(incoming.topic)  # had: a reconnect does not ask for it again
            self._asked.discard(incoming.topic)
            self._ask_more()
        if taken == "complete":
            self._finish()
        elif taken == "kept" and len(download.have) % PROGRESS_EVERY == 0:
            self.report.publish(
                Rollout.DOWNLOADING,
                download.manifest,
                progress=download.percent(),
                **download.figures(),
            )

    def abandon(self, reason: str) -> None:
        """Stop a download the desired state no longer asks for; its verified parts stay."""
        download = self.current
        if download is None:
            return
        self._end(download)
        log.info("rollout download abandoned", rollout_id=download.manifest.rollout_id, why=reason)

    def abort(self, reason: str, retry: bool = False, backoff: bool = True) -> None:
        """The download failed: its verified chunks stay only when it is retried."""
        download = self.current
        if download is None:
            return
        self._end(download)
        if not retry:
            download.discard()
        self.failed(download.manifest, reason, retry, backoff)

    def check_stall(self, timeout_s: float) -> None:
        download = self.current
        if download is not None and time.monotonic() - download.last_chunk > timeout_s:
            have, total = len(download.have), len(download.variant.chunks)
            self.abort(f"download stalled ({have}/{total} chunks)", retry=True)

    def _end(self, download: Download) -> None:
        """No more chunks for ``download``: unsubscribed, its partial file closed."""
        for topic in sorted(self._asked):
            self.link.unsubscribe(topic)
        self._asked.clear()
        self._queue.clear()
        download.close()
        self.current = None

    def _finish(self) -> None:
        download = self.current
        if download is None:
            return
        manifest, variant = download.manifest, download.variant
        figures = download.figures()
        before = self.report.figures
        if before is not None and before[0] == manifest.rollout_id:  # a second variant of it
            figures = {key: value + before[1].get(key, 0) for key, value in figures.items()}
        self.report.figures = manifest.rollout_id, figures
        self.report.publish(
            Rollout.VERIFYING,
            manifest,
            download_s=round(time.monotonic() - download.started, 2),
        )
        data = download.assembled()
        self._end(download)
        try:
            path = self.store.put_checked(data, variant.size, variant.sha256)
        except OSError as exc:  # the verified chunks stay for the retry
            self.failed(manifest, disk_reason(exc), True, False)
            return
        download.discard()  # in the store now, or worthless
        if path is None:
            self.failed(manifest, "assembled model does not match its size/sha256", False, True)
            return
        self.stored(download, path)

    def _local_models(self) -> list[Path]:
        """The models on this device whose chunks a new release may share."""
        return [*sorted(self.store.root.glob("*.tflite")), factory_model_path()]
