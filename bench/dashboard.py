"""Dashboard under a simulated fleet (a benchmark: prints only).

    .venv/bin/python bench/dashboard.py [--devices 2000] [--interval 10] [--seconds 40]

Starts a private mosquitto and ``edgefleet collect --http`` (its own process, as deployed),
then simulates ``--devices`` devices from this process: each publishes a retained ``online``
status once and a metrics message every ``--interval`` seconds (spread evenly, with the real
fields: spool place, latency histogram, health). While that runs it measures, side by side:
  1. ``GET /api/fleet`` (the whole fleet page's data) latency p50/p95/max;
  2. ``GET /metrics`` (one Prometheus scrape) latency p50/p95/max and size;
  3. live updates: ``--pages`` server-sent-event streams read in parallel: updates per
     second, bytes per update, and the lag from a device's metrics publish to the row
     reaching the page (p50/p95);
  4. the collector process: CPU share and peak RSS, messages stored.
Targets (issue 13): fleet API p95 <= 100 ms and scrape <= 500 ms at 2,000 devices, pages keep
up (lag bounded by the 1 s update tick plus processing, no page dropped).

The simulated devices are topics, not connections (a few MQTT clients publish for all of
them): the broker's per-connection cost is the fleet simulator's subject (issue 15).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.app.demo import find_mosquitto, local_broker
from edgefleet.protocol import LATENCY_BUCKETS_MS, FleetTopics

PUBLISHERS = 4


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _metrics(device: str, mseq: int) -> bytes:
    counts, total = [], 0
    for bound in (*LATENCY_BUCKETS_MS, float("inf")):
        total += 3 if bound >= 5 else 0
        counts.append(total)
    body: dict[str, Any] = {
        "device": device, "boot_id": f"boot-{device}", "mseq": mseq, "floor": 1,
        "ts": time.time(), "interval_s": 10, "fps": 14.9, "inferences": 100 * mseq,
        "dropped_frames": mseq, "errors": 0, "paused": False,
        "latency_ms": {"total": {"p50": 6.1, "p90": 6.9, "p99": 8.2, "max": 11.0},
                       "inference": {"p50": 5.0, "p90": 5.5, "p99": 6.0, "max": 9.0}},
        "latency_window": 1024, "latency_buckets_ms": list(LATENCY_BUCKETS_MS),
        "latency_hist": {"total": {"counts": counts, "sum_ms": 400.0},
                         "inference": {"counts": counts, "sum_ms": 300.0}},
        "delegate": {"type": "cpu", "threads": 2}, "spool": {"depth": 0, "bytes": 0, "dropped": 0},
        "health": {"cpu_temp_c": 51.2, "load": [0.5, 0.4, 0.3],
                   "throttled": {"now": {"throttled": False}}},
    }  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


def _status(device: str) -> bytes:
    body = {
        "state": "online", "device": device, "boot_id": f"boot-{device}", "ts": time.time(),
        "agent_version": "0.1.0", "groups": [f"site-{hash(device) % 20}"],
        "model": {"name": "efficientnet-lite0", "version": 3, "sha256": "0" * 64},
        "delegate": {"type": "cpu"},
    }  # fmt: skip
    return json.dumps(body).encode()


class Simulator:
    def __init__(self, port: int, devices: int, interval_s: float) -> None:
        self.names = [f"sim-{i:05d}" for i in range(devices)]
        self.interval_s = interval_s
        self.topics = FleetTopics()
        self.clients = []
        for index in range(PUBLISHERS):
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-pub-{index}")
            client.max_queued_messages_set(0)
            client.connect("127.0.0.1", port)
            client.loop_start()
            self.clients.append(client)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def announce(self) -> None:
        for index, name in enumerate(self.names):
            client = self.clients[index % PUBLISHERS]
            client.publish(self.topics.device(name).status, _status(name), qos=1, retain=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        step = self.interval_s / len(self.names)
        mseq = dict.fromkeys(self.names, 0)
        start = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            name = self.names[tick % len(self.names)]
            mseq[name] += 1
            client = self.clients[tick % PUBLISHERS]
            client.publish(self.topics.device(name).metrics, _metrics(name, mseq[name]), qos=1)
            self.sent += 1
            tick += 1
            delay = start + tick * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


class Page(threading.Thread):
    """One live page: reads the event stream, notes update sizes and publish-to-page lag."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.updates = 0
        self.bytes = 0
        self.lags: list[float] = []
        self.closed = False
        self.stop_at = float("inf")

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/api/events")
        response = conn.getresponse()
        data = b""
        for line in response:
            if time.monotonic() > self.stop_at:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            self.bytes += len(data)
            body = json.loads(data)
            if "devices" not in body:
                continue
            self.updates += 1
            now = time.time()
            if not body.get("full"):
                self.lags.extend(now - r["metrics_ts"] for r in body["devices"] if r["metrics_ts"])
        else:
            self.closed = True
        conn.close()


def _timed_get(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our own server
        size = len(response.read())
    return time.perf_counter() - start, size


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--pages", type=int, default=5)
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto not found")
        return 1
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_broker(binary, Path(tmp), "max_queued_messages 100000\n") as broker_port,
    ):
        http_port = _free_port()
        collector = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "collect", "--broker",
             f"mqtt://127.0.0.1:{broker_port}", "--db", f"sqlite:///{tmp}/fleet.db",
             "--http", f"127.0.0.1:{http_port}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{http_port}"
        try:
            return _measure(args, broker_port, base, http_port, collector)
        finally:
            collector.terminate()
            out, _ = collector.communicate(timeout=30)
            print(f"collector: {out.strip().splitlines()[-1]}")


def _measure(
    args: argparse.Namespace,
    broker_port: int,
    base: str,
    http_port: int,
    collector: subprocess.Popen[str],
) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            _timed_get(base + "/healthz")
            break
        except OSError:
            time.sleep(0.2)
    sim = Simulator(broker_port, args.devices, args.interval)
    sim.announce()
    sim.start()
    # one full metrics round first: every device has figures before anything is timed
    time.sleep(args.interval + 2)
    cpu_start, wall_start = _proc_cpu_s(collector.pid), time.monotonic()
    pages = [Page(http_port) for _ in range(args.pages)]
    for page in pages:
        page.start()
    api: list[float] = []
    scrapes: list[float] = []
    sizes = {}
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        took, sizes["fleet"] = _timed_get(base + "/api/fleet")
        api.append(took)
        if len(api) % 5 == 0:
            took, sizes["metrics"] = _timed_get(base + "/metrics")
            scrapes.append(took)
        time.sleep(0.5)
    cpu = (_proc_cpu_s(collector.pid) - cpu_start) / (time.monotonic() - wall_start)
    rss = _peak_rss_mb(collector.pid)
    for page in pages:
        page.stop_at = 0
    sim.stop()
    fleet = json.loads(urllib.request.urlopen(base + "/api/fleet", timeout=30).read())  # noqa: S310
    lags = [lag for page in pages for lag in page.lags]
    rate = args.devices / args.interval
    print(f"fleet: {args.devices} simulated devices, metrics every {args.interval:g} s "
          f"({rate:.0f} msg/s), {args.seconds:g} s measured, {args.pages} live pages")  # fmt: skip
    print(f"  devices on the page: {fleet['summary']['devices']} "
          f"(by state {fleet['summary']['by_state']})")  # fmt: skip
    print(f"  GET /api/fleet  p50 {statistics.median(api) * 1000:6.1f} ms  "
          f"p95 {_pct(api, 0.95) * 1000:6.1f} ms  max {max(api) * 1000:6.1f} ms  "
          f"({sizes['fleet'] / 1e6:.2f} MB, n={len(api)})")  # fmt: skip
    print(f"  GET /metrics    p50 {statistics.median(scrapes) * 1000:6.1f} ms  "
          f"p95 {_pct(scrapes, 0.95) * 1000:6.1f} ms  max {max(scrapes) * 1000:6.1f} ms  "
          f"({sizes['metrics'] / 1e6:.2f} MB, n={len(scrapes)})")  # fmt: skip
    updates = [page.updates for page in pages]
    per_update = sum(p.bytes for p in pages) / max(1, sum(updates))
    print(f"  live pages: {min(updates)}-{max(updates)} updates each "
          f"({min(updates) / args.seconds:.2f}/s), {per_update / 1e3:.1f} kB per update, "
          f"closed by the server: {sum(p.closed for p in pages)}")  # fmt: skip
    if lags:
        print(f"  publish -> page lag p50 {statistics.median(lags):.2f} s  "
              f"p95 {_pct(lags, 0.95):.2f} s  max {max(lags):.2f} s  "
              f"(rows: {len(lags)})")  # fmt: skip
    print(f"  collector process: CPU {cpu * 100:.0f}% of one core, peak RSS {rss:.0f} MB, "
          f"simulator sent {sim.sent} metrics")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
