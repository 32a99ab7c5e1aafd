"""Delta rollouts: content-defined chunks shared by releases, copied from the device's own
models, fetched by hash only when missing; verified chunk by chunk and whole as before.

Unit tests cut real bytes and run ``Download`` on real files; the end-to-end tests run a real
agent against a real mosquitto and read what it reports and what the broker retains.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from edgefleet.mqtt.link import Incoming
from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import (
    build_release,
    clear_release,
    publish_release,
    published_releases,
    shared_chunks_in,
)
from edgefleet.operator.waves import fleet_view
from edgefleet.protocol import FleetTopics, Manifest
from edgefleet.rollout.chunks import LocalChunks, content_defined, spans
from edgefleet.rollout.download import Download
from edgefleet.rollout.release import ReleaseError, check_manifest, describe_variant, pieces

from .conftest import REPO
from .fakes import RecordingLink
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"
TOPICS = FleetTopics()
SPEC = {"height": 224, "width": 224, "dtype": "uint8"}


def _noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _shared_bytes(old: bytes, new: bytes) -> float:
    """The share of ``new``'s bytes in chunks that ``old`` has too."""
    have = set(content_defined(old)[1])
    cdc, hashes = content_defined(new)
    common = sum(n for n, h in zip(cdc.lengths, hashes, strict=True) if h in have)
    return common / len(new)


def test_an_insertion_moves_only_the_chunks_near_it() -> None:
    old = _noise(2_000_000, 1)
    inserted = old[:1_000_000] + _noise(1000, 2) + old[1_000_000:]
    assert _shared_bytes(old, inserted) > 0.95
    # Fixed chunks would share nothing after the insertion point.
    fixed = describe_variant("cpu", old, SPEC, 65536)
    moved = describe_variant("cpu", inserted, SPEC, 65536)
    after = {s.sha256 for s in spans(moved) if s.offset > 1_000_000}
    assert not after & {s.sha256 for s in spans(fixed)}


def _variant_download(tmp_path: Path, new: bytes) -> Download:
    variant = describe_variant("cpu", new, SPEC, 1, content_defined=True)
    manifest = Manifest(
        rollout_id="r1", name="m", version=2, created=0, expires=1, variants=[variant],
        key_id="k",
    )  # fmt: skip
    return Download.open(tmp_path / "downloads", "d", manifest, variant, TOPICS)


def _changed(old: bytes, at: int, length: int) -> bytes:
    return old[:at] + _noise(length, 9) + old[at + length :]


def test_a_device_copies_what_it_holds_and_fetches_only_the_rest(tmp_path: Path) -> None:
    old = _noise(1_500_000, 3)
    new = _changed(old, 700_000, 3000)  # a retrained layer: same length, other bytes
    local = tmp_path / "old.tflite"
    local.write_bytes(old)
    download = _variant_download(tmp_path, new)
    copied = download.copy_local(LocalChunks(), [local, tmp_path / "missing.tflite"])
    assert copied > 0.95 * len(new)
    wanted = download.wanted_topics()
    assert 1 <= len(wanted) <= 3  # the changed chunks only, each by its hash
    for digest, piece in pieces(download.variant, new):
        if TOPICS.shared_chunk(digest) in wanted:
            assert download.owns(TOPICS.shared_chunk(digest))
            download.take(TOPICS.shared_chunk(digest), piece)
    assert download.complete
    assert download.assembled()[: len(new) + 1] == new
    assert download.figures()["fetched_bytes"] == len(new) - copied
    download.close()


def test_a_local_chunk_that_rotted_is_fetched_never_trusted(tmp_path: Path) -> None:
    old = _noise(1_000_000, 4)
    local = tmp_path / "old.tflite"
    local.write_bytes(old)
    chunks = LocalChunks()
    first = _variant_download(tmp_path, old)
    assert first.copy_local(chunks, [local]) == len(old)  # cut and remembered
    first.close()
    # One byte rots on the card; size and mtime stay, so the remembered cut is used again.
    stat = local.stat()
    with local.open("r+b") as handle:
        handle.seek(500_000)
        byte = handle.read(1)
        handle.seek(500_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = _variant_download(tmp_path, old)
    again.have.clear()
    copied = again.copy_local(chunks, [local])
    missing = [s for s in again.spans if s.index not in again.have]
    assert len(missing) == 1
    assert missing[0].offset <= 500_000 < missing[0].offset + missing[0].length
    assert copied == len(old) - missing[0].length
    again.close()


def test_a_chunk_that_occurs_twice_is_filled_by_one_message(tmp_path: Path) -> None:
    block = _noise(40_000, 5)
    data = block + b"\0" * 200_000 + block + b"\0" * 200_000  # zero runs repeat their chunks
    download = _variant_download(tmp_path, data)
    by_hash = {s.sha256 for s in download.spans}
    assert len(by_hash) < len(download.spans)
    for digest, piece in dict(pieces(download.variant, data)).items():
        taken, _ = download.take(TOPICS.shared_chunk(digest), piece)
        assert taken in ("kept", "complete")
    assert download.complete
    assert download.assembled()[: len(data) + 1] == data
    assert download.figures()["fetched_bytes"] == sum(
        len(p) for p in dict(pieces(download.variant, data)).values()
    )
    download.close()


def test_a_wrong_piece_under_a_hash_is_bad_and_never_written(tmp_path: Path) -> None:
    data = _noise(300_000, 6)
    download = _variant_download(tmp_path, data)
    digest, piece = pieces(download.variant, data)[0]
    forged = bytes([piece[0] ^ 1]) + piece[1:]
    assert download.take(TOPICS.shared_chunk(digest), forged)[0] == "bad"
    assert download.take(TOPICS.shared_chunk("0" * 64), piece)[0] == "ignored"
    assert download.take("edgefleet/v1/models/_chunks/not-a-hash", piece)[0] == "ignored"
    assert not download.have
    download.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"lengths": "drop"}, "chunk hashes for"),
        ({"lengths": "grow"}, "add up to"),
        ({"chunks": "drop"}, "chunk hashes for"),
    ],
)
def test_a_chunk_list_that_cannot_describe_the_file_is_refused(
    keys: tuple[Path, Path], change: dict[str, str], reason: str
) -> None:
    from edgefleet.rollout.release import load_private_key, load_public_key, sign

    variant = describe_variant("cpu", _noise(200_000, 7), SPEC, 1, content_defined=True)
    assert variant.cdc is not None
    lengths, hashes = list(variant.cdc.lengths), list(variant.chunks)
    if change.get("lengths") == "drop":
        lengths.pop()
    elif change.get("lengths") == "grow":
        lengths[0] += 1
    else:
        hashes.pop()
    bad = variant.model_copy(
        update={"chunks": hashes, "cdc": variant.cdc.model_copy(update={"lengths": lengths})}
    )
    manifest = sign(
        Manifest(
            rollout_id="r", name="m", version=1, created=0, expires=2e9, variants=[bad],
            key_id="release",
        ),
        load_private_key(keys[0]),
    )  # fmt: skip
    trusted = {"release": load_public_key(keys[1].read_text())}
    with pytest.raises(ReleaseError, match=reason):
        check_manifest(manifest, trusted, 0, 1 << 30, ["cpu"], "9.9.9", now=1)


# -- end to end -------------------------------------------------------------------------------


def _relabelled(path: Path, out: Path) -> Path:
    """The same network with other labels and sidecar: bytes differ only at the end."""
    from edgefleet.inference.modelfile import ModelMetadata, pack, read_packed

    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        start = min(info.header_offset for info in zf.infolist())
    contents = read_packed(path)
    assert contents.labels is not None
    assert contents.metadata is not None
    labels = [f"{label} (relabelled)" for label in contents.labels]
    meta: ModelMetadata = contents.metadata.model_copy(update={"version": 2})
    out.write_bytes(pack(data[:start], labels, meta))
    return out


def _config(tmp_path: Path, broker: Broker, keys: tuple[Path, Path]) -> Path:
    pem = keys[1].read_text().replace("\n", "\\n")
    extra = (
        f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 10\n  retry_min_s: 1\n'
    )
    return agent_config(tmp_path, broker.url, fps=20, extra=extra)


def _states(sub: Subscriber) -> list[dict[str, object]]:
    return [m.json() for m in sub.on("/rollout") if m.payload]


def _reached(sub: Subscriber, state: str, version: int) -> dict[str, object] | None:
    return next(
        (s for s in _states(sub) if s["state"] == state and s.get("version") == version), None
    )


def _retained_shared(broker: Broker) -> set[str]:
    probe = Subscriber(broker.port, [TOPICS.shared_chunks()]).start()
    try:
        # Retained messages arrive right after the SUBACK; the count settles within a second.
        seen: list[int] = []

        def settled() -> bool:
            seen.append(len(probe.messages))
            return len(seen) > 4 and len(set(seen[-4:])) == 1

        wait_for(settled, 30, "the retained chunks")
        return {m.topic.rsplit("/", 1)[1] for m in probe.messages if m.payload}
    finally:
        probe.stop()


def test_a_relabelled_release_costs_only_what_changed_and_clear_keeps_shared_chunks(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    second_file = _relabelled(FP32, tmp_path / "relabelled.tflite")
    first, first_blobs = build_release({"cpu": FP32}, "lite0", 1, keys[0], "release", 3600)
    second, second_blobs = build_release({"cpu": second_file}, "lite0", 2, keys[0], "release", 3600)
    with running(_config(tmp_path, broker, keys)) as agent, Operator(broker.url) as operator:
        wait_for(lambda: len(sub.result_seqs()) > 5, 30, "results")
        publish_release(operator, first, first_blobs, ["device:dev-1"])
        wait_for(lambda: _reached(sub, "active", 1), 90, "v1 active")
        on_broker = _retained_shared(broker)
        assert on_broker == set(first.variants[0].chunks)
        publish_release(operator, second, second_blobs, ["device:dev-1"])
        wait_for(lambda: _reached(sub, "active", 2), 90, "v2 active")
        active = _reached(sub, "active", 2)
        assert active is not None
        size = second.variants[0].size
        fetched, copied = active["fetched_bytes"], active["copied_bytes"]
        assert isinstance(fetched, int)
        assert isinstance(copied, int)
        assert fetched + copied == size
        assert fetched < 0.01 * size, active  # the labels and sidecar, not the network
        row = next(r for r in fleet_view(operator) if r["device"] == "dev-1")
        assert row["sent"].endswith(f"of {size / 1e6:.1f} MB")
        both = _retained_shared(broker)
        second_only = set(second.variants[0].chunks) - set(first.variants[0].chunks)
        assert both == on_broker | second_only  # each chunk retained once
        assert len(second_only) <= 3
        releases = published_releases(operator)
        assert shared_chunks_in(releases) == both
        cleared, _ = clear_release(operator, "lite0", 1)
        left = _retained_shared(broker)
        assert left == set(second.variants[0].chunks)  # what v2 uses stays
        assert cleared == len(on_broker - left)
        served = hashlib.sha256(second_file.read_bytes()).hexdigest()
        assert (tmp_path / "state" / "models" / f"{served}.tflite").exists()
        agent.terminate()
    sub.stop()


def test_kill_9_mid_delta_resumes_and_a_forged_chunk_is_fetched_again(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    """Half the chunks, a kill -9, a restart (the verified half kept), a forged chunk (refused,
    retried), then the genuine rest: the release goes active with the whole file verified."""
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    manifest, blobs = build_release({"cpu": FP32}, "lite0", 1, keys[0], "release", 3600)
    variant = manifest.variants[0]
    parts = pieces(variant, blobs["cpu"])
    half = len(parts) // 2
    config = _config(tmp_path, broker, keys)
    with Operator(broker.url) as operator:
        for digest, piece in parts[:half]:
            operator.publish(TOPICS.shared_chunk(digest), piece).wait_for_publish(10)
        desired = TOPICS.device("dev-1").desired
        operator.publish(desired, manifest.wire()).wait_for_publish(10)
        with running(config) as agent:
            wait_for(
                lambda: any(
                    s["state"] == "downloading" and float(str(s.get("progress"))) >= 40
                    for s in _states(sub)
                ),
                60,
                "half the chunks",
            )
            agent.kill()
        before = len(_states(sub))
        with running(config) as agent:
            wait_for(
                lambda: any(
                    s["state"] == "downloading" and int(str(s.get("resumed"))) >= half * 0.8
                    for s in _states(sub)[before:]
                ),
                60,
                "the download resumed from the kept chunks",
            )
            digest, piece = parts[half]
            forged = bytes([piece[0] ^ 1]) + piece[1:]
            operator.publish(TOPICS.shared_chunk(digest), forged).wait_for_publish(10)
            wait_for(
                lambda: any(
                    "does not match its hash" in str(s.get("reason")) for s in _states(sub)
                ),
                30,
                "the forged chunk refused",
            )
            for digest, piece in parts[half:]:
                operator.publish(TOPICS.shared_chunk(digest), piece).wait_for_publish(10)
            wait_for(lambda: _reached(sub, "active", 1), 90, "active after the genuine rest")
            agent.terminate()
    stored = tmp_path / "state" / "models" / f"{variant.sha256}.tflite"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == variant.sha256
    sub.stop()


# -- agents from before content-defined chunks ------------------------------------------------

# The last commit whose agent knows fixed-size chunks only.
OLD_AGENT = "420d4f3934c733b5da18b515ceb3a6300795d4b3"


def _old_protocol() -> ModuleType:
    shown = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{OLD_AGENT}:agent/protocol.py"],
        capture_output=True,
        check=False,
    )
    if shown.returncode != 0:
        pytest.skip(f"the old agent's source is not in this checkout's history ({OLD_AGENT[:10]})")
    module = ModuleType("edgefleet_old_protocol")
    sys.modules[module.__name__] = module  # pydantic resolves the annotations through it
    exec(compile(shown.stdout, "old/protocol.py", "exec"), module.__dict__)  # noqa: S102
    return module


def test_an_older_agent_refuses_a_content_defined_release_and_verifies_a_fixed_one(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from pydantic import ValidationError

    from edgefleet.rollout.release import load_public_key

    old = _old_protocol()
    delta, _ = build_release({"cpu": FP32}, "lite0", 1, keys[0], "release", 3600)
    with pytest.raises(ValidationError) as refused:
        old.Manifest.model_validate(json.loads(delta.wire()))
    first = refused.value.errors()[0]
    assert first["loc"] == ("variants", 0, "cdc")
    assert first["msg"] == "Extra inputs are not permitted"
    fixed, _ = build_release({"cpu": FP32}, "lite0", 1, keys[0], "release", 3600, 1 << 17)
    parsed = old.Manifest.model_validate(json.loads(fixed.wire()))
    key = load_public_key(keys[1].read_text())
    assert isinstance(key, Ed25519PublicKey)
    key.verify(base64.b64decode(parsed.signature), parsed.canonical())  # raises if not


def test_a_large_download_asks_for_a_window_of_chunks_at_a_time(tmp_path: Path) -> None:
    """A stock mosquitto drops a client's queued messages past 1000: never ask for them all."""
    from edgefleet.rollout.fetching import WINDOW, Fetching
    from edgefleet.rollout.report import StateReport
    from edgefleet.rollout.store import ModelStore

    data = _noise(6_000_000, 8)
    download = _variant_download(tmp_path, data)
    manifest, variant = download.manifest, download.variant
    download.close()
    assert len(variant.chunks) > 2 * WINDOW
    link = RecordingLink()
    report = StateReport(link, "edgefleet/v1/devices/dev-1/rollout", "dev-1", tmp_path)
    stored: list[Path] = []
    failures: list[str] = []
    fetching = Fetching(
        link, report, ModelStore(tmp_path), tmp_path / "downloads", TOPICS,
        lambda _m, reason, _r, _b: failures.append(reason), lambda _d, path: stored.append(path),
    )  # fmt: skip
    fetching.begin("d", manifest, variant)
    by_topic = {TOPICS.shared_chunk(h): p for h, p in pieces(variant, data)}
    while link.held and not stored:
        topic = min(link.held)
        fetching.take(Incoming(topic, by_topic[topic], None, None))
    assert failures == []
    assert stored == [tmp_path / "models" / f"{variant.sha256}.tflite"]
    assert link.most == WINDOW
    assert set(link.qos.values()) == {0}  # retained, hashed, asked again: no QoS 1 needed
    assert link.held == set()  # every chunk topic given back


def test_publish_asks_the_broker_for_shared_chunks_only_when_it_has_some_and_not_for_long(
    broker: Broker, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixed-chunk release has nothing to reuse: no lookup (it cost 1.5 s a publish); a
    content-defined one looks, and the look ends once the broker has gone quiet."""
    import time

    from edgefleet.factory import factory_model_path
    from edgefleet.operator.releases import SHARED_LOOKUP_QUIET_S
    from edgefleet.rollout.release import DEFAULT_CHUNK

    model = factory_model_path()
    fixed, fixed_blobs = build_release(
        {"cpu": model}, "fixed", 1, keys[0], "release", 3600, chunk_size=DEFAULT_CHUNK
    )
    cdc, cdc_blobs = build_release({"cpu": model}, "cdc", 1, keys[0], "release", 3600)
    with Operator(broker.url) as operator:
        looks: list[tuple[str, float | None]] = []
        collect = operator.collect

        def recording(topic: str, seconds: float, quiet_s: float | None = None) -> dict[str, bytes]:
            looks.append((topic, quiet_s))
            return collect(topic, seconds, quiet_s)

        monkeypatch.setattr(operator, "collect", recording)
        publish_release(operator, fixed, fixed_blobs, ["device:dev-1"])
        assert looks == []
        publish_release(operator, cdc, cdc_blobs, ["device:dev-1"])
        assert looks == [(TOPICS.every_release(), SHARED_LOOKUP_QUIET_S)]
        started = time.monotonic()
        found = collect(TOPICS.every_release(), 60.0, quiet_s=SHARED_LOOKUP_QUIET_S)
        assert time.monotonic() - started < 30  # ended by the quiet, not by the 60 s
        assert set(found) == {TOPICS.release("fixed", 1), TOPICS.release("cdc", 1)}
        assert shared_chunks_in(published_releases(operator)) == set(cdc.variants[0].chunks)
