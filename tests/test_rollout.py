"""Model rollouts: signed manifests (every check before download), and end to end over a
real mosquitto: a release goes active between two frames; attacks leave the old model serving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.release import (
    Manifest,
    ReleaseError,
    check_manifest,
    chunk,
    describe_variant,
    generate_keys,
    load_private_key,
    load_public_key,
    parse_manifest,
    sign,
)
from edgefleet.rolloutcli import Broker as Operator
from edgefleet.rolloutcli import build_release, publish_release

from .conftest import REPO
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"
SPEC = {"height": 224, "width": 224, "dtype": "uint8"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keys(tmp_path_factory.mktemp("keys"), "release")


def _manifest(keys: tuple[Path, Path], **changes: object) -> Manifest:
    data = b"TFL3" * 100
    now = time.time()
    fields: dict[str, object] = {
        "rollout_id": "r1",
        "name": "lite0",
        "version": 2,
        "created": now,
        "expires": now + 3600,
        "key_id": "release",
        "variants": [describe_variant("cpu", data, SPEC, 128)],
    }
    fields.update(changes)
    return sign(Manifest.model_validate(fields), load_private_key(keys[0]))


def _trusted(keys: tuple[Path, Path]) -> dict[str, object]:
    return {"release": load_public_key(keys[1].read_text())}


def _check(
    manifest: Manifest,
    keys: tuple[Path, Path],
    active: int = 1,
    kinds: tuple[str, ...] = ("cpu",),
    cap: int = 10**8,
) -> None:
    check_manifest(manifest, _trusted(keys), active, cap, list(kinds), "0.1.0")  # type: ignore[arg-type]


def test_good_manifest_passes(keys: tuple[Path, Path]) -> None:
    manifest = _manifest(keys)
    _check(manifest, keys)
    again = parse_manifest(manifest.model_dump_json().encode())
    assert again.canonical() == manifest.canonical()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("unsigned", "manifest is not signed"),
        ("tampered", "bad signature"),
        ("unknown_key", "signed by unknown key 'other'"),
        ("expired", "manifest expired"),
        ("older", "version 1 is not newer than the active 1"),
        ("oversize", "exceeds the cap of 100"),
        ("edgetpu_only", "no variant for this device's delegates ['cpu'] (release has edgetpu)"),
        ("newer_agent", "needs agent 9.0.0"),
    ],
)
def test_manifest_attacks_are_refused(keys: tuple[Path, Path], change: str, reason: str) -> None:
    manifest = _manifest(keys)
    cap = 10**8
    if change == "unsigned":
        manifest = manifest.model_copy(update={"signature": ""})
    elif change == "tampered":
        manifest = manifest.model_copy(update={"version": 99})
    elif change == "unknown_key":
        manifest = _manifest(keys, key_id="other")
    elif change == "expired":
        manifest = _manifest(keys, expires=time.time() - 1)
    elif change == "older":
        manifest = _manifest(keys, version=1)
    elif change == "oversize":
        cap = 100
    elif change == "edgetpu_only":
        variant = describe_variant("edgetpu", b"TFL3" * 10, SPEC, 128)
        manifest = _manifest(keys, variants=[variant])
    elif change == "newer_agent":
        manifest = _manifest(keys, min_agent_version="9.0.0")
    with pytest.raises(ReleaseError) as info:
        _check(manifest, keys, cap=cap)
    assert reason in str(info.value)


def test_explicit_rollback_may_go_back(keys: tuple[Path, Path]) -> None:
    _check(_manifest(keys, version=1, rollback=True), keys, active=3)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "manifest is not JSON"),
        (b'{"name": "x"}', "malformed manifest"),
        (b"x" * 70_000, "exceeds 65536"),
    ],
)
def test_malformed_manifests(payload: bytes, reason: str) -> None:
    with pytest.raises(ReleaseError, match=reason):
        parse_manifest(payload)


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path).start()
    yield b
    b.kill()


def _device_config(tmp_path: Path, broker: Broker, keys: tuple[Path, Path]) -> Path:
    pem = keys[1].read_text().replace("\n", "\\n")
    extra = f'    rollout:\n      trusted_keys: {{release: "{pem}"}}\n      health_frames: 10\n'
    return agent_config(tmp_path, broker.url, fps=20, mqtt_extra=extra)


def _states(sub: Subscriber) -> list[dict[str, object]]:
    return [m.json() for m in sub.on("/rollout") if m.payload]


def test_rollout_goes_active_between_frames_and_survives_restart(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 20, 30, "results on the factory model")
        manifest, blobs = build_release(
            {"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600, expected_top1="Egyptian cat"
        )
        operator = Operator(broker.url)
        publish_release(operator, manifest, blobs, ["device:dev-1"])
        operator.close()
        wait_for(
            lambda: any(s["state"] in ("active", "failed") for s in _states(sub)),
            60,
            "rollout outcome",
        )
        states = [s["state"] for s in _states(sub)]
        assert states[-1] == "active", _states(sub)[-1]
        for step in ("received", "downloading", "verifying", "preflight", "activating"):
            assert step in states
        time.sleep(1.0)
        agent.terminate()
    results = [r for m in sub.on("/predictions") for r in m.json()["results"]]
    versions = [r["model_version"] for r in results]
    assert versions[0] == 0
    assert versions[-1] == 1
    assert results[-1]["model"] == "lite0-float"
    seqs = [r["seq"] for r in results]
    assert seqs == list(range(1, len(seqs) + 1))  # the loop never stopped
    swap = versions.index(1)
    gap = results[swap]["ts"] - results[swap - 1]["ts"]
    assert gap < 2 * (1 / 20) + 0.15  # about two frame intervals at 20 fps

    boots_before = {r["boot_id"] for r in results}
    with running(config) as agent:  # a restart comes up on the rolled-out model
        wait_for(
            lambda: any(
                r["boot_id"] not in boots_before
                for m in sub.on("/predictions")
                for r in m.json()["results"]
            ),
            30,
            "results after restart",
        )
        agent.terminate()
    after = [
        r
        for m in sub.on("/predictions")
        for r in m.json()["results"]
        if r["boot_id"] not in boots_before
    ]
    assert {r["model_version"] for r in after} == {1}
    sub.stop()


def test_flipped_byte_and_garbage_leave_the_old_model(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 10, 30, "results")
        operator = Operator(broker.url)
        # 1. A chunk altered in transit (or on the broker).
        manifest, blobs = build_release(
            {"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600, chunk_size=1 << 20
        )
        data = bytearray(blobs["cpu"])
        data[5_000_000] ^= 0x01
        for index, piece in enumerate(chunk(bytes(data), 1 << 20)):
            operator.publish(
                f"edgefleet/v1/models/lite0-float/1/cpu/{index}", piece
            ).wait_for_publish(10)
        operator.publish(
            "edgefleet/v1/devices/dev-1/model/desired", manifest.model_dump_json().encode()
        ).wait_for_publish(10)
        wait_for(lambda: any(s["state"] == "failed" for s in _states(sub)), 30, "failure")
        failed = [s for s in _states(sub) if s["state"] == "failed"][-1]
        assert failed["reason"] == "chunk 4 does not match its hash"

        # 2. A validly signed release whose file is not a model at all.
        garbage = b"\x00\x00\x00\x00TFL3" + bytes(range(256)) * 400
        variant = describe_variant("cpu", garbage, SPEC, 1 << 16)
        bad = sign(
            Manifest(
                rollout_id="garbage",
                name="junk",
                version=2,
                created=time.time(),
                expires=time.time() + 600,
                key_id="release",
                variants=[variant],
            ),
            load_private_key(keys[0]),
        )
        publish_release(operator, bad, {"cpu": garbage}, ["device:dev-1"])
        wait_for(
            lambda: any(
                s.get("rollout_id") == "garbage" and s["state"] == "failed" for s in _states(sub)
            ),
            30,
            "garbage refused",
        )
        reason = next(
            s["reason"]
            for s in _states(sub)
            if s.get("rollout_id") == "garbage" and s["state"] == "failed"
        )
        assert str(reason).startswith("preflight:")
        operator.close()
        before = len(sub.result_seqs())
        wait_for(lambda: len(sub.result_seqs()) > before + 10, 10, "still serving")
        agent.terminate()
    results = [r for m in sub.on("/predictions") for r in m.json()["results"]]
    assert {r["model_version"] for r in results} == {0}
    assert json.dumps(_states(sub))  # states are plain JSON
    sub.stop()
