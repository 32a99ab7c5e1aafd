"""Fleet commands: the collector, broker enrolment, release keys, rollouts."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.errors import UserError
from edgefleet.protocol import DEFAULT_PREFIX, KIND_PATTERN

if TYPE_CHECKING:
    from edgefleet.fleet.publish import Broker
    from edgefleet.protocol import Manifest


def cmd_collect(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edgefleet.fleet.collector import Collector, CollectorSettings

    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
    settings = CollectorSettings(
        broker=args.broker,
        db=args.db,
        prefix=args.prefix,
        protocol=args.protocol,
        share_group=args.share_group or None,
        username=args.username,
        password=password,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
    )

    def echo(kind: str, device: str, body: dict[str, Any]) -> None:
        if kind == "predictions":
            for result in body.get("results", []):
                top = result.get("top") or [{}]
                print(
                    f"{device} #{result.get('seq')} {top[0].get('label')} "
                    f"{top[0].get('score', 0):.2f}",
                    flush=True,
                )

    collector = Collector(settings, echo=echo if args.print else None)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    collector.start()
    done.wait()
    collector.stop()
    return 0


def cmd_add_device(args: argparse.Namespace) -> int:
    from edgefleet.fleet.brokeradmin import add_device

    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
    groups = [g for g in (args.groups or "").split(",") if g]
    written = add_device(
        args.device,
        Path(args.acl),
        groups,
        prefix=args.prefix,
        passwd=Path(args.passwd) if args.passwd else None,
        password=password,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        out=args.out,
    )
    for key, value in written.items():
        print(f"{key}: {value}")
    if "password" in written:
        print("store the password on the device as its mqtt-password credential")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from edgefleet.rollout.release import generate_keys

    private, public = generate_keys(Path(args.out), args.key_id)
    print(f"private key: {private} (keep it off the devices)")
    print(f"public key:  {public} (list it under rollout.trusted_keys.{args.key_id})")
    return 0


def _operator(args: argparse.Namespace) -> Broker:
    from edgefleet.fleet.publish import Broker

    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
    return Broker(args.broker, args.username, password, args.ca)


def cmd_rollout_publish(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from edgefleet.fleet.publish import build_release, publish_release

    models = {"cpu": Path(args.model)}
    for item in args.variant or []:
        kind, _, path = item.partition("=")
        if not re.match(KIND_PATTERN, kind) or not path:
            raise UserError(f"--variant {item!r}: use KIND=FILE (cpu, edgetpu, gpu, ..., any)")
        models[kind] = Path(path)
    manifest, blobs = build_release(
        models,
        args.name,
        args.version,
        Path(args.key),
        args.key_id or Path(args.key).stem,
        args.expires_in * 3600,
        chunk_size=args.chunk_size,
        rollback=args.rollback,
        expected_top1=args.expected_top1,
    )
    broker = _operator(args)
    if args.waves:
        return _publish_waves(args, broker, manifest, blobs)
    try:
        with Progress() as progress:
            task = progress.add_task("chunks", total=1)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            publish_release(broker, manifest, blobs, args.target, args.prefix, advance)
    finally:
        broker.close()
    print(
        f"rollout {manifest.rollout_id}: {manifest.name} v{manifest.version} -> "
        f"{', '.join(args.target)}"
    )
    return 0


def _publish_waves(
    args: argparse.Namespace, broker: Broker, manifest: Manifest, blobs: dict[str, bytes]
) -> int:
    from edgefleet.fleet.publish import run_waves

    try:
        group = None
        for target in args.target:
            kind, _, name = target.partition(":")
            if kind == "group":
                group = name
            elif target != "fleet":
                raise UserError("--waves takes --target group:NAME or --target fleet")
        waves = [float(x) for x in args.waves.split(",")]
        ok = run_waves(
            broker,
            manifest,
            blobs,
            group,
            waves,
            args.max_failure_rate,
            args.prefix,
            args.wave_timeout,
        )
    finally:
        broker.close()
    return 0 if ok else 1


def cmd_rollout_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgefleet.fleet.publish import rollout_states

    broker = _operator(args)
    try:
        states = rollout_states(broker, args.prefix)
    finally:
        broker.close()
    table = Table(title="rollouts")
    for column in ("device", "state", "model", "version", "progress", "reason"):
        table.add_column(column)
    for device, state in sorted(states.items()):
        table.add_row(
            device,
            str(state.get("state")),
            str(state.get("name", "")),
            str(state.get("version", "")),
            str(state.get("progress", "")),
            str(state.get("reason", "")),
        )
    Console().print(table)
    return 0


def cmd_rollout_clear(args: argparse.Namespace) -> int:
    from edgefleet.fleet.publish import clear_release

    broker = _operator(args)
    try:
        count = clear_release(broker, args.name, args.version, args.prefix)
    finally:
        broker.close()
    print(f"cleared {count} retained chunks of {args.name} v{args.version}")
    return 0


def add_rollout_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="release signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", help="an Ed25519 key pair")
    gen.add_argument("--out", default=".", help="folder for KEY_ID.key and KEY_ID.pub")
    gen.add_argument("--key-id", default="release")
    gen.set_defaults(func=cmd_keys_generate)

    rollout = sub.add_parser("rollout", help="publish and watch model rollouts")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    common.add_argument("--prefix", default=DEFAULT_PREFIX)
    common.add_argument("--username")
    common.add_argument("--password-file")
    common.add_argument("--ca", type=Path)
    pub = rsub.add_parser("publish", parents=[common], help="chunk, sign and publish a model")
    pub.add_argument("model")
    pub.add_argument("--name", required=True)
    pub.add_argument("--version", required=True, type=int)
    pub.add_argument(
        "--target", required=True, action="append", help="device:ID or group:NAME (repeatable)"
    )
    pub.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    pub.add_argument("--key-id", help="default: the key file's name")
    pub.add_argument("--variant", action="append", help="KIND=FILE, e.g. edgetpu=m_edgetpu.tflite")
    pub.add_argument("--expires-in", type=float, default=24 * 7, help="hours (default 168)")
    pub.add_argument("--chunk-size", type=int, default=128 * 1024)
    pub.add_argument("--rollback", action="store_true", help="allow a lower version")
    pub.add_argument("--expected-top1", help="label the probe image must give (self-test)")
    pub.add_argument("--waves", help="percentages, e.g. 10,50,100 (devices from status topics)")
    pub.add_argument("--max-failure-rate", type=float, default=0.05)
    pub.add_argument("--wave-timeout", type=float, default=600.0, help="seconds per wave")
    pub.set_defaults(func=cmd_rollout_publish)
    status = rsub.add_parser("status", parents=[common], help="per-device rollout state")
    status.set_defaults(func=cmd_rollout_status)
    clear = rsub.add_parser("clear", parents=[common], help="remove a release's chunks")
    clear.add_argument("name")
    clear.add_argument("version", type=int)
    clear.set_defaults(func=cmd_rollout_clear)


def add_fleet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    collect = sub.add_parser("collect", help="store the fleet's reports in a database, ack them")
    collect.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://...")
    collect.add_argument(
        "--db",
        default="sqlite:///edgefleet-collector.db",
        help="sqlite:///PATH or postgresql://user@host/db",
    )
    collect.add_argument("--prefix", default=DEFAULT_PREFIX)
    collect.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    collect.add_argument(
        "--share-group",
        default="edgefleet-collectors",
        help="MQTT 5 shared-subscription group ('' to disable)",
    )
    collect.add_argument("--username")
    collect.add_argument("--password-file")
    collect.add_argument("--ca", type=Path)
    collect.add_argument("--cert", type=Path)
    collect.add_argument("--key", type=Path)
    collect.add_argument("--print", action="store_true", help="print predictions as they come")
    collect.set_defaults(func=cmd_collect)

    broker = sub.add_parser("broker", help="broker administration")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    add = broker_sub.add_parser("add-device", help="password or client certificate + ACL")
    add.add_argument("device")
    add.add_argument("--acl", required=True, help="the mosquitto ACL file to extend")
    add.add_argument("--groups", help="comma-separated groups the device belongs to")
    add.add_argument("--prefix", default=DEFAULT_PREFIX)
    add.add_argument("--passwd", help="mosquitto password file (password mode)")
    add.add_argument("--password-file", help="read the password here (default: generate)")
    add.add_argument("--ca-cert", type=Path, help="fleet CA certificate (mTLS mode)")
    add.add_argument("--ca-key", type=Path, help="fleet CA private key (mTLS mode)")
    add.add_argument("--out", type=Path, help="where to write the device's certificate and key")
    add.set_defaults(func=cmd_add_device)
