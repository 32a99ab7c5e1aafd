"""Rollouts converge to the latest desired state and nothing unauthenticated can stall them.

Each test runs a real agent against a real mosquitto and speaks to it only through the
protocol, as an operator (or an attacker with publish rights) would.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.factory import factory_model_path
from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import build_release, publish_release
from edgefleet.protocol import FleetTopics, Manifest
from edgefleet.rollout.release import (
    chunk,
    describe_variant,
    load_private_key,
    sign,
)

from .conftest import REPO, cli_command
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"
TOPICS = FleetTopics()
DEVICE = TOPICS.device("dev-1")
SPEC = {"height": 224, "width": 224, "dtype": "uint8"}


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    yield s
    s.stop()


def _config(tmp_path: Path, broker: Broker, keys: tuple[Path, Path], rollout: str = "") -> Path:
    pem = keys[1].read_text().replace("\n", "\\n")
    extra = f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 10\n{rollout}'
    return agent_config(tmp_path, broker.url, fps=20, extra=extra)


def _states(sub: Subscriber) -> list[dict[str, object]]:
    return [m.json() for m in sub.on("/rollout") if m.payload]


def _reached(sub: Subscriber, state: str, name: str) -> bool:
    return any(s["state"] == state and s.get("name") == name for s in _states(sub))


def _desired(operator: Operator, manifest: Manifest | bytes) -> None:
    body = manifest if isinstance(manifest, bytes) else manifest.model_dump_json().encode()
    operator.publish(DEVICE.desired, body).wait_for_publish(10)


def _chunks(operator: Operator, manifest: Manifest, data: bytes, only: range | None = None) -> None:
    variant = manifest.variants[0]
    pieces = chunk(data, variant.chunk_size)
    for index in only if only is not None else range(len(pieces)):
        topic = TOPICS.chunk(manifest.name, manifest.version, variant.kind, index)
        operator.publish(topic, pieces[index]).wait_for_publish(10)


def _served(sub: Subscriber) -> set[tuple[str, int]]:
    results = [r for m in sub.on("/predictions")[-3:] for r in m.json()["results"]]
    return {(r["model"], r["model_version"]) for r in results}


def test_a_forged_manifest_reusing_the_rollout_id_does_not_block_the_genuine_one(
    tmp_path: Path, broker: Broker, sub: Subscriber, keys: tuple[Path, Path]
) -> None:
    genuine, blobs = build_release({"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600)
    # Anyone can compute the rollout id; without the key the signature cannot match.
    forged = genuine.model_copy(update={"expires": genuine.expires + 1})
    with running(_config(tmp_path, broker, keys)) as agent, Operator(broker.url) as operator:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        _desired(operator, forged)
        wait_for(
            lambda: any(s.get("reason") == "bad signature" for s in _states(sub)), 20, "refusal"
        )
        publish_release(operator, genuine, blobs, ["device:dev-1"])
        wait_for(lambda: _reached(sub, "active", "lite0-float"), 60, "the genuine release active")
        wait_for(lambda: _served(sub) == {("lite0-float", 1)}, 10, "serving it")
        agent.terminate()


def test_the_latest_desired_state_wins_mid_download_and_mid_health_window(
    tmp_path: Path, broker: Broker, sub: Subscriber, keys: tuple[Path, Path]
) -> None:
    stuck, stuck_blobs = build_release(
        {"cpu": FP32}, "stuck", 2, keys[0], "release", 3600, chunk_size=1 << 20
    )
    second, second_blobs = build_release(
        {"cpu": factory_model_path()}, "second", 3, keys[0], "release", 3600
    )
    third, third_blobs = build_release({"cpu": FP32}, "third", 4, keys[0], "release", 3600)
    config = _config(tmp_path, broker, keys, "  health_timeout_s: 4\n")
    config.write_text(config.read_text().replace("health_frames: 10", "health_frames: 1000"))
    with running(config) as agent, Operator(broker.url) as operator:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        # 1. A release whose download cannot finish (3 of 18 chunks), then a newer desire.
        _chunks(operator, stuck, stuck_blobs["cpu"], range(3))
        _desired(operator, stuck)
        wait_for(lambda: _reached(sub, "downloading", "stuck"), 20, "downloading the first")
        publish_release(operator, second, second_blobs, ["device:dev-1"])
        wait_for(lambda: _reached(sub, "activating", "second"), 60, "the newer release swapped in")
        # 2. A change during its health window (4 s) is taken up when the window ends.
        publish_release(operator, third, third_blobs, ["device:dev-1"])
        wait_for(lambda: _reached(sub, "active", "second"), 20, "the window ends")
        wait_for(lambda: _reached(sub, "active", "third"), 60, "then the latest release")
        wait_for(lambda: _served(sub) == {("third", 4)}, 10, "serving the latest")
        names = [s.get("name") for s in _states(sub)]
        assert "stuck" not in names[names.index("second") :]  # abandoned, never resumed
        agent.terminate()
    # Only the active and the previous model stay; no partial download is left behind.
    stored = sorted(p.name for p in (tmp_path / "state" / "models").glob("*.tflite"))
    assert len(stored) == 2
    assert list((tmp_path / "state" / "downloads").glob("*/*")) == []


def test_a_bad_chunk_is_fetched_again_once_fixed(
    tmp_path: Path, broker: Broker, sub: Subscriber, keys: tuple[Path, Path]
) -> None:
    manifest, blobs = build_release(
        {"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600, chunk_size=1 << 20
    )
    data = bytearray(blobs["cpu"])
    data[5_000_000] ^= 0x01
    config = _config(tmp_path, broker, keys, "  retry_min_s: 1\n")
    with running(config) as agent, Operator(broker.url) as operator:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        _chunks(operator, manifest, bytes(data))
        _desired(operator, manifest)
        wait_for(
            lambda: any(s.get("reason") == "chunk 4 does not match its hash" for s in _states(sub)),
            30,
            "the bad chunk found",
        )
        failed = next(s for s in _states(sub) if s["state"] == "failed")
        assert failed["retry_in_s"] == 1
        _chunks(operator, manifest, blobs["cpu"], range(4, 5))  # the publisher fixes it
        wait_for(lambda: _reached(sub, "active", "lite0-float"), 60, "active after the fix")
        resumed = [s.get("resumed") for s in _states(sub) if s["state"] == "downloading"]
        assert any(isinstance(r, int) and r > 0 for r in resumed)  # good chunks were kept
        agent.terminate()


def _failed_version(sub: Subscriber, version: int) -> bool:
    return any(s["state"] == "failed" and s.get("version") == version for s in _states(sub))


def test_failures_leave_no_files_and_no_device_paths(
    tmp_path: Path, broker: Broker, sub: Subscriber, keys: tuple[Path, Path]
) -> None:
    """Releases that fail after their download leave nothing behind; reasons name no paths."""
    manifest, blobs = build_release({"cpu": FP32}, "junk", 2, keys[0], "release", 3600)
    # 1. A real model whose manifest declares another input: refused by preflight.
    spec = manifest.variants[0].input.model_copy(update={"height": 96})
    variant = manifest.variants[0].model_copy(update={"input": spec})
    wrong_input = sign(
        manifest.model_copy(update={"variants": [variant], "rollout_id": "j2"}),
        load_private_key(keys[0]),
    )
    # 2. A validly signed file that is no model at all: refused when it will not load.
    garbage = b"\x00\x00\x00\x00TFL3" + bytes(range(256)) * 400
    not_a_model = sign(
        Manifest(
            rollout_id="j3",
            name="junk",
            version=3,
            created=time.time(),
            expires=time.time() + 600,
            key_id="release",
            variants=[describe_variant("cpu", garbage, SPEC, 1 << 16)],
        ),
        load_private_key(keys[0]),
    )
    with running(_config(tmp_path, broker, keys)) as agent, Operator(broker.url) as operator:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        publish_release(operator, wrong_input, blobs, ["device:dev-1"])
        wait_for(lambda: _failed_version(sub, 2), 60, "preflight refusal")
        publish_release(operator, not_a_model, {"cpu": garbage}, ["device:dev-1"])
        wait_for(lambda: _failed_version(sub, 3), 60, "unloadable refusal")
        agent.terminate()
    reasons = [str(s.get("reason")) for s in _states(sub) if s["state"] == "failed"]
    assert reasons[0].startswith("preflight: model input 224x224"), reasons
    assert reasons[1].startswith("preflight: models/"), reasons  # within the store
    assert not any(str(tmp_path) in r for r in reasons)
    assert list((tmp_path / "state" / "models").glob("*.tflite")) == []
    assert list((tmp_path / "state" / "downloads").glob("*/*")) == []


def test_status_and_logs_name_what_serves_after_a_rollout(
    tmp_path: Path, broker: Broker, sub: Subscriber, keys: tuple[Path, Path]
) -> None:
    manifest, blobs = build_release({"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600)
    with running(_config(tmp_path, broker, keys)) as agent, Operator(broker.url) as operator:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        publish_release(operator, manifest, blobs, ["device:dev-1"])
        wait_for(lambda: _reached(sub, "activating", "lite0-float"), 60, "swapped")

        def status_model() -> object:
            online = [m.json() for m in sub.on("/status") if m.json().get("state") == "online"]
            return online[-1].get("model", {}).get("name") if online else None

        wait_for(lambda: status_model() == "lite0-float", 10, "status names the new model")
        # A dashboard that connects now reads the retained status: the rolled-out model.
        late = Subscriber(broker.port, [DEVICE.status]).start()
        wait_for(lambda: bool(late.on("/status")), 10, "retained status")
        assert json.loads(late.on("/status")[-1].payload)["model"]["name"] == "lite0-float"
        late.stop()
        agent.terminate()
    logs = agent.logs()
    swapped = next(i for i, line in enumerate(logs) if line.get("state") == "activating")
    later = [line for line in logs[swapped + 1 :] if "model" in line]
    assert later, "no log line after the swap"
    assert {line["model"] for line in later} == {"lite0-float"}


# -- the operator's command line ----------------------------------------------------------------
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


def test_keys_are_never_overwritten_silently(tmp_path: Path) -> None:
    first = _cli("keys", "generate", "--out", str(tmp_path), "--key-id", "ops")
    assert first.returncode == 0, first.stderr
    private = tmp_path / "ops.key"
    assert private.stat().st_mode & 0o777 == 0o600
    before = private.read_bytes()
    again = _cli("keys", "generate", "--out", str(tmp_path), "--key-id", "ops")
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        == f"error: {private} exists; --force replaces it (devices trust the old key)"
    )
    assert private.read_bytes() == before
    forced = _cli("keys", "generate", "--out", str(tmp_path), "--key-id", "ops", "--force")
    assert forced.returncode == 0
    assert private.read_bytes() != before


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--expires-in", "-5", "argument --expires-in: '-5' must be greater than 0"),
        ("--target", "device:a b", "argument --target: 'device:a b': use device:ID, group:NAME"),
        ("--target", "group:a/b", "argument --target: 'group:a/b': use device:ID, group:NAME"),
        ("--version", "-1", "argument --version: '-1' must be a whole number of at least 1"),
        ("--chunk-size", "0", "argument --chunk-size: '0' must be between 1 and 16777216 bytes"),
        ("--name", "a/b", "argument --name: 'a/b': letters, digits"),
        ("--waves", "50,10", "argument --waves: '50,10': rising percentages in (0, 100]"),
    ],
)
def test_publish_refuses_bad_arguments(
    tmp_path: Path, keys: tuple[Path, Path], option: str, value: str, message: str
) -> None:
    args = {
        "--name": "m",
        "--version": "1",
        "--target": "device:d",
        "--key": str(keys[0]),
        "--broker": "mqtt://127.0.0.1:9",
    }
    args[option] = value
    flat = [item for pair in args.items() for item in pair]
    proc = _cli("rollout", "publish", str(FP32), *flat, f"{option}={value}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"edgefleet rollout publish: error: {message}")
    ), proc.stderr


def test_publish_waits_for_the_outcome_and_versions_are_immutable(
    tmp_path: Path, broker: Broker, sub: Subscriber, keys: tuple[Path, Path]
) -> None:
    common = ["--key", str(keys[0]), "--broker", broker.url, "--target", "device:dev-1"]
    with running(_config(tmp_path, broker, keys)) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        done = _cli("rollout", "publish", str(FP32), "--name", "x", "--version", "1", *common)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1/1 active" in done.stderr
        other = _cli(
            "rollout", "publish", str(factory_model_path()), "--name", "x", "--version", "1",
            *common,
        )  # fmt: skip
        assert other.returncode == 2
        assert (
            other.stderr.strip()
            .splitlines()[-1]
            .startswith("error: x v1 is already published with other content")
        )
        same = _cli(
            "rollout", "publish", str(FP32), "--name", "x", "--version", "1", "--no-wait", *common
        )
        assert same.returncode == 0, same.stderr  # the same release again is harmless
        status = _cli("rollout", "status", "--broker", broker.url)
        assert status.returncode == 0
        row = next(line for line in status.stdout.splitlines() if "dev-1" in line)
        assert row.count("x v1") == 2  # desired and active
        assert "online" in row
        default = _cli("rollout", "status")
        assert "broker: mqtt://127.0.0.1:1883 (the default" in default.stderr
        agent.terminate()
