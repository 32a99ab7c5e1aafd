"""Model rollouts: signed manifests (every check before download), and end to end over a
real mosquitto: a release goes active between two frames; attacks leave the old model serving."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import build_release, publish_release
from edgefleet.protocol import Manifest, VariantSpec
from edgefleet.rollout.chunks import held, spans
from edgefleet.rollout.release import (
    PARTIAL,
    chunk,
    describe_variant,
    generate_keys,
    load_private_key,
    sign,
)

from .conftest import REPO
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"
SPEC = {"height": 224, "width": 224, "dtype": "uint8"}


# -- end to end -------------------------------------------------------------------------------


def _device_config(tmp_path: Path, broker: Broker, keys: tuple[Path, Path]) -> Path:
    pem = keys[1].read_text().replace("\n", "\\n")
    extra = f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 10\n'
    return agent_config(tmp_path, broker.url, fps=20, extra=extra)


def _states(sub: Subscriber) -> list[dict[str, object]]:
    return [m.json() for m in sub.on("/rollout") if m.payload]


def _on_disk(folder: Path, variant: VariantSpec) -> int:
    """How many chunks of ``variant`` the partial download in ``folder`` holds, by hash."""
    try:
        fd = os.open(folder / PARTIAL, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return len(held(fd, spans(variant)))
    finally:
        os.close(fd)


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


def test_group_target_device_precedence_and_resume(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    """A group release; a device-level one wins; a download cut by a kill -9 resumes."""
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    operator = Operator(broker.url)
    group_release, _ = build_release({"cpu": FP32}, "group-model", 5, keys[0], "release", 3600)
    device_release, blobs = build_release(
        {"cpu": FP32}, "device-model", 3, keys[0], "release", 3600, chunk_size=1 << 20
    )
    # Only the group's manifest (its chunks are never published) and half the device's chunks.
    operator.publish(
        "edgefleet/v1/groups/lab/model/desired", group_release.model_dump_json().encode()
    ).wait_for_publish(10)
    pieces = chunk(blobs["cpu"], 1 << 20)
    for index, piece in enumerate(pieces[:9]):
        operator.publish(f"edgefleet/v1/models/device-model/3/cpu/{index}", piece).wait_for_publish(
            10
        )
    operator.publish(
        "edgefleet/v1/devices/dev-1/model/desired", device_release.model_dump_json().encode()
    ).wait_for_publish(10)
    folder = tmp_path / "state" / "downloads" / device_release.variants[0].sha256
    with running(config) as agent:
        wait_for(lambda: _on_disk(folder, device_release.variants[0]) == 9, 30, "half on disk")
        states = _states(sub)
        assert all(s.get("name") != "group-model" for s in states)  # the device's wins
        agent.kill()
    with running(config) as agent:
        wait_for(
            lambda: any(
                s["state"] == "downloading" and s.get("resumed") == 9 for s in _states(sub)
            ),
            30,
            "resumed with 9 chunks",
        )
        for index, piece in enumerate(pieces[9:], start=9):
            operator.publish(
                f"edgefleet/v1/models/device-model/3/cpu/{index}", piece
            ).wait_for_publish(10)
        wait_for(
            lambda: any(
                s["state"] == "active" and s.get("name") == "device-model" for s in _states(sub)
            ),
            60,
            "device release active",
        )
        agent.terminate()
    operator.close()
    sub.stop()


def _fragile_plugin(root: Path) -> None:
    """A delegate whose interpreters for rolled-out models break after the self-test."""
    dist = root / "fragile_delegate-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fragile-delegate\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[edgefleet.plugins]\nfragile = tp_fragile\n")
    (root / "tp_fragile.py").write_text(
        "from typing import Literal\n"
        "from edgefleet.plugin import hookimpl\n"
        "from edgefleet.rollout.preflight import TIMED_INVOKES_NO_BUDGET\n"
        "from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate\n\n"
        "class FragileConfig(CpuConfig):\n"
        "    type: Literal['fragile'] = 'fragile'\n\n"
        "class Breaks:\n"
        "    def __init__(self, inner):\n"
        "        self._inner, self.calls = inner, 0\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self._inner, name)\n"
        "    def invoke(self):\n"
        "        self.calls += 1\n"
        # the self-test's invokes pass (one classification, then the timed ones), then it
        # serves two frames and breaks: inside the health window
        "        if self.calls > 1 + TIMED_INVOKES_NO_BUDGET + 2:\n"
        "            raise RuntimeError('accelerator fault')\n"
        "        return self._inner.invoke()\n\n"
        "class FragileDelegate(CpuDelegate):\n"
        "    def make_interpreter(self, model_path):\n"
        "        inner = super().make_interpreter(model_path)\n"
        "        return Breaks(inner) if '/models/' in str(model_path) else inner\n\n"
        "@hookimpl\n"
        "def edgefleet_register_delegates(registry):\n"
        "    registry.add('fragile', FragileConfig, FragileDelegate)\n"
    )


def test_health_window_rolls_back(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import sys

    _fragile_plugin(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    config.write_text(
        config.read_text().replace(
            "delegate: {type: cpu, threads: 1}", "delegate: {type: fragile, threads: 1}"
        )
    )
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 10, 30, "results")
        manifest, blobs = build_release({"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600)
        operator = Operator(broker.url)
        publish_release(operator, manifest, blobs, ["device:dev-1"])
        operator.close()
        wait_for(
            lambda: any(s["state"] in ("rolled_back", "active") for s in _states(sub)),
            60,
            "health verdict",
        )
        final = _states(sub)[-1]
        assert final["state"] == "rolled_back", final
        assert "inference errors in the health window" in str(final["reason"])
        before = len(sub.result_seqs())
        wait_for(lambda: len(sub.result_seqs()) > before + 10, 10, "serving the old model")
        agent.terminate()
    results = [r for m in sub.on("/predictions") for r in m.json()["results"]]
    assert results[-1]["model_version"] == 0
    assert not (tmp_path / "state" / "models" / "active.json").exists()
    sub.stop()


@pytest.mark.parametrize(
    "state", ["received", "downloading", "verifying", "preflight", "activating", "active"]
)
def test_kill_9_at_each_state_leaves_one_verified_model(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], state: str
) -> None:
    """SIGKILL as soon as the device reports ``state``; after a restart exactly one complete,
    verified model is active (old or new) and the rollout ends active or failed, not stuck."""
    from edgefleet.rollout.store import ModelStore

    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    manifest, blobs = build_release(
        {"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600, chunk_size=1 << 20
    )
    operator = Operator(broker.url)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 3, 30, "results")
        publish_release(operator, manifest, blobs, ["device:dev-1"])
        wait_for(lambda: any(s["state"] == state for s in _states(sub)), 30, state)
        agent.kill()
    store = ModelStore(tmp_path / "state")
    active = store.active()
    if store.pointer.exists():
        assert active is not None, "a pointer to a damaged model"
        assert active.sha256 == manifest.variants[0].sha256
    boots = {r["boot_id"] for r in (x for m in sub.on("/predictions") for x in m.json()["results"])}
    with running(config) as agent:
        wait_for(
            lambda: any(
                r["boot_id"] not in boots
                for m in sub.on("/predictions")
                for r in m.json()["results"]
            ),
            30,
            "serving after restart",
        )
        wait_for(lambda: _states(sub)[-1]["state"] in ("active", "failed"), 60, "outcome")
        agent.terminate()
    final = ModelStore(tmp_path / "state").active()
    assert final is not None
    assert final.sha256 == manifest.variants[0].sha256
    operator.close()
    sub.stop()


@pytest.mark.parametrize("case", ["shadow", "failing-preflight"])
def test_kill_9_in_a_shadow_phase_and_in_a_preflight_meant_to_fail(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], case: str
) -> None:
    """The states the kill test above leaves out: a SIGKILL while the candidate runs beside
    the active model, and while a release that must fail (its probe's label is wrong) is in
    preflight. After a restart: the outcome is final, only verified models were ever served,
    the store holds the active model (and what it may roll back to), no download is left."""
    from edgefleet.protocol import ShadowSpec
    from edgefleet.rollout.store import ModelStore

    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    # No agreement rule: synthetic frames are noise, on which the two models disagree.
    shadow = ShadowSpec(samples=4, interval_s=0.5, max_duration_s=60.0)
    manifest, blobs = build_release(
        {"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600, chunk_size=1 << 20,
        shadow=shadow if case == "shadow" else None,
        expected_top1="no such label" if case == "failing-preflight" else None,
    )  # fmt: skip
    kill_at = "shadow" if case == "shadow" else "preflight"
    operator = Operator(broker.url)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 3, 30, "results")
        publish_release(operator, manifest, blobs, ["device:dev-1"])
        wait_for(lambda: any(s["state"] == kill_at for s in _states(sub)), 60, kill_at)
        agent.kill()
    killed_at = len(_states(sub))
    with running(config) as agent:
        want = ("active", "rejected") if case == "shadow" else ("failed",)
        wait_for(lambda: _states(sub)[-1]["state"] in want, 120, f"one of {want}")
        agent.terminate()
    after = _states(sub)[killed_at:]
    store = ModelStore(tmp_path / "state")
    active = store.active()
    served = {r["model_version"] for m in sub.on("/predictions") for r in m.json()["results"]}
    if case == "shadow":
        assert after[-1]["state"] == "active", after[-1]
        assert active is not None
        assert active.sha256 == manifest.variants[0].sha256
        assert served == {0, 1}
    else:
        assert after[-1]["state"] == "failed"
        assert "expected" in str(after[-1]["reason"]), after[-1]
        assert active is None  # the factory model still serves
        assert served == {0}
        # the failed candidate was removed from the store; nothing else is there
        assert not list((tmp_path / "state" / "models").glob("*.tflite"))
    downloads = tmp_path / "state" / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir())
    operator.close()
    sub.stop()


def test_waves_halt_on_failure_threshold(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    import subprocess

    from edgefleet.operator.waves import wave_order

    from .conftest import cli_command

    # Three devices; the one that goes second (by hash order) does not trust the key.
    names = [f"dev-{i}" for i in range(20)]
    order = wave_order(names[:3])
    good1, bad, good2 = order
    other_keys = generate_keys(tmp_path / "other", "release")
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    agents = []
    for name in order:
        folder = tmp_path / name
        folder.mkdir()
        trusted = other_keys if name == bad else keys
        config = _device_config(folder, broker, trusted)
        config.write_text(
            config.read_text().replace("id: dev-1", f"id: {name}").replace("fps: 20", "fps: 5")
        )
        agents.append(running(config))
    try:
        for ctx in agents:
            ctx.__enter__()
        wait_for(
            lambda: {m.topic.split("/")[-2] for m in sub.on("/status")} >= set(order),
            30,
            "three devices online",
        )
        proc = subprocess.run(
            cli_command(
                "rollout",
                "publish",
                str(FP32),
                "--name",
                "lite0-float",
                "--version",
                "1",
                "--target",
                "group:lab",
                "--key",
                str(keys[0]),
                "--key-id",
                "release",
                "--broker",
                broker.url,
                "--waves",
                "33,66,100",
                "--max-failure-rate",
                "0.05",
                "--wave-timeout",
                "60",
            ),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "wave 33%: 1 devices, 0 not active" in proc.stdout
        assert f"wave 66%: 2 devices, 1 not active (50%): {bad}" in proc.stdout
        assert "halted" in proc.stdout
        states = {m.topic.split("/")[-2]: m.json() for m in sub.on("/rollout") if m.payload}
        assert states[good1]["state"] == "active"
        assert states[bad]["state"] == "failed"
        assert good2 not in states  # never asked: stays on its model

        status = subprocess.run(
            cli_command("rollout", "status", "--broker", broker.url),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0
        assert good1 in status.stdout
        assert "signed by unknown key" in status.stdout or "failed" in status.stdout
    finally:
        for ctx in agents:
            ctx.__exit__(None, None, None)
        sub.stop()


def test_spec_mismatch_and_broker_restart_mid_download(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    """A manifest whose input spec lies fails preflight; a download cut by a broker restart
    (no persistence: the retained chunks are gone) resumes once they are published again."""
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        operator = Operator(broker.url)
        data = FP32.read_bytes()
        lying = describe_variant(
            "cpu", data, {"height": 300, "width": 300, "dtype": "float32"}, 1 << 20, labels=1000
        )
        bad = sign(
            Manifest(
                rollout_id="liar",
                name="liar",
                version=7,
                created=time.time(),
                expires=time.time() + 600,
                key_id="release",
                variants=[lying],
            ),
            load_private_key(keys[0]),
        )
        publish_release(operator, bad, {"cpu": data}, ["device:dev-1"])
        wait_for(
            lambda: any(
                s.get("rollout_id") == "liar" and s["state"] == "failed" for s in _states(sub)
            ),
            30,
            "spec mismatch refused",
        )
        reason = next(
            str(s["reason"])
            for s in _states(sub)
            if s.get("rollout_id") == "liar" and s["state"] == "failed"
        )
        assert "differs from the manifest's 300x300 float32" in reason

        manifest, blobs = build_release(
            {"cpu": FP32}, "lite0-float", 8, keys[0], "release", 3600, chunk_size=1 << 20
        )
        pieces = chunk(blobs["cpu"], 1 << 20)
        for index, piece in enumerate(pieces[:6]):
            operator.publish(
                f"edgefleet/v1/models/lite0-float/8/cpu/{index}", piece
            ).wait_for_publish(10)
        operator.publish(
            "edgefleet/v1/devices/dev-1/model/desired", manifest.model_dump_json().encode()
        ).wait_for_publish(10)
        folder = tmp_path / "state" / "downloads" / manifest.variants[0].sha256
        wait_for(lambda: _on_disk(folder, manifest.variants[0]) == 6, 30, "six chunks")
        operator.close()
        sub.stop()
        broker.restart()  # everything retained is lost
        sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
        operator = Operator(broker.url)
        publish_release(operator, manifest, blobs, ["device:dev-1"])
        operator.close()
        wait_for(
            lambda: any(s.get("version") == 8 and s["state"] == "active" for s in _states(sub)),
            60,
            "active after the broker restart",
        )
        agent.terminate()
    sub.stop()


def test_wrong_total_sha_and_clear(tmp_path: Path, broker: Broker, keys: tuple[Path, Path]) -> None:
    import subprocess

    from .conftest import cli_command

    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    config = _device_config(tmp_path, broker, keys)
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        manifest, blobs = build_release(
            {"cpu": FP32}, "lite0-float", 4, keys[0], "release", 3600, chunk_size=1 << 20
        )
        lied = manifest.variants[0].model_copy(update={"sha256": "0" * 64})
        bad = sign(
            manifest.model_copy(update={"variants": [lied], "rollout_id": "badsum"}),
            load_private_key(keys[0]),
        )
        operator = Operator(broker.url)
        publish_release(operator, bad, blobs, ["device:dev-1"])
        operator.close()
        wait_for(
            lambda: any(
                s.get("rollout_id") == "badsum" and s["state"] == "failed" for s in _states(sub)
            ),
            30,
            "total hash refused",
        )
        reason = next(
            str(s["reason"])
            for s in _states(sub)
            if s.get("rollout_id") == "badsum" and s["state"] == "failed"
        )
        assert reason == "assembled model does not match its size/sha256"
        agent.terminate()
    proc = subprocess.run(
        cli_command("rollout", "clear", "lite0-float", "4", "--broker", broker.url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cleared 18 retained chunks" in proc.stdout
    assert "and 1 desired states naming it" in proc.stdout
    left = Operator(broker.url)
    assert left.collect("edgefleet/v1/models/lite0-float/4/+/+", 1.0) == {}
    assert left.collect("edgefleet/v1/devices/+/model/desired", 1.0) == {}
    left.close()
    sub.stop()


def test_unloadable_stored_model_falls_back_to_factory(tmp_path: Path) -> None:
    """The store points at a verified file that is not a usable model: start on the factory."""
    import hashlib

    from edgefleet.rollout.store import ActiveModel, ModelStore

    junk = b"\x00\x00\x00\x00TFL3" + b"\x01" * 500
    sha = hashlib.sha256(junk).hexdigest()
    store = ModelStore(tmp_path / "state")
    store.put(junk, sha)
    store.activate(ActiveModel(sha256=sha, name="junk", version=9))
    config = agent_config(tmp_path, "mqtt://127.0.0.1:1", fps=20)
    with running(config) as agent:
        wait_for(lambda: len(agent.truth()) > 5, 30, "results on the factory model")
        agent.terminate()
    assert {r["model_version"] for r in agent.truth()} == {0}
    assert any("starting on the factory model" in str(e.get("event")) for e in agent.logs())
