"""Telemetry throughput: agent -> spool -> mosquitto -> collector (a benchmark: prints only).

    .venv/bin/python bench/telemetry.py [--results 20000] [--seconds 6]

Needs mosquitto (started here on a free loopback port). Prints:
  1. spool write cost per message (SQLite WAL, batched as the outbox thread does);
  2. sustained results/s from the link's queue through the spool and a local mosquitto into
     the collector's SQLite database, QoS 1, one result per message (per-frame reporting),
     in ``broker`` and ``collector`` ack modes;
  3. the loop ratio with MQTT reporting on: the agent's pipeline reporting every result
     against bare invoke(), in interleaved rounds (bench/pairs.py), with the default report
     policy, one result per message, and batches of ``--batch`` waiting up to 1 s.
Targets: >= 2000 results/s (issue 4); loop ratio >= 0.92 (issue 16).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
from pairs import Run, interleave, observed, ratio_text, timed

from edgefleet.app.demo import find_mosquitto, local_broker
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import load_classifier
from edgefleet.mqtt.fleetlink import link_settings
from edgefleet.mqtt.link import LinkSettings, MqttLink
from edgefleet.mqtt.outbox import Outbox
from edgefleet.mqtt.reporter import Reporter
from edgefleet.mqtt.settings import FleetConfig, ReportPolicy
from edgefleet.mqtt.spool import Spool
from edgefleet.runtime.pipeline import Pipeline
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource

RESULT = {
    "seq": 0,
    "boot_id": "",
    "ts": 0.0,
    "model": "efficientnet-lite0",
    "model_version": 0,
    "top": [
        {"label": "espresso", "index": 967, "score": 0.95312},
        {"label": "cup", "index": 968, "score": 0.01172},
        {"label": "consomme", "index": 925, "score": 0.00781},
        {"label": "eggnog", "index": 969, "score": 0.0039},
        {"label": "coffee mug", "index": 504, "score": 0.0039},
    ],
    "timings_ms": {
        "capture_wait": 0.4,
        "preprocess": 0.9,
        "inference": 6.1,
        "postprocess": 0.1,
        "total": 7.8,
    },
    "frame": 0,
}


def spool_cost(tmp: Path, count: int = 20000, batch: int = 50) -> float:
    """Per message, written to disk at once (``flush_after_s: 0``, the most a spool writes)."""
    outbox = Outbox(Spool(tmp / "cost.sqlite"), "boot", flush_after_s=0)
    payload = json.dumps({"results": [RESULT]}).encode()
    started = time.perf_counter()
    for start in range(0, count, batch):
        outbox.put_many(
            [(outbox.next_seq(), "t", payload, 1) for _ in range(min(batch, count - start))]
        )
        outbox.flush()
    elapsed = time.perf_counter() - started
    outbox.close()
    return elapsed / count * 1e6


def _stored(db: Path, device: str) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=5)
    try:
        row = conn.execute("SELECT count(*) FROM messages WHERE device = ?", (device,)).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def throughput(tmp: Path, port: int, count: int, ack_mode: str) -> tuple[float, int]:
    # The collector runs in its own process, as it would on its own machine.
    db = tmp / f"fleet-{ack_mode}.db"
    collector = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "collect",
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--db",
            f"sqlite:///{db}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    device = f"bench-{ack_mode}"
    boot = uuid.uuid4().hex
    link = MqttLink(
        LinkSettings(
            url=f"mqtt://127.0.0.1:{port}",
            device=device,
            groups=[],
            prefix="edgefleet/v1",
            boot_id=boot,
            spool_path=tmp / f"spool-{ack_mode}.sqlite",
            ack_mode=ack_mode,
            max_inflight=1000,
        ),
        birth=dict,
    )
    link.start()
    link.online.wait(10)
    started = time.perf_counter()
    for seq in range(1, count + 1):
        link.enqueue("predictions", {"results": [{**RESULT, "seq": seq, "boot_id": boot}]})
    deadline = time.monotonic() + 120
    while _stored(db, device) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    stored = _stored(db, device)
    spool_left = link.outbox.depth()
    link.stop()
    collector.terminate()
    collector.wait(10)
    if ack_mode == "collector":
        print(f"  (collector mode: {spool_left} messages still unconfirmed in the spool)")
    return stored / elapsed, stored


def loop_ratio(
    tmp: Path, port: int, seconds: float, threads: int, rounds: int, policy: ReportPolicy
) -> str:
    """Bare invoke against the pipeline reporting every result over MQTT, interleaved."""
    bare_clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    buf = bare_clf.preprocessor.new_buffer()
    buf[...] = 127
    bare_clf.set_input(buf)
    clf = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=threads)))
    clf.classify(np.zeros((480, 640, 3), dtype=np.uint8))

    def invoke() -> int:
        bare_clf.interpreter.invoke()
        return 1

    def reporting() -> Run:
        cfg = FleetConfig(
            url=f"mqtt://127.0.0.1:{port}",
            metrics_interval_s=1,
            report=policy,
        )
        source = SyntheticSource(SyntheticConfig(fps=None, width=640, height=480))
        link = MqttLink(link_settings(cfg, "bench-loop", [], uuid.uuid4().hex, tmp), birth=dict)
        sink = Reporter(link, cfg.report)
        pipeline = Pipeline(source, clf, [sink])
        link.start()
        link.online.wait(10)
        pipeline.start()
        run = observed(lambda: pipeline.stats.inferences, seconds)
        pipeline.stop()
        sink.close()
        link.stop()
        return run

    def silent() -> Run:
        """The same loop reporting nowhere: what reporting adds is the difference."""
        source = SyntheticSource(SyntheticConfig(fps=None, width=640, height=480))
        pipeline = Pipeline(source, clf, [])
        pipeline.start()
        run = observed(lambda: pipeline.stats.inferences, seconds)
        pipeline.stop()
        return run

    series = interleave(
        {"bare": lambda: timed(invoke, seconds), "loop": silent, "mqtt": reporting}, rounds
    )
    bare, loop, mqtt = series["bare"], series["loop"], series["mqtt"]
    return (
        f"loop with MQTT reporting (every result, batch_max {policy.batch_max}, batch_ms "
        f"{policy.batch_ms}, QoS 1, spooled): "
        f"{mqtt.rate:.1f}/s vs bare "
        f"invoke {bare.rate:.1f}/s, {ratio_text('ratio', mqtt, bare)}; vs the loop "
        f"reporting nowhere {loop.rate:.1f}/s, {ratio_text('ratio', mqtt, loop)}; CPU per "
        f"frame {mqtt.cpu_ms:.2f} vs {bare.cpu_ms:.2f} (bare), {loop.cpu_ms:.2f} ms (loop) "
        f"(threads={threads})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=10, help="results per message, 2nd run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto not found; install it to run this benchmark")
        return 0
    extra = "max_queued_messages 1000000\nmax_inflight_messages 1000\n"
    with tempfile.TemporaryDirectory() as name, local_broker(binary, Path(name), extra) as port:
        tmp = Path(name)
        cost = spool_cost(tmp)
        print(f"spool write: {cost:.1f} us per message (batches of 50, WAL, synchronous=NORMAL)")
        for mode in ("broker", "collector"):
            rate, stored = throughput(tmp, port, args.results, mode)
            print(
                f"{mode:9} ack mode: {rate:8.0f} results/s end to end "
                f"({stored}/{args.results} stored by the collector)"
            )
        policies = [
            ReportPolicy(),  # the default: what came since the outbox's last turn
            ReportPolicy(batch_max=1),  # one result per message (the default before)
            ReportPolicy(batch_max=args.batch, batch_ms=1000),
        ]
        for policy in policies:
            print(loop_ratio(tmp, port, args.seconds, args.threads, args.rounds, policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
