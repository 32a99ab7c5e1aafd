"""Release keys and rollouts: `edgefleet keys generate`, `edgefleet rollout publish|status|clear`.

Targets: ``device:ID``, ``group:NAME`` (the retained desired state of the group, which every
member, also one that joins later, picks up), or ``fleet`` (every device known from its retained
status, each given a device-level desired state). ``--waves`` takes ``group:NAME`` or ``fleet``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgefleet.cli.args as argtypes
from edgefleet.cli.login import add_login_arguments, login_from
from edgefleet.errors import UserError
from edgefleet.protocol import DEFAULT_PREFIX, KIND_PATTERN, Rollout

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from edgefleet.operator import Broker
    from edgefleet.protocol import Manifest, ShadowSpec

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
BROKER_ENV = "EDGEFLEET_BROKER"
Subparsers = argparse._SubParsersAction


# -- keys ------------------------------------------------------------------------------------
def cmd_keys_generate(args: argparse.Namespace) -> int:
    from edgefleet.rollout.release import generate_keys

    private, public = generate_keys(Path(args.out), args.key_id, overwrite=args.force)
    print(f"private key: {private} (mode 0600; keep it off the devices)")
    print(f"public key:  {public} (list it under rollout.trusted_keys.{args.key_id})")
    return 0


# -- the operator's connection ----------------------------------------------------------------
def _operator(args: argparse.Namespace) -> Broker:
    from edgefleet.operator import Broker

    url = args.broker
    if url is None:
        from_env = os.environ.get(BROKER_ENV)
        url = from_env or DEFAULT_BROKER
        origin = f"${BROKER_ENV}" if from_env else f"the default; --broker or ${BROKER_ENV} sets it"
        print(f"broker: {url} ({origin})", file=sys.stderr)
    login = login_from(args)
    return Broker(url, login.username, login.password, login.ca)


# -- publish ----------------------------------------------------------------------------------
def _models(args: argparse.Namespace) -> dict[str, Path]:
    models = {"cpu": Path(args.model)}
    for item in args.variant or []:
        kind, _, path = item.partition("=")
        if not re.match(KIND_PATTERN, kind) or not path:
            raise UserError(f"--variant {item!r}: use KIND=FILE (cpu, edgetpu, gpu, ..., any)")
        models[kind] = Path(path)
    return models


def cmd_rollout_publish(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from edgefleet.operator import build_release, check_unpublished, publish_release

    manifest, blobs = build_release(
        _models(args),
        args.name,
        args.version,
        Path(args.key),
        _key_id(args),
        args.expires_in * 3600,
        chunk_size=args.chunk_size,
        rollback=args.rollback,
        expected_top1=args.expected_top1,
        shadow=_shadow_spec(args),
    )
    if manifest.shadow is not None:
        # Devices finish their shadow phase before a wave or a wait may end.
        margin = manifest.shadow.max_duration_s + 600
        args.wait_timeout = max(args.wait_timeout, margin)
        args.wave_timeout = max(args.wave_timeout, margin)
    console = Console(stderr=True)
    broker = _operator(args)
    try:
        check_unpublished(broker, manifest, args.prefix)
        if args.waves:
            return _publish_waves(args, broker, manifest, blobs, console)
        direct = [t for t in args.target if t != "fleet"]
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("chunks", total=1)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            publish_release(broker, manifest, blobs, direct, args.prefix, advance)
        devices = _fan_out(broker, manifest, args)
        print(
            f"rollout {manifest.rollout_id}: {manifest.name} v{manifest.version} -> "
            f"{', '.join(args.target)}"
        )
        if args.no_wait:
            return 0
        states = _watch(broker, manifest, devices, args, console)
    finally:
        broker.close()
    return _summary(states, devices, console)


# The ShadowSpec field each shadow option sets, for errors in the user's words.
SHADOW_FLAGS = {
    "samples": "--shadow",
    "interval_s": "--shadow-interval",
    "max_duration_s": "--shadow-max-duration",
    "min_agreement": "--min-agreement",
    "max_latency_ratio": "--max-latency-ratio",
    "max_errors": "--max-errors",
}


def _shadow_spec(args: argparse.Namespace) -> ShadowSpec | None:
    from pydantic import ValidationError

    from edgefleet.protocol import ShadowSpec

    if args.shadow is None:
        if args.manual or args.min_agreement is not None or args.max_latency_ratio is not None:
            raise UserError("--manual, --min-agreement and --max-latency-ratio need --shadow N")
        return None
    try:
        return ShadowSpec(
            samples=args.shadow,
            interval_s=args.shadow_interval,
            max_duration_s=args.shadow_max_duration,
            mode="manual" if args.manual else "auto",
            min_agreement=args.min_agreement,
            max_latency_ratio=args.max_latency_ratio,
            max_errors=args.max_errors,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = SHADOW_FLAGS.get(str(first["loc"][0]), str(first["loc"][0]))
        raise UserError(f"{flag}: {first['msg']}") from None


def cmd_rollout_decide(args: argparse.Namespace) -> int:
    from edgefleet.operator import publish_decision

    broker = _operator(args)
    try:
        publish_decision(
            broker,
            args.rollout_id,
            args.action,
            args.target,
            Path(args.key),
            _key_id(args),
            args.prefix,
        )
    finally:
        broker.close()
    print(f"{args.action} of rollout {args.rollout_id} published to {', '.join(args.target)}")
    return 0


def _fan_out(broker: Broker, manifest: Manifest, args: argparse.Namespace) -> list[str]:
    """The devices to watch; ``fleet`` also gives each known device its desired state."""
    from edgefleet.operator import desired_topic, target_devices

    devices = target_devices(broker, args.target, args.prefix)
    if "fleet" in args.target:
        body = manifest.wire()
        for device in devices:
            broker.publish(desired_topic(args.prefix, f"device:{device}"), body)
    return devices


def _watch(
    broker: Broker,
    manifest: Manifest,
    devices: list[str],
    args: argparse.Namespace,
    console: Console,
) -> dict[str, dict[str, Any]]:
    from rich.live import Live

    from edgefleet.operator import watch_devices

    if not devices:
        console.print("no target device is known yet (from its status); not waiting")
        return {}
    with Live(console=console, transient=True, refresh_per_second=4) as live:

        def show(states: dict[str, dict[str, Any]]) -> None:
            live.update(_progress_table(devices, states))

        return watch_devices(broker, manifest, devices, args.prefix, args.wait_timeout, show)


def _progress_table(devices: list[str], states: dict[str, dict[str, Any]]) -> RenderableType:
    from rich.table import Table

    counts: dict[str, int] = {}
    for device in devices:
        name = str(states.get(device, {}).get("state", "waiting"))
        counts[name] = counts.get(name, 0) + 1
    table = Table(title=", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for column in ("device", "state", "progress"):
        table.add_column(column)
    from edgefleet.operator import shadow_text

    for device in devices[:40]:
        state = states.get(device, {})
        progress = state.get("progress")
        shown = shadow_text(state) or (f"{progress}%" if progress else "")
        table.add_row(device, str(state.get("state", "waiting")), shown)
    return table


def _summary(states: dict[str, dict[str, Any]], devices: list[str], console: Console) -> int:
    from rich.table import Table

    if not devices:
        return 0
    table = Table(title="rollout outcome")
    for column in ("device", "state", "reason"):
        table.add_column(column)
    bad = 0
    for device in devices:
        state = states.get(device, {})
        name = str(state.get("state", "no answer"))
        bad += name != Rollout.ACTIVE
        table.add_row(device, name, str(state.get("reason", "")))
    console.print(table)
    console.print(f"{len(devices) - bad}/{len(devices)} active")
    return 1 if bad else 0


def _publish_waves(
    args: argparse.Namespace,
    broker: Broker,
    manifest: Manifest,
    blobs: dict[str, bytes],
    console: Console,
) -> int:
    from rich.live import Live

    from edgefleet.operator import run_waves

    group = None
    for target in args.target:
        kind, _, name = target.partition(":")
        if kind == "group":
            group = name
        elif target != "fleet":
            raise UserError("--waves takes --target group:NAME or --target fleet")
    with Live(console=console, transient=True, refresh_per_second=4) as live:

        def show(states: dict[str, dict[str, Any]]) -> None:
            live.update(_progress_table(sorted(states), states))

        ok = run_waves(
            broker,
            manifest,
            blobs,
            group,
            args.waves,
            args.max_failure_rate,
            args.prefix,
            args.wave_timeout,
            report=print,
            on_update=show,
        )
    return 0 if ok else 1


# -- status and clear -------------------------------------------------------------------------
def _status_table(rows: list[dict[str, Any]]) -> RenderableType:
    from rich.table import Table

    table = Table(title=f"fleet: {len(rows)} devices")
    columns = [
        "device",
        "presence",
        "active",
        "desired",
        "state",
        "progress",
        "sent",
        "reason",
        "age",
    ]
    for column in columns:
        table.add_column(column)
    for row in rows:
        age = row["age_s"]
        progress = row["progress"]
        table.add_row(
            row["device"],
            row["presence"],
            row["active"],
            row["desired"],
            row["state"],
            progress if isinstance(progress, str) else f"{progress}%",
            row["sent"],
            row["reason"],
            f"{age:.0f} s" if age is not None else "",
        )
    return table


def cmd_rollout_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from edgefleet.operator import fleet_view

    broker = _operator(args)
    console = Console()
    try:
        if not args.watch:
            console.print(_status_table(fleet_view(broker, args.prefix)))
            return 0
        with Live(console=console, refresh_per_second=1) as live:
            while True:
                live.update(_status_table(fleet_view(broker, args.prefix, 0.5)))
                time.sleep(args.interval)
    finally:
        broker.close()


def cmd_rollout_clear(args: argparse.Namespace) -> int:
    from edgefleet.operator import clear_release

    broker = _operator(args)
    try:
        chunks, desired = clear_release(broker, args.name, args.version, args.prefix)
    finally:
        broker.close()
    print(
        f"cleared {chunks} retained chunks of {args.name} v{args.version} "
        f"and {desired} desired states naming it"
    )
    return 0


# -- the parser -------------------------------------------------------------------------------
def add_rollout_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    keys = sub.add_parser("keys", help="release signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", help="an Ed25519 key pair", formatter_class=fmt)
    gen.add_argument("--out", default=".", help="folder for KEY_ID.key and KEY_ID.pub")
    gen.add_argument("--key-id", type=argtypes.name, default="release", help="the key's name")
    gen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    gen.set_defaults(func=cmd_keys_generate)

    rollout = sub.add_parser(
        "rollout", help="publish and watch model rollouts", description=__doc__
    )
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--broker",
        help=f"mqtt[s]://host:port, or a comma list of a cluster's brokers "
        f"(default: ${BROKER_ENV}, else {DEFAULT_BROKER})",
    )
    common.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix")
    add_login_arguments(common, who="the operator's")
    pub = rsub.add_parser(
        "publish", parents=[common], help="chunk, sign, publish and watch", formatter_class=fmt
    )
    pub.add_argument("model", help="the .tflite file (the cpu variant)")
    pub.add_argument("--name", required=True, type=argtypes.name, help="release name")
    pub.add_argument(
        "--version", required=True, type=argtypes.version, help="release version (>= 1)"
    )
    _add_target_argument(pub, "device:ID, group:NAME or fleet (repeatable)")
    _add_key_arguments(pub)
    pub.add_argument("--variant", action="append", help="KIND=FILE, e.g. edgetpu=m_edgetpu.tflite")
    pub.add_argument(
        "--expires-in", type=argtypes.positive_float, default=24 * 7, help="validity in hours"
    )
    pub.add_argument(
        "--chunk-size",
        type=argtypes.chunk_size,
        help="fixed chunks of this many bytes, for agents before content-defined chunks "
        "(default: content-defined, shared between releases; docs/rollouts.md)",
    )
    pub.add_argument("--rollback", action="store_true", help="allow a lower version")
    pub.add_argument("--expected-top1", help="label the probe image must give (self-test)")
    pub.add_argument("--no-wait", action="store_true", help="return once published")
    pub.add_argument(
        "--wait-timeout",
        type=argtypes.positive_float,
        default=600.0,
        help="seconds to wait for devices",
    )
    pub.add_argument("--waves", type=argtypes.waves, help="rising percentages, e.g. 10,50,100")
    pub.add_argument(
        "--max-failure-rate",
        type=argtypes.rate,
        default=0.05,
        help="a wave above this halts the rollout",
    )
    pub.add_argument(
        "--wave-timeout", type=argtypes.positive_float, default=600.0, help="s per wave"
    )
    _add_shadow_arguments(pub)
    pub.set_defaults(func=cmd_rollout_publish)
    _add_decision_commands(rsub, common)
    status = rsub.add_parser(
        "status", parents=[common], help="the fleet: desired vs active", formatter_class=fmt
    )
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument("--interval", type=argtypes.positive_float, default=2.0, help="seconds")
    status.set_defaults(func=cmd_rollout_status)
    clear = rsub.add_parser(
        "clear", parents=[common], help="remove a release and its desired states"
    )
    clear.add_argument("name", type=argtypes.name)
    clear.add_argument("version", type=argtypes.version)
    clear.set_defaults(func=cmd_rollout_clear)


def _add_key_arguments(parser: argparse.ArgumentParser) -> None:
    """The release key that signs (a release, an operator decision)."""
    parser.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    parser.add_argument("--key-id", help="the key id devices trust (default: the key file's name)")


def _key_id(args: argparse.Namespace) -> str:
    return str(args.key_id or Path(args.key).stem)


def _add_shadow_arguments(pub: argparse.ArgumentParser) -> None:
    shadow = pub.add_argument_group("shadow phase (docs/protocol.md#shadow-phases)")
    shadow.add_argument(
        "--shadow",
        type=argtypes.int_between(1, 100_000),
        metavar="N",
        help="compare the candidate with the active model on N sampled frames first",
    )
    shadow.add_argument(
        "--shadow-interval", type=argtypes.positive_float, default=2.0, help="s between samples"
    )
    shadow.add_argument(
        "--shadow-max-duration",
        type=argtypes.positive_float,
        default=3600.0,
        help="decide after this many seconds at the latest",
    )
    shadow.add_argument("--min-agreement", type=argtypes.rate, help="top-1 agreement, 0..1")
    shadow.add_argument(
        "--max-latency-ratio", type=argtypes.positive_float, help="candidate p50 / active p50"
    )
    shadow.add_argument(
        "--max-errors", type=argtypes.int_between(0), default=0, help="candidate failures"
    )
    shadow.add_argument(
        "--manual", action="store_true", help="wait for `rollout promote|reject` instead of rules"
    )


def _add_target_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The devices a signed message is for: publish and decide check targets alike."""
    parser.add_argument(
        "--target", required=True, action="append", type=argtypes.target, help=help_text
    )


def _add_decision_commands(
    rsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    for action in ("promote", "reject"):
        decide = rsub.add_parser(
            action,
            parents=[common],
            help=f"{action} a candidate in its shadow phase (signed, like a release)",
        )
        decide.add_argument("rollout_id", help="the rollout id `rollout publish` printed")
        _add_target_argument(decide, "device:ID or group:NAME (repeatable)")
        _add_key_arguments(decide)
        decide.set_defaults(func=cmd_rollout_decide, action=action)
