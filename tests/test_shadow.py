"""Shadow phases: a candidate is compared with the active model on the device's own frames.

Real agents on real photos (a folder of the shared ImageNet samples, looping), a real
mosquitto, releases signed like any other; the verdicts come from the device.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import load_classifier
from edgefleet.inference.images import decode_image
from edgefleet.inference.modelfile import pack, read_packed
from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import build_release, publish_decision, publish_release
from edgefleet.protocol import Rollout, ShadowSpec
from edgefleet.rollout.shadow import ShadowRun
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate

from .conftest import REPO
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"
PHOTOS = 12


@pytest.fixture(scope="module")
def agreeing(samples: Path) -> list[Path]:
    """Photos on which the int8 and float models give the same top-1.

    They disagree on 1.6% of the shared photos; two such photos in a loop of 12 make a
    12-sample agreement anything from 0.67 to 1.0 depending on which frames the sampler
    catches (the machine's load decides that), so these tests loop over photos whose
    verdict is known and test the rules, not the sampler's luck.
    """
    cpu = CpuDelegate(CpuConfig(threads=2))
    int8, fp32 = load_classifier(factory_model_path(), cpu), load_classifier(FP32, cpu)
    chosen = []
    for path in sorted(samples.glob("*.JPEG"))[::41]:
        image = decode_image(path)
        if int(np.argmax(int8.classify(image))) == int(np.argmax(fp32.classify(image))):
            chosen.append(path)
        if len(chosen) == PHOTOS:
            break
    return chosen


@pytest.fixture
def photos(tmp_path: Path, agreeing: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in agreeing:
        shutil.copy(path, folder / path.name)
    return folder


def _config(tmp_path: Path, broker: Broker, keys: tuple[Path, Path], photos: Path) -> Path:
    pem = keys[1].read_text().replace("\n", "\\n")
    config = agent_config(
        tmp_path,
        broker.url,
        fps=None,
        extra=f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 5\n',
    )
    text = config.read_text().replace(
        "source: {type: synthetic, fps: null, width: 160, height: 120}",
        f"source: {{type: images, path: '{photos}', fps: 20}}",
    )
    config.write_text(text)
    return config


def _states(sub: Subscriber, name: str) -> list[dict[str, Any]]:
    return [m.json() for m in sub.on("/rollout") if m.payload and m.json().get("name") == name]


def _final(sub: Subscriber, name: str) -> dict[str, Any] | None:
    done = [s for s in _states(sub, name) if s["state"] in Rollout.TERMINAL]
    return done[-1] if done else None


def _served_versions(sub: Subscriber) -> set[tuple[str, int]]:
    return {
        (r["model"], r["model_version"])
        for m in sub.on("/predictions")
        for r in m.json()["results"]
    }


def _roll(
    broker: Broker, keys: tuple[Path, Path], model: Path, name: str, shadow: ShadowSpec
) -> str:
    manifest, blobs = build_release({"cpu": model}, name, 1, keys[0], "release", 3600,
                                    shadow=shadow)  # fmt: skip
    with Operator(broker.url) as operator:
        publish_release(operator, manifest, blobs, ["device:dev-1"])
    return manifest.rollout_id


def _run(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    photos: Path,
    model: Path,
    name: str,
    shadow: ShadowSpec,
) -> tuple[dict[str, Any], Subscriber]:
    tmp_path.mkdir(exist_ok=True)
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    with running(_config(tmp_path, broker, keys, photos)) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 10, 30, "results")
        _roll(broker, keys, model, name, shadow)
        wait_for(lambda: _final(sub, name) is not None, 90, f"{name}: a verdict")
        final = _final(sub, name)
        assert final is not None
        wait_for(lambda: len(sub.result_seqs()) > 20, 10, "serving on")
        assert agent.terminate() == 0
    sub.stop()
    return final, sub


def _spec(**rules: Any) -> ShadowSpec:
    """12 samples 0.2 s apart, decided within a minute, and the given rules."""
    return ShadowSpec.model_validate({"samples": 12, "interval_s": 0.2, "max_duration_s": 60,
                                      **rules})  # fmt: skip


def test_an_identical_candidate_agrees_fully_and_is_promoted(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], photos: Path
) -> None:
    spec = _spec(min_agreement=1.0)
    final, sub = _run(tmp_path, broker, keys, photos, factory_model_path(), "same", spec)
    assert final["state"] == "active", final
    shadows = [s for s in _states(sub, "same") if s["state"] == "shadow"]
    assert shadows, "the shadow phase was reported"
    figures = next(s for s in _states(sub, "same") if s["state"] == "activating")["shadow"]
    assert figures["samples"] == 12
    assert figures["agreement"] == 1.0
    assert figures["top5_overlap"] == 1.0
    assert figures["errors"] == 0
    assert figures["disagreements"] == []
    assert ("same", 1) in _served_versions(sub)


def test_the_float_model_agrees_as_measured_and_the_rules_decide(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], photos: Path
) -> None:
    # Measured on the 1000 shared photos: the float model's top-1 is the int8 model's on
    # 98.4% of them (docs/protocol.md#shadow-phases). At one thread on x86 the two are about
    # as fast (XNNPACK's float kernels are good there: docs/models.md), so the ratio is near 1
    # either way; the latency rule is tested with a bound no candidate of equal speed meets.
    # The ratio's value is timing (bench/shadow.py prints it): with both cores busy it read
    # 3.9 here, so only that it was measured is asserted, and the bound is a tenth.
    met = _spec(min_agreement=0.75)
    final, sub = _run(tmp_path / "a", broker, keys, photos, FP32, "float-ok", met)
    assert final["state"] == "active", final
    figures = next(s for s in _states(sub, "float-ok") if s["state"] == "activating")["shadow"]
    assert figures["agreement"] >= 0.75
    assert figures["latency_ratio"] > 0
    stricter = _spec(min_agreement=0.75, max_latency_ratio=0.1)
    final, sub = _run(tmp_path / "b", broker, keys, photos, FP32, "float-slow", stricter)
    assert final["state"] == "rejected", final
    assert "latency ratio" in final["reason"]
    assert final["shadow"]["samples"] == 12
    assert ("float-slow", 1) not in _served_versions(sub)


def _shuffled_labels(tmp_path: Path) -> Path:
    """The factory model with its labels shuffled: validly signed, and wrong."""
    source = factory_model_path()
    data = source.read_bytes()
    with zipfile.ZipFile(source) as zf:
        flatbuffer = data[: min(info.header_offset for info in zf.infolist())]
    packed = read_packed(source)
    assert packed.labels is not None
    assert packed.metadata is not None
    labels = packed.labels[1:] + packed.labels[:1]  # every class gets its neighbour's name
    path = tmp_path / "shuffled.tflite"
    path.write_bytes(pack(flatbuffer, labels, packed.metadata))
    return path


def test_a_model_with_shuffled_labels_is_rejected_and_never_serves(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], photos: Path
) -> None:
    spec = _spec(min_agreement=0.9)
    model = _shuffled_labels(tmp_path)
    final, sub = _run(tmp_path, broker, keys, photos, model, "shuffled", spec)
    assert final["state"] == "rejected", final
    assert final["shadow"]["agreement"] < 0.1
    assert final["shadow"]["disagreements"], "examples of what it got wrong"
    assert ("shuffled", 1) not in _served_versions(sub)
    assert not list((tmp_path / "state" / "models").glob("*.tflite"))  # its file is gone


def test_manual_mode_waits_for_a_signed_decision(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], photos: Path
) -> None:
    spec = _spec(samples=4, mode="manual")
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    with running(_config(tmp_path, broker, keys, photos)) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 10, 30, "results")
        rollout_id = _roll(broker, keys, factory_model_path(), "manual", spec)
        wait_for(
            lambda: any(s.get("awaiting_decision") for s in _states(sub, "manual")),
            60,
            "the shadow phase awaiting a decision",
        )
        waiting = [s for s in _states(sub, "manual") if s.get("awaiting_decision")][-1]
        assert waiting["rules_met"] is True
        # An unsigned "promote" changes nothing.
        with Operator(broker.url) as operator:
            forged = {"rollout_id": rollout_id, "action": "promote", "created": 1,
                      "key_id": "release", "signature": "AAAA"}  # fmt: skip
            operator.publish(
                "edgefleet/v1/devices/dev-1/model/decision", json.dumps(forged).encode()
            )
            time.sleep(1.5)
            assert _final(sub, "manual") is None
            publish_decision(operator, rollout_id, "promote", ["device:dev-1"], keys[0], "release")
        wait_for(lambda: _final(sub, "manual") is not None, 30, "promoted")
        final = _final(sub, "manual")
        assert final is not None
        assert final["state"] == "active", final
        assert agent.terminate() == 0
    sub.stop()


class _Sampler:
    """Frames and 'active' results made here, for the ShadowRun's rules alone."""

    def __init__(self) -> None:
        self.frame = 0

    def __call__(self) -> Any:
        import numpy as np

        from edgefleet.runtime.results import Label, Result

        self.frame += 1
        result = Result(
            seq=self.frame, boot_id="b", ts=0.0, model="m", model_version=0,
            top=[Label("nothing", 0, 0.9)], timings_ms={"inference": 1.0}, frame=self.frame,
        )  # fmt: skip
        return np.zeros((64, 64, 3), dtype=np.uint8), result


def test_rules_and_deadline_of_a_shadow_run(classifier: Any) -> None:
    now = [0.0]
    spec = ShadowSpec(samples=3, interval_s=1.0, max_duration_s=10.0, min_agreement=0.5)
    run = ShadowRun(spec, classifier, _Sampler(), clock=lambda: now[0])
    assert run.due()
    assert run.step()
    assert not run.due()  # spaced in time
    now[0] = 1.0
    assert run.step()
    assert not run.finished()
    now[0] = 11.0  # out of time with 2 of 3 samples
    assert run.finished()
    problems = run.verdict()
    assert "2 of 3 samples in 10 s" in problems
    assert any(p.startswith("agreement 0.000 < 0.5") for p in problems)
    assert run.figures.report()["disagreements"][0]["active"]["label"] == "nothing"
