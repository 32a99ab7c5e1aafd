"""``edgefleet simulate``: N virtual devices on the real protocol (``fleet.simulate``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

import edgefleet.cli.args as argtypes
from edgefleet.cli.login import add_login_arguments, login_from
from edgefleet.protocol import DEFAULT_PREFIX

if TYPE_CHECKING:
    from argparse import _SubParsersAction as Subparsers

    from edgefleet.simulator import Simulator


def _line(sim: Simulator) -> None:
    summary = sim.summary()
    ack = summary["ack_latency_ms"]
    print(
        f"connected {summary['connected']}/{summary['devices']}, published "
        f"{sum(summary['published'].values())}, acked {summary['acked']} "
        f"(p99 {ack.get('p99', '-')} ms), unacked {summary['unacked']}, "
        f"commands {summary['commands']}, rollouts {summary['rollout_states']}",
        file=sys.stderr,
        flush=True,
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from edgefleet.simulator import Simulator, settings_from

    login = login_from(args)
    settings = settings_from(
        args.broker,
        devices=args.devices,
        prefix=args.prefix,
        id_prefix=args.id_prefix,
        groups=tuple(g for g in args.groups.split(",") if g),
        rate=args.rate,
        results_per_message=args.results_per_message,
        metrics_interval_s=args.metrics_interval,
        download_share=args.download_share,
        fail_share=args.fail_share,
        rollout_step_s=args.rollout_step,
        connect_rate=args.connect_rate,
        mqtt5=args.protocol == "5",
        seed=args.seed,
        username=login.username,
        password=login.password,
        ca=str(login.ca) if login.ca else None,
        ack_from_s=args.ack_from,
    )
    sim = Simulator(settings)
    stop = {"now": False}

    def finish(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    sim.run(args.duration, _line, args.report_every, should_stop=lambda: stop["now"])
    sim.stop()
    print(json.dumps(sim.summary(), indent=2 if args.pretty else None), flush=True)
    return 0


def add_simulate_command(sub: Subparsers[argparse.ArgumentParser]) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sim = sub.add_parser(
        "simulate",
        help="N virtual devices on the real protocol (load tests, demos)",
        formatter_class=fmt,
    )
    sim.add_argument("--devices", type=argtypes.int_between(1, 100_000), required=True)
    sim.add_argument("--broker", required=True, help="mqtt[s]://host:port, or a comma list")
    sim.add_argument("--prefix", default=DEFAULT_PREFIX)
    sim.add_argument("--id-prefix", default="sim-", help="device ids: PREFIX00000, ...")
    sim.add_argument("--groups", default="sim", help="comma-separated groups of every device")
    sim.add_argument(
        "--rate",
        type=argtypes.positive_float,
        default=0.2,
        help="prediction messages per second per device",
    )
    sim.add_argument("--results-per-message", type=argtypes.int_between(1, 1000), default=1)
    sim.add_argument(
        "--metrics-interval",
        type=argtypes.positive_float,
        default=60.0,
        help="seconds between a device's metrics",
    )
    sim.add_argument(
        "--download-share",
        type=argtypes.rate,
        default=0.0,
        help="share of devices that really download and check a release",
    )
    sim.add_argument(
        "--fail-share",
        type=argtypes.rate,
        default=0.0,
        help="share of devices whose rollouts end failed (preflight)",
    )
    sim.add_argument(
        "--rollout-step",
        type=argtypes.positive_float,
        default=1.0,
        help="seconds per simulated rollout state",
    )
    sim.add_argument(
        "--connect-rate",
        type=argtypes.positive_float,
        default=500.0,
        help="new connections per second",
    )
    sim.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    sim.add_argument("--duration", type=argtypes.positive_float, help="seconds (default: Ctrl-C)")
    sim.add_argument(
        "--report-every",
        type=argtypes.positive_float,
        default=10.0,
        help="seconds between progress lines on stderr",
    )
    sim.add_argument(
        "--ack-from",
        type=argtypes.non_negative_float,
        default=0.0,
        help="count ack latencies from this many seconds after the start (skip the warm-up)",
    )
    sim.add_argument("--seed", type=argtypes.int_between(0), default=0)
    add_login_arguments(sim, who="the simulated devices'")
    sim.add_argument("--pretty", action="store_true", help="indent the final JSON summary")
    sim.set_defaults(func=cmd_simulate)
