"""Collector ingest from thousands of simulated devices (a benchmark: prints, never fails).

    .venv/bin/python bench/fleet.py [--devices 2000,5000] [--seconds 60] [--pg URL]

Then a rollout in waves (``--rollout`` devices, ``--downloaders`` of them really fetching and
checking the 5.5 MB factory model's chunks): time per wave and the broker's peak RSS.

For each fleet size, a private mosquitto, ``edgefleet collect`` (one, or two sharing an
MQTT 5 shared subscription into PostgreSQL) and ``edgefleet simulate`` (one process for all
the devices; predictions at 0.2 messages/s each, metrics every 60 s) run as separate
processes, as deployed. After the devices are connected and a warm-up, the run measures
over ``--seconds``: messages stored per second (rows in the database), the simulator's ack
latency percentiles (publish to the collector's ack covering it), and each process's CPU
(share of one core) and peak RSS, read from /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgefleet.app.demo import find_mosquitto

TICK = os.sysconf("SC_CLK_TCK")
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefleet", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A child process and its CPU seconds at the start of the measured window."""

    name: str
    popen: subprocess.Popen[bytes]
    cpu_start: float = 0.0

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


@contextlib.contextmanager
def listening(
    argv: list[str], port: int, name: str, env: dict[str, str] | None = None
) -> Iterator[Proc]:
    """A broker process, once it accepts connections on ``port``; terminated afterwards."""
    popen = subprocess.Popen(argv, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        time.sleep(0.05)
    try:
        yield Proc(name, popen)
    finally:
        popen.terminate()
        popen.wait(20)


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[tuple[int, Proc]]:
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto not found")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest none\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
    )
    with listening([binary, "-c", str(conf)], port, "mosquitto") as proc:
        yield port, proc


def simulator(url: str, devices: int, out: IO[bytes], *extra: str) -> subprocess.Popen[bytes]:
    """``edgefleet simulate`` in its own process, its JSON summary into ``out``."""
    return subprocess.Popen(
        cli(
            "simulate", "--devices", str(devices), "--broker", url, "--report-every", "3600", *extra
        ),
        stdout=out,
        stderr=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def nats(workdir: Path) -> Iterator[tuple[int, Proc]]:
    """One nats-server with JetStream and its MQTT listener (MQTT 3.1.1 only)."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).exists():
        raise SystemExit("nats-server not found")
    port = free_port()
    store = workdir / f"jetstream-{port}"
    conf = workdir / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{free_port()}\nserver_name: bench\n"
        f"jetstream {{ store_dir: {store} }}\nmqtt {{ listen: 127.0.0.1:{port} }}\n"
    )
    with listening([binary, "-c", str(conf)], port, "nats-server") as proc:
        yield port, proc


@contextlib.contextmanager
def nats_cluster(workdir: Path) -> Iterator[tuple[str, list[Proc]]]:
    """Three nats-server nodes from the shipped configs/nats/cluster-node.conf; their MQTT
    URLs as one comma list (the simulator spreads its devices over them)."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    conf = Path(__file__).resolve().parents[1] / "configs" / "nats" / "cluster-node.conf"
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]  # client, route, mqtt
    with contextlib.ExitStack() as stack:
        nodes = []
        for i, (client, route, mqtt_port) in enumerate(ports):
            peers = [f"nats-route://127.0.0.1:{p[1]}" for j, p in enumerate(ports) if j != i]
            env = dict(
                os.environ,
                NODE=f"n{i}",
                CLIENT_LISTEN=f"127.0.0.1:{client}",
                CLUSTER_LISTEN=f"127.0.0.1:{route}",
                MQTT_LISTEN=f"127.0.0.1:{mqtt_port}",
                STORE=str(workdir / f"jetstream-n{i}"),
                ROUTE_1=peers[0],
                ROUTE_2=peers[1],
            )
            argv = [binary, "-c", str(conf)]
            nodes.append(stack.enter_context(listening(argv, mqtt_port, f"nats-n{i}", env)))
        yield ",".join(f"mqtt://127.0.0.1:{p[2]}" for p in ports), nodes


@contextlib.contextmanager
def broker_of(kind: str, workdir: Path) -> Iterator[tuple[str, list[Proc]]]:
    """``mosquitto``, ``nats`` (one node) or ``nats3`` (the 3-node cluster): URL(s), processes."""
    if kind == "nats3":
        with nats_cluster(workdir) as (urls, nodes):
            yield urls, nodes
        return
    with (nats if kind == "nats" else mosquitto)(workdir) as (port, proc):
        yield f"mqtt://127.0.0.1:{port}", [proc]


def stored(db: str) -> int:
    if db.startswith("sqlite:///"):
        with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    import psycopg

    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
        return int(row[0]) if row else 0


def bytes_per_message(db: str) -> float:
    """Database size (tables and indexes) per stored message."""
    rows = stored(db)
    if db.startswith("sqlite:///"):
        size = Path(db.removeprefix("sqlite:///")).stat().st_size
    else:
        import psycopg

        with psycopg.connect(db) as conn:
            row = conn.execute(
                "SELECT sum(pg_total_relation_size(c)) FROM unnest(ARRAY["
                "'messages', 'predictions', 'acks', 'device_status']::regclass[]) AS c"
            ).fetchone()
            size = int(row[0]) if row and row[0] else 0
    return size / rows if rows else 0.0


def reset_pg(db: str) -> None:
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        for table in ("messages", "predictions", "acks", "device_status"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def one_run(
    devices: int,
    db: str,
    collectors: int,
    seconds: float,
    workdir: Path,
    kind: str = "mosquitto",
    settle_s: float = 10.0,
) -> dict[str, Any]:
    if db.startswith("postgresql"):
        reset_pg(db)
    # NATS speaks MQTT 3.1.1 only and has no shared subscriptions.
    on_nats = kind != "mosquitto"
    v311 = ["--protocol", "3.1.1"] if on_nats else []
    with broker_of(kind, workdir) as (url, brokers):
        procs = list(brokers)
        for i in range(collectors):
            extra = [*v311, "--share-group", ""] if on_nats else []
            popen = subprocess.Popen(
                cli("collect", "--broker", url, "--db", db, *extra), stdout=subprocess.DEVNULL
            )
            procs.append(Proc(f"collector-{i + 1}", popen))
        time.sleep(2)
        sim_out = workdir / "simulate.json"
        connect_s = devices / 500 + 5
        warm = connect_s + settle_s
        with sim_out.open("wb") as out:
            sim = simulator(
                url, devices, out, "--rate", "0.2", "--metrics-interval", "60",
                "--duration", str(warm + seconds + 2), "--ack-from", str(warm), *v311,
            )  # fmt: skip
            procs.append(Proc("simulator", sim))
            time.sleep(warm)
            for proc in procs:
                proc.cpu_start = proc.cpu()
            rows_start, started = stored(db), time.monotonic()
            time.sleep(seconds)
            rows_end, elapsed = stored(db), time.monotonic() - started
            usage = {p.name: ((p.cpu() - p.cpu_start) / elapsed, p.peak_rss_mib()) for p in procs}
            sim.wait(warm + seconds + 120)
        summary = json.loads(sim_out.read_text())
        for proc in procs[len(brokers) : -1]:
            proc.popen.send_signal(signal.SIGTERM)
            proc.popen.wait(30)
        per_message = bytes_per_message(db)
    return {
        "broker": "+".join(b.name for b in brokers),
        "bytes_per_message": per_message,
        "devices": devices,
        "db": db.split(":", 1)[0],
        "collectors": collectors,
        "stored_per_s": (rows_end - rows_start) / elapsed,
        "offered_per_s": devices * (0.2 + 1 / 60),
        "ack_ms": summary["ack_latency_ms"],
        "connected": summary["connects"],
        "unacked_at_end": summary["unacked"],
        "usage": usage,
    }


def rollout_run(devices: int, downloaders: int, waves: str, workdir: Path) -> None:
    """A release of the factory model (5.5 MB) in waves to a simulated group."""
    from edgefleet.factory import factory_model_path
    from edgefleet.operator.releases import Broker, build_release
    from edgefleet.operator.waves import run_waves
    from edgefleet.rollout.release import generate_keys

    key, _ = generate_keys(workdir, "bench")
    manifest, blobs = build_release(
        {"cpu": factory_model_path()}, "bench-model", 1, key, "bench", 3600
    )
    with mosquitto(workdir) as (port, broker):
        url = f"mqtt://127.0.0.1:{port}"
        sim_out = workdir / "rollout.json"
        with sim_out.open("wb") as out:
            sim = simulator(
                url, devices, out, "--download-share", str(downloaders / devices),
                "--rollout-step", "0.5", "--groups", "bench",
            )  # fmt: skip
            time.sleep(devices / 500 + 8)
            rss_before = Proc("mosquitto", broker.popen).peak_rss_mib()
            operator = Broker(url)
            started = time.monotonic()
            marks: list[str] = []

            def report(line: str) -> None:
                marks.append(f"{time.monotonic() - started:6.1f} s  {line}")

            ok = run_waves(
                operator,
                manifest,
                blobs,
                "bench",
                [float(w) for w in waves.split(",")],
                0.05,
                report=report,
            )
            total = time.monotonic() - started
            operator.close()
            rss_after = Proc("mosquitto", broker.popen).peak_rss_mib()
            sim.send_signal(signal.SIGTERM)
            sim.wait(120)
        summary = json.loads(sim_out.read_text())
    print(
        f"rollout to {devices} simulated devices ({downloaders} really downloading "
        f"{manifest.variants[0].size:,} B in {len(manifest.variants[0].chunks)} chunks), "
        f"waves {waves}: {'completed' if ok else 'halted'} in {total:.1f} s"
    )
    for line in marks:
        print(f"  {line}")
    print(
        f"  mosquitto peak RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after; "
        f"downloaded and checked {summary['downloaded']}, chunk errors "
        f"{summary['chunk_errors']}, states {summary['rollout_states']}"
    )


def show(result: dict[str, Any]) -> None:
    ack = result["ack_ms"]
    usage = ", ".join(
        f"{k} {cpu:.0%} CPU {rss:.0f} MiB" for k, (cpu, rss) in result["usage"].items()
    )
    print(
        f"{result['devices']:>5} devices, {result['broker']}, {result['db']}, "
        f"{result['collectors']} collector(s): "
        f"stored {result['stored_per_s']:.0f}/s of {result['offered_per_s']:.0f}/s offered; "
        f"ack p50 {ack.get('p50', 0):.0f} ms p99 {ack.get('p99', 0):.0f} ms; "
        f"connected {result['connected']}; {result['bytes_per_message']:.0f} B/message "
        f"stored; {usage}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="2000,5000", help="comma-separated fleet sizes")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per run")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL URL ('' to skip)")
    parser.add_argument(
        "--runs", default="sqlite,pg,pg2", help="of sqlite, pg (one collector), pg2 (two)"
    )
    parser.add_argument(
        "--rollout", type=int, default=1000, help="devices of the wave run (0: skip)"
    )
    parser.add_argument("--downloaders", type=int, default=50, help="of them really downloading")
    parser.add_argument("--waves", default="10,50,100")
    parser.add_argument(
        "--nats", type=int, default=0, help="devices of a mosquitto vs NATS run (0: skip)"
    )
    parser.add_argument(
        "--nats-cluster",
        action="store_true",
        help="add the 3-node NATS cluster (configs/nats/cluster-node.conf) to the --nats run",
    )
    args = parser.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {os.cpu_count()} cores, {cpu}; {time.strftime('%Y-%m-%d')}; every process "
        "on this one machine (CPU is the share of one core)"
    )
    sizes = [int(n) for n in args.devices.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-fleet-") as tmp:
        chosen = set(args.runs.split(","))
        for n in sizes:
            runs = [(f"sqlite:///{tmp}/fleet-{n}.db", 1)] if "sqlite" in chosen else []
            if args.pg:
                runs += [(args.pg, k) for k, name in ((1, "pg"), (2, "pg2")) if name in chosen]
            for db, collectors in runs:
                show(one_run(n, db, collectors, args.seconds, Path(tmp)))
        if args.nats:
            # Side by side: the same load on mosquitto and on one NATS node, a longer settle
            # for both (NATS creates a JetStream consumer per MQTT subscription).
            kinds = ["mosquitto", "nats", *(["nats3"] if args.nats_cluster else [])]
            for kind in kinds:
                db = f"sqlite:///{tmp}/side-{args.nats}-{kind}.db"
                show(one_run(args.nats, db, 1, args.seconds, Path(tmp), kind, settle_s=45))
        if args.rollout:
            rollout_run(args.rollout, args.downloaders, args.waves, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
