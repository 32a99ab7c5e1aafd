"""The device side of model rollouts: a state machine fed by MQTT, off the hot path.

received -> downloading (percent) -> verifying -> preflight -> [shadow] -> activating ->
active; or failed (reason) / rolled_back (reason) / rejected (shadow figures, reason). Each
state is published retained on ``{prefix}/devices/{id}/rollout``. The desired manifest
arrives retained on ``{prefix}/devices/{id}/model/desired`` or
``{prefix}/groups/{group}/model/desired`` (a device-level manifest wins over its groups');
chunks arrive retained on ``{prefix}/models/_chunks/{sha256}`` (content-defined, shared by
releases; those this device holds in its own models are copied instead) or, for a release cut
in fixed sizes, on ``{prefix}/models/{name}/{version}/{variant}/{index}``.

Every check that needs no download (signature, expiry, version, size, variant) runs first;
chunks are verified as they arrive (``rollout.download``: an interrupted download resumes);
the whole file is verified again, stored by content hash, loaded and self-tested with the
running delegate, then swapped in between two frames. A release may first ask for a shadow
phase; a health window follows activation (``rollout.phases``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet import __version__
from edgefleet.delegation.serving import ServedModel
from edgefleet.errors import UserError
from edgefleet.mqtt.link import Incoming
from edgefleet.protocol import FleetTopics, Manifest, Rollout, ShadowSpec, Topics, VariantSpec
from edgefleet.rollout.download import Download
from edgefleet.rollout.fetching import Fetching
from edgefleet.rollout.phases import Candidate, HealthWindow, ShadowPhase
from edgefleet.rollout.ports import BoundedMemo, LinkPort, Retries, ServingPort
from edgefleet.rollout.preflight import Beside, preflight
from edgefleet.rollout.release import (
    ReleaseError,
    check_manifest,
    load_public_key,
    parse_manifest,
    verify_signature,
)
from edgefleet.rollout.report import StateReport
from edgefleet.rollout.settings import RolloutSettings
from edgefleet.rollout.shadow import Disagreement, Sampler, ShadowRun
from edgefleet.rollout.store import ActiveModel, ModelStore
from edgefleet.runtime.results import Result
from edgefleet.runtime.stats import LoopStats

log = structlog.get_logger(__name__)


class RolloutManager:
    """Receives desired releases, downloads, verifies, preflights and activates them."""

    def __init__(
        self,
        serving: ServingPort,
        stats: LoopStats,
        link: LinkPort,
        settings: RolloutSettings,
        state_dir: Path,
        topics: Topics,
        groups: list[str],
        sampler: Sampler | None = None,
    ) -> None:
        self.serving = serving
        self.stats = stats
        self.link = link
        self.settings = settings
        self.store = ModelStore(state_dir)
        self.state_dir = state_dir
        self.downloads = state_dir / "downloads"
        self.device = topics.device
        self.fleet_topics = FleetTopics(topics.prefix)
        self.trusted: dict[str, Ed25519PublicKey] = {
            key_id: load_public_key(text) for key_id, text in settings.trusted_keys.items()
        }
        self.device_desired = topics.desired
        self.group_desired = [topics.group_desired(g) for g in groups]
        self.decision_topics = [topics.decision, *(topics.group_decision(g) for g in groups)]
        self.sampler = sampler
        # Told of each sampled frame a shadow candidate disagrees on (data capture).
        self.disagreement_listeners: list[Disagreement] = []
        self._inbox: queue.Queue[Incoming] = queue.Queue(maxsize=10_000)
        self._desired: dict[str, bytes] = {}
        self._health: HealthWindow | None = None
        self._shadow: ShadowPhase | None = None
        self._decisions: dict[str, bytes] = {}
        # Only authenticated releases are remembered by rollout_id; payloads that did not
        # parse or verify are remembered by their own hash, so they can never shadow a
        # genuine release that reuses their rollout_id. Both memories are bounded.
        self.retries = Retries(settings.retry_min_s, settings.retry_max_s)
        self._rejected: BoundedMemo[str] = BoundedMemo()  # payload sha256 -> reason
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
        self.report = StateReport(link, topics.rollout, topics.device, state_dir)
        self.fetch = Fetching(
            link,
            self.report,
            self.store,
            state_dir / "downloads",
            self.fleet_topics,
            self._fail,
            self._stored,
        )
        self._twin_of: Candidate | None = None  # an EdgeTPU candidate whose cpu twin downloads

    @property
    def subscriptions(self) -> list[str]:
        """Desired-state and decision topics, subscribed on every connect."""
        return [self.device_desired, *self.group_desired, *self.decision_topics]

    @property
    def chunk_filter(self) -> str:
        """Every chunk topic; subscribed only for the download in progress."""
        return self.fleet_topics.all_chunks()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)

    def on_message(self, incoming: Incoming) -> None:
        """paho's thread: hand over only."""
        try:
            self._inbox.put_nowait(incoming)
        except queue.Full:
            log.warning("rollout inbox full; message dropped", topic=incoming.topic)

    # -- state --------------------------------------------------------------------------------
    def announce(self) -> list[tuple[str, bytes]]:
        return self.report.announce()

    @property
    def state(self) -> dict[str, Any]:
        """The last rollout state published."""
        return self.report.state

    # -- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                incoming = self._inbox.get(timeout=0.5)
            except queue.Empty:
                incoming = None
            try:
                if incoming is not None:
                    self._handle(incoming)
                self._tick()
            except Exception:
                log.exception("rollout step failed")

    def _handle(self, incoming: Incoming) -> None:
        if incoming.topic in self.decision_topics:
            self._decisions[incoming.topic] = incoming.payload
            self._take_decision()
        elif incoming.topic in self.subscriptions:
            self._desired[incoming.topic] = incoming.payload
            self._consider_desired()
        elif self.fetch.owns(incoming.topic):
            self.fetch.take(incoming)

    def _effective_desired(self) -> bytes | None:
        device = self._desired.get(self.device_desired)
        if device:
            return device
        return next((self._desired[t] for t in self.group_desired if self._desired.get(t)), None)

    def _active_version(self) -> int:
        record = self.store.active()
        return record.version if record is not None else 0

    def _consider_desired(self) -> None:
        """Converge to the latest desired state; called whenever it, or the device, changed."""
        wanted = self._wanted()
        if wanted is None:
            return
        digest, manifest = wanted
        if self.retries.waiting(manifest.rollout_id):
            return  # failed before; retried when its backoff ends (never, if final)
        try:
            variant = check_manifest(
                manifest,
                self.trusted,
                self._active_version(),
                self.settings.max_model_bytes,
                self.serving.kinds(),
                __version__,
            )
        except ReleaseError as exc:
            self._fail(manifest, str(exc), retry=False)
            return
        self.report.publish(Rollout.RECEIVED, manifest, variant=variant.kind)
        self._twin_of = None
        self.fetch.begin(digest, manifest, variant)

    def _wanted(self) -> tuple[str, Manifest] | None:
        """The authenticated desired release to act on now, if there is one."""
        payload = self._effective_desired()
        if payload is None or self._health is not None:
            return None  # during a health window: taken up when the window ends
        digest = hashlib.sha256(payload).hexdigest()
        download = self.fetch.current
        if (download is not None and download.digest == digest) or digest in self._rejected:
            return None
        manifest = self._authenticated(payload, digest)
        if manifest is None:
            return None
        record = self.store.active()
        if record is not None and record.rollout_id == manifest.rollout_id:
            if download is not None:
                self.fetch.abandon("the desired release is the active one again")
            if self.state.get("rollout_id") != manifest.rollout_id:
                self.report.publish(Rollout.ACTIVE, manifest, note="the desired release is active")
            return None
        superseded = download is None or self._supersede(download, manifest, digest)
        if not superseded or not self._shadow_gives_way(manifest):
            return None
        return digest, manifest

    def _shadow_gives_way(self, manifest: Manifest) -> bool:
        """False while ``manifest``'s own shadow phase runs; a newer release ends a shadow."""
        shadow = self._shadow
        if shadow is None:
            return True
        if shadow.candidate.manifest.rollout_id == manifest.rollout_id:
            return False  # the same release published again: its shadow phase goes on
        self._shadow = None  # a newer desired release: the candidate never serves
        log.info("shadow phase abandoned", rollout_id=shadow.candidate.manifest.rollout_id)
        return True

    def _authenticated(self, payload: bytes, digest: str) -> Manifest | None:
        """The manifest if it parses and its signature verifies; else remembered by hash."""
        try:
            manifest = parse_manifest(payload)
            verify_signature(manifest, self.trusted)
        except ReleaseError as exc:
            self._rejected[digest] = str(exc)
            log.warning("desired release refused", reason=str(exc), sha256=digest[:16])
            if self.fetch.current is None:  # never hide a genuine download's progress
                self.report.publish(Rollout.FAILED, None, reason=str(exc))
            return None
        return manifest

    def _supersede(self, download: Download, manifest: Manifest, digest: str) -> bool:
        """True when ``manifest`` replaces the download in progress (now abandoned)."""
        if download.manifest.rollout_id == manifest.rollout_id:
            download.digest = digest  # the same release published again: carry on
            return False
        self.fetch.abandon(f"superseded by {manifest.name} v{manifest.version}")
        return True

    def _fail(self, manifest: Manifest, reason: str, retry: bool, backoff: bool = True) -> None:
        delay = self.retries.failed(manifest.rollout_id, retry, backoff)
        self.report.publish(
            Rollout.FAILED, manifest, reason=reason, retry_in_s=delay if retry else None
        )
        if not retry:
            self.store.gc()  # a model that failed preflight does not stay beside the active one

    def _stored(self, download: Download, path: Path) -> None:
        """A variant verified and in the store: the serving one goes to preflight; the cpu
        twin of an EdgeTPU candidate starts that candidate's shadow phase."""
        twin_of, self._twin_of = self._twin_of, None
        if twin_of is not None and twin_of.manifest.rollout_id == download.manifest.rollout_id:
            self._shadow_with_twin(twin_of, download.variant, path)
            return
        self._preflight_and_activate(download.digest, download.manifest, download.variant, path)

    def _preflight_and_activate(
        self, digest: str, manifest: Manifest, variant: VariantSpec, path: Path
    ) -> None:
        self.report.publish(Rollout.PREFLIGHT, manifest)
        try:
            classifier, latency = preflight(self.serving, variant, path)
        except (ReleaseError, UserError, ValueError, RuntimeError) as exc:
            self._fail(manifest, f"preflight: {exc}", retry=False)
            return
        candidate = Candidate(manifest, variant, path, classifier, latency)
        if manifest.shadow is not None:
            self._begin_shadow(candidate, manifest.shadow, digest)
            return
        self._activate(candidate)

    def _activate(self, candidate: Candidate, **fields: Any) -> None:
        manifest, variant, classifier = candidate.manifest, candidate.variant, candidate.classifier
        info = dataclasses.replace(classifier.info, name=manifest.name, version=manifest.version)
        latency_ms = round(candidate.latency, 2)
        self.report.publish(Rollout.ACTIVATING, manifest, latency_ms=latency_ms, **fields)
        previous_record = self.store.active()
        previous = self.serving.activate(ServedModel(candidate.path, info), classifier)
        self.store.activate(
            ActiveModel(
                sha256=variant.sha256,
                name=manifest.name,
                version=manifest.version,
                variant=variant.kind,
                rollout_id=manifest.rollout_id,
                previous=previous_record,
            )
        )
        self._health = HealthWindow(
            manifest,
            previous,
            previous_record,
            self.stats.inferences,
            self.stats.errors,
            time.monotonic(),
        )

    # -- shadow phase ---------------------------------------------------------------------------
    def _begin_shadow(self, candidate: Candidate, spec: ShadowSpec, digest: str) -> None:
        manifest = candidate.manifest
        if self.sampler is None:
            self._fail(manifest, "shadow phase asked for, but this agent cannot sample", False)
            return
        if self.serving.kinds()[0] == "edgetpu":
            # Two models on one EdgeTPU evict each other's parameters from its memory: the
            # release's cpu variant (the same network, not compiled for the TPU) is shadowed
            # on the CPU instead, and the EdgeTPU candidate serves if it is promoted.
            twin = next((v for v in manifest.variants if v.kind == "cpu"), None)
            if twin is None:
                reason = "a shadow phase on an EdgeTPU needs the release to carry a cpu variant"
                self._fail(manifest, reason, False)
                return
            self._twin_of = candidate
            self.fetch.begin(digest, manifest, twin)
            return
        run = ShadowRun(
            spec,
            candidate.classifier,
            self.sampler,
            quiet=self.serving.quiet,
            on_disagree=self._disagreed,
        )
        self._start_shadow(candidate, run)

    def _shadow_with_twin(self, candidate: Candidate, variant: VariantSpec, path: Path) -> None:
        manifest, spec = candidate.manifest, candidate.manifest.shadow
        if spec is None or self.sampler is None:
            return
        self.report.publish(Rollout.PREFLIGHT, manifest, twin=variant.kind)
        try:
            twin, _ = preflight(Beside(self.serving), variant, path)
        except (ReleaseError, UserError, ValueError, RuntimeError) as exc:
            self._fail(manifest, f"preflight of the {variant.kind} twin: {exc}", retry=False)
            return
        run = ShadowRun(
            spec,
            twin,
            self.sampler,
            quiet=self.serving.quiet,
            twin=variant.kind,
            on_disagree=self._disagreed,
        )
        self._start_shadow(candidate, run)

    def _disagreed(
        self, image: np.ndarray, active: Result, candidate: tuple[str, int, list[Any]]
    ) -> None:
        for listener in list(self.disagreement_listeners):
            listener(image, active, candidate)

    def _start_shadow(self, candidate: Candidate, run: ShadowRun) -> None:
        shadow = self._shadow = ShadowPhase(candidate, run)
        self.report.publish(Rollout.SHADOW, candidate.manifest, shadow=shadow.report())
        self._take_decision()  # one may be waiting already (retained)

    def shadow_figures(self) -> dict[str, Any] | None:
        """The shadow phase in progress, for the metrics message (any thread)."""
        shadow = self._shadow
        if shadow is None:
            return None
        return {"rollout_id": shadow.candidate.manifest.rollout_id, **shadow.report()}

    def _shadow_step(self, shadow: ShadowPhase) -> None:
        step, why = shadow.advance()
        manifest = shadow.candidate.manifest
        if step == "progress":
            self.report.publish(Rollout.SHADOW, manifest, shadow=shadow.report())
        elif step == "awaiting":
            rules_met = not shadow.run.verdict()
            report = shadow.report()
            self.report.publish(
                Rollout.SHADOW, manifest, shadow=report, awaiting_decision=True, rules_met=rules_met
            )
        elif step == "reject":
            self._reject(shadow, why)
        elif step == "promote":
            self._promote(shadow, why)

    def _promote(self, shadow: ShadowPhase, why: str) -> None:
        self._shadow = None
        self._activate(shadow.candidate, shadow=shadow.run.figures.report(), promoted=why)

    def _reject(self, shadow: ShadowPhase, reason: str) -> None:
        self._shadow = None
        manifest = shadow.candidate.manifest
        self.retries.never(manifest.rollout_id)
        self.report.publish(
            Rollout.REJECTED, manifest, reason=reason, shadow=shadow.run.figures.report()
        )
        self.store.gc()  # the candidate never served: its file goes
        self._consider_desired()

    def _take_decision(self) -> None:
        """Apply an operator's signed decision on the shadow phase in progress, if any."""
        shadow = self._shadow
        if shadow is None:
            return
        payloads = [(t, self._decisions.get(t, b"")) for t in self.decision_topics]
        step, why = shadow.decision(payloads, self.trusted)
        if step == "promote":
            self._promote(shadow, why)
        elif step == "reject":
            self._reject(shadow, why)

    def _tick(self) -> None:
        self.fetch.check_stall(self.settings.stall_timeout_s)
        health = self._health
        if health is not None:
            self._check_health(health)
        shadow = self._shadow
        if shadow is not None:
            self._shadow_step(shadow)
        idle = self.fetch.current is None and self._health is None and self._shadow is None
        if idle and self.retries.due():
            self._consider_desired()

    def _check_health(self, health: HealthWindow) -> None:
        outcome, count = health.verdict(self.stats, self.settings, time.monotonic())
        if outcome == "open":
            return
        self._health = None
        if outcome == "rolled_back":
            self.serving.restore(health.previous)
            if health.previous_record is not None:
                self.store.activate(health.previous_record)
            else:
                self.store.pointer.unlink(missing_ok=True)
            self.retries.never(health.manifest.rollout_id)
            reason = f"{count} inference errors in the health window"
            self.report.publish(Rollout.ROLLED_BACK, health.manifest, reason=reason)
            self.store.gc()
        else:
            removed = self.store.gc()
            gc = [p.name for p in removed]
            self.report.publish(Rollout.ACTIVE, health.manifest, frames_checked=count, gc=gc)
        self._consider_desired()  # a change that came during the window
