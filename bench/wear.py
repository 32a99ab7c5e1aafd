"""SD-card wear: bytes the agent process writes, per hour (a benchmark: prints only).

    .venv/bin/python bench/wear.py [--seconds 60] [--fps 10] [--ack-mode broker] [--flush-after S]
                                   [--capture PER_HOUR]

Runs `edgefleet run` (synthetic 640x480 frames at ``--fps``, every result reported over MQTT,
metrics every 10 s, its state directory on this machine's disk, not a tmpfs: a tmpfs does no
block I/O and would read 0) against a private mosquitto, and reads the process's
``/proc/<pid>/io`` around three phases of ``--seconds`` each:

  1. link up, the broker acknowledging;
  2. link down (the broker stopped);
  3. link up again: the backlog replayed, then steady.

``write_bytes`` is what the process made the kernel send to the storage layer (pages it
dirtied: the SQLite file and its WAL, the model store, anything else), ``wchar`` the bytes its
write calls passed. Each is printed as MiB per hour. Target (issue 28): <= 10 MiB/hour of
write_bytes with the link up at 10 fps. ``--capture N`` turns data capture on (every frame a
trigger, at most N samples an hour, 1 s apart at least): what the samples add (issue 31).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgefleet.app.demo import find_mosquitto

MIB = 1024 * 1024


def io_counters(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value)
    return fields


def config_text(
    port: int, state: Path, fps: float, ack_mode: str, flush_after: float | None,
    capture: int | None = None,
) -> str:  # fmt: skip
    spool = f"    flush_after_s: {flush_after}\n" if flush_after is not None else ""
    kept = (
        f"capture: {{enabled: true, below_score: 1.0, min_interval_s: 1, per_hour: {capture}}}\n"
        if capture
        else ""
    )
    return kept + (
        "device: {id: wear-1}\n"
        f"source: {{type: synthetic, fps: {fps}, width: 640, height: 480}}\n"
        "delegate: {type: cpu, threads: 1}\n"
        "sinks: []\n"
        f"state_dir: {state}\n"
        "logging: {format: json, level: warning}\n"
        "fleet:\n"
        f"  url: mqtt://127.0.0.1:{port}\n"
        f"  ack_mode: {ack_mode}\n"
        "  reconnect_min_s: 0.2\n"
        "  reconnect_max_s: 1.0\n"
        "  metrics_interval_s: 10\n" + (f"  spool:\n{spool}" if spool else "")
    )


def phase(pid: int, seconds: float) -> dict[str, float]:
    before = io_counters(pid)
    time.sleep(seconds)
    after = io_counters(pid)
    per_hour = 3600.0 / seconds
    return {key: (after[key] - before[key]) * per_hour / MIB for key in ("write_bytes", "wchar")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--ack-mode", choices=["broker", "collector"], default="broker")
    parser.add_argument("--flush-after", type=float, default=None, help="fleet.spool.flush_after_s")
    parser.add_argument("--capture", type=int, default=None, metavar="PER_HOUR")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),  # noqa: S108 - a real disk, unlike /tmp on many machines
        help="on a real disk",
    )
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto not found", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="edgefleet-wear-", dir=args.dir))
    try:
        return run(binary, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Mosquitto:
    """A private mosquitto on one loopback port that can be stopped and started again."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"user root\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\nlog_dest none\nset_tcp_nodelay true\n"
        )
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def run(binary: str, work: Path, args: argparse.Namespace) -> int:
    broker = Mosquitto(binary, work)
    broker.start()
    config = work / "agent.yaml"
    config.write_text(
        config_text(
            broker.port, work / "state", args.fps, args.ack_mode, args.flush_after, args.capture
        )
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(work / "agent.log").open("wb"),
    )
    try:
        time.sleep(min(10.0, args.seconds / 3))  # model loaded, online, first metrics
        up = phase(agent.pid, args.seconds)
        broker.stop()
        down = phase(agent.pid, args.seconds)
        broker.start()
        back = phase(agent.pid, args.seconds)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
        broker.stop()
    print(
        f"edgefleet run, {args.fps:g} fps, ack mode {args.ack_mode}, flush_after_s "
        f"{args.flush_after if args.flush_after is not None else 'default'}, "
        f"{args.seconds:g} s per phase, state directory under {args.dir}, "
        f"capture {f'{args.capture}/h' if args.capture else 'off'}"
    )
    for name, figures in (("link up", up), ("link down", down), ("back up", back)):
        print(
            f"  {name:<10} write_bytes {figures['write_bytes']:8.1f} MiB/h   "
            f"wchar {figures['wchar']:8.1f} MiB/h"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
