"""Rollout figures on a local mosquitto (a benchmark: prints only).

    .venv/bin/python bench/rollout.py [--agents 20]

1. publish -> ``active`` for the factory lite0 int8 file as a release, to 1 device and then
   to N agents at once (separate processes, 2 fps synthetic input each);
2. download throughput of the device's chunk path against a plain subscriber fetching the same
   retained chunks over MQTT 5, the device's protocol, from its SUBSCRIBE to the last chunk's
   arrival (ratio; target >= 0.6, issue 16); a 3.1.1 subscriber's time beside it;
3. the largest gap between two consecutive predictions around the swap, against the normal
   frame interval (target <= 2 intervals), for the first rollout and ``--swaps`` more (whose
   downloads are also compared with a plain subscriber's: medians over all of them);
4. convergence when the desired state changes mid-download: release A (the float model, half
   of its chunks published, so its download cannot finish) then release B; time from B's
   publish to B active, against B's own download time (target: within it + 2 s).
Targets (issue 5): 20 agents active <= 10 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgefleet.app.demo import find_mosquitto, local_broker
from edgefleet.factory import factory_model_path
from edgefleet.operator.releases import Broker, build_release, publish_release
from edgefleet.rollout.release import DEFAULT_CHUNK, chunk, generate_keys

MODEL = factory_model_path()
FLOAT_MODEL = Path(__file__).resolve().parents[1] / "models" / "efficientnet-lite0-fp32.tflite"


def agent_config(folder: Path, port: int, device: str, public: str, fps: float) -> Path:
    pem = public.replace("\n", "\\n")
    config = folder / f"{device}.yaml"
    config.write_text(
        f"device: {{id: {device}, groups: [bench]}}\n"
        f"source: {{type: synthetic, fps: {fps}, width: 64, height: 48}}\n"
        "delegate: {type: cpu, threads: 1}\n"
        f"state_dir: '{folder / device}'\n"
        "logging: {level: warning}\n"
        "sinks: []\n"
        f"fleet: {{url: 'mqtt://127.0.0.1:{port}'}}\n"
        f'rollout: {{trusted_keys: {{bench: "{pem}"}}, health_frames: 3}}\n'
    )
    return config


class Watch:
    """Everything published under ``topic``, with arrival times."""

    def __init__(
        self,
        port: int,
        topic: str,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    ) -> None:
        self._seen: dict[str, list[tuple[float, bytes]]] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.subscribed = time.monotonic()  # the SUBSCRIBE goes out from here on
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._seen.setdefault(msg.topic, []).append((time.monotonic(), bytes(msg.payload)))

    def snapshot(self) -> dict[str, list[tuple[float, bytes]]]:
        with self._lock:
            return {k: list(v) for k, v in self._seen.items()}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def active_count(watch: Watch, rollout_id: str) -> dict[str, float]:
    done = {}
    for topic, events in watch.snapshot().items():
        if not topic.endswith("/rollout"):
            continue
        for at, payload in events:
            if (
                payload
                and json.loads(payload).get("rollout_id") == rollout_id
                and json.loads(payload).get("state") == "active"
            ):
                done[topic.split("/")[-2]] = at
    return done


def stages(watch: Watch, rollout_id: str, since: float) -> str:
    """When the devices reached each state, after the publish: median and slowest."""
    reached: dict[str, list[float]] = {}
    for topic, events in watch.snapshot().items():
        if not topic.endswith("/rollout"):
            continue
        first: dict[str, float] = {}
        for at, payload in events:
            body = json.loads(payload) if payload else {}
            if body.get("rollout_id") == rollout_id:
                first.setdefault(str(body["state"]), at - since)
        for state, at in first.items():
            reached.setdefault(state, []).append(at)
    order = ["received", "downloading", "verifying", "preflight", "activating", "active"]
    return ", ".join(
        f"{state} {statistics.median(reached[state]):.2f}/{max(reached[state]):.2f}"
        for state in order
        if state in reached
    )


def roll(
    port: int, key: Path, devices: list[str], version: int, watch: Watch, model: Path = MODEL
) -> float:
    # Fixed chunks: the plain subscriber it is compared with fetches them by release topic
    # (bench/delta.py measures content-defined ones).
    manifest, blobs = build_release(
        {"cpu": model}, "bench", version, key, "bench", 3600, chunk_size=DEFAULT_CHUNK
    )
    operator = Broker(f"mqtt://127.0.0.1:{port}")
    started = time.monotonic()
    publish_release(operator, manifest, blobs, [f"device:{d}" for d in devices])
    operator.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = active_count(watch, manifest.rollout_id)
        if len(done) == len(devices):
            if len(devices) > 1:
                print(f"  states reached (s after publish, median/slowest): "
                      f"{stages(watch, manifest.rollout_id, started)}")  # fmt: skip
            return max(done.values()) - started
        time.sleep(0.05)
    return float("nan")


def plain_fetch(
    port: int,
    chunks: int,
    version: int = 1,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
) -> float:
    """From a plain client's SUBSCRIBE to the arrival of the last retained chunk (seconds);
    by default in MQTT 5, the device's protocol (paho parses each 5 PUBLISH's properties)."""
    watch = Watch(port, f"edgefleet/v1/models/bench/{version}/cpu/+", protocol)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = [at for events in watch.snapshot().values() for at, _ in events]
        if len(seen) >= chunks:
            break
        time.sleep(0.005)
    watch.close()
    return max(seen) - watch.subscribed if seen else float("nan")


def start_agents(
    tmp: Path, port: int, names: list[str], public: str, watch: Watch, first: int = 0
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i, device in enumerate(names, start=first):
        config = agent_config(tmp, port, device, public, 20.0 if i == 0 else 2.0)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "run", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        online = {t.split("/")[-2] for t in watch.snapshot() if t.endswith("/status")}
        if online >= set(names):
            break
        time.sleep(0.2)
    time.sleep(2)
    return procs


def download_ratio(
    port: int, device: str, watch: Watch, version: int, size: int, quiet: bool = False
) -> tuple[float, float]:
    """The device's download of release ``version`` against a plain subscriber's (seconds)."""
    chunks = -(-size // (128 * 1024))
    plain = plain_fetch(port, chunks, version)
    states = [
        (at, body)
        for at, body in _states(watch, device)
        if body.get("name") == "bench" and body.get("version") == version
    ]
    dl_start = next(at for at, s in states if s["state"] == "downloading")
    dl_end = next(at for at, s in states if s["state"] == "verifying")
    device_dl = dl_end - dl_start
    own = next(s.get("download_s") for _, s in states if s["state"] == "verifying")
    if not quiet:
        plain311 = plain_fetch(port, chunks, version, MQTTProtocolVersion.MQTTv311)
        print(
            f"download of {size / 1e6:.1f} MB: device {device_dl * 1000:.0f} ms (its own clock: "
            f"{own} s) vs a plain MQTT 5 subscriber {plain * 1000:.0f} ms for the same retained "
            f"chunks, ratio {plain / device_dl:.2f} (a 3.1.1 one: {plain311 * 1000:.0f} ms)"
        )
    return device_dl, plain


def report_downloads(figures: list[tuple[float, float]], size: int) -> None:
    """Many downloads of one size: the median of each side and of the ratios, with the range."""
    ratios = sorted(plain / device for device, plain in figures)
    print(
        f"download of {size / 1e6:.1f} MB, {len(figures)} rollouts: device median "
        f"{statistics.median(d for d, _ in figures) * 1000:.0f} ms, plain subscriber median "
        f"{statistics.median(p for _, p in figures) * 1000:.0f} ms; ratio median "
        f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
    )


def report_first(port: int, device: str, watch: Watch, seconds: float) -> None:
    size = MODEL.stat().st_size
    print(f"1 device: publish -> active in {seconds:.2f} s ({size / 1e6:.1f} MB, 128 KiB chunks)")
    download_ratio(port, device, watch, 1, size)
    report_gaps(watch, device, [1])


def _activations(watch: Watch, device: str, versions: list[int] | None = None) -> list[float]:
    """When the device began activating each of ``versions`` (all, by default), by its own
    clock."""
    return [
        float(body["ts"])  # type: ignore[arg-type]
        for _, body in _states(watch, device)
        if body.get("state") == "activating"
        and (versions is None or body.get("version") in versions)
    ]


def report_gaps(watch: Watch, device: str, versions: list[int]) -> None:
    """The largest gap between two results within 2 s of each swap, against the gaps away
    from every swap (how much they jitter without one)."""
    swaps = _activations(watch, device, versions)
    everything = _activations(watch, device)
    # When each result was made, by the device's clock (arrival times add MQTT's jitter),
    # and how long after its capture.
    made = [
        result
        for _, payload in watch.snapshot().get(f"edgefleet/v1/devices/{device}/predictions", [])
        for result in json.loads(payload)["results"]
    ]
    results = sorted((result["ts"], result["timings_ms"]["total"]) for result in made)
    gaps = [(a, b - a) for (a, _), (b, _) in itertools.pairwise(results)]
    worst = [max((g for a, g in gaps if abs(a - at) < 2), default=0.0) for at in swaps]
    elsewhere = sorted(g for a, g in gaps if all(abs(a - at) >= 2 for at in everything))
    # The slowest result within 2 s of each swap (capture -> result), and when it was made.
    slowest = [
        (max(near, key=lambda r: r["timings_ms"]["total"]), at)
        for at in swaps
        if (near := [r for r in made if abs(r["ts"] - at) < 2])
    ]
    usual_total = sorted(t for a, t in results if all(abs(a - at) >= 2 for at in everything))
    if not worst or not elsewhere or not usual_total or not slowest:
        print("swap gap: not enough results around the swaps")
        return
    usual = elsewhere[int(0.99 * (len(elsewhere) - 1))]
    shown = ", ".join(f"{w * 1000:.0f}" for w in worst)
    print(
        f"swap gap: largest gap between results within 2 s of each of {len(worst)} swaps: "
        f"{shown} ms (median {statistics.median(worst) * 1000:.0f} ms, "
        f"{statistics.median(worst) * 20:.2f} intervals of 50 ms); away from them the p99 gap "
        f"is {usual * 1000:.0f} ms, the largest {elsewhere[-1] * 1000:.0f} ms "
        f"({len(elsewhere)} gaps; results' own timestamps)"
    )
    totals = [r["timings_ms"]["total"] for r, _ in slowest]
    p99 = usual_total[int(0.99 * (len(usual_total) - 1))]
    print(
        f"  capture -> result within 2 s of each swap, slowest: "
        f"{', '.join(f'{t:.1f}' for t in totals)} ms (median {statistics.median(totals):.1f}); "
        f"away from them: median {statistics.median(usual_total):.1f}, p99 {p99:.1f}, "
        f"largest {usual_total[-1]:.1f} ms"
    )
    for result, at in slowest:  # where it spent its time
        stages = " ".join(f"{k} {v:.1f}" for k, v in result["timings_ms"].items())
        print(f"    {(result['ts'] - at) * 1000:+.0f} ms from activating: {stages}")


def _states(watch: Watch, device: str) -> list[tuple[float, dict[str, object]]]:
    topic = f"edgefleet/v1/devices/{device}/rollout"
    return [(at, json.loads(p)) for at, p in watch.snapshot().get(topic, []) if p]


def converge(port: int, key: Path, device: str, watch: Watch, first: int, second: int) -> None:
    stuck, stuck_blobs = build_release(
        {"cpu": FLOAT_MODEL}, "stuck", first, key, "bench", 3600, chunk_size=1 << 20
    )
    latest, latest_blobs = build_release(
        {"cpu": MODEL}, "latest", second, key, "bench", 3600, chunk_size=DEFAULT_CHUNK
    )
    operator = Broker(f"mqtt://127.0.0.1:{port}")
    pieces = chunk(stuck_blobs["cpu"], 1 << 20)
    for index, piece in enumerate(pieces[: len(pieces) // 2]):
        topic = f"edgefleet/v1/models/stuck/{first}/cpu/{index}"
        operator.publish(topic, piece).wait_for_publish(10)
    operator.publish(f"edgefleet/v1/devices/{device}/model/desired", stuck.wire()).wait_for_publish(
        10
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        s.get("name") == "stuck" and s["state"] == "downloading" for _, s in _states(watch, device)
    ):
        time.sleep(0.02)
    time.sleep(0.5)
    started = time.monotonic()
    publish_release(operator, latest, latest_blobs, [f"device:{device}"])
    operator.close()
    while time.monotonic() < deadline:
        mine = [(at, s) for at, s in _states(watch, device) if s.get("name") == "latest"]
        if any(s["state"] == "active" for _, s in mine):
            break
        time.sleep(0.02)
    mine = [(at, s) for at, s in _states(watch, device) if s.get("name") == "latest"]
    at = {str(s["state"]): at for at, s in reversed(mine)}
    if "active" not in at or "downloading" not in at or "verifying" not in at:
        print(f"convergence: release B never went active: {[s for _, s in mine]}")
        return
    own = at["verifying"] - at["downloading"]
    total = at["active"] - started
    print(
        f"desired changed mid-download: B active {total:.2f} s after its publish; its own "
        f"download {own:.2f} s (target: within download + 2 s = {own + 2:.2f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument(
        "--swaps", type=int, default=6, help="more rollouts to the first device for the swap gap"
    )
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto not found")
        return 0
    with tempfile.TemporaryDirectory() as name, local_broker(binary, Path(name)) as port:
        tmp = Path(name)
        private, public = generate_keys(tmp / "keys", "bench")
        watch = Watch(port, "edgefleet/v1/devices/#")
        names = [f"bench-{i:02d}" for i in range(args.agents)]
        # The single-device figures (download, swap gap) with that agent alone on the
        # machine; then the others join for the fleet figure.
        procs = start_agents(tmp, port, names[:1], public.read_text(), watch)
        try:
            versions = itertools.count(1)  # each release newer than the last
            first = roll(port, private, names[:1], next(versions), watch)
            report_first(port, names[0], watch, first)
            if FLOAT_MODEL.exists():  # a larger file: fixed costs weigh less
                version = next(versions)
                roll(port, private, names[:1], version, watch, FLOAT_MODEL)
                download_ratio(port, names[0], watch, version, FLOAT_MODEL.stat().st_size)
            swaps = [next(versions) for _ in range(args.swaps)]
            downloads = []
            size = MODEL.stat().st_size
            for version in swaps:
                roll(port, private, names[:1], version, watch)
                downloads.append(download_ratio(port, names[0], watch, version, size, quiet=True))
                time.sleep(5)  # results away from any swap, for the comparison
            if swaps:
                report_downloads(downloads, size)
                report_gaps(watch, names[0], swaps)
            procs += start_agents(tmp, port, names[1:], public.read_text(), watch, first=1)
            many = roll(port, private, names, next(versions), watch)
            print(f"{len(names)} agents: publish -> all active in {many:.2f} s")
            converge(port, private, names[0], watch, next(versions), next(versions))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(20)
            watch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
