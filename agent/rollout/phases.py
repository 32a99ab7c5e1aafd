"""The phases a release passes through after its download, as records with their own rules:
a candidate that passed preflight, its shadow phase, and the health window after activation.
The manager acts on what they decide (publishing, swapping, remembering failures)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.delegation.serving import ServingState
from edgefleet.inference.classifier import Classifier
from edgefleet.protocol import Manifest, VariantSpec
from edgefleet.rollout.release import ReleaseError, parse_decision, verify_signature
from edgefleet.rollout.settings import RolloutSettings
from edgefleet.rollout.shadow import ShadowRun
from edgefleet.rollout.store import ActiveModel
from edgefleet.runtime.stats import LoopStats

log = structlog.get_logger(__name__)
SHADOW_REPORT_EVERY = 10  # samples between two retained shadow progress reports

Step = Literal["none", "progress", "awaiting", "promote", "reject"]


@dataclasses.dataclass
class Candidate:
    """A release that passed preflight: what activating it needs."""

    manifest: Manifest
    variant: VariantSpec
    path: Path
    classifier: Classifier
    latency: float  # preflight's median, reported when it activates


@dataclasses.dataclass
class ShadowPhase:
    candidate: Candidate
    run: ShadowRun
    awaiting: bool = False  # manual mode: finished, waiting for the operator

    def report(self) -> dict[str, Any]:
        """The figures so far, with the phase's target and mode."""
        spec = self.run.spec
        report = {**self.run.figures.report(), "target": spec.samples, "mode": spec.mode}
        if self.run.twin is not None:  # the figures are the twin's, its latency not judged
            report["twin"] = self.run.twin
        return report

    def advance(self) -> tuple[Step, str]:
        """One step of the phase (a sample when due) and what it asks of the manager."""
        run = self.run
        if run.due() and run.step() and run.figures.samples % SHADOW_REPORT_EVERY == 0:
            step: tuple[Step, str] = ("progress", "")
        else:
            step = ("none", "")
        if not run.finished():
            return step
        if run.spec.mode == "manual":
            if self.awaiting:
                return step
            self.awaiting = True
            return "awaiting", ""
        problems = run.verdict()
        if problems:
            return "reject", "; ".join(problems)
        return "promote", "the release's rules are met"

    def decision(
        self, payloads: Iterable[tuple[str, bytes]], trusted: dict[str, Ed25519PublicKey]
    ) -> tuple[Step, str]:
        """An operator's signed decision on this phase among ``payloads``, if there is one."""
        for topic, payload in payloads:
            if not payload:
                continue
            try:
                decision = parse_decision(payload)
                verify_signature(decision, trusted)
            except ReleaseError as exc:
                log.warning("decision refused", topic=topic, reason=str(exc))
                continue
            if decision.rollout_id != self.candidate.manifest.rollout_id:
                continue
            if decision.action == "promote":
                return "promote", f"promoted by the operator (key {decision.key_id})"
            return "reject", f"rejected by the operator (key {decision.key_id})"
        return "none", ""


@dataclasses.dataclass
class HealthWindow:
    """The frames after an activation: an inference error swaps the previous model back."""

    manifest: Manifest
    previous: ServingState
    previous_record: ActiveModel | None
    inferences_at_start: int
    errors_at_start: int
    started: float

    def verdict(
        self, stats: LoopStats, settings: RolloutSettings, now: float
    ) -> tuple[Literal["open", "rolled_back", "active"], int]:
        """Still open, or its outcome with the errors (rolled back) or frames (active)."""
        errors = stats.errors - self.errors_at_start
        if errors > 0:
            return "rolled_back", errors
        done = stats.inferences - self.inferences_at_start
        if done >= settings.health_frames or now - self.started > settings.health_timeout_s:
            return "active", done
        return "open", done
