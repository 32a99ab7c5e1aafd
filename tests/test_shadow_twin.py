"""A shadow phase on an EdgeTPU device runs the release's cpu variant on the CPU (two models
on one EdgeTPU evict each other's parameters); the EdgeTPU variant serves when promoted.

The rollout manager runs in process with the serving side faked at its port (``ServingPort``:
this machine has no EdgeTPU, so "edgetpu" models load on the CPU here) and a link that
records what it is asked; the store, downloads, chunks, preflight and shadow run are real.
"""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgefleet.delegation.serving import ServedModel, ServingState
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import Classifier, load_checked
from edgefleet.inference.images import decode_image
from edgefleet.inference.labels import Label
from edgefleet.inference.modelfile import pack, read_packed
from edgefleet.mqtt.link import Incoming
from edgefleet.operator.releases import build_release
from edgefleet.protocol import FleetTopics, ShadowSpec
from edgefleet.rollout.manager import RolloutManager
from edgefleet.rollout.release import pieces
from edgefleet.rollout.settings import RolloutSettings
from edgefleet.runtime.results import Result
from edgefleet.runtime.stats import LoopStats
from edgefleet.samples import sample_dir
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate

from .fakes import RecordingLink
from .mqtt_helpers import wait_for

TOPICS = FleetTopics().device("dev-1")


class EdgeTpuServing:
    """``ServingPort`` of a device serving on an EdgeTPU, with the CPU beside it."""

    def __init__(self) -> None:
        self.cpu = CpuDelegate(CpuConfig(threads=1))
        self.loaded: list[tuple[str, Path]] = []
        self.activated: list[Path] = []

    def kinds(self) -> list[str]:
        return ["edgetpu", "cpu"]

    def load(self, path: Path) -> Classifier:
        self.loaded.append(("edgetpu", path))
        return load_checked(path, self.cpu)

    def load_beside(self, path: Path) -> Classifier:
        self.loaded.append(("cpu", path))
        return load_checked(path, self.cpu)

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def activate(self, model: ServedModel, classifier: Classifier) -> ServingState:
        self.activated.append(model.path)
        return ServingState(model, (classifier,))

    def restore(self, state: ServingState) -> None:
        pass


class ActiveModel:
    """The loop's newest frame and the active model's result for it (the sampler)."""

    def __init__(self) -> None:
        self.image = decode_image(sample_dir() / "chelsea.jpg")
        classifier = load_checked(factory_model_path(), CpuDelegate(CpuConfig(threads=1)))
        self.top = classifier.top(classifier.classify(self.image), 5)
        self.frame = 0

    def __call__(self) -> tuple[np.ndarray, Result]:
        self.frame += 1
        top = [Label(t.label, t.index, t.score) for t in self.top]
        result = Result(
            seq=self.frame, boot_id="b", ts=0.0, model="factory", model_version=0, top=top,
            timings_ms={"inference": 0.01}, frame=self.frame,
        )  # fmt: skip
        return self.image, result


def _compiled_stand_in(out: Path) -> Path:
    """Another file of the factory network (a compiled EdgeTPU model is another file too)."""
    data = factory_model_path().read_bytes()
    with zipfile.ZipFile(factory_model_path()) as zf:
        start = min(info.header_offset for info in zf.infolist())
    contents = read_packed(factory_model_path())
    assert contents.metadata is not None
    meta = contents.metadata.model_copy(update={"variant": "edgetpu"})
    out.write_bytes(pack(data[:start], contents.labels, meta))
    return out


@pytest.fixture
def device(tmp_path: Path, keys: tuple[Path, Path]) -> tuple[RolloutManager, RecordingLink]:
    link = RecordingLink()
    settings = RolloutSettings(
        trusted_keys={"release": keys[1].read_text()}, health_frames=1, health_timeout_s=0.1
    )
    manager = RolloutManager(
        EdgeTpuServing(), LoopStats(), link, settings, tmp_path / "state", TOPICS, [],
        sampler=ActiveModel(),
    )  # fmt: skip
    return manager, link


def _deliver(
    manager: RolloutManager, link: RecordingLink, blobs: dict[str, bytes], release: object
) -> None:
    """Every chunk the device subscribed to so far, as the broker would hand it over."""
    from edgefleet.protocol import Manifest

    assert isinstance(release, Manifest)
    shared = FleetTopics()
    for variant in release.variants:
        for digest, piece in pieces(variant, blobs[variant.kind]):
            topic = shared.shared_chunk(digest)
            if topic in link.subscribed:
                manager._handle(Incoming(topic, piece, None, None))


def _step(
    manager: RolloutManager, link: RecordingLink, blobs: dict[str, bytes], release: object
) -> bool:
    """One turn of the rollout thread with what the broker holds; True once activated."""
    _deliver(manager, link, blobs, release)
    manager._tick()
    serving = manager.serving
    return isinstance(serving, EdgeTpuServing) and bool(serving.activated)


def test_an_edgetpu_device_shadows_the_cpu_variant_and_serves_the_edgetpu_one(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[RolloutManager, RecordingLink]
) -> None:
    manager, link = device
    serving = manager.serving
    assert isinstance(serving, EdgeTpuServing)
    compiled = _compiled_stand_in(tmp_path / "model_edgetpu.tflite")
    # A latency rule no candidate could meet: the twin's latency must not be judged.
    shadow = ShadowSpec(samples=3, interval_s=0.05, min_agreement=0.9, max_latency_ratio=1e-6)
    release, blobs = build_release(
        {"cpu": factory_model_path(), "edgetpu": compiled}, "tpu", 1, keys[0], "release",
        3600, shadow=shadow,
    )  # fmt: skip
    edgetpu = next(v for v in release.variants if v.kind == "edgetpu")
    cpu = next(v for v in release.variants if v.kind == "cpu")
    assert (edgetpu.input, edgetpu.labels) == (cpu.input, cpu.labels)  # taken from the cpu one
    manager._handle(Incoming(TOPICS.desired, release.wire(), None, None))
    wait_for(
        lambda: _step(manager, link, blobs, release),
        60,
        "the EdgeTPU variant activated after the twin's shadow phase",
    )
    store = tmp_path / "state" / "models"
    assert serving.activated == [store / f"{edgetpu.sha256}.tflite"]
    assert ("edgetpu", store / f"{edgetpu.sha256}.tflite") in serving.loaded
    assert ("cpu", store / f"{cpu.sha256}.tflite") in serving.loaded
    states = link.states(TOPICS.rollout)
    shadowing = [s for s in states if s["state"] == "shadow"]
    assert shadowing
    assert all(s["shadow"]["twin"] == "cpu" for s in shadowing)  # type: ignore[index]
    activating = next(s for s in states if s["state"] == "activating")
    figures = activating["shadow"]
    assert isinstance(figures, dict)
    assert figures["samples"] >= 3
    assert figures["agreement"] == 1.0


def test_an_edgetpu_release_without_a_cpu_variant_cannot_be_shadowed(
    tmp_path: Path, keys: tuple[Path, Path], device: tuple[RolloutManager, RecordingLink]
) -> None:
    from edgefleet.rollout.release import chunk, describe_variant, load_private_key, sign

    manager, link = device
    compiled = _compiled_stand_in(tmp_path / "model_edgetpu.tflite")
    data = compiled.read_bytes()
    spec = {"height": 224, "width": 224, "dtype": "uint8"}
    variant = describe_variant("edgetpu", data, spec, 1 << 20)
    release, _ = build_release({"cpu": factory_model_path()}, "tpu", 1, keys[0], "release", 60)
    alone = sign(
        release.model_copy(
            update={"variants": [variant], "shadow": ShadowSpec(samples=3, interval_s=0.05)}
        ),
        load_private_key(keys[0]),
    )
    manager._handle(Incoming(TOPICS.desired, alone.wire(), None, None))
    topic = FleetTopics().chunk("tpu", 1, "edgetpu", 0)
    wait_for(lambda: topic[:-1] + "+" in link.subscribed, 10, "the download asked for")
    for index, piece in enumerate(chunk(data, 1 << 20)):
        manager._handle(
            Incoming(FleetTopics().chunk("tpu", 1, "edgetpu", index), piece, None, None)
        )
    reasons = [s.get("reason") for s in link.states(TOPICS.rollout) if s["state"] == "failed"]
    assert reasons == ["a shadow phase on an EdgeTPU needs the release to carry a cpu variant"]
