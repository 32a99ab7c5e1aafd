"""Preflight: a downloaded, verified model is loaded and tested before it may serve.

It loads on the delegate that serves at that moment (after a failover, the runner-up), checks
the input spec and class count against the manifest, classifies the bundled probe image
(and compares the top-1 when the release names one), and times it against the budget.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import numpy as np

from edgefleet.inference.classifier import Classifier
from edgefleet.inference.images import decode_image
from edgefleet.protocol import VariantSpec
from edgefleet.rollout.release import ReleaseError
from edgefleet.samples import sample_dir

PROBE_IMAGE = "chelsea.jpg"
# Invokes timed for the latency figure: enough for a median a budget may be checked against;
# without a budget the figure is only reported, and a fleet of small boards swapping at once
# should not spend CPU on it.
TIMED_INVOKES = 10
TIMED_INVOKES_NO_BUDGET = 3


class Loader(Protocol):
    """Loads a model on the delegate serving now (``Serving.load``; ``Beside``: on the CPU
    beside it); ``quiet`` is the
    serving loop's idle moment, for each test inference (``Serving.quiet``)."""

    def load(self, path: Path) -> Classifier: ...

    def quiet(self) -> AbstractContextManager[None]: ...


class _LoadsBeside(Protocol):
    def load_beside(self, path: Path) -> Classifier: ...

    def quiet(self) -> AbstractContextManager[None]: ...


class Beside:
    """A ``Loader`` on the CPU beside the serving delegate (``Serving.load_beside``): for the
    cpu twin of an EdgeTPU candidate."""

    def __init__(self, serving: _LoadsBeside) -> None:
        self.serving = serving

    def load(self, path: Path) -> Classifier:
        return self.serving.load_beside(path)

    def quiet(self) -> AbstractContextManager[None]:
        return self.serving.quiet()


def preflight(loader: Loader, variant: VariantSpec, path: Path) -> tuple[Classifier, float]:
    """The loaded classifier and its median latency; ReleaseError when it must not serve."""
    classifier = loader.load(path)
    plan = classifier.plan
    spec = variant.input
    if (plan.height, plan.width, str(plan.dtype)) != (spec.height, spec.width, spec.dtype):
        raise ReleaseError(
            f"model input {plan.height}x{plan.width} {plan.dtype} differs from the "
            f"manifest's {spec.height}x{spec.width} {spec.dtype}"
        )
    if variant.labels is not None and classifier.num_classes != variant.labels:
        raise ReleaseError(f"{classifier.num_classes} classes, manifest says {variant.labels}")
    probe = decode_image(sample_dir() / PROBE_IMAGE)
    # Each test inference in the loop's idle time: it neither slows a frame nor is slowed by
    # one, so the latency below is the model's own.
    with loader.quiet():
        scores = classifier.classify(probe)
    if not np.all(np.isfinite(scores)):
        raise ReleaseError("self-test gave non-finite outputs")
    top = classifier.top(scores, 1)
    if variant.expected_top1 is not None and top[0].label != variant.expected_top1:
        raise ReleaseError(f"self-test top-1 {top[0].label!r}, expected {variant.expected_top1!r}")
    times = []
    rounds = TIMED_INVOKES if variant.latency_budget_ms is not None else TIMED_INVOKES_NO_BUDGET
    for _ in range(rounds):
        with loader.quiet():
            started = time.perf_counter()
            classifier.interpreter.invoke()
            times.append((time.perf_counter() - started) * 1e3)
    latency = statistics.median(times)
    if variant.latency_budget_ms is not None and latency > variant.latency_budget_ms:
        raise ReleaseError(
            f"latency {latency:.1f} ms exceeds the budget {variant.latency_budget_ms} ms"
        )
    return classifier, latency
