"""The ``edgefleet`` command line.

User errors (bad config, missing model, unusable input) print one line per problem and
exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgefleet import __version__, logs
from edgefleet.cli import device, fleet, models, rollout, samples, simulate, top
from edgefleet.cli.args import int_between, positive_float
from edgefleet.cli.device import DEFAULT_CONFIG
from edgefleet.errors import ConfigError, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet", description="Edge vision agent for fleets of Pi and Coral devices."
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent (the daemon)")
    run.add_argument(
        "-c", "--config", help=f"config file (default $EDGEFLEET_CONFIG or {DEFAULT_CONFIG})"
    )
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.set_defaults(func=device.cmd_run)

    check = sub.add_parser("check-config", help="validate a config file (exit 0 when valid)")
    check.add_argument("file")
    check.add_argument(
        "--credentials", help="resolve !credential NAME in this folder (the service's one)"
    )
    check.set_defaults(func=device.cmd_check_config)

    reload = sub.add_parser(
        "reload", help="make a running agent re-read its config; return once it applied it"
    )
    reload.add_argument("--pid", type=int_between(1), required=True, help="the agent's pid")
    reload.add_argument("--state-dir", required=True, help="the agent's state_dir")
    reload.add_argument("--timeout", type=positive_float, default=30.0, help="seconds")
    reload.set_defaults(func=device.cmd_reload)

    plugins = sub.add_parser("plugins", help="list plugins, what they provide, load failures")
    plugins.add_argument("-c", "--config", help="apply this config's block list")
    plugins.set_defaults(func=device.cmd_plugins)

    classify = sub.add_parser("classify", help="classify images, folders or videos (JSON lines)")
    classify.add_argument("inputs", nargs="+", metavar="INPUT")
    classify.add_argument("--model", help="model file (default: the factory model)")
    classify.add_argument("--labels", type=Path, help="labels file overriding embedded labels")
    classify.add_argument("--top-k", type=int_between(1, 100), default=5, help="1..100")
    classify.add_argument("--threads", type=int_between(1, 256), default=None)
    classify.add_argument("--every", type=int_between(1), default=1, help="video: every Nth frame")
    classify.add_argument(
        "--max-pixels",
        type=int_between(1),
        default=None,
        help="refuse images with more pixels than this, read from their header (default 50000000)",
    )
    classify.set_defaults(func=device.cmd_classify)

    bench = sub.add_parser("bench", help="measure every delegate candidate on a model")
    bench.add_argument("model", nargs="?", help="model file (default: the factory model)")
    bench.add_argument("--budget", type=positive_float, default=5.0, help="total seconds of timing")
    bench.add_argument("--candidates", help='JSON list, e.g. [{"type":"cpu","threads":1}]')
    bench.set_defaults(func=device.cmd_bench)

    demo = sub.add_parser("demo", help="classify the bundled sample photos live")
    demo.add_argument("--duration", type=float, default=None, help="seconds (default: Ctrl-C)")
    demo.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="where the fleet page listens (default: 127.0.0.1 on a free port)",
    )
    demo.set_defaults(func=device.cmd_demo)

    fleet.add_fleet_commands(sub)
    rollout.add_rollout_commands(sub)
    top.add_top_command(sub)
    models.add_models_commands(sub)
    samples.add_samples_commands(sub)
    simulate.add_simulate_command(sub)

    schema = sub.add_parser("schema", help="print the config JSON schema")
    schema.add_argument("--out", help="write to this file")
    schema.set_defaults(func=device.cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Until `run` reads its config, log to stderr: stdout carries results.
    logs.configure("info" if args.command in ("run", "demo") else "warning")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
