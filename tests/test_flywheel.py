"""The data flywheel on real pieces: devices keep frames, the collector stores and checks
them, operators label them (API, CLI and the page in Chromium), and they come out as a
training folder. The agent runs as ``edgefleet run`` on a real mosquitto; the collector and
its web server run in-process on the same broker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgefleet.collector import Collector, CollectorSettings, SampleCatalog, SampleSettings
from edgefleet.collector.samples import sample_path
from edgefleet.collector.store import Store
from edgefleet.dashboard import Dashboard, FleetView
from edgefleet.factory import factory_model_path
from edgefleet.inference.images import decode_image
from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import build_release, publish_release
from edgefleet.protocol import SAMPLE_PIECE_BYTES, Rollout, ShadowSpec
from tests.conftest import needs_train
from tests.mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for
from tests.test_collector import PG_URL, _pg_available

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOPIC = "edgefleet/v1/devices/{}/samples"


def _jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    assert ok
    return bytes(buf)


def _meta(width: int, height: int, **changes: Any) -> dict[str, Any]:
    return {
        "ts": 1.0, "model": "efficientnet-lite0", "model_version": 0,
        "top": [{"label": "goldfish", "index": 1, "score": 0.4},
                {"label": "tench", "index": 0, "score": 0.3}],
        "triggers": ["low_score"], "encoding": "jpeg", "width": width, "height": height,
        **changes,
    }  # fmt: skip


def _pieces(
    device: str, boot: str, first: int, data: bytes, meta: dict[str, Any], **override: Any
) -> list[tuple[str, bytes]]:
    """The messages a device sends for one sample, mseq from ``first``."""
    sha = hashlib.sha256(data).hexdigest()
    count = max(1, -(-len(data) // SAMPLE_PIECE_BYTES))
    out = []
    for i in range(count):
        part = data[i * SAMPLE_PIECE_BYTES : (i + 1) * SAMPLE_PIECE_BYTES]
        body: dict[str, Any] = {
            "device": device, "boot_id": boot, "mseq": first + i, "floor": 1, "ts": 1.0,
            "sample": sha, "piece": i, "pieces": count, "size": len(data),
            "data": base64.b64encode(part).decode(),
        }  # fmt: skip
        if i == 0:
            body["meta"] = meta
        body.update(override)
        out.append((TOPIC.format(device), json.dumps(body).encode()))
    return out


def _collector(
    tmp_path: Path, broker: str = "mqtt://127.0.0.1:1", db: str | None = None
) -> Collector:
    return Collector(
        CollectorSettings(
            broker=broker,
            db=db or f"sqlite:///{tmp_path / 'fleet.db'}",
            samples=SampleSettings(tmp_path / "samples"),
        )
    )


def _fresh_postgresql() -> str:
    """The suite's PostgreSQL database without the sample tables of an earlier run."""
    if not _pg_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    store = Store(PG_URL)
    store.cursor().execute(
        "DROP TABLE IF EXISTS sample_pieces, samples, sample_counts, sample_classes"
    )
    store.commit()
    store.close()
    return PG_URL


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_collector_checks_each_sample_and_one_bad_costs_no_other(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _fresh_postgresql() if backend == "postgresql" else None
    collector = _collector(tmp_path, db=db)
    acks: list[dict[str, Any]] = []
    monkeypatch.setattr(
        collector.client, "publish", lambda _t, body, qos: acks.append(json.loads(body))
    )
    boot = uuid.uuid4().hex
    rng = np.random.default_rng(3)
    big = cv2.imencode(".png", rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))[1].tobytes()
    good, small = _jpeg(1), _jpeg(2)
    assert len(big) > 2 * SAMPLE_PIECE_BYTES  # three pieces or more
    bomb = cv2.imencode(".png", np.zeros((8000, 6000, 1), np.uint8))[1].tobytes()  # 48 MP
    batch = [
        *_pieces("d1", boot, 0, good, _meta(64, 64)),
        *_pieces("d1", boot, 0, big, _meta(200, 200)),
    ]
    bad = [
        # a hash that is not the file's
        _pieces("d1", boot, 0, small, _meta(64, 64), sample="0" * 64),
        # bytes that are no picture
        _pieces("d1", boot, 0, b"\xff\xd8 not a jpeg \xff\xd9", _meta(64, 64)),
        # a decoded size other than the metadata says
        _pieces("d1", boot, 0, small, _meta(32, 64)),
        # more pixels than a sample may have
        _pieces("d1", boot, 0, bomb, _meta(6000, 8000)),
        # a first piece without its metadata
        [(t, p.replace(b'"meta"', b'"other"'))
         for t, p in _pieces("d1", boot, 0, _jpeg(5), _meta(64, 64))],
    ]  # fmt: skip
    messages = [*batch, *(m for sample in bad for m in sample)]
    # mseq in the order sent, as the device's link numbers them
    numbered = [
        (t, json.dumps({**json.loads(p), "mseq": i + 1}).encode())
        for i, (t, p) in enumerate(messages)
    ]
    last = len(numbered)
    # the same picture from another device: stored once
    again = _pieces("d2", uuid.uuid4().hex, 1, good, _meta(64, 64))
    collector._store_batch([*numbered, *again])
    catalog = SampleCatalog(collector.s.db, collector.s.samples.folder)
    stored = {s["sample"]: s for s in catalog.find(state="all")}
    assert set(stored) == {hashlib.sha256(good).hexdigest(), hashlib.sha256(big).hexdigest()}
    for sha in stored:
        path = tmp_path / "samples" / sha[:2] / f"{sha}.jpg"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert stored[hashlib.sha256(good).hexdigest()]["device"] == "d1"
    refused = catalog.facets()["refused"]
    assert refused == {
        "stored": 2, "duplicate": 1, "bad_hash": 1, "undecodable": 2, "bad_meta": 1,
        "bad_piece": 1,
    }  # fmt: skip
    # Every piece, good or bad, is acknowledged: the device lets go of all of them.
    assert {"boot_id": boot, "mseq": last} in acks
    catalog.close()
    collector.store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_labels_must_be_classes_of_the_model_and_export_makes_a_training_folder(
    backend: str, tmp_path: Path
) -> None:
    db = _fresh_postgresql() if backend == "postgresql" else None
    collector = _collector(tmp_path, db=db)
    boot = uuid.uuid4().hex
    pictures = [_jpeg(i) for i in range(4)]
    batch = [
        m for i, p in enumerate(pictures) for m in _pieces("d1", boot, i + 1, p, _meta(64, 64))
    ]
    collector._store_batch(batch)  # acks go to a broker that is not there: harmless
    collector.store.close()
    db = collector.s.db
    cli = [sys.executable, "-m", "edgefleet", "samples"]
    where = ["--db", db, "--samples", str(tmp_path / "samples")]
    shas = [hashlib.sha256(p).hexdigest() for p in pictures]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [*cli, *args, *where]
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)

    refused = run("label", shas[0], "goldfish")
    assert refused.returncode == 2
    assert "no classes known" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = run("classes", str(factory_model_path()))
    assert done.returncode == 0, done.stderr
    assert "1000 classes" in done.stdout
    wrong = run("label", shas[0], "goldfsh")
    assert wrong.returncode == 2
    assert "has no class 'goldfsh'" in wrong.stderr
    assert run("label", shas[0], "goldfish").returncode == 0
    assert run("label", shas[1], "tench").returncode == 0
    assert run("label", shas[2], "--skip").returncode == 0
    listed = run("list", "--state", "unlabelled")
    assert [json.loads(line)["sample"] for line in listed.stdout.splitlines()[:-1]] == [shas[3]]
    base = tmp_path / "base"
    (base / "goldfish").mkdir(parents=True)
    (base / "goldfish" / "mine.jpg").write_bytes(_jpeg(99))
    out = tmp_path / "data"
    exported = run("export", str(out), "--base", str(base))
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == sorted(
        ["goldfish/mine.jpg", f"goldfish/{shas[0]}.jpg", f"tench/{shas[1]}.jpg"]
    )
    again = run("export", str(out))
    assert again.returncode == 2
    assert "not empty" in again.stderr


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[Dashboard, SampleCatalog, list[str]]]:
    collector = _collector(tmp_path)
    pictures = [_jpeg(i) for i in range(3)]
    boot = uuid.uuid4().hex
    collector._store_batch(
        [m for i, p in enumerate(pictures) for m in _pieces("d1", boot, i + 1, p, _meta(64, 64))]
    )
    collector.store.close()
    catalog = SampleCatalog(collector.s.db, tmp_path / "samples")
    catalog.set_classes("efficientnet-lite0", ["tench", "goldfish", "great white shark"])
    dashboard = Dashboard(FleetView(), "127.0.0.1:0", samples=catalog)
    dashboard.start()
    yield dashboard, catalog, [hashlib.sha256(p).hexdigest() for p in pictures]
    dashboard.stop()
    catalog.close()


def _post(url: str, body: bytes, content_type: str | None = "application/json") -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_api_refuses_what_it_cannot_take(
    page: tuple[Dashboard, SampleCatalog, list[str]],
) -> None:
    dashboard, _catalog, shas = page
    url = dashboard.url + f"api/samples/{shas[0]}/label"
    assert _post(url, b'{"label": "goldfish"}', None)[0] == 415  # a cross-site form's post
    assert _post(url, b"not json")[0] == 400
    status, body = _post(url, b'{"label": "zebra"}')
    assert status == 422
    assert "has no class 'zebra'" in body["error"]
    assert _post(dashboard.url + f"api/samples/{'f' * 64}/label", b'{"label": "tench"}')[0] == 422
    assert _post(url, b'{"label": "goldfish"}') == (
        200,
        {"sample": shas[0], "label": "goldfish", "skipped": False, "by": "local"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(dashboard.url + "api/samples?trigger=nope", timeout=10)
    assert refused.value.code == 400
    assert b"trigger must be one of" in refused.value.read()


def test_labelling_from_the_keyboard_in_chromium(
    page: tuple[Dashboard, SampleCatalog, list[str]],
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (./dev test installs it)")
    dashboard, catalog, shas = page
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.goto(dashboard.url + "samples")
            tab.wait_for_selector("#gallery figure.sample.selected")
            assert tab.locator("#gallery figure").count() == 3
            first = tab.locator("#gallery figure.selected").get_attribute("data-sample")
            # The model's own guesses are the numbered choices: 1 is its top-1, goldfish.
            tab.wait_for_selector("#current button[data-label='goldfish']")
            tab.keyboard.press("1")
            wait_for(lambda: tab.locator("#gallery figure").count() == 2, 10, "one labelled")
            second = tab.locator("#gallery figure.selected").get_attribute("data-sample")
            tab.keyboard.press("s")
            wait_for(lambda: tab.locator("#gallery figure").count() == 1, 10, "one skipped")
            tab.keyboard.press("/")
            tab.keyboard.type("great white shark")
            tab.keyboard.press("Enter")
            wait_for(lambda: tab.locator("#gallery figure").count() == 0, 10, "all done")
            count = tab.locator("#count")
            wait_for(lambda: "0 unlabelled of 3" in count.inner_text(), 10, "the count")
        finally:
            browser.close()
    done = {s["sample"]: s for s in catalog.find(state="all")}
    assert done[first]["label"] == "goldfish"
    assert done[second]["skipped"]
    assert done[second]["label"] is None
    third = (set(shas) - {first, second}).pop()
    assert done[third]["label"] == "great white shark"


CAPTURE = """
capture:
  enabled: true
  below_score: null
  margin_below: null
  random_one_in: 1
  min_interval_s: 0.3
  per_hour: 10000
"""


def test_kept_frames_reach_the_collector_across_a_broker_restart(
    tmp_path: Path, broker: Broker
) -> None:
    collector = _collector(tmp_path, broker.url)
    collector.start()
    catalog = SampleCatalog(collector.s.db, collector.s.samples.folder)

    def counts() -> dict[str, int]:
        refused: dict[str, int] = catalog.facets()["refused"]
        return refused

    config = agent_config(
        tmp_path, broker.url, fps=10, mqtt_extra="ack_mode: collector\n", extra=CAPTURE,
        jsonl=False,
    )  # fmt: skip
    try:
        with running(config) as agent:
            wait_for(lambda: counts().get("stored", 0) >= 3, 60, "first samples stored")
            broker.restart()
            before = counts().get("stored", 0)
            wait_for(lambda: counts().get("stored", 0) >= before + 3, 60, "samples after it")
            assert agent.terminate() == 0
        (stopped,) = [line for line in agent.logs() if line.get("event") == "capture stopped"]
        kept = stopped["kept"]
        # What the restart lost in flight waits in the device's spool (unacknowledged by the
        # collector): the next boot, capture off, sends it.
        agent_config(tmp_path, broker.url, fps=10, mqtt_extra="ack_mode: collector\n", jsonl=False)
        with running(config) as again:
            # Every sample the device kept arrived: stored, or a picture it had sent before.
            wait_for(
                lambda: counts().get("stored", 0) + counts().get("duplicate", 0) == kept,
                60,
                f"all {kept} kept samples at the collector ({counts()})",
            )
            assert again.terminate() == 0
        assert set(counts()) <= {"stored", "duplicate"}  # nothing refused
        found = catalog.find(state="all", limit=500)
        assert len(found) == counts()["stored"]
        sample = found[0]
        assert sample["device"] == "dev-1"
        assert sample["model"] == "efficientnet-lite0"
        assert sample["triggers"] == ["random"]
        assert (sample["width"], sample["height"]) == (
            120,
            120,
        )
        catalog.set_classes("efficientnet-lite0", ["tench", "goldfish"])
        catalog.label(sample["sample"], "tench", "test")
        assert catalog.export(tmp_path / "data") == {"tench": 1}
        data = (tmp_path / "data" / "tench" / f"{sample['sample']}.jpg").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sample["sample"]
    finally:
        catalog.close()
        collector.stop()


def test_the_sweep_completes_pieces_stored_apart_and_retention_removes_the_oldest(
    tmp_path: Path,
) -> None:
    collector = _collector(tmp_path)
    intake, store = collector.samples, collector.store
    rng = np.random.default_rng(4)
    data = cv2.imencode(".png", rng.integers(0, 256, (120, 120, 3), dtype=np.uint8))[1].tobytes()
    first, second = _pieces("d1", "b" * 32, 1, data, _meta(120, 120))[:2]
    # Another collector of this database took the second piece in its own transaction:
    # neither saw both, so neither completed the sample.
    cur = store.cursor()
    intake.take(cur, "d1", json.loads(second[1]))
    store.commit()
    other = Collector(collector.s)
    other.samples.take(other.store.cursor(), "d1", json.loads(first[1]))
    catalog = SampleCatalog(collector.s.db, collector.s.samples.folder)
    assert catalog.facets()["total"] == 0
    other.store.commit()
    intake.prune()
    assert catalog.facets()["total"] == 1
    # Retention: the labelled sample outlives an unlabelled one when the folder is too full.
    newer = _jpeg(8)
    collector._store_batch(_pieces("d1", "c" * 32, 1, newer, _meta(64, 64)))
    catalog.set_classes("efficientnet-lite0", ["goldfish"])
    catalog.label(hashlib.sha256(data).hexdigest(), "goldfish", "t")
    collector.s.samples.max_mib = (len(data) + 10) / 2**20
    assert intake.prune() == 1
    (left,) = catalog.find(state="all")
    assert left["label"] == "goldfish"
    assert not sample_path(tmp_path / "samples", hashlib.sha256(newer).hexdigest()).exists()
    collector.s.samples.max_age_days = 0.0
    assert intake.prune() == 1
    assert catalog.facets()["total"] == 0
    catalog.close()
    other.store.close()
    store.close()


@pytest.mark.export
@needs_train
def test_the_loop_kept_frames_labelled_trained_shadowed_and_promoted(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], samples: Path, classifier: Any
) -> None:
    """Devices keep frames -> the collector stores them, across a broker restart ->
    labelled through the page's API -> exported -> trained -> published with a shadow phase
    -> promoted on the device, which then serves it and keeps the frames the candidate
    disagreed on."""
    from edgefleet.training import ImageFolder, train

    photos = sorted(samples.glob("*.JPEG"))
    groups = {"animal": photos[:4], "thing": photos[-4:]}  # fish and sharks; fungi, paper
    folder = tmp_path / "photos"
    folder.mkdir()
    group_of: dict[str, str] = {}
    for group, members in groups.items():
        for photo in members:
            shutil.copy(photo, folder / photo.name)
            top = classifier.top(classifier.classify(decode_image(photo)), 1)[0].label
            group_of[top] = group
    assert len(group_of) == 8  # each photo has its own top-1: a sample names its photo
    collector = _collector(tmp_path, broker.url)
    collector.start()
    catalog = SampleCatalog(collector.s.db, collector.s.samples.folder)
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    pem = keys[1].read_text().replace("\n", "\\n")
    loop_capture = CAPTURE.replace("min_interval_s: 0.3", "min_interval_s: 0.25")
    config = agent_config(
        tmp_path, broker.url, fps=None, mqtt_extra="ack_mode: collector\n",
        extra=f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 5\n'
        + loop_capture,
        jsonl=False,
    )  # fmt: skip
    config.write_text(
        config.read_text().replace(
            "source: {type: synthetic, fps: null, width: 160, height: 120}",
            f"source: {{type: images, path: '{folder}', fps: 10}}",
        )
    )
    dashboard = Dashboard(FleetView(), "127.0.0.1:0", samples=catalog)
    dashboard.start()
    try:
        with running(config) as agent:
            wait_for(lambda: catalog.facets()["total"] >= 2, 120, "the first samples")
            broker.restart()  # what was in flight is sent again from the device's outbox
            wait_for(lambda: catalog.facets()["total"] == 8, 120, "a sample of every photo")
            catalog.set_classes("efficientnet-lite0", ["animal", "thing"])
            # Labelled as an operator does it: through the page's API.
            listing = dashboard.url + "api/samples?limit=500"
            with urllib.request.urlopen(listing, timeout=10) as answer:
                waiting = json.loads(answer.read())["samples"]
            for sample in waiting:
                body = json.dumps({"label": group_of[sample["predicted"]]}).encode()
                status, _ = _post(dashboard.url + f"api/samples/{sample['sample']}/label", body)
                assert status == 200
            assert catalog.export(tmp_path / "data") == {"animal": 4, "thing": 4}
            model = train(ImageFolder(tmp_path / "data"), base="lite0", cache=tmp_path / "c")
            exported = model.export(tmp_path / "model", "animals")
            spec = ShadowSpec(samples=5, interval_s=0.2, max_duration_s=60)
            manifest, blobs = build_release(
                {"cpu": exported.int8}, "animals", 1, keys[0], "release", 3600, shadow=spec
            )
            with Operator(broker.url) as operator:
                publish_release(operator, manifest, blobs, ["device:dev-1"])

            def final() -> dict[str, Any] | None:
                states = [m.json() for m in sub.on("/rollout") if m.payload]
                done = [s for s in states if s.get("name") == "animals"
                        and s["state"] in Rollout.TERMINAL]  # fmt: skip
                return done[-1] if done else None

            wait_for(lambda: final() is not None, 120, "the shadow phase decided")
            assert final()["state"] == "active", final()  # type: ignore[index]

            def served() -> set[str]:
                return {r["model"] for m in sub.on("/predictions") for r in m.json()["results"]}

            wait_for(lambda: "animals" in served(), 30, "the new model serving")

            # The candidate (two classes) disagreed with the serving model on its frames: the
            # device kept those frames too (the collector holds each of these 8 pictures
            # once, so it counts them as duplicates of what it has).
            def disagreements() -> int:
                figures = [m.json().get("capture", {}) for m in sub.on("/metrics")]
                return max((f.get("by_trigger", {}).get("shadow_disagrees", 0) for f in figures),
                           default=0)  # fmt: skip

            wait_for(lambda: disagreements() >= 1, 30, "disagreements kept")
            assert agent.terminate() == 0
    finally:
        dashboard.stop()
        sub.stop()
        catalog.close()
        collector.stop()
