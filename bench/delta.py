"""Delta rollouts: bytes on the wire per release, and time to active (a benchmark: prints).

    .venv/bin/python bench/delta.py [--agents 20] [--work build/bench-delta]

Makes its models once under ``--work`` (reused when there): lite0 and lite1 exported by
tools/export_models.py, and three head retrains by ``edgefleet models train`` on seeded
synthetic photo folders (tools/synthetic_domains.py, "shapes"), each with the int8 file
calibrated on the training photos (``data``) and on the base model's photos (``base``).

1. Wire bytes: for each case, what a device holding the old model (and the factory model)
   fetches of the new one, through the agent's own download code (``rollout.download``):
   fetched / size, and the whole cost (chunk payloads + MQTT PUBLISH headers + manifest)
   against today's fixed 128 KiB chunks of the whole file (issue 32: a head retrain
   <= 15%, an unrelated model <= 1.02).
2. Time to active on a local mosquitto, each device behind its own ``--link-mbit`` link (a
   user-space proxy, tests/chaos.py), for 1 agent and then ``--agents`` agents, all serving
   retrain 1: retrain 2 published in fixed chunks (the whole file), then retrain 3 in
   content-defined chunks (a delta from retrain 2), side by side in one run; timed from the
   desired state's publish (chunks already retained) to the last device active.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout import Watch, active_count, start_agents

from edgefleet.app.demo import find_mosquitto, local_broker
from edgefleet.factory import factory_model_path
from edgefleet.operator.releases import Broker, build_release, desired_topic, publish_release
from edgefleet.protocol import DEFAULT_PREFIX, FleetTopics
from edgefleet.rollout.chunks import LocalChunks
from edgefleet.rollout.download import Download
from edgefleet.rollout.release import DEFAULT_CHUNK, generate_keys
from tests.chaos import ChaosProxy  # a TCP proxy of our own: here, a slow link per device

REPO = Path(__file__).resolve().parents[1]
TOPICS = FleetTopics()
PUBLISH_HEADER = 5  # fixed header, remaining length, packet id: about, per chunk (QoS 1)


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def make_models(work: Path) -> dict[str, Path]:
    """Every file the cases need, made once."""
    base = work / "base"
    if not (base / "efficientnet-lite1-int8.tflite").exists():
        print("exporting lite0 fp32/int8 and lite1 int8 ...", flush=True)
        _run("tools/export_models.py", "--out", str(base), "lite0-fp32", "lite0-int8", "lite1-int8")
    files = {
        "lite0-fp32": base / "efficientnet-lite0-fp32.tflite",
        "lite0-int8": base / "efficientnet-lite0-int8.tflite",
        "lite1-int8": base / "efficientnet-lite1-int8.tflite",
    }
    for draw in (1, 2, 3):
        data = work / f"photos-{draw}"
        if not data.exists():
            _run("tools/synthetic_domains.py", "--domain", "shapes", "--seed", str(draw), str(data))
        for calibration in ("data", "base"):
            out = work / f"retrain-{draw}-{calibration}"
            if not (out / "shapes-int8.tflite").exists():
                print(f"training retrain {draw} ({calibration} calibration) ...", flush=True)
                _run(
                    "-m", "edgefleet", "models", "train", str(data / "shapes"), "-o", str(out),
                    "--name", "shapes", "--force", "--calibration", calibration,
                )  # fmt: skip
            files[f"retrain{draw}-fp32"] = out / "shapes-fp32.tflite"
            files[f"retrain{draw}-int8-{calibration}"] = out / "shapes-int8.tflite"
    return files


def wire_cost(old: Path, new: Path, key: Path, work: Path) -> tuple[int, int, float, float]:
    """(size, fetched, fetched / size, whole cost / today's) for a device holding ``old``."""
    delta, _ = build_release({"cpu": new}, "bench", 2, key, "bench", 3600)
    fixed, _ = build_release({"cpu": new}, "bench", 2, key, "bench", 3600, DEFAULT_CHUNK)
    variant = delta.variants[0]
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        download = Download.open(Path(tmp), "d", delta, variant, TOPICS)
        download.copy_local(LocalChunks(), [old, factory_model_path()])
        missing = [s for s in download.spans if s.index not in download.have]
        download.close()
    unique = {s.sha256: s.length for s in missing}  # one message per missing hash
    fetched = sum(unique.values())
    topic = len(TOPICS.shared_chunk("0" * 64))
    cost = fetched + len(unique) * (topic + PUBLISH_HEADER) + len(delta.wire())
    fixed_topic = len(TOPICS.chunk("bench", 2, "cpu", 999))
    today = variant.size + len(fixed.variants[0].chunks) * (fixed_topic + PUBLISH_HEADER)
    today += len(fixed.wire())
    return variant.size, fetched, fetched / variant.size, cost / today


def report_wire(files: dict[str, Path], key: Path, work: Path) -> None:
    cases = [
        ("same model rebuilt (lite0 fp32)", REPO / "models" / "efficientnet-lite0-fp32.tflite",
         files["lite0-fp32"]),
        ("pretrained -> retrain, fp32", files["lite0-fp32"], files["retrain1-fp32"]),
        ("retrain -> retrain, fp32", files["retrain1-fp32"], files["retrain2-fp32"]),
        ("pretrained -> retrain, int8 (data calibration)", files["lite0-int8"],
         files["retrain1-int8-data"]),
        ("retrain -> retrain, int8 (data calibration)", files["retrain1-int8-data"],
         files["retrain2-int8-data"]),
        ("pretrained -> retrain, int8 (base calibration)", files["lite0-int8"],
         files["retrain1-int8-base"]),
        ("retrain -> retrain, int8 (base calibration)", files["retrain1-int8-base"],
         files["retrain2-int8-base"]),
        ("int8 -> fp32 of the same network", files["lite0-int8"], files["lite0-fp32"]),
        ("unrelated model (lite0 -> lite1 int8)", files["lite0-int8"], files["lite1-int8"]),
    ]  # fmt: skip
    print(f"{'case':50} {'size MB':>8} {'fetched':>9} {'fetched/size':>12} {'cost/today':>10}")
    for name, old, new in cases:
        size, fetched, share, ratio = wire_cost(old, new, key, work)
        print(f"{name:50} {size / 1e6:8.2f} {fetched / 1e6:8.3f}M {share:12.3f} {ratio:10.3f}")


def timed_roll(port: int, key: Path, devices: list[str], version: int, model: Path,
               watch: Watch, chunk_size: int | None) -> float:  # fmt: skip
    manifest, blobs = build_release(
        {"cpu": model}, "bench", version, key, "bench", 3600, chunk_size=chunk_size
    )
    operator = Broker(f"mqtt://127.0.0.1:{port}")
    publish_release(operator, manifest, blobs, [])  # the chunks and the index, no target yet
    started = time.monotonic()  # from the desired state on: the devices' own time
    infos = [
        operator.publish(desired_topic(DEFAULT_PREFIX, f"device:{device}"), manifest.wire())
        for device in devices
    ]
    for info in infos:
        info.wait_for_publish(30)
    operator.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = active_count(watch, manifest.rollout_id)
        if len(done) == len(devices):
            return max(done.values()) - started
        time.sleep(0.05)
    return float("nan")


def report_times(files: dict[str, Path], agents: int, mbit_s: float, work: Path) -> None:
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto not found: no timing")
        return
    with tempfile.TemporaryDirectory(dir=work) as name, local_broker(binary, Path(name)) as port:
        tmp = Path(name)
        private, public = generate_keys(tmp / "keys", "bench")
        watch = Watch(port, "edgefleet/v1/devices/#")
        names = [f"bench-{i:02d}" for i in range(agents)]
        link = ChaosProxy(port).start()  # the devices' links: each connection at the cap
        link.rate_bytes_s = mbit_s * 1e6 / 8
        print(f"devices reach the broker through {mbit_s:g} Mbit/s each (a user-space proxy)")
        procs = start_agents(tmp, link.port, names[:1], public.read_text(), watch)
        version = 1
        try:
            for group in (names[:1], names):
                if len(group) > 1:
                    procs += start_agents(tmp, link.port, names[1:], public.read_text(), watch, 1)
                timed_roll(port, private, group, version, files["retrain1-fp32"], watch, None)
                full = timed_roll(
                    port, private, group, version + 1, files["retrain2-fp32"], watch,
                    DEFAULT_CHUNK,
                )  # fmt: skip
                delta = timed_roll(
                    port, private, group, version + 2, files["retrain3-fp32"], watch, None
                )
                version += 3
                print(
                    f"{len(group):3} agent(s), fp32 retrain "
                    f"({files['retrain3-fp32'].stat().st_size / 1e6:.1f} MB): publish -> all "
                    f"active {full:.2f} s whole file, {delta:.2f} s delta"
                )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(20)
            watch.close()
            link.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument(
        "--link-mbit", type=float, default=8.0, help="each device's link to the broker, Mbit/s"
    )
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-delta")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = make_models(args.work)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        key, _ = generate_keys(Path(tmp), "bench")
        report_wire(files, key, args.work)
    report_times(files, args.agents, args.link_mbit, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
